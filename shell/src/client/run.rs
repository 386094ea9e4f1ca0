//! `turbine run MODEL [PROMPT]`: a one-shot prompt (arguments and/or piped stdin) answered by
//! a streamed `/api/chat`, or, on a terminal, an interactive chat as Ollama's: `/bye`,
//! `/set parameter NAME VALUE`, `/clear`, `/?` and `"""` multi-line input.

use serde_json::{json, Map, Value};
use std::io::{BufRead, IsTerminal, Read, Write};

use super::Target;

pub struct RunArgs {
    pub model: String,
    pub prompt: Vec<String>,
    pub keep_alive: Option<String>,
    pub verbose: bool,
    /// `think` for the requests: "true", "false" or a level; None leaves it unset.
    pub think: Option<String>,
    /// Leave a thinking model's reasoning out of the output.
    pub hide_thinking: bool,
    /// `format` for the requests: "json", or a JSON schema's text.
    pub format: Option<String>,
    /// Run the interactive chat even when stdin is not a terminal (for scripts and tests).
    pub interactive: bool,
}

pub fn run(t: &Target, args: RunArgs) -> Result<(), String> {
    let stdin = std::io::stdin();
    let piped = !stdin.is_terminal();
    if args.interactive || (!piped && args.prompt.is_empty()) {
        return interactive(t, &args, &mut stdin.lock());
    }
    let mut parts = Vec::new();
    if piped {
        let mut s = String::new();
        stdin.lock().read_to_string(&mut s).map_err(|e| format!("reading stdin: {e}"))?;
        parts.push(s);
    }
    parts.extend(args.prompt.iter().cloned());
    let prompt = parts.join(" ");
    let mut chat = Chat::new(&args);
    chat.send(t, prompt)?;
    Ok(())
}

struct Chat<'a> {
    args: &'a RunArgs,
    messages: Vec<Value>,
    options: Map<String, Value>,
}

