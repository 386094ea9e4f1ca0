//! The continuous-batching scheduler on the real default model: results independent of
//! what shares a batch, the prefix cache, preemption, cancellation and the queue limit.

#[allow(dead_code)] // each test binary uses part of the shared helpers
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::Duration;
use turbine::engine::backend::cpu::CpuBackend;
use turbine::engine::generate::{GenerateOptions, GenerateStats, LoadedModel, Session};
use turbine::engine::kv::BLOCK_TOKENS;
use turbine::engine::sampler::SamplerParams;
use turbine::engine::scheduler::{Refused, Request, Scheduler, SchedulerConfig, SeqEvent};

fn model() -> Arc<LoadedModel<CpuBackend>> {
    Arc::new(common::load_default_model())
}

fn options(num_predict: usize, sampler: SamplerParams) -> GenerateOptions {
    GenerateOptions {
        num_predict: Some(num_predict),
        num_ctx: 4096,
        sampler,
        stop: Vec::new(),
        logprobs: None,
        render_special: false,
        format: None,
    }
}

/// Submits a request; the receiver yields its text pieces, then its stats or an error.
fn submit(s: &Scheduler, prompt: Vec<u32>, opts: GenerateOptions) -> Receiver<SeqEvent> {
    let (tx, rx) = channel();
    let events = Box::new(move |e| tx.send(e).is_ok());
    let req = Request { prompt, opts, events, cancel: Arc::new(AtomicBool::new(false)) };
    s.submit(req).expect("queued");
    rx
}

/// Whether `cond` holds within 5 s: the scheduler publishes its counts after the step
/// that retired a request, a moment after the request's last event.
fn eventually(cond: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

fn finish(rx: Receiver<SeqEvent>) -> (String, GenerateStats) {
    let mut text = String::new();
    for e in rx.iter() {
        match e {
            SeqEvent::Text(t) => text.push_str(&t),
            SeqEvent::Logprob(_) => {}
            SeqEvent::Done(stats) => return (text, stats),
            SeqEvent::Error(e) => panic!("request failed: {e}"),
        }
    }
    panic!("scheduler dropped a request without an answer");
}

/// Prompts that share no full cache block, one long enough to be fed in several chunks.
fn prompts(m: &LoadedModel<CpuBackend>) -> Vec<Vec<u32>> {
    let greedy = common::fixture("greedy/gemma3-270m.json");
    let mut texts: Vec<String> = greedy["cases"].as_array().expect("cases")[..6]
        .iter()
        .map(|c| c["prompt"].as_str().expect("prompt").to_string())
        .collect();
    let long = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/corpus/logits-text.txt"))
        .expect("corpus text");
    texts.push(format!("Summary of the following notes. {long}"));
    let ps: Vec<Vec<u32>> = texts.iter().map(|t| m.tokenizer.encode(t, true, true)).collect();
    assert!(ps.last().map_or(0, Vec::len) > 600, "the long prompt spans several chunks");
    ps
}

fn sampled(seed: u64) -> SamplerParams {
    SamplerParams { temperature: 0.9, seed: Some(seed), ..SamplerParams::default() }
}

#[test]
fn concurrent_requests_match_one_at_a_time_token_for_token() {
    let m = model();
    let ps = prompts(&m);
    let opts = |i: usize| match i % 3 {
        2 => options(24, sampled(i as u64 + 7)),
        _ => options(24, SamplerParams::greedy()),
    };
    // One at a time, each on a fresh scheduler so no prefix cache is involved.
    let alone: Vec<GenerateStats> = ps
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let s = Scheduler::start(m.clone(), SchedulerConfig::new(8, 64, 2048, 4096)).expect("thread");
            finish(submit(&s, p.clone(), opts(i))).1
        })
        .collect();
    // All at once.
    let s = Scheduler::start(m.clone(), SchedulerConfig::new(8, 64, 2048, 4096)).expect("thread");
    let rxs: Vec<_> = ps.iter().enumerate().map(|(i, p)| submit(&s, p.clone(), opts(i))).collect();
    let together: Vec<GenerateStats> = rxs.into_iter().map(|rx| finish(rx).1).collect();
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert!(a.generated.len() >= 8, "prompt {i} generated only {} tokens", a.generated.len());
        assert_eq!(a.generated, t.generated, "prompt {i}: concurrent output differs from serving it alone");
        assert_eq!(a.prompt_tokens, ps[i].len());
    }
    assert!(s.stats.steps.load(Ordering::Relaxed) > 0);

    // A short greedy prompt through the scheduler equals the single-sequence session.
    let mut session = Session::new(&m, 4096);
    let direct = session.generate(&ps[0], &opts(0), |_| true).expect("generates");
    assert_eq!(direct.generated, alone[0].generated);
}

