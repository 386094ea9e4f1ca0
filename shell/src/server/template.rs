//! Chat templates: messages → the prompt text a model was trained on.
//!
//! Gemma models use the built-in Gemma turn format, exactly as Ollama's gemma3 template
//! renders it (the default model's GGUF carries no `tokenizer.chat_template`). Other models
//! with a `tokenizer.chat_template` get it rendered with minijinja (Hugging Face's variables:
//! messages, add_generation_prompt, bos_token, eos_token; Python string methods); models
//! with neither get their messages joined by newlines.

use super::gotemplate::Template;
use super::output::ThinkFormat;
use serde_json::{json, Value};
use turbine::engine::gguf::Gguf;

/// One chat message (role: system, user, assistant or tool).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// An assistant's calls, `[{"function": {"name", "arguments": {…}}}]`.
    pub tool_calls: Option<Value>,
    /// A tool result's tool.
    pub tool_name: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.to_string(), content: content.to_string(), tool_calls: None, tool_name: None }
    }

    /// The message as chat templates read it (Hugging Face's names, Ollama's too).
    fn to_json(&self) -> Value {
        let mut m = json!({ "role": self.role, "content": self.content });
        if let Some(calls) = &self.tool_calls {
            m["tool_calls"] = calls.clone();
        }
        if let Some(name) = &self.tool_name {
            m["tool_name"] = json!(name);
            m["name"] = json!(name);
        }
        m
    }
}

/// Ollama's library template for gemma3, reported by `/api/show` for Gemma models.
pub const GEMMA_GO_TEMPLATE: &str = r#"{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if or (eq .Role "user") (eq .Role "system") }}<start_of_turn>user
{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"#;

/// A request's `think`: unset, false, true, or a reasoning effort (gpt-oss's
/// "low"/"medium"/"high").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Think {
    #[default]
    Unset,
    Off,
    On,
    Level(String),
}

impl Think {
    /// Whether the request explicitly asks for reasoning (a model that cannot think then
    /// refuses it).
    pub fn asked(&self) -> bool {
        matches!(self, Think::On | Think::Level(_))
    }
}

#[derive(Clone, Debug)]
pub enum ChatTemplate {
    /// Gemma turns, exactly as Ollama's gemma3 template renders them.
    Gemma,
    /// The GGUF's `tokenizer.chat_template`, with the texts of its BOS and EOS tokens.
    Jinja { source: String, bos: String, eos: String },
    /// No template: message contents joined by newlines.
    Plain,
    /// A Go TEMPLATE (a model created with one), rendered as Ollama renders it.
    Go { source: String, template: Box<Template> },
}

impl ChatTemplate {
    /// A Go TEMPLATE, parsed.
    pub fn go(source: &str) -> Result<ChatTemplate, String> {
        Ok(ChatTemplate::Go { source: source.to_string(), template: Box::new(Template::parse(source)?) })
    }

    /// The template of a model: its TEMPLATE layer if it has one, else the file's.
    pub fn for_entry(template: Option<&str>, file: &Gguf) -> ChatTemplate {
        match template.map(ChatTemplate::go) {
            Some(Ok(t)) => t,
            Some(Err(e)) => {
                eprintln!("turbine serve: ignoring the model's TEMPLATE: {e}");
                ChatTemplate::for_model(file)
            }
            None => ChatTemplate::for_model(file),
        }
    }

    /// The template for a model file: its architecture's built-in format, else plain.
    pub fn for_model(file: &Gguf) -> ChatTemplate {
        let arch = file.architecture().unwrap_or("");
        if arch.starts_with("gemma") {
            return ChatTemplate::Gemma;
        }
        let Some(source) = file.get_str("tokenizer.chat_template").ok().flatten() else {
            return ChatTemplate::Plain;
        };
        let tokens = file.get_str_array("tokenizer.ggml.tokens").ok().flatten().unwrap_or(&[]);
        let text = |key: &str| {
            let id = file.get_u32(key).ok().flatten()?;
            tokens.get(id as usize).cloned()
        };
        ChatTemplate::Jinja {
            source: source.to_string(),
            bos: text("tokenizer.ggml.bos_token_id").unwrap_or_default(),
            eos: text("tokenizer.ggml.eos_token_id").unwrap_or_default(),
        }
    }

