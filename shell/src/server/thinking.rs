//! Splits a thinking model's output into its reasoning (Ollama's `thinking`) and its
//! answer (`content`), as text streams out piece by piece.
//!
//! Two formats: `<think>…</think>` tags (Qwen3, DeepSeek-R1, DeepSeek-V3.1; the template
//! may already have opened the tag at the end of the prompt), and gpt-oss's harmony
//! channels (`<|channel|>analysis<|message|>…<|end|>` is reasoning, the `final` channel
//! the answer; `commentary` preambles count as answer text, since tool calls are not
//! served yet). A tag split across two pieces is held back until it is complete.

/// How a model marks its reasoning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThinkFormat {
    Tags,
    Harmony,
}

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";
const CHANNEL: &str = "<|channel|>";
const MESSAGE: &str = "<|message|>";
/// Harmony tokens that end a message or start the next one.
const HARMONY_ENDS: [&str; 4] = ["<|end|>", "<|return|>", "<|call|>", "<|start|>"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Tags: before any output; a leading `<think>` opens the reasoning.
    Start,
    Thinking,
    Answer,
    /// Harmony: inside a message header (`assistant<|channel|>final`), until `<|message|>`.
    Header,
}

/// Text routed so far: (thinking, content).
pub type Split = (String, String);

pub struct ThinkingParser {
    format: ThinkFormat,
    state: State,
    /// Text not yet routed: a possible tag prefix, or a harmony header being read.
    pending: String,
    /// Tags: the answer's leading whitespace after `</think>` is dropped.
    trim_answer: bool,
}

impl ThinkingParser {
    /// A parser for output that follows `prompt`: with tags, a prompt ending in an open
    /// `<think>` means the output starts inside the reasoning.
    pub fn new(format: ThinkFormat, prompt: &str) -> ThinkingParser {
        let state = match format {
            ThinkFormat::Tags if prompt.trim_end().ends_with(OPEN) => State::Thinking,
            ThinkFormat::Tags => State::Start,
            // The prompt ends with `<|start|>assistant`: a header follows.
            ThinkFormat::Harmony => State::Header,
        };
        ThinkingParser { format, state, pending: String::new(), trim_answer: state == State::Thinking }
    }

    /// Routes a piece of output.
    pub fn push(&mut self, piece: &str) -> Split {
        self.pending.push_str(piece);
        let mut out = Split::default();
        match self.format {
            ThinkFormat::Tags => self.route_tags(&mut out, false),
            ThinkFormat::Harmony => self.route_harmony(&mut out, false),
        }
        out
    }

    /// Routes whatever is held back (the output has ended).
    pub fn finish(&mut self) -> Split {
        let mut out = Split::default();
        match self.format {
            ThinkFormat::Tags => self.route_tags(&mut out, true),
            ThinkFormat::Harmony => self.route_harmony(&mut out, true),
        }
        out
    }

    fn route_tags(&mut self, out: &mut Split, end: bool) {
        loop {
            match self.state {
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
                State::Thinking => match self.pending.find(CLOSE) {
                    Some(i) => {
                        out.0.push_str(&self.pending[..i]);
                        self.pending.drain(..i + CLOSE.len());
                        self.state = State::Answer;
                    }
                    None => {
                        let keep = if end { 0 } else { partial_suffix(&self.pending, &[CLOSE]) };
                        let cut = self.pending.len() - keep;
                        out.0.extend(self.pending.drain(..cut));
                        return;
                    }
                },
                State::Answer | State::Header => {
                    let text = std::mem::take(&mut self.pending);
                    let text = if self.trim_answer { text.trim_start().to_string() } else { text };
                    self.trim_answer &= text.is_empty();
                    out.1.push_str(&text);
                    return;
                }
            }
        }
    }

