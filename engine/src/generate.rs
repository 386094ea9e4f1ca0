//! Loading a model and generating text from one prompt: the single-sequence path the
//! CLI uses (the server's scheduler will batch many of these).

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, KvCache};
use crate::gguf::Gguf;
use crate::model::{self, Architecture, Batch};
use crate::sampler::{Sampler, SamplerParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::EngineError;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A model ready to run: its file, tokenizer and weights on a backend.
pub struct LoadedModel<B: Backend> {
    pub file: Arc<Gguf>,
    pub tokenizer: Tokenizer,
    pub arch: Box<dyn Architecture<B>>,
    pub backend: B,
    pub load_time: Duration,
}

impl LoadedModel<CpuBackend> {
    /// Opens a GGUF file and prepares it on the CPU.
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        let start = Instant::now();
        let file = Arc::new(Gguf::open(path)?);
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let backend = CpuBackend;
        let arch = model::load(&backend, &file)?;
        if tokenizer.n_vocab() > arch.info().n_vocab {
            return Err(EngineError::BadValue {
                key: "tokenizer.ggml.tokens".into(),
                value: tokenizer.n_vocab().to_string(),
                why: "more tokens than the embedding matrix has rows",
            });
        }
        Ok(LoadedModel { file, tokenizer, arch, backend, load_time: start.elapsed() })
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Most tokens to generate (None: until end of generation or the context is full).
    pub num_predict: Option<usize>,
    /// Context length of the sequence (prompt plus generated tokens).
    pub num_ctx: usize,
    pub sampler: SamplerParams,
    /// Generation stops before the first occurrence of any of these strings.
    pub stop: Vec<String>,
}

/// Why generation ended (Ollama's done_reason values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoneReason {
    /// End-of-generation token or a stop sequence.
    Stop,
    /// num_predict or the context length reached.
    Length,
    /// The caller's callback asked to stop.
    Cancelled,
}

#[derive(Clone, Debug)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub prompt_time: Duration,
    pub generated: Vec<u32>,
    pub gen_time: Duration,
    pub done_reason: DoneReason,
}

/// A sequence the generation loop can extend: whoever runs the model (a [`Session`], the
/// C API's context, later the scheduler) implements this and shares [`generate`].
pub trait Sequence {
    /// Tokens in the sequence so far.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Appends tokens, runs the model over them and returns the last one's logits.
    fn append(&mut self, tokens: &[u32]) -> Result<&[f32], EngineError>;
}

/// Runs `prompt` through `seq`, then samples until a stop condition, calling `on_text`
/// with each piece of text as it becomes final; `on_text` returns false to cancel.
pub fn generate(
    seq: &mut impl Sequence,
    tok: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<GenerateStats, EngineError> {
    if prompt.is_empty() {
        return Err(EngineError::BadBatch("empty prompt".into()));
    }
    if seq.len() + prompt.len() >= opts.num_ctx {
        return Err(EngineError::ContextFull { needed: seq.len() + prompt.len() + 1, limit: opts.num_ctx });
    }
    let mut sampler = Sampler::new(opts.sampler.clone());
    prompt.iter().for_each(|&t| sampler.accept(t));
    let start = Instant::now();
    let mut next = sampler.sample(seq.append(prompt)?);
    let prompt_time = start.elapsed();

    let start = Instant::now();
    let mut out = StopFilter::new(&opts.stop);
    let mut decoder = StreamDecoder::new();
    let mut generated = Vec::new();
    let limit = opts.num_predict.unwrap_or(usize::MAX);
    let done_reason = loop {
        if generated.len() >= limit {
            break DoneReason::Length;
        }
        if tok.is_eog(next) {
            break DoneReason::Stop;
        }
        sampler.accept(next);
        generated.push(next);
        let text = decoder.push(&tok.token_to_piece(next));
        let (ready, stopped) = out.push(&text);
        if !ready.is_empty() && !on_text(&ready) {
            break DoneReason::Cancelled;
        }
        if stopped {
            break DoneReason::Stop;
        }
        if generated.len() >= limit || seq.len() >= opts.num_ctx {
            break DoneReason::Length;
        }
        next = sampler.sample(seq.append(&[next])?);
    };
    if done_reason != DoneReason::Cancelled {
        // Text held back for a stop sequence that never completed, and any trailing
        // partial character, are final now.
        let rest = out.flush(&decoder.finish());
        if !rest.is_empty() {
            on_text(&rest);
        }
    }
    Ok(GenerateStats { prompt_tokens: prompt.len(), prompt_time, generated, gen_time: start.elapsed(), done_reason })
}

/// A single sequence's KV cache on a loaded model.
pub struct Session<'m, B: Backend> {
    model: &'m LoadedModel<B>,
    kv: B::Kv,
    /// Logits of the last token appended through [`Sequence::append`].
    last_logits: Vec<f32>,
}

