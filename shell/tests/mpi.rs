//! `mpirun -np 2 turbine serve --tp 2` (tensor parallelism over MPI) and `--pp 2` (a
//! pipeline of two processes), on loopback (the `mpi` feature, OpenMPI's `mpirun` on PATH;
//! `.ci/run` installs both). The processes serve what the in-process split (or the whole
//! model) serves, token for token and log-probability for log-probability; killing a rank
//! mid-generation answers the waiting requests with an error and ends the job within
//! seconds, never a hang. `TURBINE_COLLECTIVES` picks what carries the collectives: a value
//! it does not know ends every rank at once, and NCCL collectives that cannot start (no
//! CUDA driver here) fail the load on every rank, never a hang (with the `nccl` feature).
#![cfg(feature = "mpi")]

mod common;

use common::ServeProcess;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

const MODEL: &str = "gemma3:270m";

const TP: &[&str] = &["--tp", "2"];
const PP: &[&str] = &["--pp", "2"];
const PP3: &[&str] = &["--pp", "3"];

/// `mpirun -np N turbine serve --tp N` (or `--pp N`: `split`), its output in `log`.
/// OpenMPI refuses to run as root (CI, containers) unless told it may.
fn mpirun(log: &std::path::Path, split: &[&str]) -> Job {
    mpirun_with(log, split, &[])
}

fn mpirun_with(log: &std::path::Path, split: &[&str], env: &[(&str, &str)]) -> Job {
    let turbine = env!("CARGO_BIN_EXE_turbine");
    let mut args = vec!["--oversubscribe", "-np", split[1], turbine, "serve"];
    args.extend_from_slice(split);
    let mut all = vec![("OMPI_ALLOW_RUN_AS_ROOT", "1"), ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")];
    all.extend_from_slice(env);
    Job(ServeProcess::launch_program("mpirun", &args, &all, Some(log), None))
}

/// Split by tensors, several models stay loaded over the world at once: requests to both,
/// concurrent, each load once on every rank, and each model answers as it did alone (their
/// steps take turns, so no model's collectives fall between another's).
#[test]
fn several_models_stay_loaded_over_the_world() {
    let store = common::two_model_store("mpi-store-several");
    let log = log_path("several");
    let job = mpirun_with(&log, TP, &[("OLLAMA_MODELS", store.to_str().expect("UTF-8 path"))]);
    let port = job.0.port;
    let ask = |model: &'static str, prompt: &'static str| {
        std::thread::spawn(move || {
            let r = generate(
                port,
                &json!({ "model": model, "prompt": prompt, "raw": true, "stream": false,
                         "options": { "num_predict": 10, "temperature": 0 } }),
            );
            assert_eq!(r.status, 200, "{model}: {}", r.text());
            r.json()["response"].clone()
        })
    };
    let alone = [
        ask("gemma3:270m", "The sky is").join().expect("first"),
        ask("gemma3:second", "Once upon").join().expect("second"),
    ];
    for _ in 0..2 {
        let both = [ask("gemma3:270m", "The sky is"), ask("gemma3:second", "Once upon")];
        let got: Vec<Value> = both.into_iter().map(|t| t.join().expect("request")).collect();
        assert_eq!(got, alone, "concurrent answers differ from the answers alone");
    }
    let ps = common::request(port, "GET", "/api/ps", &[], b"").expect("ps").json();
    assert_eq!(ps["models"].as_array().map(Vec::len), Some(2), "{ps}");
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(logged.matches("turbine serve: loaded").count(), 2, "each model loads once: {logged}");
    stop(job);
    std::fs::remove_dir_all(&store).ok();
    std::fs::remove_file(&log).ok();
}

/// A pipeline world holds one model at a time: asking for another unloads the first's
/// stages on every rank before the second loads, again and again, and each answers the
/// same.
#[test]
fn pipelines_take_turns_over_the_world() {
    models_take_turns(PP, "pp-turns");
}

fn models_take_turns(split: &[&str], name: &str) {
    let store = common::two_model_store(&format!("mpi-store-{name}"));
    let log = log_path(name);
    let job = mpirun_with(&log, split, &[("OLLAMA_MODELS", store.to_str().expect("UTF-8 path"))]);
    let mut answers = Vec::new();
    for model in ["gemma3:270m", "gemma3:second", "gemma3:270m", "gemma3:second"] {
        let r = generate(
            job.0.port,
            &json!({ "model": model, "prompt": "The sky is", "raw": true, "stream": false,
                     "options": { "num_predict": 8, "temperature": 0 } }),
        );
        assert_eq!(r.status, 200, "{model}: {}", r.text());
        answers.push(r.json()["response"].clone());
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    stop(job);
    std::fs::remove_dir_all(&store).ok();
    std::fs::remove_file(&log).ok();
}

/// An mpirun job, ended as a person ends it (SIGTERM, which mpirun passes to its ranks)
/// when dropped, so a failed test leaves no rank behind.
struct Job(ServeProcess);

impl Drop for Job {
    fn drop(&mut self) {
        let kill = Command::new("kill").arg(self.0.pid().to_string()).stderr(std::process::Stdio::null()).status();
        if kill.is_ok_and(|s| s.success()) {
            self.0.wait_exit(Duration::from_secs(20));
        }
    }
}

fn log_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("turbine-mpi-{name}-{}.log", std::process::id()))
}

