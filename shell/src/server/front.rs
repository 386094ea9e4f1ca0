//! The front door shared by `turbine serve` and `turbine gateway`: the listener (TLS,
//! timeouts), and for every request the Host check, CORS, API key, rate limit, body limit,
//! metrics and a log line that never holds prompt or completion text. What lies behind it
//! is a `Service`.

use super::{access, keys, metrics, ratelimit, worker, Reply};
use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tiny_http::{Header, Request, Response};

/// Largest request body accepted (413 beyond).
pub const MAX_BODY: usize = 16 << 20;

/// Longest wait for a client's bytes (an idle keep-alive connection, a TLS handshake, a
/// request's whole head, each read of a body) and for a client to take ours, unless
/// TURBINE_HTTP_TIMEOUT (seconds) says otherwise.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

fn http_timeout() -> Result<Duration, String> {
    match std::env::var("TURBINE_HTTP_TIMEOUT") {
        Err(_) => Ok(HTTP_TIMEOUT),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n @ 1..=86_400) => Ok(Duration::from_secs(n)),
            _ => Err(format!("TURBINE_HTTP_TIMEOUT={v:?}: expected whole seconds from 1 to 86400")),
        },
    }
}

/// What every request passes through before its route.
pub struct Front {
    pub keys: keys::KeyRing,
    pub limiter: Arc<ratelimit::Limiter>,
    pub metrics: Arc<metrics::Metrics>,
    pub origins: access::Origins,
    /// Bound to a loopback address: Host headers are checked (DNS rebinding).
    pub loopback: bool,
}

/// The routes behind the front door.
pub trait Service: Send + Sync + Sized + 'static {
    fn front(&self) -> &Front;
    /// Answers an admitted request; may add response headers.
    fn dispatch(
        self: &Arc<Self>,
        meter: worker::Meter,
        head: &Head,
        body: &[u8],
        headers: &mut Vec<(String, String)>,
    ) -> Reply;

    /// Whether this request's body goes to `upload` as it arrives (no 16 MiB limit).
    fn streams_body(&self, _head: &Head) -> bool {
        false
    }

    /// Answers a request whose body streams in.
    fn upload(self: &Arc<Self>, _head: &Head, _body: &mut dyn Read) -> Reply {
        Reply::error(404, "404 page not found")
    }
}

/// Flags of `turbine serve` and `turbine gateway`.
#[derive(Debug, Default)]
pub struct ListenArgs {
    /// Refuse requests without a valid API key even when no key exists yet.
    pub require_auth: bool,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// The certificate chain and private key (PEM) to serve HTTPS with.
fn tls_config(args: &ListenArgs) -> Result<Option<tiny_http::SslConfig>, String> {
    let (cert, key) = match (&args.tls_cert, &args.tls_key) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c, k),
        _ => return Err("--tls-cert and --tls-key go together".into()),
    };
    if !cfg!(feature = "tls") {
        return Err("this turbine was built without TLS (the `tls` feature)".into());
    }
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    Ok(Some(tiny_http::SslConfig { certificate: read(cert)?, private_key: read(key)? }))
}

/// Binds OLLAMA_HOST (TLS when asked) and sets up the front door; `who` starts the log lines.
pub fn bind(args: &ListenArgs, who: &str) -> Result<(tiny_http::Server, Front), String> {
    let hp = super::host::parse_ollama_host(&std::env::var("OLLAMA_HOST").unwrap_or_default());
    let addr = hp.bind_addr();
    let ssl = tls_config(args)?;
    let scheme = if ssl.is_some() { "https" } else { "http" };
    let timeout = http_timeout()?;
    let config = tiny_http::ServerConfig {
        addr: tiny_http::ConfigListenAddr::from_socket_addrs(&addr).map_err(|e| format!("bad address {addr}: {e}"))?,
        ssl,
        timeouts: tiny_http::Timeouts { read: Some(timeout), write: Some(timeout) },
    };
    let server = tiny_http::Server::new(config).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let keys = keys::KeyRing::new(keys::keys_path(), args.require_auth);
    eprintln!(
        "{who}: listening on {scheme}://{addr} (version {}, API keys {})",
        env!("CARGO_PKG_VERSION"),
        if keys.required() { "required" } else { "off: no key file" },
    );
    let loopback = matches!(hp.host.as_str(), "localhost")
        || hp.host.trim_matches(|c| c == '[' || c == ']').parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    let front = Front {
        keys,
        limiter: Arc::default(),
        metrics: Arc::default(),
        origins: access::Origins::from_env(),
        loopback,
    };
    Ok((server, front))
}

/// Serves until the process ends: a thread per request, and one that writes the keys'
/// last-used times every 10 s.
pub fn run<S: Service>(service: Arc<S>, server: tiny_http::Server) {
    let flusher = service.clone();
    let _ = std::thread::Builder::new().name("keys".into()).spawn(move || loop {
        std::thread::sleep(Duration::from_secs(10));
        if let Err(e) = flusher.front().keys.flush_last_used() {
            eprintln!("turbine: {e}");
        }
    });
    for request in server.incoming_requests() {
        let service = service.clone();
        if let Err(e) = std::thread::Builder::new().name("http".into()).spawn(move || handle(&service, request)) {
            eprintln!("turbine: cannot start a request thread: {e}");
        }
    }
}