#[test]
fn second_chat_turn_reads_its_history_from_the_prefix_cache() {
    let m = model();
    let s = Scheduler::start(m.clone(), SchedulerConfig::new(4, 64, 2048, 4096)).expect("thread");
    let first = m.tokenizer.encode("A conversation about the weather in the mountains and the sea.", true, true);
    let (_, one) = finish(submit(&s, first.clone(), options(40, SamplerParams::greedy())));
    assert_eq!(one.prompt_tokens, first.len());

    let mut second = first.clone();
    second.extend(&one.generated);
    let new = m.tokenizer.encode(" And what about tomorrow?", false, true);
    second.extend(&new);
    let (_, two) = finish(submit(&s, second.clone(), options(8, SamplerParams::greedy())));
    // The cache holds the first turn up to its last whole block (the last sampled token
    // was never fed), so only the tail is computed.
    let cached = (first.len() + one.generated.len() - 1) / BLOCK_TOKENS * BLOCK_TOKENS;
    assert_eq!(two.prompt_tokens, second.len() - cached, "prompt_eval_count counts only computed tokens");
    assert!(two.prompt_tokens <= new.len() + BLOCK_TOKENS + 1);
}

#[test]
fn a_full_pool_preempts_and_recomputes_without_dropping_anything() {
    let m = model();
    // Room for 4 × 48 tokens of full-attention cache; 4 requests of ~90 tokens need more.
    let mut cfg = SchedulerConfig::new(4, 64, 48, 4096);
    cfg.chunk_tokens = 32;
    let s = Scheduler::start(m.clone(), cfg).expect("thread");
    let ps = prompts(&m);
    let rxs: Vec<_> = ps[..4].iter().map(|p| submit(&s, p.clone(), options(80, SamplerParams::greedy()))).collect();
    for (i, rx) in rxs.into_iter().enumerate() {
        let (_, stats) = finish(rx);
        assert!(!stats.generated.is_empty(), "request {i} generated nothing");
    }
    assert!(s.stats.preemptions.load(Ordering::Relaxed) > 0, "the pool was small enough to force preemption");
    assert!(eventually(|| s.stats.running.load(Ordering::Relaxed) == 0), "sequences still running");
}

#[test]
fn a_cancelled_request_leaves_and_frees_its_blocks() {
    let m = model();
    let s = Scheduler::start(m.clone(), SchedulerConfig::new(2, 64, 2048, 4096)).expect("thread");
    let prompt = m.tokenizer.encode("Count from one to one thousand:", true, true);
    let (tx, rx) = channel();
    let mut pieces = 0;
    let events = Box::new(move |e| {
        pieces += 1;
        // Hang up after the third piece.
        tx.send(e).is_ok() && pieces < 3
    });
    let cancel = Arc::new(AtomicBool::new(false));
    s.submit(Request { prompt, opts: options(500, SamplerParams::greedy()), events, cancel }).expect("queued");
    let got: Vec<SeqEvent> = rx.iter().collect();
    assert_eq!(got.len(), 3, "no events after the hang-up");
    let idle = || s.stats.running.load(Ordering::Relaxed) == 0 && s.stats.kv_blocks_used.load(Ordering::Relaxed) == 0;
    assert!(eventually(idle), "the cancelled request still holds its slot or blocks");

    // A request cancelled by its flag while waiting never runs.
    let flag = Arc::new(AtomicBool::new(true));
    let (tx, rx) = channel();
    let events = Box::new(move |e| tx.send(e).is_ok());
    let prompt = m.tokenizer.encode("Never run.", true, true);
    s.submit(Request { prompt, opts: options(5, SamplerParams::greedy()), events, cancel: flag }).expect("queued");
    assert!(rx.recv_timeout(Duration::from_secs(5)).is_err(), "a cancelled request produced events");
}

#[test]
fn the_queue_refuses_beyond_its_limit_and_recovers() {
    let m = model();
    let s = Scheduler::start(m.clone(), SchedulerConfig::new(1, 2, 512, 4096)).expect("thread");
    let prompt = m.tokenizer.encode("Tell me a long story.", true, true);
    let mut accepted = Vec::new();
    let mut refused = 0;
    for _ in 0..8 {
        let (tx, rx) = channel();
        let events = Box::new(move |e| tx.send(e).is_ok());
        let req = Request {
            prompt: prompt.clone(),
            opts: options(16, SamplerParams::greedy()),
            events,
            cancel: Arc::new(AtomicBool::new(false)),
        };
        match s.submit(req) {
            Ok(()) => accepted.push(rx),
            Err(Refused::QueueFull) => refused += 1,
            Err(e) => panic!("unexpected refusal {e:?}"),
        }
    }
    assert!(refused > 0 && accepted.len() >= 2, "accepted {}, refused {refused}", accepted.len());
    for rx in accepted {
        finish(rx);
    }
    finish(submit(&s, prompt, options(4, SamplerParams::greedy())));
}

