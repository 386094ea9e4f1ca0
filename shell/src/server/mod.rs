//! `turbine serve`: Ollama's HTTP API (and OpenAI's chat completions) over tiny_http.
//!
//! A request's path: the accept loop hands each request to its own HTTP thread, which
//! reads the body (bounded), parses and validates it (`routes`), and submits a job to the
//! model's engine worker (`worker`: one thread per loaded model owning the weights). The
//! worker streams events back over a channel; the HTTP thread turns them into NDJSON or
//! SSE chunks and writes them as they come. A client that goes away makes the next send
//! fail, which cancels the generation.

pub mod access;
pub mod catalog;
pub mod front;
pub mod gotemplate;
pub mod host;
pub mod keys;
pub mod metrics;
pub mod options;
pub mod output;
pub mod ratelimit;
mod routes;
pub mod template;
pub mod worker;

pub use front::{Front, Head, ListenArgs, Service};
use std::sync::Arc;
use std::time::Duration;

/// The routes behind the front door: the engine's models.
pub struct State {
    pub front: Front,
    pub models: worker::Models,
}

impl Service for State {
    fn front(&self) -> &Front {
        &self.front
    }

    fn dispatch(
        self: &Arc<Self>,
        meter: worker::Meter,
        head: &Head,
        body: &[u8],
        _: &mut Vec<(String, String)>,
    ) -> Reply {
        let cx = Cx { state: self.clone(), meter, peer: head.peer.clone() };
        routes::dispatch(&cx, &head.method, &head.path, body)
    }

    /// Blob uploads stream to disk as they arrive.
    fn streams_body(&self, head: &Head) -> bool {
        head.method == "POST" && head.path.starts_with("/api/blobs/")
    }

    fn upload(self: &Arc<Self>, head: &Head, body: &mut dyn std::io::Read) -> Reply {
        routes::create::upload(&head.path, body).unwrap_or_else(|e| e)
    }
}
/// One request as the routes see it: the shared state, and where its token usage goes.
pub struct Cx {
    pub state: Arc<State>,
    pub meter: worker::Meter,
    /// Whether the client has gone away: checked while an answer is being computed and
    /// nothing is written yet, so that the generation stops with it.
    pub peer: Option<tiny_http::PeerProbe>,
}

/// A response, complete or streamed.
pub enum Reply {
    Full {
        status: u16,
        content_type: &'static str,
        body: Vec<u8>,
    },
    /// 200 with a chunked body; each item is written and flushed as it comes.
    Stream {
        content_type: &'static str,
        frames: Box<dyn Iterator<Item = Vec<u8>> + Send>,
    },
}

impl Reply {
    pub fn json(status: u16, v: &serde_json::Value) -> Reply {
        Reply::Full { status, content_type: "application/json; charset=utf-8", body: v.to_string().into_bytes() }
    }

    /// Ollama's error body: `{"error":"..."}`.
    pub fn error(status: u16, message: impl Into<String>) -> Reply {
        Reply::json(status, &serde_json::json!({ "error": message.into() }))
    }

    pub fn text(status: u16, text: &str) -> Reply {
        Reply::Full { status, content_type: "text/plain; charset=utf-8", body: text.as_bytes().to_vec() }
    }

    fn status(&self) -> u16 {
        match self {
            Reply::Full { status, .. } => *status,
            Reply::Stream { .. } => 200,
        }
    }
}

/// Listens on OLLAMA_HOST and serves until the process ends.
/// Under `mpirun`: the world whose processes hold the shares of each model (rank 0 serves).
#[cfg(feature = "mpi")]
pub static MPI_WORLD: std::sync::OnceLock<Arc<turbine::engine::parallel::mpi::MpiWorld>> = std::sync::OnceLock::new();

/// Rank 0 under MPI: on SIGTERM (mpirun ending the job because a rank died, or a person
/// stopping it), waiting requests are answered with an error, then the process exits
/// before the launcher's SIGKILL.
#[cfg(feature = "mpi")]
pub fn fail_on_termination() -> Result<(), String> {
    turbine::engine::parallel::mpi::on_termination(|| {
        let why = "the MPI group is ending (a rank was lost or the job was stopped)";
        eprintln!("turbine serve: {why}: answering waiting requests, then exiting");
        worker::fail_engine(why);
        // Waiting requests notice within PEER_CHECK (100 ms); their answers then go out.
        std::thread::sleep(Duration::from_millis(500));
        std::process::exit(1);
    })
}

/// Serves the store's models, each split over `tensor_parallel` ranks or into
/// `pipeline_stages` stages (1 and 1: whole), whole models on `device`.
pub fn serve(
    args: &ListenArgs,
    tensor_parallel: usize,
    pipeline_stages: usize,
    device: turbine::engine::generate::Device,
) -> Result<(), String> {
    let mut limits =
        worker::EngineLimits { tensor_parallel, pipeline_stages, device, ..worker::EngineLimits::from_env()? };
    // On a GPU the budget that matters is the GPU's: models and their caches live there.
    // A tenth is left for what the budget does not count (activations, the kernels).
    let budget_set =
        std::env::var("TURBINE_MAX_MEMORY_MB").is_ok_and(|v| v.trim().parse::<usize>().is_ok_and(|n| n > 0));
    if let Some(free) = device.gpu_free_memory().filter(|_| !budget_set) {
        limits.max_memory_mb = usize::try_from(free / 10 * 9 >> 20).unwrap_or(usize::MAX);
        eprintln!("turbine serve: models on {device}, within {} MiB (90% of its free memory)", limits.max_memory_mb);
    }
    // A pipeline over MPI holds one model at a time: its stages serve one chain.
    #[cfg(feature = "mpi")]
    let limits = match MPI_WORLD.get() {
        Some(world) if world.is_pipelined() => worker::EngineLimits { max_loaded: 1, ..limits },
        _ => limits,
    };
    let (server, front) = front::bind(args, "turbine serve")?;
    eprintln!("turbine serve: models in {}", turbine::engine::store::models_dir().display());
    let state = Arc::new(State { front, models: worker::Models::new(limits) });
    let reaper = state.clone();
    let _ = std::thread::Builder::new().name("keep_alive".into()).spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        reaper.models.reap();
    });
    front::run(state, server);
    Ok(())
}
