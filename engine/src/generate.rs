//! Loading a model and generating text from one prompt: the single-sequence path the
//! CLI uses (the server's scheduler will batch many of these).

use crate::backend::cpu::CpuBackend;
use crate::backend::offload::Offloaded;
use crate::backend::{Backend, KvCache};
use crate::gguf::Gguf;
use crate::json_format::{JsonFormat, JsonState};
use crate::kv::KvType;
use crate::model::{self, Architecture, Batch};
use crate::parallel::{Pipelined, Sharded};
use crate::sampler::{Sampler, SamplerParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::EngineError;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a model's layers run (`--device`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    /// The GPU of this CUDA ordinal.
    Cuda(usize),
    /// GPU 0 where one can be used, else the CPU.
    Auto,
}

impl std::str::FromStr for Device {
    type Err = String;

    /// `cpu`, `cuda` (GPU 0), `cuda:N` or `auto`.
    fn from_str(s: &str) -> Result<Device, String> {
        let bad = || format!("unknown device {s:?}: expected cpu, cuda, cuda:N (a GPU ordinal) or auto");
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            "auto" => Ok(Device::Auto),
            _ => match s.strip_prefix("cuda:").map(str::parse::<u16>) {
                Some(Ok(ordinal)) => Ok(Device::Cuda(ordinal.into())),
                _ => Err(bad()),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
            Device::Auto => write!(f, "auto"),
        }
    }
}

impl Device {
    /// The device models will run on, checked now (a GPU: its driver, the GPU itself, its
    /// kernels): one that cannot be used is an error, or, for `auto`, the CPU instead.
    pub fn resolve(self) -> Result<Device, EngineError> {
        match self {
            Device::Cpu => Ok(Device::Cpu),
            Device::Cuda(ordinal) => cuda_backend(ordinal).map(|_| self),
            Device::Auto => match cuda_backend(0) {
                Ok(_) => Ok(Device::Cuda(0)),
                Err(e) => {
                    eprintln!("turbine: {e}; running on the CPU");
                    Ok(Device::Cpu)
                }
            },
        }
    }
}

