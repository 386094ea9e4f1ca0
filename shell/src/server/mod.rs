//! `turbine serve`: Ollama's HTTP API (and OpenAI's chat completions) over tiny_http.
//!
//! A request's path: the accept loop hands each request to its own HTTP thread, which
//! reads the body (bounded), parses and validates it (`routes`), and submits a job to the
//! model's engine worker (`worker`: one thread per loaded model owning the weights). The
//! worker streams events back over a channel; the HTTP thread turns them into NDJSON or
//! SSE chunks and writes them as they come. A client that goes away makes the next send
//! fail, which cancels the generation.

pub mod catalog;
pub mod host;
pub mod options;
mod routes;
pub mod template;
pub mod worker;

use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tiny_http::{Header, Request, Response};

/// Largest request body accepted (413 beyond).
pub const MAX_BODY: usize = 16 << 20;

/// What every HTTP thread shares.
#[derive(Default)]
pub struct State {
    pub models: worker::Models,
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
pub fn serve() -> Result<(), String> {
    let hp = host::parse_ollama_host(&std::env::var("OLLAMA_HOST").unwrap_or_default());
    let addr = hp.bind_addr();
    let server = tiny_http::Server::http(&addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    eprintln!(
        "turbine serve: listening on {addr} (version {}, models in {})",
        env!("CARGO_PKG_VERSION"),
        turbine::engine::store::models_dir().display()
    );
    let limits = worker::EngineLimits::from_env()?;
    let state = Arc::new(State { models: worker::Models::new(limits) });
    let reaper = state.clone();
    let _ = std::thread::Builder::new().name("keep_alive".into()).spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        reaper.models.reap();
    });
    for request in server.incoming_requests() {
        let state = state.clone();
        if let Err(e) = std::thread::Builder::new().name("http".into()).spawn(move || handle(&state, request)) {
            eprintln!("turbine serve: cannot start a request thread: {e}");
        }
    }
    Ok(())
}

/// One request, start to end. Request and completion text are never logged.
fn handle(state: &Arc<State>, mut req: Request) {
    let start = Instant::now();
    let method = req.method().as_str().to_ascii_uppercase();
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let reply = match read_body(&mut req) {
        Err(reply) => reply,
        Ok(body) => catch_unwind(AssertUnwindSafe(|| routes::dispatch(state, &method, &path, &body)))
            .unwrap_or_else(|_| Reply::error(500, "internal server error")),
    };
    let status = reply.status();
    let http10 = req.http_version().0 == 1 && req.http_version().1 == 0;
    let sent = catch_unwind(AssertUnwindSafe(|| send(req, reply, http10)));
    let outcome = match sent {
        Ok(Ok(())) => "",
        Ok(Err(_)) => " (client went away)",
        Err(_) => " (panic while writing)",
    };
    eprintln!("turbine serve: {method} {path} {status} {:.3?}{outcome}", start.elapsed());
}

/// Reads the whole body, refusing more than MAX_BODY before reading it when the length
/// is declared.
fn read_body(req: &mut Request) -> Result<Vec<u8>, Reply> {
    let too_large = || Reply::error(413, "request body too large");
    if req.body_length().is_some_and(|n| n > MAX_BODY) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    req.as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| Reply::error(400, format!("cannot read request body: {e}")))?;
    if body.len() > MAX_BODY {
        return Err(too_large());
    }
    Ok(body)
}

fn header(name: &str, value: &str) -> Option<Header> {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

fn send(req: Request, reply: Reply, http10: bool) -> std::io::Result<()> {
    match reply {
        // HTTP/1.0 has no chunked encoding: gather the stream into one body.
        Reply::Stream { content_type, frames } if http10 => {
            let body: Vec<u8> = frames.flatten().collect();
            send(req, Reply::Full { status: 200, content_type, body }, false)
        }
        Reply::Full { status, content_type, body } => {
            let mut resp = Response::from_data(body).with_status_code(status);
            if let Some(h) = header("Content-Type", content_type) {
                resp = resp.with_header(h);
            }
            if status == 405 {
                if let Some(h) = header("Allow", "GET, HEAD, POST, DELETE") {
                    resp = resp.with_header(h);
                }
            }
            req.respond(resp)
        }
        Reply::Stream { content_type, frames } => {
            let mut w = req.into_writer();
            write!(
                w,
                "HTTP/1.1 200 OK\r\nServer: turbine\r\nContent-Type: {content_type}\r\n\
                 Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
            )?;
            w.flush()?;
            for frame in frames {
                if frame.is_empty() {
                    continue;
                }
                // On a write error the iterator (and with it the event channel) is dropped,
                // so the engine's next send fails and the generation stops.
                write!(w, "{:x}\r\n", frame.len())?;
                w.write_all(&frame)?;
                w.write_all(b"\r\n")?;
                w.flush()?;
            }
            w.write_all(b"0\r\n\r\n")?;
            w.flush()
        }
    }
}