impl<'a> Chat<'a> {
    fn new(args: &'a RunArgs) -> Chat<'a> {
        Chat { args, messages: Vec::new(), options: Map::new() }
    }

    fn request(&self, messages: &[Value]) -> Value {
        let mut body = json!({ "model": self.args.model, "messages": messages, "stream": true });
        if !self.options.is_empty() {
            body["options"] = Value::Object(self.options.clone());
        }
        if let Some(k) = &self.args.keep_alive {
            body["keep_alive"] = Value::String(k.clone());
        }
        match self.args.think.as_deref() {
            None => {}
            Some("true") => body["think"] = json!(true),
            Some("false") => body["think"] = json!(false),
            Some(level) => body["think"] = json!(level),
        }
        if let Some(f) = &self.args.format {
            // A schema goes as the object it is; anything else as the string (the server
            // says what is wrong with it).
            body["format"] = serde_json::from_str::<Value>(f).ok().filter(Value::is_object).unwrap_or(json!(f));
        }
        body
    }

    /// Sends one user turn, streams the answer to stdout, and keeps both in the history.
    fn send(&mut self, t: &Target, prompt: String) -> Result<(), String> {
        self.messages.push(json!({ "role": "user", "content": prompt }));
        let body = self.request(&self.messages);
        let mut answer = String::new();
        let mut last = Value::Null;
        let mut out = std::io::stdout().lock();
        // A thinking model's reasoning comes first, framed as Ollama's CLI frames it.
        let mut thinking = false;
        let hide = self.args.hide_thinking;
        let result = t.stream("/api/chat", &body, |v| {
            let mut write =
                |s: &str| out.write_all(s.as_bytes()).and_then(|_| out.flush()).map_err(|e| format!("stdout: {e}"));
            if let Some(text) = v["message"]["thinking"].as_str().filter(|t| !hide && !t.is_empty()) {
                if !thinking {
                    write("Thinking...\n")?;
                    thinking = true;
                }
                write(text)?;
            }
            if let Some(text) = v["message"]["content"].as_str().filter(|t| !t.is_empty()) {
                if std::mem::take(&mut thinking) {
                    write("\n...done thinking.\n\n")?;
                }
                answer.push_str(text);
                write(text)?;
            }
            if v["done"] == json!(true) {
                last = v.clone();
            }
            Ok(())
        });
        let _ = writeln!(out);
        drop(out);
        if let Err(e) = result {
            self.messages.pop();
            return Err(e);
        }
        if self.args.verbose {
            print_stats(&last);
        }
        self.messages.push(json!({ "role": "assistant", "content": answer }));
        Ok(())
    }
}

fn print_stats(v: &Value) {
    let ns = |k: &str| v[k].as_u64().unwrap_or(0) as f64 / 1e9;
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    let rate = |count: u64, secs: f64| if secs > 0.0 { count as f64 / secs } else { 0.0 };
    eprintln!("total duration:       {:.3}s", ns("total_duration"));
    eprintln!("load duration:        {:.3}s", ns("load_duration"));
    eprintln!("prompt eval count:    {} token(s)", n("prompt_eval_count"));
    eprintln!("prompt eval duration: {:.3}s", ns("prompt_eval_duration"));
    eprintln!("prompt eval rate:     {:.2} tokens/s", rate(n("prompt_eval_count"), ns("prompt_eval_duration")));
    eprintln!("eval count:           {} token(s)", n("eval_count"));
    eprintln!("eval duration:        {:.3}s", ns("eval_duration"));
    eprintln!("eval rate:            {:.2} tokens/s", rate(n("eval_count"), ns("eval_duration")));
}

const HELP: &str = "Available Commands:
  /set parameter NAME VALUE   Set a parameter (temperature, num_predict, stop, ...)
  /clear                      Clear the session context
  /bye                        Exit
  /?, /help                   Help for a command

Use \"\"\" to begin a multi-line message.
";

/// What a `/set parameter` value means: an integer, a float, a boolean, else a string.
fn parse_value(s: &str) -> Value {
    if let Ok(i) = s.parse::<i64>() {
        return json!(i);
    }
    if let Ok(f) = s.parse::<f64>() {
        if f.is_finite() {
            return json!(f);
        }
    }
    match s {
        "true" => json!(true),
        "false" => json!(false),
        _ => json!(s),
    }
}

/// Reads one message: a line, or `"""`-delimited lines. None at end of input.
fn read_message(input: &mut dyn BufRead, prompt_shown: bool) -> Result<Option<String>, String> {
    let mut line = String::new();
    let show = |p: &str| {
        if prompt_shown {
            print!("{p}");
            let _ = std::io::stdout().flush();
        }
    };
    show(">>> ");
    if input.read_line(&mut line).map_err(|e| format!("reading input: {e}"))? == 0 {
        return Ok(None);
    }
    let first = line.trim_end_matches(['\r', '\n']);
    let Some(rest) = first.trim_start().strip_prefix("\"\"\"") else {
        return Ok(Some(first.to_string()));
    };
    if let Some(body) = rest.strip_suffix("\"\"\"") {
        return Ok(Some(body.to_string()));
    }
    let mut lines = vec![rest.to_string()];
    loop {
        show("... ");
        line.clear();
        if input.read_line(&mut line).map_err(|e| format!("reading input: {e}"))? == 0 {
            break;
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if let Some(end) = l.strip_suffix("\"\"\"") {
            lines.push(end.to_string());
            break;
        }
        lines.push(l.to_string());
    }
    Ok(Some(lines.join("\n").trim_start_matches('\n').to_string()))
}

fn interactive(t: &Target, args: &RunArgs, input: &mut dyn BufRead) -> Result<(), String> {
    let mut chat = Chat::new(args);
    // Load the model first, so that a missing model is reported before the first prompt.
    t.json(
        "POST",
        "/api/chat",
        Some(&{
            let mut b = chat.request(&[]);
            b["stream"] = json!(false);
            b
        }),
    )?;
    let tty = std::io::stdin().is_terminal();
    if tty {
        println!("Send a message (/? for help)");
    }
    if !args.prompt.is_empty() {
        chat.send(t, args.prompt.join(" "))?;
    }
    while let Some(msg) = read_message(input, tty)? {
        let trimmed = msg.trim();
        if trimmed.is_empty() {
            continue;
        }
        let words: Vec<&str> = trimmed.split_whitespace().collect();
        match words[0] {
            "/bye" | "/exit" => break,
            "/?" | "/help" => print!("{HELP}"),
            "/clear" => {
                chat.messages.clear();
                println!("Cleared session context");
            }
            "/set" => match words.get(1).copied() {
                Some("parameter") if words.len() >= 4 => {
                    let (name, raw) = (words[2], words[3..].join(" "));
                    let value = parse_value(&raw);
                    if name == "stop" {
                        let stops = chat.options.entry("stop").or_insert_with(|| json!([]));
                        if let Value::Array(a) = stops {
                            a.extend(words[3..].iter().map(|w| json!(w)));
                        }
                    } else {
                        chat.options.insert(name.to_string(), value);
                    }
                    println!("Set parameter '{name}' to '{raw}'");
                }
                Some("parameter") => println!("Usage: /set parameter NAME VALUE"),
                _ => println!("Unknown command '/set {}'. Type /? for help", words[1..].join(" ")),
            },
            w if w.starts_with('/') && !trimmed.contains(char::is_whitespace) => {
                println!("Unknown command '{w}'. Type /? for help")
            }
            _ => {
                chat.send(t, msg)?;
                if tty {
                    println!();
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_and_values() {
        let mut input: &[u8] = b"hello\n\"\"\"one\ntwo\nthree\"\"\"\n\"\"\"inline\"\"\"\n";
        assert_eq!(read_message(&mut input, false).unwrap().as_deref(), Some("hello"));
        assert_eq!(read_message(&mut input, false).unwrap().as_deref(), Some("one\ntwo\nthree"));
        assert_eq!(read_message(&mut input, false).unwrap().as_deref(), Some("inline"));
        assert_eq!(read_message(&mut input, false).unwrap(), None);
        assert_eq!(parse_value("42"), json!(42));
        assert_eq!(parse_value("0.5"), json!(0.5));
        assert_eq!(parse_value("true"), json!(true));
        assert_eq!(parse_value("<end>"), json!("<end>"));
    }
}