impl Device {
    /// The free memory of this device in bytes, where it is a GPU that can be asked.
    pub fn gpu_free_memory(self) -> Option<u64> {
        match self {
            Device::Cuda(ordinal) => cuda_free_memory(ordinal),
            Device::Cpu | Device::Auto => None,
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_free_memory(ordinal: usize) -> Option<u64> {
    use turbine_cuda::cudarc::driver::{sys, CudaContext};
    // SAFETY: only tries to open libcuda (cudarc panics on a missing library otherwise).
    if !unsafe { sys::is_culib_present() } {
        return None;
    }
    let (free, _total) = CudaContext::new(ordinal).ok()?.mem_get_info().ok()?;
    u64::try_from(free).ok()
}

#[cfg(not(feature = "cuda"))]
fn cuda_free_memory(_ordinal: usize) -> Option<u64> {
    None
}

/// The CUDA backend of GPU `ordinal`, or why it cannot be used.
#[cfg(feature = "cuda")]
fn cuda_backend(ordinal: usize) -> Result<crate::backend::cuda::CudaBackend, EngineError> {
    crate::backend::cuda::CudaBackend::new(ordinal)
        .map_err(|e| EngineError::NoDevice { device: Device::Cuda(ordinal).to_string(), why: e.to_string() })
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend(ordinal: usize) -> Result<std::convert::Infallible, EngineError> {
    Err(EngineError::NoDevice {
        device: Device::Cuda(ordinal).to_string(),
        why: "this build has no CUDA backend (build with --features cuda)".into(),
    })
}

/// A model ready to run: its file, tokenizer and weights on a backend.
pub struct LoadedModel<B: Backend> {
    pub file: Arc<Gguf>,
    pub tokenizer: Tokenizer,
    pub arch: Box<dyn Architecture<B>>,
    pub backend: B,
    pub load_time: Duration,
    /// Last, so that dropping a model gives its freed memory back after its weights go.
    pub release: crate::memory::ReleaseOnDrop,
}

impl LoadedModel<CpuBackend> {
    /// Opens a GGUF file and prepares it on the CPU.
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        Self::load_with(path, None)
    }

    /// Opens a GGUF file and prepares it on `device`: the CPU, a GPU (the model offloaded
    /// to it, run through a host backend the scheduler drives as any other), or, for
    /// `auto`, GPU 0 where one can be used and the CPU otherwise.
    pub fn load_on(path: &Path, device: Device) -> Result<Self, EngineError> {
        match device {
            Device::Cpu => Self::load(path),
            Device::Cuda(ordinal) => Self::load_on_cuda(path, ordinal),
            Device::Auto => match Self::load_on_cuda(path, 0) {
                Err(e @ EngineError::NoDevice { .. }) => {
                    eprintln!("turbine: {e}; running on the CPU");
                    Self::load(path)
                }
                loaded => loaded,
            },
        }
    }

    /// Opens a GGUF file and offloads its model to `device`, driven from a host backend.
    pub fn load_offloaded<D: Backend + 'static>(path: &Path, device: D) -> Result<Self, EngineError> {
        let start = Instant::now();
        let file = Arc::new(Gguf::open(path)?);
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let offloaded = Offloaded::load(device, &file)?;
        Self::assemble(file, tokenizer, CpuBackend::host(), Box::new(offloaded), start)
    }

    #[cfg(feature = "cuda")]
    fn load_on_cuda(path: &Path, ordinal: usize) -> Result<Self, EngineError> {
        let gpu = cuda_backend(ordinal)?;
        let model = Self::load_offloaded(path, gpu.clone())?;
        // Uploads are queued; a failed one shows here rather than at the first step.
        gpu.synchronize()?;
        Ok(model)
    }

    #[cfg(not(feature = "cuda"))]
    fn load_on_cuda(_path: &Path, ordinal: usize) -> Result<Self, EngineError> {
        cuda_backend(ordinal).map(|never| match never {})
    }

    /// Opens a GGUF file and prepares it on the CPU split over `ranks` tensor-parallel
    /// ranks (threads of this process) of `threads` threads each. One rank is the
    /// reference for more: it sums row-parallel products as a split does, where the
    /// unsplit model ([`LoadedModel::load`]) keeps llama.cpp's f32 sums.
    pub fn load_split(path: &Path, ranks: usize, threads: usize) -> Result<Self, EngineError> {
        Self::load_with(path, Some((ranks, threads)))
    }

    /// Opens a GGUF file and prepares it on the CPU as a pipeline of `stages` ≥ 2 stages
    /// (consecutive layer ranges on threads of this process, `threads` each, shared to
    /// balance the stages' weights).
    pub fn load_pipeline(path: &Path, stages: usize, threads: usize) -> Result<Self, EngineError> {
        Self::load_pipeline_with(path, |file| Pipelined::load(file, stages, threads))
    }

    /// [`LoadedModel::load_pipeline`] with the stages' boundaries given (stage s runs layers
    /// cuts[s]..cuts[s + 1]).
    pub fn load_pipeline_at(path: &Path, cuts: &[usize], threads: usize) -> Result<Self, EngineError> {
        Self::load_pipeline_with(path, |file| Pipelined::load_at(file, cuts, threads))
    }

    /// [`LoadedModel::load_pipeline`] with each stage split over `ranks` tensor-parallel
    /// ranks (`--tp ranks --pp stages`; threads of this process, `threads` each).
    pub fn load_pipeline_split(path: &Path, stages: usize, ranks: usize, threads: usize) -> Result<Self, EngineError> {
        Self::load_pipeline_with(path, |file| Pipelined::load_split(file, stages, ranks, threads))
    }

    /// [`LoadedModel::load_pipeline_split`] with the stages' boundaries given.
    pub fn load_pipeline_split_at(
        path: &Path,
        cuts: &[usize],
        ranks: usize,
        threads: usize,
    ) -> Result<Self, EngineError> {
        Self::load_pipeline_with(path, |file| Pipelined::load_split_at(file, cuts, ranks, threads))
    }

    fn load_pipeline_with(
        path: &Path,
        load: impl FnOnce(&Arc<Gguf>) -> Result<(CpuBackend, Pipelined), EngineError>,
    ) -> Result<Self, EngineError> {
        let start = Instant::now();
        let file = Arc::new(Gguf::open(path)?);
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let (backend, pipelined) = load(&file)?;
        Self::assemble(file, tokenizer, backend, Box::new(pipelined), start)
    }

    /// Rank 0 of an MPI world: `path` split over every process of the world (by tensors,
    /// or as a pipeline of one stage per process), each with the cores its machine gives it.
    #[cfg(feature = "mpi")]
    pub fn load_mpi(path: &Path, world: &crate::parallel::mpi::MpiWorld) -> Result<Self, EngineError> {
        let start = Instant::now();
        let (file, backend, arch) = world.load(path)?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        Self::assemble(file, tokenizer, backend, arch, start)
    }

    /// [`LoadedModel::load_split`] with the ranks' collectives over NCCL, one rank per GPU
    /// of `ordinals` (threads of this process, `threads` each); the `nccl` feature.
    #[cfg(feature = "nccl")]
    pub fn load_split_nccl(path: &Path, ordinals: &[usize], threads: usize) -> Result<Self, EngineError> {
        let start = Instant::now();
        let file = Arc::new(Gguf::open(path)?);
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let comms = crate::parallel::nccl::NcclComm::group(ordinals)?;
        let (backend, sharded) = Sharded::load_over(&file, comms, threads, None)?;
        Self::assemble(file, tokenizer, backend, Box::new(sharded), start)
    }

    fn load_with(path: &Path, split: Option<(usize, usize)>) -> Result<Self, EngineError> {
        let start = Instant::now();
        let file = Arc::new(Gguf::open(path)?);
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let (backend, arch): (CpuBackend, Box<dyn Architecture<CpuBackend>>) = match split {
            None => {
                let backend = CpuBackend::default();
                let arch = model::load(&backend, &file)?;
                (backend, arch)
            }
            Some((ranks, threads)) => {
                let (backend, sharded) = Sharded::load(&file, ranks, threads)?;
                (backend, Box::new(sharded))
            }
        };
        Self::assemble(file, tokenizer, backend, arch, start)
    }

    fn assemble(
        file: Arc<Gguf>,
        tokenizer: Tokenizer,
        backend: CpuBackend,
        arch: Box<dyn Architecture<CpuBackend>>,
        start: Instant,
    ) -> Result<Self, EngineError> {
        if tokenizer.n_vocab() > arch.info().n_vocab {
            return Err(EngineError::BadValue {
                key: "tokenizer.ggml.tokens".into(),
                value: tokenizer.n_vocab().to_string(),
                why: "more tokens than the embedding matrix has rows",
            });
        }
        Ok(LoadedModel { file, tokenizer, arch, backend, load_time: start.elapsed(), release: Default::default() })
    }
}

/// How token states become one embedding (GGUF `<arch>.pooling_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    /// The first token's state.
    Cls,
    /// The last token's state.
    Last,
}

impl<B: Backend> LoadedModel<B> {
    /// The file's pooling type; mean when it names none (generative models).
    pub fn pooling(&self) -> Pooling {
        let arch = self.arch.info().architecture.as_str();
        match self.file.get_u32(&format!("{arch}.pooling_type")).ok().flatten() {
            Some(2) => Pooling::Cls,
            Some(3) => Pooling::Last,
            _ => Pooling::Mean,
        }
    }