#[test]
fn logprobs_come_one_per_generated_token_and_change_nothing() {
    let m = model();
    let s = Scheduler::start(m.clone(), SchedulerConfig::new(2, 8, 512, 4096)).expect("thread");
    let prompt = m.tokenizer.encode("The capital of France is", true, true);
    let plain = finish(submit(&s, prompt.clone(), options(6, SamplerParams::greedy()))).1;
    let mut opts = options(6, SamplerParams::greedy());
    opts.logprobs = Some(2);
    let rx = submit(&s, prompt, opts);
    let events: Vec<SeqEvent> = rx.iter().collect();
    let lps: Vec<_> = events.iter().filter_map(|e| if let SeqEvent::Logprob(l) = e { Some(l) } else { None }).collect();
    let Some(SeqEvent::Done(stats)) = events.last() else { panic!("no Done") };
    assert_eq!(stats.generated, plain.generated, "asking for logprobs changes no token");
    assert_eq!(lps.iter().map(|l| l.token).collect::<Vec<_>>(), stats.generated);
    for l in lps {
        assert_eq!(l.top.len(), 2);
        assert_eq!(l.top[0].0, l.token, "greedy picks the most likely token");
        assert!(l.logprob <= 0.0 && l.top[0].1 >= l.top[1].1);
    }
}

/// A model split over 2 tensor-parallel ranks under the scheduler: concurrent requests
/// (prompts fed in chunks, greedy and sampled), a chat's second turn from the prefix
/// cache and preemption in a small pool all give the tokens of the same model as a
/// group of one rank (which sums row-parallel products the same way; the unsplit
/// model's f32 sums can move an activation across a quantization step). The ranks'
/// caches follow rank 0's block changes, so any drift would show as different tokens or
/// an error.
#[test]
fn a_split_model_serves_like_the_whole_one() {
    let path = common::default_model_path();
    let whole = Arc::new(LoadedModel::load_split(&path, 1, 1).expect("the default model as one rank"));
    let split = Arc::new(LoadedModel::load_split(&path, 2, 1).expect("the default model over 2 ranks"));
    serves_like(&whole, &split);
}

/// The same for a pipeline of 2 stages (layer ranges on two threads, micro-batches in
/// flight), against the whole model itself: a pipeline changes no arithmetic.
#[test]
fn a_pipelined_model_serves_like_the_whole_one() {
    let whole = model();
    let piped = Arc::new(LoadedModel::load_pipeline(&common::default_model_path(), 2, 1).expect("2 stages"));
    serves_like(&whole, &piped);
}

/// And for 2 stages each over 2 tensor-parallel ranks (`--tp 2 --pp 2`), against the
/// one-rank group: each stage's ranks mirror its first rank's cache, which mirrors stage
/// 0's.
#[test]
fn stages_over_ranks_serve_like_the_whole_model() {
    let path = common::default_model_path();
    let whole = Arc::new(LoadedModel::load_split(&path, 1, 1).expect("the default model as one rank"));
    let both = Arc::new(LoadedModel::load_pipeline_split(&path, 2, 2, 1).expect("2 stages over 2 ranks"));
    serves_like(&whole, &both);
}

/// And for a model offloaded to another backend through a host backend, as `--device cuda`
/// runs one: here the device is a second CPU backend, so the device's caches, which replay
/// the host's block changes, must give exactly the direct model's tokens.
#[test]
fn an_offloaded_model_serves_like_the_direct_one() {
    let device = CpuBackend::default();
    let offloaded = LoadedModel::load_offloaded(&common::default_model_path(), device).expect("offloaded model");
    serves_like(&model(), &Arc::new(offloaded));
}