fn generate(port: u16, body: &Value) -> common::Resp {
    common::request(port, "POST", "/api/generate", &[], body.to_string().as_bytes()).expect("request")
}

/// Ends mpirun the way a person would (SIGTERM; it ends its ranks) and waits for it.
fn stop(mut job: Job) {
    Command::new("kill").arg(job.0.pid().to_string()).status().expect("kill");
    assert!(job.0.wait_exit(Duration::from_secs(20)).is_some(), "mpirun did not end");
}

#[test]
fn two_processes_serve_what_the_in_process_split_serves() {
    let logged = serve_alike(TP, TP, "serve");
    assert!(logged.contains("rank 1 of 2") && logged.contains("over 2 tensor-parallel ranks"), "{logged}");
}

/// A pipeline's logits are the whole model's bit for bit, so two processes as two stages
/// serve what one whole model serves.
#[test]
fn a_pipeline_of_two_processes_serves_what_the_whole_model_serves() {
    let logged = serve_alike(PP, &[], "pp-serve");
    assert!(logged.contains("rank 1 of 2") && logged.contains("in 2 pipeline stages"), "{logged}");
}

/// Three: the middle stage passes the chain's messages on.
#[test]
fn a_pipeline_of_three_processes_serves_what_the_whole_model_serves() {
    let logged = serve_alike(PP3, &[], "pp3-serve");
    assert!(logged.contains("rank 2 of 3") && logged.contains("in 3 pipeline stages"), "{logged}");
}

/// `mpirun -np N turbine serve SPLIT` against `turbine serve LOCAL`: the same text and
/// log-probabilities for concurrent greedy requests, and the same embedding; the job's log.
fn serve_alike(split: &[&str], local: &[&str], name: &str) -> String {
    let log = log_path(name);
    let job = mpirun(&log, split);
    let local = ServeProcess::start_with(&[], local, None);
    let prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):"];
    let body = |p: &str| {
        json!({ "model": MODEL, "prompt": p, "raw": true, "stream": false, "logprobs": true, "top_logprobs": 3,
                "options": { "num_predict": 12, "temperature": 0 } })
    };
    // The processes serve the prompts concurrently (one batch); the threads one at a time.
    let port = job.0.port;
    let threads: Vec<_> = prompts
        .iter()
        .map(|p| {
            let b = body(p);
            std::thread::spawn(move || generate(port, &b))
        })
        .collect();
    for (t, p) in threads.into_iter().zip(prompts) {
        let over_mpi = t.join().expect("request");
        assert_eq!(over_mpi.status, 200, "{}", over_mpi.text());
        let in_process = generate(local.port, &body(p));
        let (a, b) = (over_mpi.json(), in_process.json());
        assert_eq!(a["response"], b["response"], "{p:?}");
        assert_eq!(a["eval_count"], json!(12));
        assert_eq!(a["logprobs"], b["logprobs"], "{p:?}: log-probabilities differ");
    }
    let embed = |port| {
        let body = json!({"model": MODEL, "input": "sky"}).to_string();
        common::request(port, "POST", "/api/embed", &[], body.as_bytes()).expect("embed")
    };
    let (e, here) = (embed(port), embed(local.port));
    assert_eq!(e.status, 200, "{}", e.text());
    assert_eq!(e.json()["embeddings"], here.json()["embeddings"]);
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    stop(job);
    std::fs::remove_file(&log).ok();
    logged
}

#[test]
fn killing_a_rank_answers_the_waiting_requests_and_ends_the_job() {
    killing_a_rank(TP, "kill");
}

#[test]
fn killing_a_pipeline_stage_answers_the_waiting_requests_and_ends_the_job() {
    killing_a_rank(PP, "pp-kill");
}