    /// The template text `/api/show` reports.
    pub fn source(&self) -> &str {
        match self {
            ChatTemplate::Gemma => GEMMA_GO_TEMPLATE,
            ChatTemplate::Jinja { source, .. } => source,
            ChatTemplate::Plain => "{{ .Prompt }}",
            ChatTemplate::Go { source, .. } => source,
        }
    }

    /// How the model marks its reasoning, judged from its template: harmony channels
    /// (gpt-oss) or `<think>` tags (Qwen3, DeepSeek-R1, DeepSeek-V3.1); None when it does
    /// not think.
    pub fn think_format(&self) -> Option<ThinkFormat> {
        let source = match self {
            ChatTemplate::Jinja { source, .. } | ChatTemplate::Go { source, .. } => source,
            ChatTemplate::Gemma | ChatTemplate::Plain => return None,
        };
        if source.contains("<|channel|>") {
            Some(ThinkFormat::Harmony)
        } else if source.contains("<think>") || source.contains("</think>") {
            Some(ThinkFormat::Tags)
        } else {
            None
        }
    }

    /// Whether the template renders the tools a request offers (a GGUF template that
    /// reads `tools`; Go TEMPLATEs get no `.Tools` yet).
    pub fn supports_tools(&self) -> bool {
        matches!(self, ChatTemplate::Jinja { source, .. } if source.contains("tools"))
    }

    /// Whether the template can fill in between a prompt and a suffix (`.Suffix`).
    pub fn supports_insert(&self) -> bool {
        matches!(self, ChatTemplate::Go { template, .. } if template.uses("Suffix"))
    }

    /// Renders the messages into a prompt that ends where the model should continue.
    #[cfg(test)] // the server renders with the request's `think` (render_with)
    /// The built-in formats leave BOS out (the tokenizer adds it); a Jinja template may
    /// write it itself (see `starts_with_bos`). Errors are the template's own (a
    /// `raise_exception` call, or a syntax error in the file).
    pub fn render(&self, messages: &[Message]) -> Result<String, String> {
        self.render_with(messages, "", &Think::Unset, None)
    }