/// `split` serves what `whole` serves: concurrent requests, preemption, a second turn from
/// the prefix cache, embeddings from another cache.
fn serves_like(whole: &Arc<LoadedModel<CpuBackend>>, split: &Arc<LoadedModel<CpuBackend>>) {
    let ps = prompts(whole);
    let opts = |i: usize| match i % 3 {
        2 => options(24, sampled(i as u64 + 7)),
        _ => options(24, SamplerParams::greedy()),
    };
    let serve = |m: &Arc<LoadedModel<CpuBackend>>, cfg: SchedulerConfig| -> Vec<Vec<u32>> {
        let s = Scheduler::start(m.clone(), cfg).expect("thread");
        let rxs: Vec<_> = ps.iter().enumerate().map(|(i, p)| submit(&s, p.clone(), opts(i))).collect();
        rxs.into_iter().map(|rx| finish(rx).1.generated).collect()
    };
    let want = serve(whole, SchedulerConfig::new(8, 64, 2048, 4096));
    assert_eq!(serve(split, SchedulerConfig::new(8, 64, 2048, 4096)), want, "concurrent requests");
    // Preemption: room for 4 × 48 tokens of full-attention cache.
    let mut small = SchedulerConfig::new(4, 64, 48, 4096);
    small.chunk_tokens = 32;
    let s = Scheduler::start(split.clone(), small).expect("thread");
    let rxs: Vec<_> = ps[..4].iter().map(|p| submit(&s, p.clone(), options(40, SamplerParams::greedy()))).collect();
    let preempted: Vec<Vec<u32>> = rxs.into_iter().map(|rx| finish(rx).1.generated).collect();
    assert!(s.stats.preemptions.load(Ordering::Relaxed) > 0, "the pool was small enough to force preemption");
    for (i, got) in preempted.iter().enumerate().filter(|(i, _)| i % 3 != 2) {
        assert_eq!(got[..24], want[i][..24], "greedy prompt {i} after preemption");
    }
    // A second turn reads its history from the prefix cache on every rank.
    let first = whole.tokenizer.encode("A conversation about the weather in the mountains and the sea.", true, true);
    let turns = |m: &Arc<LoadedModel<CpuBackend>>| {
        let s = Scheduler::start(m.clone(), SchedulerConfig::new(4, 64, 2048, 4096)).expect("thread");
        let (_, one) = finish(submit(&s, first.clone(), options(40, SamplerParams::greedy())));
        let mut second = first.clone();
        second.extend(&one.generated);
        second.extend(whole.tokenizer.encode(" And what about tomorrow?", false, true));
        let (_, two) = finish(submit(&s, second, options(8, SamplerParams::greedy())));
        (one.generated, two.generated, two.prompt_tokens)
    };
    let (want_turns, got_turns) = (turns(whole), turns(split));
    assert!(got_turns.2 < first.len(), "the second turn came from the cache: {} computed", got_turns.2);
    assert_eq!(got_turns, want_turns);
    // Embeddings (another cache, from another thread) between steps change nothing.
    let e = split.embed(&ps[0]).expect("embedding from the split model");
    let w = whole.embed(&ps[0]).expect("embedding");
    let worst = e.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "embeddings differ by {worst}");
}

/// A forward pass that fails because a tensor-parallel group lost a member marks the
/// scheduler broken (the server then loads the model afresh for the next request); the
/// running request gets the error.
#[test]
fn a_lost_rank_marks_the_model_broken() {
    use turbine::engine::backend::cpu::CpuKv;
    use turbine::engine::model::{Architecture, Batch, Logits, ModelInfo};
    use turbine::engine::EngineError;
    struct LostRank(Box<dyn Architecture<CpuBackend>>);
    impl Architecture<CpuBackend> for LostRank {
        fn info(&self) -> &ModelInfo {
            self.0.info()
        }
        fn kv_layout(&self) -> turbine::engine::kv::KvLayout {
            self.0.kv_layout()
        }
        fn compute(&self, _: &CpuBackend, _: &Batch, _: &mut CpuKv) -> Result<Logits, EngineError> {
            Err(EngineError::TensorParallel("tensor-parallel rank 1 left the group".into()))
        }
        fn compute_hidden(&self, _: &CpuBackend, _: &Batch, _: &mut CpuKv) -> Result<Vec<f32>, EngineError> {
            Err(EngineError::TensorParallel("tensor-parallel rank 1 left the group".into()))
        }
    }
    let whole = common::load_default_model();
    let LoadedModel { file, tokenizer, arch, backend, load_time, release } = whole;
    let m = Arc::new(LoadedModel { file, tokenizer, arch: Box::new(LostRank(arch)), backend, load_time, release });
    let s = Scheduler::start(m.clone(), SchedulerConfig::new(2, 8, 512, 4096)).expect("thread");
    assert!(!s.stats.broken.load(Ordering::SeqCst));
    let rx = submit(&s, m.tokenizer.encode("Hello", true, true), options(4, SamplerParams::greedy()));
    let error = rx.iter().find_map(|e| match e {
        SeqEvent::Error(e) => Some(e.to_string()),
        _ => None,
    });
    assert!(error.is_some_and(|e| e.contains("rank 1 left")), "the request gets the error");
    assert!(s.stats.broken.load(Ordering::SeqCst));
}
