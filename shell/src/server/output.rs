//! Splits a model's output into its reasoning (Ollama's `thinking`), its answer
//! (`content`) and its tool calls, as text streams out piece by piece.
//!
//! Two formats:
//! - `<think>…</think>` tags (Qwen3, DeepSeek-R1, DeepSeek-V3.1; the template may already
//!   have opened the tag at the end of the prompt), with tool calls written as
//!   `<tool_call>{"name": …, "arguments": {…}}</tool_call>` (Qwen, Hermes) when the
//!   request offers tools;
//! - gpt-oss's harmony channels: `<|channel|>analysis<|message|>…<|end|>` is reasoning, the
//!   `final` channel the answer, a message addressed `to=functions.NAME` a tool call whose
//!   body is its JSON arguments (ended by `<|call|>`); other `commentary` is answer text.
//!
//! A tag split across two pieces is held back until it is complete.

use serde_json::{json, Value};

/// How a model marks its reasoning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThinkFormat {
    Tags,
    Harmony,
}

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";
const TOOL_OPEN: &str = "<tool_call>";
const TOOL_CLOSE: &str = "</tool_call>";
const CHANNEL: &str = "<|channel|>";
const MESSAGE: &str = "<|message|>";
/// Harmony tokens that end a message or start the next one.
const HARMONY_ENDS: [&str; 4] = ["<|end|>", "<|return|>", "<|call|>", "<|start|>"];

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// Tags: before any output; a leading `<think>` opens the reasoning.
    Start,
    Thinking,
    Answer,
    /// Inside a tool call: `<tool_call>` (no name yet), or a harmony message to a function.
    Call(Option<String>),
    /// Harmony: inside a message header (`assistant<|channel|>final`), until `<|message|>`.
    Header,
}

/// What a piece of output turned out to be.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Split {
    pub thinking: String,
    pub content: String,
    /// Ollama's shape: `{"function": {"name", "arguments": {…}}}`.
    pub calls: Vec<Value>,
}

pub struct OutputParser {
    format: ThinkFormat,
    /// Tags: whether `<tool_call>` blocks are parsed (the request offered tools).
    tool_tags: bool,
    state: State,
    /// Text not yet routed: a possible tag prefix, a header or a call being read.
    pending: String,
    /// Tags: the answer's leading whitespace after `</think>` is dropped.
    trim_answer: bool,
}

impl OutputParser {
    /// A parser for output that follows `prompt`: with tags, a prompt ending in an open
    /// `<think>` means the output starts inside the reasoning.
    pub fn new(format: ThinkFormat, tool_tags: bool, prompt: &str) -> OutputParser {
        let state = match format {
            ThinkFormat::Tags if prompt.trim_end().ends_with(OPEN) => State::Thinking,
            ThinkFormat::Tags => State::Start,
            // The prompt ends with `<|start|>assistant`: a header follows.
            ThinkFormat::Harmony => State::Header,
        };
        let trim_answer = state == State::Thinking;
        OutputParser { format, tool_tags, state, pending: String::new(), trim_answer }
    }

    /// Routes a piece of output.
    pub fn push(&mut self, piece: &str) -> Split {
        self.pending.push_str(piece);
        self.route(false)
    }

    /// Routes whatever is held back (the output has ended).
    pub fn finish(&mut self) -> Split {
        self.route(true)
    }

    fn route(&mut self, end: bool) -> Split {
        let mut out = Split::default();
        match self.format {
            ThinkFormat::Tags => self.route_tags(&mut out, end),
            ThinkFormat::Harmony => self.route_harmony(&mut out, end),
        }
        out
    }