    /// `render` for a request's `think` (Jinja templates read `enable_thinking` and
    /// `reasoning_effort`) and `tools`, filling in before `suffix` where the template can.
    pub fn render_with(
        &self,
        messages: &[Message],
        suffix: &str,
        think: &Think,
        tools: Option<&Value>,
    ) -> Result<String, String> {
        match self {
            ChatTemplate::Gemma => Ok(render_gemma(messages)),
            ChatTemplate::Jinja { source, bos, eos } => render_jinja(source, [bos, eos], messages, think, tools),
            ChatTemplate::Plain => Ok(messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n")),
            ChatTemplate::Go { template, .. } => render_go(template, messages, suffix),
        }
    }

    /// `render`, with a suffix to fill in before (only Go templates with `.Suffix`).
    pub fn render_insert(&self, messages: &[Message], suffix: &str) -> Result<String, String> {
        self.render_with(messages, suffix, &Think::Unset, None)
    }

    /// Whether a rendered prompt already begins with the BOS text (then the tokenizer must
    /// not add another).
    pub fn starts_with_bos(&self, rendered: &str) -> bool {
        matches!(self, ChatTemplate::Jinja { bos, .. } if !bos.is_empty() && rendered.starts_with(bos.as_str()))
    }
}

/// Ollama's way with a Go template: one run over `.Messages` when it reads them; else
/// (an older template of `.System`, `.Prompt`, `.Response`) one run per exchange, the last
/// cut off after `.Response` so the model continues from there.
fn render_go(t: &Template, messages: &[Message], suffix: &str) -> Result<String, String> {
    let text = |role: &str| messages.iter().filter(|m| m.role == role).map(|m| m.content.as_str()).collect::<Vec<_>>();
    if t.uses("Messages") {
        let data = json!({
            "Messages": messages.iter().map(|m| json!({ "Role": m.role, "Content": m.content })).collect::<Vec<_>>(),
            "System": text("system").join("\n\n"),
            "Prompt": messages.last().filter(|m| m.role == "user").map_or("", |m| m.content.as_str()),
            "Suffix": suffix,
            "Response": "",
        });
        return t.render(&data);
    }
    let turn = |system: &str, prompt: &str, response: &str| -> Value {
        json!({ "System": system, "Prompt": prompt, "Response": response, "Suffix": suffix })
    };
    let mut out = String::new();
    let (mut system, mut prompt, mut response) = (String::new(), String::new(), String::new());
    for m in messages {
        let finished = match m.role.as_str() {
            "system" => !prompt.is_empty() || !response.is_empty(),
            "user" => !response.is_empty(),
            _ => false,
        };
        if finished {
            out.push_str(&t.render(&turn(&system, &prompt, &response))?);
            (system, prompt, response) = (String::new(), String::new(), String::new());
        }
        match m.role.as_str() {
            "system" => system = m.content.clone(),
            "user" => prompt = m.content.clone(),
            "assistant" => response = m.content.clone(),
            _ => {}
        }
    }
    out.push_str(&t.render_until_response(&turn(&system, &prompt, &response))?);
    Ok(out)
}

fn render_jinja(
    source: &str,
    [bos, eos]: [&String; 2],
    messages: &[Message],
    think: &Think,
    tools: Option<&Value>,
) -> Result<String, String> {
    use minijinja::{context, Environment, Error, ErrorKind};
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
    env.add_template("chat", source).map_err(|e| format!("invalid chat template: {e}"))?;
    let msgs: Vec<Value> = messages.iter().map(Message::to_json).collect();
    let tmpl = env.get_template("chat").map_err(|e| e.to_string())?;
    // Qwen3's templates read `enable_thinking`, gpt-oss's `reasoning_effort`.
    let enable_thinking = match think {
        Think::Unset => None,
        t => Some(*t != Think::Off),
    };
    let reasoning_effort = match think {
        Think::Level(level) => level.as_str(),
        _ => "medium",
    };
    tmpl.render(context! {
        messages => msgs,
        add_generation_prompt => true,
        bos_token => bos,
        eos_token => eos,
        enable_thinking => enable_thinking,
        reasoning_effort => reasoning_effort,
        tools => tools,
    })
    .map_err(|e| format!("chat template: {e}"))
}

/// Ollama's gemma3 template: system and user messages become user turns, assistant
/// messages model turns; after a final user/system turn the model turn is opened, and a
/// final assistant message is left open so the model continues it.
fn render_gemma(messages: &[Message]) -> String {
    let mut out = String::new();
    for (i, m) in messages.iter().enumerate() {
        let last = i + 1 == messages.len();
        match m.role.as_str() {
            "user" | "system" => {
                out.push_str("<start_of_turn>user\n");
                out.push_str(&m.content);
                out.push_str("<end_of_turn>\n");
                if last {
                    out.push_str("<start_of_turn>model\n");
                }
            }
            "assistant" => {
                out.push_str("<start_of_turn>model\n");
                out.push_str(&m.content);
                if !last {
                    out.push_str("<end_of_turn>\n");
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinking_templates_are_recognized_and_told_whether_to_think() {
        let jinja =
            |source: &str| ChatTemplate::Jinja { source: source.into(), bos: String::new(), eos: String::new() };
        let qwen3 = jinja(
            "{% for m in messages %}{{ m.content }}{% endfor %}\
             {% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>{% endif %}",
        );
        assert_eq!(qwen3.think_format(), Some(ThinkFormat::Tags));
        let hi = [Message::new("user", "Hi")];
        assert_eq!(qwen3.render_with(&hi, "", &Think::Off, None).unwrap(), "Hi<think>\n\n</think>");
        assert_eq!(qwen3.render_with(&hi, "", &Think::On, None).unwrap(), "Hi");
        assert_eq!(qwen3.render_with(&hi, "", &Think::Unset, None).unwrap(), "Hi");
        let harmony = jinja(
            "<|start|>system<|message|>Reasoning: {{ reasoning_effort }}<|end|>{% for m in messages %}\
             {% if m.role == 'assistant' %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>\
             {% endif %}{% endfor %}<|start|>assistant",
        );
        assert_eq!(harmony.think_format(), Some(ThinkFormat::Harmony));
        let prompt = harmony.render_with(&hi, "", &Think::Level("high".into()), None).unwrap();
        assert!(prompt.contains("Reasoning: high"), "{prompt}");
        assert_eq!(ChatTemplate::Gemma.think_format(), None);
        assert_eq!(jinja("{{ messages[0].content }}").think_format(), None);
    }

    #[test]
    fn gemma_turns_as_ollama_renders_them() {
        let t = |m: &[Message]| ChatTemplate::Gemma.render(m).unwrap();
        assert_eq!(t(&[Message::new("user", "Hi")]), "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n");
        let conv = [
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello!"),
            Message::new("user", "Bye"),
        ];
        assert_eq!(
            t(&conv),
            "<start_of_turn>user\nBe brief.<end_of_turn>\n<start_of_turn>user\nHi<end_of_turn>\n\
             <start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
        // A trailing assistant message is continued, not closed.
        assert_eq!(
            t(&[Message::new("user", "Hi"), Message::new("assistant", "Hel")]),
            "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHel"
        );
    }

    #[test]
    fn go_templates_as_ollama_runs_them() {
        // An older template: one run per exchange, the last cut after .Response.
        let t = ChatTemplate::go("{{ if .System }}[S]{{ .System }}\n{{ end }}[U]{{ .Prompt }}\n[A]{{ .Response }}\n")
            .unwrap();
        let conv = [
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello!"),
            Message::new("user", "Bye"),
        ];
        assert_eq!(t.render(&conv).unwrap(), "[S]Be brief.\n[U]Hi\n[A]Hello!\n[U]Bye\n[A]");
        assert!(!t.supports_insert());
        // A .Messages template gets them all at once; .Suffix makes it an insert template.
        let fim = ChatTemplate::go(
            "{{ range .Messages }}<{{ .Role }}>{{ .Content }}{{ end }}{{ if .Suffix }}<fill>{{ .Suffix }}{{ end }}",
        )
        .unwrap();
        assert!(fim.supports_insert());
        assert_eq!(fim.render_insert(&conv[1..2], "tail").unwrap(), "<user>Hi<fill>tail");
        assert!(ChatTemplate::go("{{ if }}").is_err());
    }

    #[test]
    fn jinja_templates_from_gguf_files() {
        // ChatML as Qwen's GGUFs carry it, with a Python string method and raise_exception.
        let source = "{{ bos_token }}{% for m in messages %}{% if m.role not in ['system','user','assistant'] %}\
            {{ raise_exception('bad role ' + m.role) }}{% endif %}<|im_start|>{{ m.role }}\n{{ m.content.strip() }}\
            <|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let t = ChatTemplate::Jinja { source: source.into(), bos: "<s>".into(), eos: "</s>".into() };
        let out = t.render(&[Message::new("system", "S"), Message::new("user", " Hi ")]).unwrap();
        assert_eq!(out, "<s><|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        assert!(t.starts_with_bos(&out));
        let err = t.render(&[Message::new("tool", "x")]).unwrap_err();
        assert!(err.contains("bad role tool"), "{err}");
        let broken = ChatTemplate::Jinja { source: "{% for %}".into(), bos: String::new(), eos: String::new() };
        assert!(broken.render(&[]).is_err());
        assert_eq!(
            ChatTemplate::Plain.render(&[Message::new("user", "a"), Message::new("user", "b")]).unwrap(),
            "a\nb"
        );
    }
}
