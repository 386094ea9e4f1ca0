//! `turbine gateway`: Ollama's API, with API keys and rate limits, in front of several
//! `turbine serve` compute nodes, and no engine of its own.
//!
//! A request that names a model goes to a node that has it. Conversations stick to one
//! node (rendezvous hashing of the conversation's opening, so the node's prefix cache
//! holds it) unless that node is much busier than the idlest; other requests go to the
//! least loaded node (load: its queued and running sequences from /metrics, plus this
//! gateway's requests open on it). Nodes are health-checked every two seconds. A node
//! that fails before the first byte of its answer is marked down and the request goes to
//! another; a stream cut mid-way ends with a clean error line. Streams pass through
//! unchanged. /api/tags, /api/ps and /v1/models merge the nodes' lists.

use crate::client::http::{Fail, Response, Target};
use crate::server::front::{self, Front, Head, ListenArgs, Service};
use crate::server::worker::Meter;
use crate::server::Reply;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{BufRead, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often every node is checked.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Limit on a health check, and on connecting to a node for a request.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest silence from a node in the middle of an answer (a long prompt evaluates first).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);
/// A conversation leaves its node only when that node's load is above the idlest node's
/// by more than this, and by more than BALANCE_REL times.
const BALANCE_ABS: usize = 4;
const BALANCE_REL: f64 = 1.5;
/// Largest whole (non-streamed) answer relayed; a stream's line likewise.
const MAX_ANSWER: u64 = 512 << 20;
const MAX_LINE: u64 = 16 << 20;

/// `turbine gateway` settings.
#[derive(Debug, Default)]
pub struct GatewayArgs {
    pub listen: ListenArgs,
    /// Node base URLs (`http://host:port`, or https).
    pub nodes: Vec<String>,
    /// A JSON file `{"nodes": [...], "node_key": "..."}` adding nodes (and the key).
    pub config: Option<PathBuf>,
}

/// One compute node as the gateway sees it.
struct Node {
    url: String,
    /// For health checks (short timeout).
    check: Target,
    /// For requests (long timeout once connected).
    proxy: Target,
    up: AtomicBool,
    /// Models it has (normalized names).
    models: Mutex<HashSet<String>>,
    /// Sequences queued and running on it, from its /metrics.
    load: AtomicUsize,
    /// Requests this gateway has open on it.
    in_flight: AtomicUsize,
}