    fn route_harmony(&mut self, out: &mut Split, end: bool) {
        loop {
            match self.state {
                State::Header => match self.pending.find(MESSAGE) {
                    Some(i) => {
                        let header = &self.pending[..i];
                        let channel = header.find(CHANNEL).map_or("", |c| header[c + CHANNEL.len()..].trim());
                        let channel = channel.split_whitespace().next().unwrap_or("");
                        self.state = if channel == "analysis" { State::Thinking } else { State::Answer };
                        self.pending.drain(..i + MESSAGE.len());
                    }
                    None => {
                        if end {
                            self.pending.clear(); // an unfinished header carries no text
                        }
                        return;
                    }
                },
                State::Thinking | State::Answer | State::Start => {
                    let hit = HARMONY_ENDS.iter().filter_map(|t| self.pending.find(t).map(|i| (i, *t))).min();
                    let sink = if self.state == State::Thinking { &mut out.0 } else { &mut out.1 };
                    match hit {
                        Some((i, token)) => {
                            // The message ends; a header (`<|start|>assistant<|channel|>…`)
                            // follows.
                            sink.push_str(&self.pending[..i]);
                            self.pending.drain(..i + token.len());
                            self.state = State::Header;
                        }
                        None => {
                            let keep = if end { 0 } else { partial_suffix(&self.pending, &HARMONY_ENDS) };
                            let cut = self.pending.len() - keep;
                            sink.extend(self.pending.drain(..cut));
                            return;
                        }
                    }
                }
            }
        }
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

    /// Feeds `pieces` one by one and gathers (thinking, content).
    fn run(format: ThinkFormat, prompt: &str, pieces: &[&str]) -> Split {
        let mut p = ThinkingParser::new(format, prompt);
        let mut all = Split::default();
        for piece in pieces {
            let (t, c) = p.push(piece);
            all.0 += &t;
            all.1 += &c;
        }
        let (t, c) = p.finish();
        (all.0 + &t, all.1 + &c)
    }

    #[test]
    fn tags_split_reasoning_from_the_answer_across_pieces() {
        let want = ("Let me see. 2+2=4.".to_string(), "It is 4.".to_string());
        let pieces = ["<th", "ink>Let me see.", " 2+2=4.</", "think>", "\n\nIt is", " 4."];
        assert_eq!(run(ThinkFormat::Tags, "<|im_start|>assistant\n", &pieces), want);
        // The template opened the tag already (DeepSeek-R1, Qwen3 thinking).
        let pieces = ["Let me see. 2+2=4.", "</think>\n\n", "It is 4."];
        assert_eq!(run(ThinkFormat::Tags, "...<|Assistant|><think>\n", &pieces), want);
    }

    #[test]
    fn tags_without_reasoning_are_all_answer() {
        assert_eq!(
            run(ThinkFormat::Tags, "", &["Hello", " <b>there</b>"]),
            (String::new(), "Hello <b>there</b>".into())
        );
        assert_eq!(run(ThinkFormat::Tags, "", &["<", "3 you"]), (String::new(), "<3 you".into()));
        // An unclosed reasoning is all reasoning, its partial tag included.
        assert_eq!(run(ThinkFormat::Tags, "<think>", &["hmm </thi"]), ("hmm </thi".into(), String::new()));
    }

    #[test]
    fn harmony_channels_route_analysis_to_thinking_and_final_to_content() {
        let pieces = [
            "<|channel|>analysis<|message|>User asks",
            " 2+2.<|e",
            "nd|><|start|>assistant<|channel|>final<|message|>4",
            "<|return|>",
        ];
        assert_eq!(run(ThinkFormat::Harmony, "<|start|>assistant", &pieces), ("User asks 2+2.".into(), "4".into()));
        let pieces =
            ["<|channel|>commentary<|message|>Checking.<|end|>", "<|start|>assistant<|channel|>final<|message|>Done"];
        assert_eq!(run(ThinkFormat::Harmony, "", &pieces), (String::new(), "Checking.Done".into()));
    }
}