    /// Moves pending text up to the first of `tags` into `sink`; returns the tag found
    /// (consumed), or None after keeping back what may begin one (nothing at the end).
    fn take_until(&mut self, tags: &[&'static str], end: bool, sink: &mut String) -> Option<&'static str> {
        let hit = tags.iter().filter_map(|t| self.pending.find(t).map(|i| (i, *t))).min();
        match hit {
            Some((i, tag)) => {
                sink.push_str(&self.pending[..i]);
                self.pending.drain(..i + tag.len());
                Some(tag)
            }
            None => {
                let keep = if end { 0 } else { partial_suffix(&self.pending, tags) };
                let cut = self.pending.len() - keep;
                sink.extend(self.pending.drain(..cut));
                None
            }
        }
    }

    fn route_tags(&mut self, out: &mut Split, end: bool) {
        loop {
            match self.state.clone() {
                State::Start => {
                    let rest = self.pending.trim_start();
                    if let Some(after) = rest.strip_prefix(OPEN) {
                        self.pending = after.to_string();
                        self.state = State::Thinking;
                        self.trim_answer = true;
                    } else if !end && (rest.is_empty() || OPEN.starts_with(rest)) {
                        return; // maybe the start of the tag
                    } else {
                        self.state = State::Answer;
                    }
                }
                State::Thinking => match self.take_until(&[CLOSE], end, &mut out.thinking) {
                    Some(_) => self.state = State::Answer,
                    None => return,
                },
                State::Answer | State::Header => {
                    let tags: &[&'static str] = if self.tool_tags { &[TOOL_OPEN] } else { &[] };
                    let mut text = String::new();
                    let found = self.take_until(tags, end, &mut text);
                    let text = if self.trim_answer { text.trim_start().to_string() } else { text };
                    self.trim_answer &= text.is_empty();
                    out.content.push_str(&text);
                    match found {
                        Some(_) => self.state = State::Call(None),
                        None => return,
                    }
                }
                State::Call(_) => {
                    let mut body = String::new();
                    match self.take_until(&[TOOL_CLOSE], end, &mut body) {
                        Some(_) => {
                            out.calls.push(tagged_call(&body));
                            self.state = State::Answer;
                            self.trim_answer = true;
                        }
                        None if end => return out.content.push_str(&format!("{TOOL_OPEN}{body}")),
                        None => {
                            // Not closed yet: read on from the start of the call.
                            self.pending.insert_str(0, &body);
                            return;
                        }
                    }
                }
            }
        }
    }

    fn route_harmony(&mut self, out: &mut Split, end: bool) {
        loop {
            match self.state.clone() {
                State::Header => match self.pending.find(MESSAGE) {
                    Some(i) => {
                        self.state = harmony_message(&self.pending[..i]);
                        self.pending.drain(..i + MESSAGE.len());
                    }
                    None => {
                        if end {
                            self.pending.clear(); // an unfinished header carries no text
                        }
                        return;
                    }
                },
                State::Call(name) => {
                    let mut body = String::new();
                    match self.take_until(&HARMONY_ENDS, end, &mut body) {
                        Some(_) => {
                            out.calls.push(call(name.unwrap_or_default(), body.trim()));
                            self.state = State::Header;
                        }
                        None if end => return out.calls.push(call(name.unwrap_or_default(), body.trim())),
                        None => {
                            self.pending.insert_str(0, &body);
                            return;
                        }
                    }
                }
                state => {
                    let sink = if state == State::Thinking { &mut out.thinking } else { &mut out.content };
                    let mut text = String::new();
                    let found = self.take_until(&HARMONY_ENDS, end, &mut text);
                    sink.push_str(&text);
                    match found {
                        // The message ends; a header (`<|start|>assistant<|channel|>…`) follows.
                        Some(_) => self.state = State::Header,
                        None => return,
                    }
                }
            }
        }
    }
}

/// What a harmony message header announces: reasoning (`analysis`), a call (a recipient
/// `to=functions.NAME`), or answer text.
fn harmony_message(header: &str) -> State {
    if let Some(at) = header.find("to=") {
        let recipient = header[at + 3..].split(|c: char| c.is_whitespace() || c == '<').next().unwrap_or("");
        let name = recipient.strip_prefix("functions.").unwrap_or(recipient);
        return State::Call(Some(name.to_string()));
    }
    let channel = header.find(CHANNEL).map_or("", |c| header[c + CHANNEL.len()..].trim());
    match channel.split_whitespace().next().unwrap_or("") {
        "analysis" => State::Thinking,
        _ => State::Answer,
    }
}

/// A call in Ollama's shape; arguments that are not a JSON object stay a string.
fn call(name: String, arguments: &str) -> Value {
    let arguments = match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ => Value::String(arguments.to_string()),
    };
    json!({ "function": { "name": name, "arguments": arguments } })
}

/// A `<tool_call>` body: `{"name": …, "arguments": {…}}`.
fn tagged_call(body: &str) -> Value {
    match serde_json::from_str::<Value>(body.trim()) {
        Ok(v) => {
            let name = v.get("name").and_then(Value::as_str).unwrap_or("").to_string();
            let args = v.get("arguments").cloned().unwrap_or(json!({}));
            let args = if let Value::String(s) = &args { serde_json::from_str(s).unwrap_or(args) } else { args };
            json!({ "function": { "name": name, "arguments": args } })
        }
        Err(_) => call(String::new(), body.trim()),
    }
}

/// Bytes at the end of `text` that could begin one of `tags` (held back for the next piece).
fn partial_suffix(text: &str, tags: &[&str]) -> usize {
    let longest = tags.iter().map(|t| t.len()).max().unwrap_or(0);
    (1..longest.min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && tags.iter().any(|t| t.starts_with(&text[text.len() - n..])))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` one by one and gathers everything.
    fn run(format: ThinkFormat, tools: bool, prompt: &str, pieces: &[&str]) -> Split {
        let mut p = OutputParser::new(format, tools, prompt);
        let mut parts: Vec<Split> = pieces.iter().map(|piece| p.push(piece)).collect();
        parts.push(p.finish());
        let mut all = Split::default();
        for part in parts {
            all.thinking += &part.thinking;
            all.content += &part.content;
            all.calls.extend(part.calls);
        }
        all
    }

    fn text(thinking: &str, content: &str) -> Split {
        Split { thinking: thinking.into(), content: content.into(), calls: vec![] }
    }

    #[test]
    fn tags_split_reasoning_from_the_answer_across_pieces() {
        let want = text("Let me see. 2+2=4.", "It is 4.");
        let pieces = ["<th", "ink>Let me see.", " 2+2=4.</", "think>", "\n\nIt is", " 4."];
        assert_eq!(run(ThinkFormat::Tags, false, "<|im_start|>assistant\n", &pieces), want);
        // The template opened the tag already (DeepSeek-R1, Qwen3 thinking).
        let pieces = ["Let me see. 2+2=4.", "</think>\n\n", "It is 4."];
        assert_eq!(run(ThinkFormat::Tags, false, "...<|Assistant|><think>\n", &pieces), want);
    }

    #[test]
    fn tags_without_reasoning_are_all_answer() {
        assert_eq!(run(ThinkFormat::Tags, false, "", &["Hello", " <b>there</b>"]), text("", "Hello <b>there</b>"));
        assert_eq!(run(ThinkFormat::Tags, false, "", &["<", "3 you"]), text("", "<3 you"));
        // An unclosed reasoning is all reasoning, its partial tag included.
        assert_eq!(run(ThinkFormat::Tags, false, "<think>", &["hmm </thi"]), text("hmm </thi", ""));
    }

    #[test]
    fn tool_call_tags_become_calls_when_tools_are_offered() {
        let pieces = [
            "Checking.<tool",
            "_call>\n{\"name\": \"get_weather\", ",
            "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        ];
        let got = run(ThinkFormat::Tags, true, "", &pieces);
        assert_eq!(got.content, "Checking.");
        assert_eq!(got.calls, vec![json!({ "function": { "name": "get_weather", "arguments": { "city": "Paris" } } })]);
        // Without tools the tags are text.
        assert_eq!(run(ThinkFormat::Tags, false, "", &pieces).content, pieces.concat());
        // An unclosed call is given back as text.
        assert_eq!(run(ThinkFormat::Tags, true, "", &["a<tool_call>{"]).content, "a<tool_call>{");
    }

    #[test]
    fn harmony_channels_route_analysis_to_thinking_and_final_to_content() {
        let pieces = [
            "<|channel|>analysis<|message|>User asks",
            " 2+2.<|e",
            "nd|><|start|>assistant<|channel|>final<|message|>4",
            "<|return|>",
        ];
        assert_eq!(run(ThinkFormat::Harmony, false, "<|start|>assistant", &pieces), text("User asks 2+2.", "4"));
        let pieces =
            ["<|channel|>commentary<|message|>Checking.<|end|>", "<|start|>assistant<|channel|>final<|message|>Done"];
        assert_eq!(run(ThinkFormat::Harmony, false, "", &pieces), text("", "Checking.Done"));
    }

    #[test]
    fn harmony_messages_to_functions_are_tool_calls() {
        let pieces = [
            "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant",
            "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\":",
            " \"Paris\"}<|call|>",
        ];
        let got = run(ThinkFormat::Harmony, true, "", &pieces);
        assert_eq!(got.thinking, "Need weather.");
        assert_eq!(got.content, "");
        assert_eq!(got.calls, vec![json!({ "function": { "name": "get_weather", "arguments": { "city": "Paris" } } })]);
    }
}