fn killing_a_rank(split: &[&str], name: &str) {
    let log = log_path(name);
    let mut job = mpirun(&log, split);
    let port = job.0.port;
    let warm =
        generate(port, &json!({ "model": MODEL, "prompt": "Hi", "stream": false, "options": { "num_predict": 1 } }));
    assert_eq!(warm.status, 200, "{}", warm.text());
    let long = |stream: bool| {
        json!({ "model": MODEL, "prompt": "Once upon a time", "raw": true, "stream": stream,
                "options": { "num_predict": 30000, "temperature": 0 } })
    };
    let (streamed, whole) = (long(true), long(false));
    let streaming = std::thread::spawn(move || generate(port, &streamed));
    let waiting = std::thread::spawn(move || generate(port, &whole));
    std::thread::sleep(Duration::from_millis(1500));
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let pid = logged
        .split("(pid ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("rank 1's pid is not in the log: {logged}"));
    let killed = Instant::now();
    assert!(Command::new("kill").args(["-9", pid]).status().expect("kill").success());

    let why = "MPI group is ending";
    let s = streaming.join().expect("streaming request");
    let last = s.text().lines().last().unwrap_or_default().to_string();
    assert!(last.contains(why), "the stream ends with the error: {last}");
    let w = waiting.join().expect("waiting request");
    assert_eq!(w.status, 500, "{}", w.text());
    assert!(w.text().contains(why), "{}", w.text());
    assert!(killed.elapsed() < Duration::from_secs(10), "answered after {:?}", killed.elapsed());
    let status = job.0.wait_exit(Duration::from_secs(10)).expect("mpirun ends the job");
    assert!(!status.success());
    std::fs::remove_file(&log).ok();
}

/// `mpirun -np 2 turbine ARGS` with `env`, which must end by itself within `limit`: its
/// exit status and output (every rank's and mpirun's). A job still running then is a hang:
/// it is ended and the test fails. Every process of the job carries a marker in its
/// environment, so that none may be left once mpirun is gone.
fn run_to_end(name: &str, args: &[&str], env: &[(&str, &str)], limit: Duration) -> (std::process::ExitStatus, String) {
    let log = log_path(name);
    let out = std::fs::File::create(&log).expect("log file");
    let marker = format!("{name}-{}", std::process::id());
    let mut job = Command::new("mpirun")
        .args(["--oversubscribe", "-np", "2", env!("CARGO_BIN_EXE_turbine")])
        .args(args)
        .envs([("OMPI_ALLOW_RUN_AS_ROOT", "1"), ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")])
        .envs(env.iter().copied())
        .env(JOB_MARKER, &marker)
        .stdout(out.try_clone().expect("log file"))
        .stderr(out)
        .spawn()
        .expect("start mpirun");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = job.try_wait().expect("mpirun's status") {
            break status;
        }
        if started.elapsed() > limit {
            Command::new("kill").arg(job.id().to_string()).status().ok();
            std::thread::sleep(Duration::from_secs(5));
            job.kill().ok();
            job.wait().ok();
            kill_all(&processes_of(&marker));
            let logged = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("mpirun {args:?} did not end within {limit:?} (a hang): {logged}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_no_process_left(&marker);
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    std::fs::remove_file(&log).ok();
    (status, logged)
}

/// The environment variable that marks a job's processes.
const JOB_MARKER: &str = "TURBINE_TEST_MPI_JOB";

/// The processes whose environment holds `JOB_MARKER=marker` (Linux's /proc).
fn processes_of(marker: &str) -> Vec<u32> {
    let wanted = format!("{JOB_MARKER}={marker}");
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            environ.split(|&b| b == 0).any(|var| var == wanted.as_bytes())
        })
        .collect()
}

fn kill_all(pids: &[u32]) {
    for pid in pids {
        Command::new("kill").args(["-9", &pid.to_string()]).status().ok();
    }
}

/// Once mpirun has ended, none of its job's processes is left (a moment allowed for them
/// to go); any that is left is killed and fails the test.
fn assert_no_process_left(marker: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut left = processes_of(marker);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        left = processes_of(marker);
    }
    kill_all(&left);
    assert!(left.is_empty(), "processes {left:?} of the job outlived mpirun");
}

/// `turbine bench` of the default model over two ranks, small enough to end at once where
/// it runs at all.
const BENCH_TP: &[&str] = &["bench", "-m", MODEL, "--tp", "2", "-p", "8", "-n", "2", "-r", "1", "-t", "1"];

/// A value of TURBINE_COLLECTIVES that is neither `mpi` nor `nccl` ends every rank before
/// MPI starts (none waits for another), saying what it got and what it takes.
#[test]
fn an_unknown_collectives_value_is_refused_by_every_rank() {
    let env = [("TURBINE_COLLECTIVES", "gloo")];
    let (status, logged) = run_to_end("collectives-unknown", BENCH_TP, &env, Duration::from_secs(60));
    assert!(!status.success(), "{logged}");
    let refusal = "error: TURBINE_COLLECTIVES=\"gloo\" is not known: use mpi (the default) or nccl";
    // mpirun ends the job as the first rank exits, maybe before the other has said so.
    assert!(logged.contains(refusal), "{logged}");
}

/// Built without NCCL, asking for it is refused by every rank, saying how to build.
#[cfg(not(feature = "nccl"))]
#[test]
fn nccl_collectives_in_a_build_without_nccl_are_refused() {
    let env = [("TURBINE_COLLECTIVES", "nccl")];
    let (status, logged) = run_to_end("collectives-no-nccl", BENCH_TP, &env, Duration::from_secs(60));
    assert!(!status.success(), "{logged}");
    let refusal = "error: TURBINE_COLLECTIVES=nccl: built without NCCL: build with --features mpi,nccl";
    // mpirun ends the job as the first rank exits, maybe before the other has said so.
    assert!(logged.contains(refusal), "{logged}");
}

/// Whether this machine has a CUDA driver (where it has none, NCCL cannot start).
#[cfg(feature = "nccl")]
fn cuda_driver_here() -> bool {
    // SAFETY: only tries to open the driver's library by its candidate names.
    unsafe { turbine::cuda::cudarc::driver::sys::is_culib_present() }
}

/// What rank 0 reports when no rank can start NCCL for want of a CUDA driver.
#[cfg(feature = "nccl")]
const NO_DRIVER: &str = "tensor parallelism failed: NCCL could not start on every rank (opening each rank's GPU): \
                         ranks 0, 1: NCCL: no CUDA driver (libcuda) on this machine";

/// With TURBINE_COLLECTIVES=nccl and no CUDA driver, the model's load fails on every rank
/// before any rank waits in NCCL's init: rank 0 reports why for each rank, and the job
/// ends (rank 0 with the error, the others told to go), within seconds.
#[cfg(feature = "nccl")]
#[test]
fn nccl_collectives_that_cannot_start_fail_the_load_and_the_job_ends() {
    let env = [("TURBINE_COLLECTIVES", "nccl")];
    let (status, logged) = run_to_end("nccl-bench", BENCH_TP, &env, Duration::from_secs(120));
    if cuda_driver_here() {
        // A GPU machine: the bench may run; either way it ended, and a failure names NCCL.
        assert!(status.success() || logged.contains("NCCL"), "{logged}");
        return;
    }
    assert!(!status.success(), "{logged}");
    assert!(logged.contains(&format!("error: {NO_DRIVER}")), "{logged}");
}

/// Serving with TURBINE_COLLECTIVES=nccl and no CUDA driver: each request's load fails on
/// every rank with rank 0's report, again and again (the ranks stay in step after a
/// failed load), each answered within seconds; the job then ends as usual.
#[cfg(feature = "nccl")]
#[test]
fn nccl_collectives_that_cannot_start_fail_each_served_load_in_step() {
    if cuda_driver_here() {
        eprintln!("skipped: a CUDA driver is here, so NCCL may start");
        return;
    }
    let log = log_path("nccl-serve");
    let marker = format!("nccl-serve-{}", std::process::id());
    let job = mpirun_with(&log, TP, &[("TURBINE_COLLECTIVES", "nccl"), (JOB_MARKER, &marker)]);
    let body = json!({ "model": MODEL, "prompt": "Hi", "stream": false, "options": { "num_predict": 1 } });
    for attempt in 0..2 {
        let asked = Instant::now();
        let r = generate_within(job.0.port, &body, Duration::from_secs(60));
        assert_eq!(r.status, 500, "attempt {attempt}: {}", r.text());
        assert!(r.text().contains(NO_DRIVER), "attempt {attempt}: {}", r.text());
        assert!(asked.elapsed() < Duration::from_secs(30), "attempt {attempt} answered after {:?}", asked.elapsed());
    }
    stop(job);
    assert_no_process_left(&marker);
    std::fs::remove_file(&log).ok();
}

/// [`generate`], failing the test when no answer comes within `limit` (a hang).
#[cfg(feature = "nccl")]
fn generate_within(port: u16, body: &Value, limit: Duration) -> common::Resp {
    let (tx, rx) = std::sync::mpsc::channel();
    let body = body.clone();
    std::thread::spawn(move || tx.send(generate(port, &body)).ok());
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("no answer within {limit:?} (a hang)"))
}