    /// The embedding of `tokens`: the final hidden states pooled, then scaled to unit
    /// length (Ollama's normalized embeddings).
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::BadBatch("nothing to embed".into()));
        }
        let mut kv = self.backend.new_kv(&self.arch.kv_spec(tokens.len(), 1));
        let batch = Batch::for_sequence(0, 0, tokens, true);
        let hidden = self.arch.forward_hidden(&self.backend, &batch, &mut kv)?; // [n × d]
        let d = self.arch.info().n_embd;
        let rows: Vec<&[f32]> = hidden.chunks_exact(d.max(1)).collect();
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return Err(EngineError::BadBatch("the model returned no hidden states".into()));
        };
        let mut v = match self.pooling() {
            Pooling::Cls => first.to_vec(),
            Pooling::Last => last.to_vec(),
            Pooling::Mean => {
                let mut sum = vec![0f64; d];
                for row in &rows {
                    sum.iter_mut().zip(*row).for_each(|(s, &x)| *s += f64::from(x));
                }
                sum.iter().map(|s| (s / rows.len() as f64) as f32).collect()
            }
        };
        normalize(&mut v);
        Ok(v)
    }
}

/// Scales `v` to unit Euclidean length (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x = (f64::from(*x) / norm) as f32);
    }
}

/// Most automaton work (`JsonState::accepts_within` units) a structured output's token may
/// take over all the candidates it asks about, most likely first: enough to ask about the
/// whole vocabulary of ordinary schemas (a few units per token), while a pathological one
/// cannot stall the batch. A step that finds nothing allowed within it ends the generation.
const MAX_FORMAT_WORK: usize = 16 << 20;

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
    /// Report each generated token's log-probability and this many most likely
    /// alternatives (None: no log-probabilities).
    pub logprobs: Option<usize>,
    /// Output control tokens as their text (gpt-oss's harmony channels are tokens the
    /// server parses).
    pub render_special: bool,
    /// Structured output: only tokens that keep the text a prefix of such a JSON
    /// document are sampled, and generation stops when it is complete.
    pub format: Option<Arc<JsonFormat>>,
}