impl<'m, B: Backend> Session<'m, B> {
    pub fn new(model: &'m LoadedModel<B>, num_ctx: usize) -> Self {
        let spec = model.arch.kv_spec(num_ctx, 1);
        Session { model, kv: model.backend.new_kv(&spec), last_logits: Vec::new() }
    }

    /// Tokens currently in the cache.
    pub fn len(&self) -> usize {
        self.kv.seq_len(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        self.kv.truncate(0, 0);
    }

    /// Appends tokens; returns the logits of every one (`all`) or of the last.
    pub fn feed(&mut self, tokens: &[u32], all: bool) -> Result<model::Logits, EngineError> {
        let batch = Batch::for_sequence(0, self.len(), tokens, all);
        self.model.arch.forward(&self.model.backend, &batch, &mut self.kv)
    }

    /// [`generate`] on this session with the model's tokenizer.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<GenerateStats, EngineError> {
        let tok = &self.model.tokenizer;
        generate(self, tok, prompt, opts, on_text)
    }
}

impl<B: Backend> Sequence for Session<'_, B> {
    fn len(&self) -> usize {
        Session::len(self)
    }

    fn append(&mut self, tokens: &[u32]) -> Result<&[f32], EngineError> {
        self.last_logits = self.feed(tokens, false)?.data;
        Ok(&self.last_logits)
    }
}

/// Holds back text that might be the start of a stop sequence, and cuts the output at
/// the first stop sequence.
pub struct StopFilter<'a> {
    stops: &'a [String],
    pending: String,
    stopped: bool,
}

impl<'a> StopFilter<'a> {
    pub fn new(stops: &'a [String]) -> Self {
        StopFilter { stops, pending: String::new(), stopped: false }
    }

    /// Adds text; returns the text that is now final and whether a stop sequence was hit.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.pending.push_str(text);
        let first_stop =
            self.stops.iter().filter(|s| !s.is_empty()).filter_map(|s| self.pending.find(s.as_str())).min();
        if let Some(at) = first_stop {
            let ready = self.pending[..at].to_string();
            self.pending.clear();
            self.stopped = true;
            return (ready, true);
        }
        let keep = self.longest_stop_prefix_suffix();
        let ready = self.pending[..self.pending.len() - keep].to_string();
        self.pending.drain(..self.pending.len() - keep);
        (ready, false)
    }

    pub fn pending(&self) -> &str {
        &self.pending
    }

    /// Releases what is held back (generation ended without completing a stop sequence).
    pub fn flush(&mut self, tail: &str) -> String {
        let (mut ready, stopped) = self.push(tail);
        if !stopped {
            ready.push_str(&std::mem::take(&mut self.pending));
        }
        ready
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of a stop string.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let p = &self.pending;
        (1..=p.len())
            .rev()
            .filter(|&n| p.is_char_boundary(p.len() - n))
            .find(|&n| self.stops.iter().any(|s| s.len() > n && s.starts_with(&p[p.len() - n..])))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::StopFilter;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut f = StopFilter::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let (r, stopped) = f.push(p);
            out.push_str(&r);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&f.flush(""));
        (out, false)
    }

    #[test]
    fn stops_across_pieces_and_holds_back_prefixes() {
        assert_eq!(run(&["END"], &["abc E", "N", "D tail"]), ("abc ".to_string(), true));
        assert_eq!(run(&["END"], &["abc E", "x"]), ("abc Ex".to_string(), false));
        assert_eq!(run(&["\n\n", "stop"], &["a\n", "b sto", "p"]), ("a\nb ".to_string(), true));
        assert_eq!(run(&[], &["plain", " text"]), ("plain text".to_string(), false));
        assert_eq!(run(&["é!"], &["caf", "é", "é!"]), ("café".to_string(), true));
    }
}