/// The request head fields the front door and the routes look at.
pub struct Head {
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    pub origin: Option<String>,
    pub authorization: Option<String>,
    /// Tells whether the client has closed its connection (None: it cannot be told).
    pub peer: Option<tiny_http::PeerProbe>,
}

impl Head {
    fn of(req: &Request) -> Head {
        let get = |name: &'static str| {
            req.headers().iter().find(|h| h.field.equiv(name)).map(|h| h.value.as_str().to_string())
        };
        Head {
            method: req.method().as_str().to_ascii_uppercase(),
            path: req.url().split('?').next().unwrap_or("").to_string(),
            host: get("Host"),
            origin: get("Origin"),
            authorization: get("Authorization"),
            peer: req.peer_probe(),
        }
    }
}

/// One request, start to end. Request and completion text are never logged.
fn handle<S: Service>(service: &Arc<S>, mut req: Request) {
    let start = Instant::now();
    let front = service.front();
    let head = Head::of(&req);
    let mut headers = Vec::new();
    if let Some(origin) = head.origin.as_deref().filter(|o| front.origins.allows(o)) {
        headers.push(("Access-Control-Allow-Origin".to_string(), origin.to_string()));
        headers.push(("Vary".to_string(), "Origin".to_string()));
    }
    let gate = gate(front, &head, &mut headers);
    let key_id = gate.as_ref().ok().and_then(|m| m.key.as_ref().map(|(_, id)| id.clone()));
    let internal = |_| Reply::error(500, "internal server error");
    let reply = match gate {
        Err(reply) => reply,
        Ok(_) if service.streams_body(&head) => {
            catch_unwind(AssertUnwindSafe(|| service.upload(&head, req.as_reader()))).unwrap_or_else(internal)
        }
        Ok(meter) => match read_body(&mut req) {
            Err(reply) => reply,
            Ok(body) => catch_unwind(AssertUnwindSafe(|| service.dispatch(meter, &head, &body, &mut headers)))
                .unwrap_or_else(internal),
        },
    };
    let status = reply.status();
    let http10 = req.http_version().0 == 1 && req.http_version().1 == 0;
    let sent = catch_unwind(AssertUnwindSafe(|| send(req, reply, http10, &headers)));
    let outcome = match sent {
        Ok(Ok(())) => "",
        Ok(Err(_)) => " (client went away)",
        Err(_) => " (panic while writing)",
    };
    front.metrics.request(&head.path, status, start.elapsed());
    let key = key_id.map(|id| format!(" key={id}")).unwrap_or_default();
    let path = metrics::route_label(&head.path);
    eprintln!("turbine: {} {path} {status} {:.3?}{key}{outcome}", head.method, start.elapsed());
}

/// Host check, CORS preflight, API key and rate limit: the meter to run the request
/// with, or the reply that refuses it. Adds the response headers they call for.
fn gate(front: &Front, head: &Head, headers: &mut Vec<(String, String)>) -> Result<worker::Meter, Reply> {
    if !access::host_allowed(front.loopback, head.host.as_deref()) {
        return Err(Reply::error(403, "forbidden: the Host header names no local address"));
    }
    if head.method == "OPTIONS" {
        headers.push(("Access-Control-Allow-Methods".into(), access::ALLOW_METHODS.into()));
        headers.push(("Access-Control-Allow-Headers".into(), access::ALLOW_HEADERS.into()));
        headers.push(("Access-Control-Max-Age".into(), "43200".into()));
        return Err(Reply::Full { status: 204, content_type: "text/plain; charset=utf-8", body: Vec::new() });
    }
    let mut meter = worker::Meter { metrics: front.metrics.clone(), key: None };
    if matches!(head.path.as_str(), "/" | "/api/version") {
        return Ok(meter);
    }
    let key = front.keys.authorize(head.authorization.as_deref()).map_err(|denied| {
        if let keys::Denied::KeyFile(e) = denied {
            eprintln!("turbine: refusing every request: {e}");
        }
        headers.push(("WWW-Authenticate".into(), "Bearer".into()));
        Reply::error(401, "unauthorized")
    })?;
    let Some(key) = key else { return Ok(meter) };
    match front.limiter.admit(&key) {
        Ok(usage) => headers.extend(usage.headers()),
        Err(limited) => {
            headers.extend(limited.usage.headers());
            headers.push(("Retry-After".into(), limited.retry_after_secs().to_string()));
            return Err(Reply::error(429, limited.message));
        }
    }
    meter.key = Some((front.limiter.clone(), key.id));
    Ok(meter)
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

fn send(req: Request, reply: Reply, http10: bool, headers: &[(String, String)]) -> std::io::Result<()> {
    match reply {
        // HTTP/1.0 has no chunked encoding: gather the stream into one body.
        Reply::Stream { content_type, frames } if http10 => {
            let body: Vec<u8> = frames.flatten().collect();
            send(req, Reply::Full { status: 200, content_type, body }, false, headers)
        }
        Reply::Full { status, content_type, body } => {
            let mut resp = Response::from_data(body).with_status_code(status);
            if let Some(h) = header("Content-Type", content_type) {
                resp = resp.with_header(h);
            }
            for h in headers.iter().filter_map(|(k, v)| header(k, v)) {
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
            write!(w, "HTTP/1.1 200 OK\r\nServer: turbine\r\nContent-Type: {content_type}\r\n")?;
            for (k, v) in headers {
                write!(w, "{k}: {v}\r\n")?;
            }
            write!(w, "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")?;
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