impl Node {
    fn new(url: &str, key: Option<&str>) -> Result<Node, String> {
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let default_port = match scheme {
            "http" => 80,
            "https" => 443,
            _ => return Err(format!("node {url:?}: give it as http://host:port or https://host:port")),
        };
        let addr = rest.trim_end_matches('/');
        if addr.is_empty() || addr.contains('/') {
            return Err(format!("node {url:?}: expected {scheme}://host:port with no path"));
        }
        let (addr, host) = match addr.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() && !h.ends_with(':') => (addr.to_string(), h),
            _ => (format!("{addr}:{default_port}"), addr),
        };
        let tls_name = (scheme == "https").then(|| host.trim_matches(|c| c == '[' || c == ']').to_string());
        let target = |timeout| Target {
            addr: addr.clone(),
            api_key: key.map(String::from),
            timeout: Some(timeout),
            tls_name: tls_name.clone(),
        };
        Ok(Node {
            url: format!("{scheme}://{addr}"),
            check: target(CHECK_TIMEOUT),
            proxy: target(ANSWER_TIMEOUT),
            up: AtomicBool::new(false),
            models: Mutex::default(),
            load: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
        })
    }

    fn load(&self) -> usize {
        self.load.load(Ordering::Relaxed) + self.in_flight.load(Ordering::Relaxed)
    }

    fn has(&self, model: &str) -> bool {
        lock(&self.models).contains(model)
    }

    /// Refreshes models and load; a node that does not answer both is down.
    fn health_check(&self) {
        let result = (|| -> Result<(HashSet<String>, usize), String> {
            let tags = self.check.json("GET", "/api/tags", None)?;
            let models = tags["models"]
                .as_array()
                .map(|a| a.iter().filter_map(|m| m["name"].as_str()).map(normalize_model).collect())
                .unwrap_or_default();
            let mut r = self.check.send("GET", "/metrics", None)?;
            let mut text = String::new();
            r.body.by_ref().take(MAX_LINE).read_to_string(&mut text).map_err(|e| e.to_string())?;
            Ok((models, queue_load(&text)))
        })();
        match result {
            Ok((models, load)) => {
                *lock(&self.models) = models;
                self.load.store(load, Ordering::Relaxed);
                if !self.up.swap(true, Ordering::SeqCst) {
                    eprintln!("turbine gateway: node {} is up", self.url);
                }
            }
            Err(e) => self.mark_down(&e),
        }
    }

    fn mark_down(&self, why: &str) {
        if self.up.swap(false, Ordering::SeqCst) {
            eprintln!("turbine gateway: node {} is down: {why}", self.url);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `gemma3` → `gemma3:latest`, as Ollama completes a name without a tag.
fn normalize_model(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

/// Queued plus running sequences over every model in a node's /metrics.
fn queue_load(metrics: &str) -> usize {
    metrics
        .lines()
        .filter(|l| l.starts_with("turbine_requests_waiting{") || l.starts_with("turbine_requests_running{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v.max(0.0) as usize)
        .sum()
}

/// What identifies a conversation for the prefix cache: the model and its opening (the
/// messages up to and including the first user turn, or the prompt's first 512 bytes).
fn affinity(model: &str, body: &Value) -> Option<u64> {
    let mut h = DefaultHasher::new();
    model.hash(&mut h);
    if let Some(msgs) = body["messages"].as_array() {
        let first_user = msgs.iter().position(|m| m["role"] == "user").unwrap_or(msgs.len().saturating_sub(1));
        msgs.get(..=first_user)?.iter().for_each(|m| m.to_string().hash(&mut h));
    } else {
        let system = body["system"].as_str().unwrap_or("");
        let prompt = body["prompt"].as_str()?;
        let cut = (0..=prompt.len().min(512)).rev().find(|&i| prompt.is_char_boundary(i)).unwrap_or(0);
        (system, &prompt[..cut]).hash(&mut h);
    }
    Some(h.finish())
}

/// Rendezvous score of a node for a key: every gateway agrees on the winner, and losing
/// a node moves only its own conversations.
fn score(key: u64, url: &str) -> u64 {
    let mut h = DefaultHasher::new();
    (key, url).hash(&mut h);
    h.finish()
}

pub struct Gateway {
    front: Front,
    nodes: Vec<Arc<Node>>,
    /// Breaks ties among equally loaded nodes in turn.
    turn: AtomicUsize,
}

/// Counts a request as open on its node while alive.
struct InFlight(Arc<Node>);

impl InFlight {
    fn new(node: &Arc<Node>) -> InFlight {
        node.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(node.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Gateway {
    /// The node for a request: among the up nodes not yet tried, those with the model (or
    /// all of them, to let a node answer that it has none), by affinity or load.
    fn pick(&self, model: Option<&str>, key: Option<u64>, tried: &[String]) -> Option<Arc<Node>> {
        let up: Vec<&Arc<Node>> =
            self.nodes.iter().filter(|n| n.up.load(Ordering::SeqCst) && !tried.contains(&n.url)).collect();
        let with_model: Vec<&Arc<Node>> = up.iter().copied().filter(|n| model.is_some_and(|m| n.has(m))).collect();
        let candidates = if with_model.is_empty() { up } else { with_model };
        let least = candidates.iter().map(|n| n.load()).min()?;
        if let Some(key) = key {
            let preferred = candidates.iter().max_by_key(|n| score(key, &n.url))?;
            let load = preferred.load();
            if load <= least + BALANCE_ABS || (load as f64) <= BALANCE_REL * least as f64 {
                return Some((*preferred).clone());
            }
        }
        let idlest: Vec<&&Arc<Node>> = candidates.iter().filter(|n| n.load() == least).collect();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        idlest.get(turn % idlest.len().max(1)).map(|n| (**n).clone())
    }

    /// Sends a request to a node, trying the next one while nodes fail before answering.
    fn forward(
        &self,
        head: &Head,
        body: &[u8],
        headers: &mut Vec<(String, String)>,
    ) -> Result<(Response, InFlight), Reply> {
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        let model = parsed.as_ref().and_then(|v| v["model"].as_str().or(v["name"].as_str())).map(normalize_model);
        let model = model.or_else(|| head.path.strip_prefix("/v1/models/").map(normalize_model));
        let key = match (&model, &parsed) {
            (Some(m), Some(v)) => affinity(m, v),
            _ => None,
        };
        let mut tried = Vec::new();
        while let Some(node) = self.pick(model.as_deref(), key, &tried) {
            let guard = InFlight::new(&node);
            match node.proxy.request(&head.method, &head.path, body) {
                Ok(resp) => {
                    headers.push(("x-turbine-node".into(), node.url.clone()));
                    return Ok((resp, guard));
                }
                Err(Fail::Connect(e) | Fail::Exchange(e)) => {
                    node.mark_down(&e.to_string());
                    tried.push(node.url.clone());
                }
            }
        }
        Err(Reply::error(503, "no compute node is available; try again shortly"))
    }

    /// A node's answer, passed on: streams line by line, anything else whole.
    fn relay(&self, resp: Response, guard: InFlight, meter: Meter) -> Reply {
        let content_type = static_content_type(resp.content_type.as_deref());
        let mut usage = Usage { meter, counted: (0, 0), charged: (0, 0) };
        let streamed = content_type == NDJSON || content_type == SSE;
        if resp.status == 200 && streamed {
            let frames = Relay { body: resp.body, sse: content_type == SSE, usage, guard, done: false, blank: true };
            return Reply::Stream { content_type, frames: Box::new(frames) };
        }
        let reply = whole(resp);
        drop(guard);
        if let Reply::Full { body, .. } = &reply {
            if let Ok(v) = serde_json::from_slice::<Value>(body) {
                usage.count(&v);
            }
        }
        reply
    }

    /// The same GET on every up node, their JSON answers in node order.
    fn gather(&self, path: &str) -> Vec<Value> {
        let up: Vec<&Arc<Node>> = self.nodes.iter().filter(|n| n.up.load(Ordering::SeqCst)).collect();
        std::thread::scope(|s| {
            let asks: Vec<_> = up.iter().map(|n| s.spawn(|| n.check.json("GET", path, None).ok())).collect();
            asks.into_iter().filter_map(|a| a.join().ok().flatten()).collect()
        })
    }

    /// /api/tags, /api/ps (`list` "models", by "name") and /v1/models ("data", by "id"):
    /// every node's entries, each name once.
    fn merged(&self, path: &str, list: &str, id: &str) -> Reply {
        let mut seen = HashSet::new();
        let mut items = Vec::new();
        for answer in self.gather(path) {
            for item in answer[list].as_array().into_iter().flatten() {
                if seen.insert(item[id].as_str().unwrap_or_default().to_string()) {
                    items.push(item.clone());
                }
            }
        }
        let mut out = json!({ list: items });
        if list == "data" {
            out["object"] = json!("list");
        }
        Reply::json(200, &out)
    }

    /// Copy and delete change every node that has the model.
    fn broadcast(&self, head: &Head, body: &[u8]) -> Reply {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let name = v["source"].as_str().or(v["model"].as_str()).or(v["name"].as_str()).map(normalize_model);
        let targets: Vec<&Arc<Node>> = self
            .nodes
            .iter()
            .filter(|n| n.up.load(Ordering::SeqCst) && name.as_deref().is_some_and(|m| n.has(m)))
            .collect();
        if targets.is_empty() {
            return Reply::error(404, format!("model '{}' not found", name.unwrap_or_default()));
        }
        for n in &targets {
            match n.proxy.request(&head.method, &head.path, body) {
                Ok(r) if r.status == 200 => {}
                Ok(r) => return whole(r),
                Err(Fail::Connect(e) | Fail::Exchange(e)) => {
                    return Reply::error(502, format!("compute node {} failed: {e}", n.url))
                }
            }
        }
        Reply::Full { status: 200, content_type: JSON, body: Vec::new() }
    }

    fn metrics(&self) -> Reply {
        let mut text = self.front.metrics.render(&[]);
        let series: [(&str, &str, fn(&Node) -> usize); 3] = [
            ("turbine_gateway_node_up", "1 when the node answered its last health check.", |n| {
                usize::from(n.up.load(Ordering::SeqCst))
            }),
            ("turbine_gateway_node_load", "Sequences queued and running on the node.", |n| {
                n.load.load(Ordering::Relaxed)
            }),
            ("turbine_gateway_node_in_flight", "Requests this gateway has open on the node.", |n| {
                n.in_flight.load(Ordering::Relaxed)
            }),
        ];
        for (name, help, get) in series {
            text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
            for n in &self.nodes {
                text.push_str(&format!("{name}{{node=\"{}\"}} {}\n", n.url, get(n)));
            }
        }
        Reply::Full { status: 200, content_type: "text/plain; version=0.0.4; charset=utf-8", body: text.into_bytes() }
    }
}

impl Service for Gateway {
    fn front(&self) -> &Front {
        &self.front
    }

    fn dispatch(
        self: &Arc<Self>,
        meter: Meter,
        head: &Head,
        body: &[u8],
        headers: &mut Vec<(String, String)>,
    ) -> Reply {
        match (head.method.as_str(), head.path.as_str()) {
            ("GET" | "HEAD", "/") => Reply::text(200, "Ollama is running"),
            ("GET" | "HEAD", "/api/version") => Reply::json(200, &json!({ "version": env!("CARGO_PKG_VERSION") })),
            ("GET" | "HEAD", "/api/tags") => self.merged("/api/tags", "models", "name"),
            ("GET", "/api/ps") => self.merged("/api/ps", "models", "name"),
            ("GET", "/v1/models") => self.merged("/v1/models", "data", "id"),
            ("GET", "/metrics") => self.metrics(),
            ("POST", "/api/copy") | ("DELETE", "/api/delete") => self.broadcast(head, body),
            _ => match self.forward(head, body, headers) {
                Ok((resp, guard)) => self.relay(resp, guard, meter),
                Err(reply) => reply,
            },
        }
    }
}

const NDJSON: &str = "application/x-ndjson";
const SSE: &str = "text/event-stream";
const JSON: &str = "application/json; charset=utf-8";

/// A node's Content-Type as one of the types the API uses.
fn static_content_type(ct: Option<&str>) -> &'static str {
    let ct = ct.unwrap_or("").to_ascii_lowercase();
    if ct.starts_with(NDJSON) {
        NDJSON
    } else if ct.starts_with(SSE) {
        SSE
    } else if ct.starts_with("application/json") {
        JSON
    } else if ct.starts_with("text/plain") {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    }
}

/// A node's whole answer (bounded), with its status.
fn whole(resp: Response) -> Reply {
    let content_type = static_content_type(resp.content_type.as_deref());
    let mut body = Vec::new();
    match resp.body.take(MAX_ANSWER).read_to_end(&mut body) {
        Ok(_) => Reply::Full { status: resp.status, content_type, body },
        Err(e) => Reply::error(502, format!("compute node failed while answering: {e}")),
    }
}

/// Tokens of a relayed answer, charged to the request's meter as they pass.
struct Usage {
    meter: Meter,
    /// (prompt, generated) seen so far.
    counted: (usize, usize),
    charged: (usize, usize),
}

impl Usage {
    /// Reads one answer object (a whole answer, an NDJSON line or an SSE event): final
    /// counts where it has them (Ollama's `prompt_eval_count`/`eval_count`, OpenAI's
    /// `usage`), else one more generated token for a chunk of text.
    fn count(&mut self, v: &Value) {
        let n = |x: &Value| x.as_u64().map(|n| n as usize);
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.counted = (n(&u["prompt_tokens"]).unwrap_or(0), n(&u["completion_tokens"]).unwrap_or(self.counted.1));
        } else if v.get("done") == Some(&Value::Bool(true)) || v.get("embeddings").is_some() {
            self.counted = (n(&v["prompt_eval_count"]).unwrap_or(0), n(&v["eval_count"]).unwrap_or(0));
        } else if v.get("response").is_some() || v.get("message").is_some() || v.get("choices").is_some() {
            self.counted.1 += 1;
        }
        let (p, g) = (self.counted.0.saturating_sub(self.charged.0), self.counted.1.saturating_sub(self.charged.1));
        if p + g > 0 {
            self.meter.charge(p, g);
            self.charged = (self.charged.0.max(self.counted.0), self.charged.1.max(self.counted.1));
        }
    }
}

/// A streamed answer passed on line by line.
struct Relay {
    body: std::io::BufReader<crate::client::http::Body>,
    sse: bool,
    usage: Usage,
    guard: InFlight,
    done: bool,
    /// The last line passed on was blank (an SSE event ended there).
    blank: bool,
}

impl Iterator for Relay {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        if self.done {
            return None;
        }
        let mut line = Vec::new();
        match self.body.by_ref().take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(0) => {
                self.done = true;
                None
            }
            Ok(_) if line.ends_with(b"\n") => {
                self.blank = line.trim_ascii().is_empty();
                let text = line.strip_prefix(b"data: ").unwrap_or(&line);
                if let Ok(v) = serde_json::from_slice::<Value>(text) {
                    self.usage.count(&v);
                }
                Some(line)
            }
            // A line cut short, or a failed read: the node went away mid-answer.
            Ok(_) | Err(_) => {
                self.done = true;
                let message = format!("compute node {} stopped in the middle of the answer", self.guard.0.url);
                self.guard.0.mark_down(&message);
                Some(self.error_line(&message))
            }
        }
    }
}

impl Relay {
    /// The stream's last line: Ollama's `{"error": ...}`, or an SSE error event.
    fn error_line(&self, message: &str) -> Vec<u8> {
        if self.sse {
            let event = json!({ "error": { "message": message, "type": "api_error" } });
            format!("{}data: {event}\n\n", if self.blank { "" } else { "\n" }).into_bytes()
        } else {
            format!("{}\n", json!({ "error": message })).into_bytes()
        }
    }
}

/// Nodes and their key from the flags, TURBINE_NODE_KEY and the config file.
fn nodes_from(args: &GatewayArgs) -> Result<Vec<Arc<Node>>, String> {
    let mut urls = args.nodes.clone();
    let mut key = std::env::var("TURBINE_NODE_KEY").ok().filter(|k| !k.is_empty());
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
        let listed =
            v["nodes"].as_array().ok_or_else(|| format!("{}: expected {{\"nodes\": [urls]}}", path.display()))?;
        for u in listed {
            urls.push(u.as_str().ok_or_else(|| format!("{}: node URLs are strings", path.display()))?.to_string());
        }
        if let Some(k) = v["node_key"].as_str() {
            key = Some(k.to_string());
        }
    }
    if urls.is_empty() {
        return Err("no compute nodes: give --node URL (repeatable) or --config FILE".into());
    }
    let mut seen = HashMap::new();
    let mut nodes = Vec::new();
    for u in &urls {
        let node = Node::new(u, key.as_deref())?;
        if seen.insert(node.url.clone(), ()).is_none() {
            nodes.push(Arc::new(node));
        }
    }
    Ok(nodes)
}

/// Runs the gateway until the process ends.
pub fn run(args: &GatewayArgs) -> Result<(), String> {
    let nodes = nodes_from(args)?;
    let (server, front) = front::bind(&args.listen, "turbine gateway")?;
    for node in &nodes {
        let node = node.clone();
        node.health_check();
        let spawned = std::thread::Builder::new().name("health".into()).spawn(move || loop {
            let next = Instant::now() + HEALTH_INTERVAL;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            node.health_check();
        });
        spawned.map_err(|e| format!("cannot start a health-check thread: {e}"))?;
    }
    let up = nodes.iter().filter(|n| n.up.load(Ordering::SeqCst)).count();
    eprintln!("turbine gateway: {up} of {} nodes up", nodes.len());
    front::run(Arc::new(Gateway { front, nodes, turn: AtomicUsize::new(0) }), server);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(url: &str, load: usize, models: &[&str]) -> Arc<Node> {
        let n = Node::new(url, None).unwrap();
        n.up.store(true, Ordering::SeqCst);
        n.load.store(load, Ordering::SeqCst);
        *lock(&n.models) = models.iter().map(|m| normalize_model(m)).collect();
        Arc::new(n)
    }

    fn gateway(nodes: Vec<Arc<Node>>) -> Gateway {
        let front = Front {
            keys: crate::server::keys::KeyRing::new(PathBuf::from("/nonexistent/keys.json"), false),
            limiter: Arc::default(),
            metrics: Arc::default(),
            origins: crate::server::access::Origins::new(""),
            loopback: true,
        };
        Gateway { front, nodes, turn: AtomicUsize::new(0) }
    }

    #[test]
    fn conversations_stick_and_spread_and_busy_nodes_shed() {
        let g =
            gateway(vec![node("http://a:1", 0, &["m"]), node("http://b:1", 0, &["m"]), node("http://c:1", 0, &["m"])]);
        let mut used = HashSet::new();
        for i in 0..30 {
            let opening = json!({ "messages": [{ "role": "user", "content": format!("conversation {i}") }] });
            let k = affinity("m:latest", &opening);
            let first = g.pick(Some("m:latest"), k, &[]).unwrap().url.clone();
            let mut later = opening.clone();
            later["messages"]
                .as_array_mut()
                .unwrap()
                .extend([json!({ "role": "assistant", "content": "x" }), json!({ "role": "user", "content": "more" })]);
            assert_eq!(g.pick(Some("m:latest"), affinity("m:latest", &later), &[]).unwrap().url, first);
            used.insert(first);
        }
        assert_eq!(used.len(), 3, "30 conversations spread over all nodes");
        // The preferred node gets busy: its conversations move to the idlest.
        let k = affinity("m:latest", &json!({ "prompt": "hello" }));
        let preferred = g.pick(Some("m:latest"), k, &[]).unwrap();
        preferred.load.store(20, Ordering::SeqCst);
        assert_ne!(g.pick(Some("m:latest"), k, &[]).unwrap().url, preferred.url);
        // A tried (failed) node is skipped; one without the model is not chosen.
        let g = gateway(vec![node("http://a:1", 0, &["m"]), node("http://b:1", 0, &["other"])]);
        assert_eq!(g.pick(Some("m:latest"), None, &[]).unwrap().url, "http://a:1");
        assert_eq!(g.pick(Some("m:latest"), None, &["http://a:1".into()]).unwrap().url, "http://b:1");
        assert!(g.pick(Some("m:latest"), None, &["http://a:1".into(), "http://b:1".into()]).is_none());
    }

    #[test]
    fn node_urls_and_metrics() {
        assert_eq!(Node::new("http://127.0.0.1:11434/", None).unwrap().url, "http://127.0.0.1:11434");
        assert_eq!(Node::new("http://box", None).unwrap().url, "http://box:80");
        assert_eq!(Node::new("https://box:1", None).unwrap().proxy.tls_name.as_deref(), Some("box"));
        assert_eq!(Node::new("https://box", None).unwrap().url, "https://box:443");
        assert!(Node::new("ftp://box:1", None).is_err());
        assert!(Node::new("http://box:1/api", None).is_err());
        let m = "turbine_requests_waiting{model=\"a\"} 2\nturbine_requests_running{model=\"a\"} 3\nturbine_requests_running{model=\"b\"} 1\nturbine_models_loaded 2\n";
        assert_eq!(queue_load(m), 6);
        assert_eq!(normalize_model("gemma3"), "gemma3:latest");
        assert_eq!(normalize_model("host:5000/ns/m"), "host:5000/ns/m:latest");
    }
}