/// A generated token's log-probability under the model (log-softmax of the raw logits,
/// before any sampling option) and the most likely alternatives, most likely first.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprob {
    /// Of `token` among `logits`, with the `k` most likely tokens.
    pub fn of(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
        let lse = max + sum.ln() as f32;
        let logprob = logits.get(token as usize).map_or(f32::NEG_INFINITY, |&l| l - lse);
        let k = k.min(logits.len());
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        if k > 0 && k < ids.len() {
            ids.select_nth_unstable_by(k - 1, by_logit);
        }
        ids.truncate(k);
        ids.sort_unstable_by(by_logit);
        let top = ids.into_iter().map(|t| (t, logits[t as usize] - lse)).collect();
        TokenLogprob { token, logprob, top }
    }
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

/// What [`Generation::step`] decided.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Feed `token` next; `text` is final and may be streamed now.
    Continue { token: u32, text: String },
    /// Generation is over; `text` is the last of it.
    Finished { reason: DoneReason, text: String },
}

/// One sequence's generation after its prompt: sampling with its own options and seed,
/// stop conditions and text streaming. Whoever runs the model (a [`Session`], the C API,
/// the server's scheduler) feeds it the logits of each step.
pub struct Generation<'t> {
    tok: &'t Tokenizer,
    opts: GenerateOptions,
    sampler: Sampler,
    out: StopFilter,
    decoder: StreamDecoder,
    generated: Vec<u32>,
    started: Instant,
    /// When the prompt's logits arrived.
    first_logits: Option<Instant>,
    /// The last generated token's log-probability, until taken.
    logprob: Option<TokenLogprob>,
    /// The structured output's state (with `opts.format`, once its marker has passed).
    json: Option<JsonState>,
}

impl<'t> Generation<'t> {
    pub fn new(tok: &'t Tokenizer, prompt: &[u32], opts: &GenerateOptions) -> Generation<'t> {
        let mut sampler = Sampler::new(opts.sampler.clone());
        prompt.iter().for_each(|&t| sampler.accept(t));
        Generation {
            tok,
            opts: opts.clone(),
            sampler,
            out: StopFilter::new(&opts.stop),
            decoder: StreamDecoder::new(),
            generated: Vec::new(),
            started: Instant::now(),
            first_logits: None,
            logprob: None,
            json: opts.format.as_ref().filter(|f| f.marker().is_empty()).map(|f| f.start()),
        }
    }

    /// The log-probability of the token the last step generated, when asked for.
    pub fn take_logprob(&mut self) -> Option<TokenLogprob> {
        self.logprob.take()
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// Samples from the logits of the last token fed; `seq_len` is the sequence's length
    /// including that token.
    pub fn step(&mut self, logits: &[f32], seq_len: usize) -> Step {
        self.first_logits.get_or_insert_with(Instant::now);
        let next = match &self.json {
            None => Some(self.sampler.sample(logits)),
            Some(json) => {
                // Bounded work per token, whatever the schema: the batch waits for it.
                let (tok, mut budget) = (self.tok, MAX_FORMAT_WORK);
                self.sampler.sample_allowed(logits, &mut |id| match tok.is_eog(id) {
                    true => json.may_end(),
                    false => !tok.is_control(id) && json.accepts_within(&tok.token_to_piece(id), &mut budget),
                })
            }
        };
        // None: no token can continue the structured output (a vocabulary without them).
        let Some(next) = next else { return self.finish(DoneReason::Stop, String::new()) };
        let limit = self.opts.num_predict.unwrap_or(usize::MAX);
        if self.generated.len() >= limit {
            return self.finish(DoneReason::Length, String::new());
        }
        if self.tok.is_eog(next) {
            return self.finish(DoneReason::Stop, String::new());
        }
        self.sampler.accept(next);
        self.generated.push(next);
        self.logprob = self.opts.logprobs.map(|k| TokenLogprob::of(logits, next, k));
        let piece = self.decoder.push(&self.tok.token_to_piece_with(next, self.opts.render_special));
        let (text, stopped) = self.out.push(&piece);
        if stopped {
            return Step::Finished { reason: DoneReason::Stop, text };
        }
        if let Some(json) = &mut self.json {
            // Checked by `sample_allowed`, so this holds; a complete document ends here.
            if !json.push_all(&self.tok.token_to_piece(next)) || json.is_complete() {
                return self.finish(DoneReason::Stop, text);
            }
        }
        if self.generated.len() >= limit || seq_len >= self.opts.num_ctx {
            return self.finish(DoneReason::Length, text);
        }
        // The thinking is over: the document starts with the next token.
        if let Some(f) = self.opts.format.as_ref().filter(|f| self.json.is_none() && !f.marker().is_empty()) {
            if self.generated.ends_with(f.marker()) {
                self.json = Some(f.start());
            }
        }
        Step::Continue { token: next, text }
    }

    /// Ends with `reason`: text held back for a stop sequence that never completed, and a
    /// trailing partial character, are final now.
    fn finish(&mut self, reason: DoneReason, mut text: String) -> Step {
        text.push_str(&self.out.flush(&self.decoder.finish()));
        Step::Finished { reason, text }
    }

    /// Statistics, once finished; `prompt_tokens` counts the prompt tokens computed.
    pub fn stats(&self, reason: DoneReason, prompt_tokens: usize) -> GenerateStats {
        let now = Instant::now();
        let first = self.first_logits.unwrap_or(now);
        GenerateStats {
            prompt_tokens,
            prompt_time: first - self.started,
            generated: self.generated.clone(),
            gen_time: now - first,
            done_reason: reason,
        }
    }
}

/// Checks that `prompt` can start on a sequence of `len` tokens under `opts`.
pub fn check_prompt(len: usize, prompt: &[u32], opts: &GenerateOptions) -> Result<(), EngineError> {
    if prompt.is_empty() {
        return Err(EngineError::BadBatch("empty prompt".into()));
    }
    if len + prompt.len() >= opts.num_ctx {
        return Err(EngineError::ContextFull { needed: len + prompt.len() + 1, limit: opts.num_ctx });
    }
    Ok(())
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
    check_prompt(seq.len(), prompt, opts)?;
    let mut gen = Generation::new(tok, prompt, opts);
    let len = seq.len() + prompt.len();
    let mut step = gen.step(seq.append(prompt)?, len);
    let reason = loop {
        match step {
            Step::Continue { token, text } => {
                if !text.is_empty() && !on_text(&text) {
                    break DoneReason::Cancelled;
                }
                let len = seq.len() + 1;
                step = gen.step(seq.append(&[token])?, len);
            }
            Step::Finished { reason, text } => {
                if !text.is_empty() {
                    on_text(&text);
                }
                break reason;
            }
        }
    };
    Ok(gen.stats(reason, prompt.len()))
}

/// A single sequence's KV cache on a loaded model.
pub struct Session<'m, B: Backend> {
    model: &'m LoadedModel<B>,
    kv: B::Kv,
    /// Logits of the last token appended through [`Sequence::append`].
    last_logits: Vec<f32>,
}

impl<'m, B: Backend> Session<'m, B> {
    /// A session whose cache holds `num_ctx` tokens in f16 (llama.cpp's default).
    pub fn new(model: &'m LoadedModel<B>, num_ctx: usize) -> Self {
        Session::with_kv_type(model, num_ctx, KvType::F16)
    }

    pub fn with_kv_type(model: &'m LoadedModel<B>, num_ctx: usize, dtype: KvType) -> Self {
        let spec = model.arch.kv_spec(num_ctx, 1).with_type(dtype);
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
        self.kv.clear(0);
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
pub struct StopFilter {
    stops: Vec<String>,
    pending: String,
    stopped: bool,
}

impl StopFilter {
    pub fn new(stops: &[String]) -> Self {
        StopFilter {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
            stopped: false,
        }
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
