//! The routes: request parsing and validation, and the shapes of Ollama's (and OpenAI's)
//! responses. Nothing here runs the model: jobs go to the model's worker.

use super::catalog::{self, Entry};
use super::host::{self, KeepAlive};
use super::metrics::ModelGauges;
use super::options::{self, Options};
use super::template::{ChatTemplate, Message, Think};
use super::worker::{Done, Event, Events, JobInput, JobOptions};
use super::{Cx, Reply, State};
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use turbine::engine::gguf::Gguf;
use turbine::engine::json_format::JsonFormat;
use turbine::engine::scheduler::SchedulerStats;

/// Early-return plumbing: the error side is the response to send.
type R = Result<Reply, Reply>;
type Body = Map<String, Value>;

pub mod create;
mod embed;

pub fn dispatch(cx: &Cx, method: &str, path: &str, body: &[u8]) -> Reply {
    let allowed: &[&str] = match path {
        "/" | "/api/version" | "/api/tags" => &["GET", "HEAD"],
        "/api/ps" | "/v1/models" | "/metrics" => &["GET"],
        "/api/copy" | "/api/create" => &["POST"],
        p if p.starts_with("/api/blobs/") => &["HEAD", "POST"],
        "/api/delete" => &["DELETE"],
        "/api/generate" | "/api/chat" | "/api/show" | "/api/embed" | "/api/embeddings" => &["POST"],
        "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" => &["POST"],
        p if p.starts_with("/v1/models/") => &["GET"],
        _ => return Reply::text(404, "404 page not found"),
    };
    if !allowed.contains(&method) {
        return Reply::text(405, "405 method not allowed");
    }
    let result = match path {
        "/" => Ok(Reply::text(200, "Ollama is running")),
        "/api/version" => Ok(Reply::json(200, &json!({ "version": env!("CARGO_PKG_VERSION") }))),
        "/api/tags" => Ok(tags()),
        "/api/ps" => Ok(ps(cx)),
        "/metrics" => Ok(metrics(cx)),
        "/api/show" => show(body),
        "/api/copy" => copy(body),
        "/api/create" => create::create(body),
        p if p.starts_with("/api/blobs/") && method == "HEAD" => create::has_blob(p),
        p if p.starts_with("/api/blobs/") => create::upload(p, &mut &body[..]),
        "/api/delete" => delete(cx, body),
        "/api/generate" => generate(cx, body),
        "/api/chat" => chat(cx, body),
        "/api/embed" => embed::embed(cx, body),
        "/api/embeddings" => embed::embeddings(cx, body),
        "/v1/embeddings" => embed::openai(cx, body),
        "/v1/chat/completions" => openai::completions(cx, body, true),
        "/v1/completions" => openai::completions(cx, body, false),
        "/v1/models" => Ok(openai::models()),
        p => openai::model(p.trim_start_matches("/v1/models/")),
    };
    result.unwrap_or_else(|e| e)
}

fn now() -> String {
    host::rfc3339(SystemTime::now())
}

fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

fn not_found(model: &str) -> Reply {
    Reply::error(404, format!("model \"{model}\" not found, try pulling it first"))
}

/// The JSON object of a request body.
fn parse_body(body: &[u8]) -> Result<Body, Reply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Reply::error(400, "missing request body"));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Reply::error(400, "json: cannot unmarshal non-object into request body")),
        Err(e) => Err(Reply::error(400, e.to_string())),
    }
}

fn type_error(key: &str, want: &str) -> Reply {
    Reply::error(400, format!("json: cannot unmarshal value into field {key} of type {want}"))
}

fn str_field(m: &Body, key: &str) -> Result<Option<String>, Reply> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(type_error(key, "string")),
    }
}

fn bool_field(m: &Body, key: &str) -> Result<Option<bool>, Reply> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(type_error(key, "bool")),
    }
}

/// The model name a request gives: `model` (or the legacy `name`), required.
fn name_field(m: &Body) -> Result<String, Reply> {
    let name = match str_field(m, "model")? {
        Some(s) if !s.is_empty() => s,
        _ => str_field(m, "name")?.unwrap_or_default(),
    };
    if name.is_empty() {
        return Err(Reply::error(400, "model is required"));
    }
    Ok(name)
}

/// The model a request names: `model` (or the legacy `name`), required and installed.
fn model_field(m: &Body) -> Result<(String, Entry), Reply> {
    let name = name_field(m)?;
    let entry = catalog::lookup(&name).ok_or_else(|| not_found(&name))?;
    Ok((name, entry))
}

fn keep_alive_field(m: &Body) -> Result<KeepAlive, Reply> {
    match m.get("keep_alive") {
        None | Some(Value::Null) => Ok(host::default_keep_alive()),
        Some(v) => host::parse_keep_alive(v).map_err(|e| Reply::error(400, e)),
    }
}

/// Ollama's defaults under the model's own PARAMETERs (from `turbine create`).
fn model_options(entry: &Entry) -> Result<Options, Reply> {
    options::apply(Options::default(), entry.params.as_ref())
        .map_err(|e| Reply::error(500, format!("the model's parameters are invalid: {e}")))
}

/// The messages with the model's SYSTEM in front when they bring no system message.
fn with_model_system(entry: &Entry, mut messages: Vec<Message>) -> Vec<Message> {
    if let Some(system) = entry.system.as_deref().filter(|s| !s.is_empty()) {
        if !messages.iter().any(|m| m.role == "system") {
            messages.insert(0, Message::new("system", system));
        }
    }
    messages
}

fn job_options(m: &Body, base: Options, keep_alive: KeepAlive) -> Result<JobOptions, Reply> {
    let o = options::apply(base, m.get("options")).map_err(|e| Reply::error(400, e))?;
    let truncate = bool_field(m, "truncate")?.unwrap_or(true);
    Ok(JobOptions {
        num_predict: o.num_predict,
        num_ctx: o.num_ctx,
        sampler: o.sampler,
        stop: o.stop,
        logprobs: logprobs_fields(m)?,
        truncate,
        keep_alive,
        format: format_field(m.get("format").unwrap_or(&Value::Null))?,
    })
}

/// Ollama's `format`: `"json"` or a JSON schema; an error names what is wrong with it.
fn format_field(format: &Value) -> Result<Option<Arc<JsonFormat>>, Reply> {
    JsonFormat::from_request(format).map(|f| f.map(Arc::new)).map_err(|e| Reply::error(400, e.to_string()))
}

/// OpenAI's `response_format`: `{"type": "text" | "json_object" | "json_schema",
/// "json_schema": {"schema": ...}}`.
fn response_format_field(m: &Body) -> Result<Option<Arc<JsonFormat>>, Reply> {
    let Some(rf) = m.get("response_format").filter(|v| !v.is_null()) else { return Ok(None) };
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => format_field(&json!("json")),
        Some("json_schema") => match rf.get("json_schema").and_then(|s| s.get("schema")) {
            Some(schema) => format_field(schema),
            None => Err(Reply::error(400, "response_format json_schema needs json_schema.schema")),
        },
        _ => Err(Reply::error(400, "response_format type must be \"text\", \"json_object\" or \"json_schema\"")),
    }
}

/// Most alternatives `top_logprobs` may ask for (OpenAI's and Ollama's limit).
const MAX_TOP_LOGPROBS: u64 = 20;

/// `logprobs` (bool) and `top_logprobs` (0..=20): None when log-probabilities are off.
fn logprobs_fields(m: &Body) -> Result<Option<usize>, Reply> {
    let top = match m.get("top_logprobs") {
        None | Some(Value::Null) => 0,
        Some(v) => match v.as_u64() {
            Some(n) if n <= MAX_TOP_LOGPROBS => n as usize,
            _ => return Err(Reply::error(400, format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"))),
        },
    };
    Ok(bool_field(m, "logprobs")?.unwrap_or(false).then_some(top))
}

fn no_images(m: &Body, name: &str) -> Result<(), Reply> {
    match m.get("images") {
        Some(Value::Array(a)) if !a.is_empty() => Err(Reply::error(400, format!("\"{name}\" does not support images"))),
        _ => Ok(()),
    }
}

/// `think`: a bool or a reasoning effort. Whether the model can think is the worker's
/// check (it has the model's template).
fn think_field(m: &Body) -> Result<Think, Reply> {
    match m.get("think") {
        None | Some(Value::Null) => Ok(Think::Unset),
        Some(Value::Bool(b)) => Ok(if *b { Think::On } else { Think::Off }),
        Some(Value::String(s)) if matches!(s.as_str(), "low" | "medium" | "high" | "max") => {
            Ok(Think::Level(s.clone()))
        }
        Some(Value::String(s)) => Err(Reply::error(
            400,
            format!("invalid think value: {s:?} (expected true, false, \"low\", \"medium\" or \"high\")"),
        )),
        Some(_) => Err(type_error("think", "bool or string")),
    }
}

/// Tools are not served yet: refused as Ollama refuses them for a model without them.
fn no_tools(m: &Body, name: &str) -> Result<(), Reply> {
    if matches!(m.get("tools"), Some(Value::Array(a)) if !a.is_empty()) {
        return Err(Reply::error(400, format!("\"{name}\" does not support tools")));
    }
    Ok(())
}

fn tags() -> Reply {
    let models: Vec<Value> = catalog::list()
        .iter()
        .map(|e| {
            json!({
                "name": e.name, "model": e.name, "modified_at": host::rfc3339(e.modified),
                "size": e.size, "digest": e.digest, "details": catalog::details(e),
            })
        })
        .collect();
    Reply::json(200, &json!({ "models": models }))
}

/// GET /metrics: Prometheus' text format.
fn metrics(cx: &Cx) -> Reply {
    let gauges: Vec<ModelGauges> = cx
        .state
        .models
        .loaded()
        .iter()
        .map(|w| {
            let stats = w.scheduler_stats();
            let get =
                |f: fn(&SchedulerStats) -> &AtomicUsize| stats.as_ref().map_or(0, |s| f(s).load(Ordering::Relaxed));
            ModelGauges {
                name: w.entry.name.clone(),
                waiting: get(|s| &s.waiting),
                running: get(|s| &s.running),
                kv_blocks_used: get(|s| &s.kv_blocks_used),
                kv_blocks_free: get(|s| &s.kv_blocks_free),
            }
        })
        .collect();
    let body = cx.state.front.metrics.render(&gauges).into_bytes();
    Reply::Full { status: 200, content_type: "text/plain; version=0.0.4; charset=utf-8", body }
}

fn ps(cx: &Cx) -> Reply {
    let models: Vec<Value> = cx
        .state
        .models
        .loaded()
        .iter()
        .map(|w| {
            let e = &w.entry;
            let expires = w.expires_at().unwrap_or(UNIX_EPOCH + Duration::from_secs(253_402_300_799));
            json!({
                "name": e.name, "model": e.name, "size": w.resident_bytes(), "digest": e.digest,
                "details": catalog::details(e), "expires_at": host::rfc3339(expires),
                "size_vram": w.gpu_bytes(), "context_length": w.context_length(),
            })
        })
        .collect();
    Reply::json(200, &json!({ "models": models }))
}

fn show(body: &[u8]) -> R {
    let m = parse_body(body)?;
    let (_, entry) = model_field(&m)?;
    let verbose = bool_field(&m, "verbose")?.unwrap_or(false);
    let file = Gguf::open(&entry.blob).map_err(|e| Reply::error(500, format!("error reading model: {e}")))?;
    let template = ChatTemplate::for_entry(entry.template.as_deref(), &file);
    let params = parameter_lines(entry.params.as_ref());
    let mut modelfile = format!(
        "# Modelfile generated by \"turbine show\"\n# To build a new Modelfile based on this, replace FROM with:\n\
         # FROM {}\n\nFROM {}\nTEMPLATE \"\"\"{}\"\"\"\n",
        entry.name,
        entry.blob.display(),
        template.source()
    );
    if let Some(system) = &entry.system {
        modelfile.push_str(&format!("SYSTEM \"\"\"{system}\"\"\"\n"));
    }
    for (k, v) in &params {
        modelfile.push_str(&format!("PARAMETER {k} {v}\n"));
    }
    let mut capabilities = vec!["completion"];
    if template.think_format().is_some() {
        capabilities.push("thinking");
    }
    if template.supports_tools() {
        capabilities.push("tools");
    }
    if template.supports_insert() {
        capabilities.push("insert");
    }
    let mut answer = json!({
        "modelfile": modelfile,
        "template": template.source(),
        "details": catalog::details_of(&file),
        "model_info": catalog::model_info(&file, verbose),
        "capabilities": capabilities,
        "modified_at": host::rfc3339(entry.modified),
    });
    if !params.is_empty() {
        let text: Vec<String> = params.iter().map(|(k, v)| format!("{k:<30} {v}")).collect();
        answer["parameters"] = json!(text.join("\n"));
    }
    if let Some(system) = &entry.system {
        answer["system"] = json!(system);
    }
    Ok(Reply::json(200, &answer))
}

/// A model's PARAMETERs as Ollama prints them: one `(name, value)` per value, a list
/// (stop) giving one line per item, strings quoted.
fn parameter_lines(params: Option<&Value>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Some(Value::Object(map)) = params else { return out };
    let show = |v: &Value| match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    };
    for (k, v) in map {
        match v {
            Value::Array(items) => out.extend(items.iter().map(|i| (k.clone(), show(i)))),
            v => out.push((k.clone(), show(v))),
        }
    }
    out
}

/// The final statistics of a job whose text nobody reads (loading, embedding).
fn wait_for_done(mut rx: Events) -> Result<Done, Reply> {
    loop {
        match rx.recv() {
            Ok(Event::Done(d)) => return Ok(d),
            Ok(Event::Text(_) | Event::Thinking(_) | Event::ToolCall(_) | Event::Logprob(_)) => continue,
            Ok(Event::Error { status, message }) => return Err(Reply::error(status, message)),
            Err(_) => return Err(Reply::error(500, "model runner stopped unexpectedly")),
        }
    }
}

/// An empty 200, as Ollama answers copy and delete.
fn ok_empty() -> Reply {
    Reply::Full { status: 200, content_type: "application/json; charset=utf-8", body: Vec::new() }
}

/// A store error as Ollama words it.
fn store_error(name: &str, e: turbine::engine::EngineError) -> Reply {
    use turbine::engine::EngineError as E;
    match e {
        E::ModelNotFound { .. } => Reply::error(404, format!("model '{name}' not found")),
        E::BadValue { .. } => Reply::error(400, format!("invalid model name: {name:?}")),
        other => Reply::error(500, other.to_string()),
    }
}

/// POST /api/copy: `source` installed under `destination` too.
fn copy(body: &[u8]) -> R {
    let m = parse_body(body)?;
    let src = str_field(&m, "source")?.unwrap_or_default();
    let dst = str_field(&m, "destination")?.unwrap_or_default();
    if src.is_empty() || dst.is_empty() {
        return Err(Reply::error(400, "source and destination are required"));
    }
    turbine::engine::store::copy(&src, &dst).map_err(|e| match e {
        turbine::engine::EngineError::ModelNotFound { .. } => Reply::error(404, format!("model {src:?} not found")),
        e => store_error(&dst, e),
    })?;
    Ok(ok_empty())
}

/// DELETE /api/delete: unloads and uninstalls a model (its unshared blobs too).
fn delete(cx: &Cx, body: &[u8]) -> R {
    let m = parse_body(body)?;
    let name = name_field(&m)?;
    if let Some(entry) = catalog::lookup(&name) {
        cx.state.models.unload(&entry.name);
    }
    turbine::engine::store::delete(&name).map_err(|e| store_error(&name, e))?;
    Ok(ok_empty())
}

/// An empty prompt (or no messages): load the model, or unload it with keep_alive 0.
fn load_only(cx: &Cx, name: &str, entry: &Entry, keep_alive: KeepAlive, chat: bool) -> R {
    let mut v = json!({ "model": name, "created_at": now(), "done": true });
    if keep_alive == KeepAlive::For(Duration::ZERO) {
        cx.state.models.unload(&entry.name);
        v["done_reason"] = json!("unload");
    } else {
        let worker = cx.state.models.get(entry).map_err(|m| Reply::error(503, m))?;
        let opts = JobOptions {
            num_predict: Some(0),
            num_ctx: options::default_num_ctx(),
            sampler: Options::default().sampler,
            stop: vec![],
            logprobs: None,
            truncate: true,
            keep_alive,
            format: None,
        };
        wait_for_done(worker.submit(JobInput::Load, opts, &cx.meter))?;
        v["done_reason"] = json!("load");
    }
    if chat {
        v["message"] = json!({ "role": "assistant", "content": "" });
    } else {
        v["response"] = json!("");
    }
    Ok(Reply::json(200, &v))
}

fn generate(cx: &Cx, body: &[u8]) -> R {
    let start = Instant::now();
    let m = parse_body(body)?;
    let prompt = str_field(&m, "prompt")?.unwrap_or_default();
    let system = str_field(&m, "system")?.unwrap_or_default();
    let template = str_field(&m, "template")?.unwrap_or_default();
    let suffix = str_field(&m, "suffix")?.unwrap_or_default();
    let raw = bool_field(&m, "raw")?.unwrap_or(false);
    let stream = bool_field(&m, "stream")?.unwrap_or(true);
    let think = think_field(&m)?;
    let context: Vec<u32> = match m.get("context") {
        None | Some(Value::Null) => vec![],
        Some(v) => serde_json::from_value(v.clone()).map_err(|_| type_error("context", "[]int"))?,
    };
    let (name, entry) = model_field(&m)?;
    if raw && (!template.is_empty() || !system.is_empty() || !context.is_empty()) {
        return Err(Reply::error(400, "raw mode does not support template, system, or context"));
    }
    no_images(&m, &name)?;
    no_tools(&m, &name)?;
    let keep_alive = keep_alive_field(&m)?;
    let opts = job_options(&m, model_options(&entry)?, keep_alive)?;
    if prompt.is_empty() && system.is_empty() && context.is_empty() {
        return load_only(cx, &name, &entry, keep_alive, false);
    }
    let input = generate_input(&name, &entry, GenerateText { prompt, system, template, suffix, raw, think }, context)?;
    let worker = cx.state.models.get(&entry).map_err(|m| Reply::error(503, m))?;
    let rx = worker.submit(input, opts, &cx.meter);
    let framer = Box::new(OllamaFramer::new(name, false, start));
    respond(cx, rx, stream, keep_alive, framer)
}

/// The text fields of a generate request.
struct GenerateText {
    prompt: String,
    system: String,
    template: String,
    suffix: String,
    raw: bool,
    think: Think,
}

/// What a generate request asks the worker for: the prompt as it is (raw), rendered by
/// the request's own Go template, or as messages for the model's template (with the
/// model's SYSTEM when the request has none). A suffix needs a template that reads
/// `.Suffix`: the request's, else the model's.
fn generate_input(name: &str, entry: &Entry, t: GenerateText, context: Vec<u32>) -> Result<JobInput, Reply> {
    let own_template = match t.template.as_str() {
        "" => None,
        src => Some(ChatTemplate::go(src).map_err(|e| Reply::error(400, e))?),
    };
    let model_template = entry.template.as_deref().and_then(|src| ChatTemplate::go(src).ok());
    let template = own_template.as_ref().or(model_template.as_ref());
    if !t.suffix.is_empty() && !template.is_some_and(ChatTemplate::supports_insert) {
        return Err(Reply::error(400, format!("{name} does not support insert")));
    }
    let mut msgs = Vec::new();
    if !t.system.is_empty() {
        msgs.push(Message::new("system", &t.system));
    }
    msgs.push(Message::new("user", &t.prompt));
    let msgs = with_model_system(entry, msgs);
    let (prompt, messages, suffix) = match (t.raw, own_template) {
        (true, _) => (t.prompt, None, String::new()),
        (false, Some(own)) => {
            (own.render_insert(&msgs, &t.suffix).map_err(|e| Reply::error(400, e))?, None, String::new())
        }
        (false, None) => (t.prompt, Some(msgs), t.suffix),
    };
    Ok(JobInput::Generate { prompt, context, messages, suffix, think: t.think, tools: None })
}

/// A chat job: the messages through the model's template, with its SYSTEM when they
/// bring none.
fn chat_input(entry: &Entry, messages: Vec<Message>, think: Think, tools: Option<Value>) -> JobInput {
    let messages = Some(with_model_system(entry, messages));
    JobInput::Generate { prompt: String::new(), context: vec![], messages, suffix: String::new(), think, tools }
}

/// `tools`: the functions a chat offers the model, `[{"type": "function", "function":
/// {"name", "description", "parameters"}}]`, passed to its template as they are.
fn tools_field(m: &Body) -> Result<Option<Value>, Reply> {
    match m.get("tools") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) if a.is_empty() => Ok(None),
        Some(Value::Array(a)) => {
            let named = |t: &Value| t.get("function").and_then(|f| f.get("name")).is_some_and(Value::is_string);
            match a.iter().all(named) {
                true => Ok(Some(Value::Array(a.clone()))),
                false => Err(Reply::error(400, "each tool needs a function with a name")),
            }
        }
        Some(_) => Err(type_error("tools", "[]api.Tool")),
    }
}

fn chat(cx: &Cx, body: &[u8]) -> R {
    let start = Instant::now();
    let m = parse_body(body)?;
    let stream = bool_field(&m, "stream")?.unwrap_or(true);
    let think = think_field(&m)?;
    let messages = parse_messages(m.get("messages"), false)?;
    let (name, entry) = model_field(&m)?;
    if let Some(Value::Array(msgs)) = m.get("messages") {
        for msg in msgs {
            if let Value::Object(o) = msg {
                no_images(o, &name)?;
            }
        }
    }
    let tools = tools_field(&m)?;
    let keep_alive = keep_alive_field(&m)?;
    let opts = job_options(&m, model_options(&entry)?, keep_alive)?;
    if messages.is_empty() {
        return load_only(cx, &name, &entry, keep_alive, true);
    }
    let worker = cx.state.models.get(&entry).map_err(|m| Reply::error(503, m))?;
    let rx = worker.submit(chat_input(&entry, messages, think, tools), opts, &cx.meter);
    let framer = Box::new(OllamaFramer::new(name, true, start));
    respond(cx, rx, stream, keep_alive, framer)
}

/// `messages`: `[{role, content}]`; with `parts`, content may also be OpenAI's array of
/// `{type:"text", text}` parts.
fn parse_messages(v: Option<&Value>, parts: bool) -> Result<Vec<Message>, Reply> {
    let arr = match v {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(type_error("messages", "[]api.Message")),
    };
    let mut out = Vec::with_capacity(arr.len());
    for item in arr {
        let Value::Object(o) = item else { return Err(type_error("messages", "api.Message")) };
        let role = str_field(o, "role")?.unwrap_or_default();
        let content = match o.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(ps)) if parts => ps
                .iter()
                .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
            Some(_) => return Err(type_error("messages.content", "string")),
        };
        // An assistant's calls: Ollama sends arguments as an object, OpenAI as a string.
        let tool_calls = match o.get("tool_calls") {
            None | Some(Value::Null) => None,
            Some(Value::Array(calls)) => Some(Value::Array(calls.iter().map(call_with_object_arguments).collect())),
            Some(_) => return Err(type_error("messages.tool_calls", "[]api.ToolCall")),
        };
        let tool_name = str_field(o, "tool_name")?.or(str_field(o, "name")?);
        out.push(Message { role, content, tool_calls, tool_name });
    }
    Ok(out)
}

/// A call whose `function.arguments` is a JSON string gets the object it holds.
fn call_with_object_arguments(call: &Value) -> Value {
    let mut call = call.clone();
    if let Some(args) = call.pointer_mut("/function/arguments") {
        if let Some(parsed) = args.as_str().and_then(|s| serde_json::from_str::<Value>(s).ok()) {
            *args = parsed;
        }
    }
    call
}

/// Turns a job's events into the frames of one API's stream.
trait Framer: Send {
    /// A generated token's log-probability, to go out with the next text (or the end).
    fn add_logprob(&mut self, _logprob: Value) {}
    fn text(&mut self, text: &str) -> Vec<u8>;
    /// Reasoning of a thinking model: a frame of its own when streaming, else kept for
    /// `whole` (dropped by formats without a place for it).
    fn thinking(&mut self, _text: &str, _stream: bool) -> Vec<u8> {
        Vec::new()
    }
    /// A tool call: a frame of its own when streaming, else kept for `whole`.
    fn tool_call(&mut self, call: Value, stream: bool) -> Vec<u8>;
    fn done(&mut self, done: &Done) -> Vec<u8>;
    fn error(&mut self, message: &str) -> Vec<u8>;
    /// The one-object answer of `stream: false`.
    fn whole(&mut self, text: &str, done: &Done) -> Value;
    fn error_reply(&self, status: u16, message: &str) -> Reply {
        Reply::error(status, message)
    }
    fn content_type(&self) -> &'static str;
}

/// Waits for the first event (so that a load or prompt error still gets its status), then
/// streams or gathers the rest.
fn respond(cx: &Cx, mut rx: Events, stream: bool, keep_alive: KeepAlive, mut framer: Box<dyn Framer>) -> R {
    let stopped = "model runner stopped unexpectedly";
    let first = match next_event(cx, &mut rx) {
        Ok(Event::Error { status, message }) => return Err(framer.error_reply(status, &message)),
        Ok(e) => e,
        Err(Waited::ClientGone) => return Err(framer.error_reply(499, CLIENT_GONE)),
        Err(Waited::Stopped) => return Err(framer.error_reply(500, stopped)),
        Err(Waited::Failed(why)) => return Err(framer.error_reply(500, why)),
    };
    let unload = keep_alive == KeepAlive::For(Duration::ZERO);
    let after = Finish { state: cx.state.clone(), unload };
    if !stream {
        let mut text = String::new();
        let mut ev = first;
        loop {
            match ev {
                Event::Text(t) => text.push_str(&t),
                Event::Thinking(t) => drop(framer.thinking(&t, false)),
                Event::ToolCall(c) => drop(framer.tool_call(c, false)),
                Event::Logprob(v) => framer.add_logprob(v),
                Event::Done(d) => {
                    after.run();
                    return Ok(Reply::json(200, &framer.whole(&text, &d)));
                }
                Event::Error { status, message } => return Err(framer.error_reply(status, &message)),
            }
            ev = next_event(cx, &mut rx).map_err(|w| match w {
                Waited::ClientGone => framer.error_reply(499, CLIENT_GONE),
                Waited::Stopped => framer.error_reply(500, stopped),
                Waited::Failed(why) => framer.error_reply(500, why),
            })?;
        }
    }
    let content_type = framer.content_type();
    let frames = EventFrames { first: Some(first), rx, framer, finished: false, after: Some(after) };
    Ok(Reply::Stream { content_type, frames: Box::new(frames) })
}

/// Why no event came.
enum Waited {
    /// The client closed its connection: the caller drops the job's events, which cancels
    /// it (the scheduler drops the sequence and its cache blocks at its next step).
    ClientGone,
    Stopped,
    /// The engine cannot go on (a tensor-parallel rank was lost): why.
    Failed(&'static str),
}

/// The body of the reply nobody reads (nginx's status for a client that closed first).
const CLIENT_GONE: &str = "client closed the connection";

/// How often a request still waiting for its first event, or gathering a non-streamed
/// answer, checks that its client is still there.
const PEER_CHECK: Duration = Duration::from_millis(100);

/// The job's next event, unless its client goes away or the engine fails first (checked
/// at each event and every [`PEER_CHECK`] between them: a system call, microseconds
/// against a token's milliseconds).
fn next_event(cx: &Cx, rx: &mut Events) -> Result<Event, Waited> {
    loop {
        if cx.peer.as_ref().is_some_and(|p| p.closed()) {
            return Err(Waited::ClientGone);
        }
        if let Some(why) = super::worker::engine_failure() {
            return Err(Waited::Failed(why));
        }
        match rx.recv_timeout(PEER_CHECK) {
            Ok(e) => return Ok(e),
            Err(RecvTimeoutError::Disconnected) => return Err(Waited::Stopped),
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

/// Run when a job is done: keep_alive 0 unloads the model.
struct Finish {
    state: Arc<State>,
    unload: bool,
}

impl Finish {
    fn run(self) {
        if self.unload {
            self.state.models.reap();
        }
    }
}

struct EventFrames {
    first: Option<Event>,
    rx: Events,
    framer: Box<dyn Framer>,
    finished: bool,
    after: Option<Finish>,
}

impl Iterator for EventFrames {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        if self.finished {
            return None;
        }
        let ev = match self.first.take() {
            Some(e) => e,
            None => loop {
                match self.rx.recv_timeout(PEER_CHECK) {
                    Ok(e) => break e,
                    Err(RecvTimeoutError::Disconnected) => {
                        break Event::Error { status: 500, message: "model runner stopped unexpectedly".into() }
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        if let Some(why) = super::worker::engine_failure() {
                            break Event::Error { status: 500, message: why.into() };
                        }
                    }
                }
            },
        };
        Some(match ev {
            Event::Text(t) => self.framer.text(&t),
            Event::Thinking(t) => self.framer.thinking(&t, true),
            Event::ToolCall(c) => self.framer.tool_call(c, true),
            Event::Logprob(v) => {
                self.framer.add_logprob(v);
                Vec::new() // nothing to write yet (empty frames are skipped)
            }
            Event::Done(d) => {
                self.finished = true;
                if let Some(f) = self.after.take() {
                    f.run();
                }
                self.framer.done(&d)
            }
            Event::Error { message, .. } => {
                self.finished = true;
                self.framer.error(&message)
            }
        })
    }
}

/// Ollama's NDJSON chunks for /api/generate and /api/chat.
struct OllamaFramer {
    model: String,
    chat: bool,
    start: Instant,
    /// Log-probabilities of tokens whose text has not gone out yet.
    logprobs: Vec<Value>,
    /// Reasoning and tool calls gathered for a `stream: false` answer.
    thinking: String,
    tool_calls: Vec<Value>,
}

impl OllamaFramer {
    fn new(model: String, chat: bool, start: Instant) -> OllamaFramer {
        OllamaFramer { model, chat, start, logprobs: Vec::new(), thinking: String::new(), tool_calls: Vec::new() }
    }

    fn chunk(&mut self, text: &str) -> Value {
        let mut v = json!({ "model": self.model, "created_at": now() });
        let thinking = std::mem::take(&mut self.thinking);
        if self.chat {
            v["message"] = json!({ "role": "assistant", "content": text });
            if !thinking.is_empty() {
                v["message"]["thinking"] = json!(thinking);
            }
            if !self.tool_calls.is_empty() {
                v["message"]["tool_calls"] = Value::Array(std::mem::take(&mut self.tool_calls));
            }
        } else {
            v["response"] = json!(text);
            if !thinking.is_empty() {
                v["thinking"] = json!(thinking);
            }
        }
        v["done"] = json!(false);
        if !self.logprobs.is_empty() {
            v["logprobs"] = Value::Array(std::mem::take(&mut self.logprobs));
        }
        v
    }

    fn last(&mut self, text: &str, d: &Done) -> Value {
        let mut v = self.chunk(text);
        v["done"] = json!(true);
        v["done_reason"] = json!(d.done_reason);
        if !self.chat {
            v["context"] = json!(d.context);
        }
        v["total_duration"] = json!(ns(self.start.elapsed()));
        v["load_duration"] = json!(ns(d.load_duration));
        v["prompt_eval_count"] = json!(d.prompt_eval_count);
        v["prompt_eval_duration"] = json!(ns(d.prompt_eval_duration));
        v["eval_count"] = json!(d.eval_count);
        v["eval_duration"] = json!(ns(d.eval_duration));
        v
    }
}

fn ndjson(v: &Value) -> Vec<u8> {
    let mut b = v.to_string().into_bytes();
    b.push(b'\n');
    b
}

impl Framer for OllamaFramer {
    fn add_logprob(&mut self, logprob: Value) {
        self.logprobs.push(logprob);
    }
    fn text(&mut self, text: &str) -> Vec<u8> {
        ndjson(&self.chunk(text))
    }
    fn thinking(&mut self, text: &str, stream: bool) -> Vec<u8> {
        self.thinking.push_str(text);
        if stream {
            ndjson(&self.chunk(""))
        } else {
            Vec::new()
        }
    }
    fn tool_call(&mut self, call: Value, stream: bool) -> Vec<u8> {
        self.tool_calls.push(call);
        if stream {
            ndjson(&self.chunk(""))
        } else {
            Vec::new()
        }
    }
    fn done(&mut self, d: &Done) -> Vec<u8> {
        ndjson(&self.last("", d))
    }
    fn error(&mut self, message: &str) -> Vec<u8> {
        ndjson(&json!({ "error": message }))
    }
    fn whole(&mut self, text: &str, d: &Done) -> Value {
        self.last(text, d)
    }
    fn content_type(&self) -> &'static str {
        "application/x-ndjson"
    }
}

/// OpenAI compatibility: /v1/chat/completions and /v1/models.
mod openai {
    use super::*;

    /// OpenAI's error body; the type follows the status as in Ollama's middleware.
    pub fn error(status: u16, message: &str) -> Reply {
        let kind = match status {
            400 => "invalid_request_error",
            404 => "not_found_error",
            _ => "api_error",
        };
        Reply::json(status, &json!({ "error": { "message": message, "type": kind, "param": null, "code": null } }))
    }

    /// Re-shapes an Ollama `{"error":...}` reply as OpenAI's.
    pub(super) fn reshape(r: Reply) -> Reply {
        match r {
            Reply::Full { status, body, content_type } if status >= 400 => {
                match serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["error"].as_str().map(str::to_string))
                {
                    Some(msg) => error(status, &msg),
                    None => Reply::Full { status, body, content_type },
                }
            }
            r => r,
        }
    }

    fn owned_by(name: &str) -> String {
        let path = name.split(':').next().unwrap_or(name);
        path.rsplit('/').nth(1).unwrap_or("library").to_string()
    }

    fn unix(t: SystemTime) -> u64 {
        t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    }

    fn model_object(e: &Entry) -> Value {
        json!({ "id": e.name, "object": "model", "created": unix(e.modified), "owned_by": owned_by(&e.name) })
    }

    pub fn models() -> Reply {
        let data: Vec<Value> = catalog::list().iter().map(model_object).collect();
        Reply::json(200, &json!({ "object": "list", "data": data }))
    }

    pub fn model(name: &str) -> R {
        match catalog::lookup(name) {
            Some(e) => Ok(Reply::json(200, &model_object(&e))),
            None => Err(error(404, &format!("model \"{name}\" not found"))),
        }
    }

    /// /v1/chat/completions (`chat`) and /v1/completions (a prompt, templated as Ollama's
    /// compatibility layer does).
    pub fn completions(cx: &Cx, body: &[u8], chat: bool) -> R {
        inner(cx, body, chat).map_err(reshape).map(reshape)
    }

    fn num(m: &Body, key: &str) -> Result<Option<f64>, Reply> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| type_error(key, "number")),
        }
    }

    fn inner(cx: &Cx, body: &[u8], chat: bool) -> R {
        let m = parse_body(body)?;
        let stream = bool_field(&m, "stream")?.unwrap_or(false);
        let include_usage =
            m.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
        let messages = if chat {
            parse_messages(m.get("messages"), true)?
        } else {
            match m.get("prompt") {
                Some(Value::String(p)) => vec![Message::new("user", p)],
                None | Some(Value::Null) => vec![],
                Some(_) => return Err(Reply::error(400, "invalid type for 'prompt' field: only string is supported")),
            }
        };
        let (name, entry) = model_field(&m)?;
        // Ollama's compatibility layer: unset temperature and top_p are 1.0.
        let mut o = model_options(&entry)?;
        o.sampler.temperature = num(&m, "temperature")?.unwrap_or(1.0) as f32;
        o.sampler.top_p = num(&m, "top_p")?.unwrap_or(1.0) as f32;
        if let Some(f) = num(&m, "frequency_penalty")? {
            o.sampler.frequency_penalty = f as f32;
        }
        if let Some(p) = num(&m, "presence_penalty")? {
            o.sampler.presence_penalty = p as f32;
        }
        if let Some(s) = num(&m, "seed")? {
            o.sampler.seed = (s >= 0.0).then_some(s as u64);
        }
        let max = match num(&m, "max_completion_tokens")? {
            Some(n) => Some(n),
            None => num(&m, "max_tokens")?,
        };
        if let Some(n) = max {
            o.num_predict = (n >= 0.0).then_some(n as usize);
        }
        o.stop = match m.get("stop") {
            None | Some(Value::Null) => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| type_error("stop", "[]string"))?,
            Some(_) => return Err(type_error("stop", "string or []string")),
        };
        if messages.is_empty() {
            return Err(Reply::error(400, if chat { "[] is too short - 'messages'" } else { "prompt is required" }));
        }
        let keep_alive = host::default_keep_alive();
        let opts = JobOptions {
            num_predict: o.num_predict,
            num_ctx: o.num_ctx,
            sampler: o.sampler,
            stop: o.stop,
            // Chat takes OpenAI's `logprobs` (bool) and `top_logprobs`; text completions
            // the legacy integer `logprobs` (that many alternatives per token).
            logprobs: if chat { logprobs_fields(&m)? } else { legacy_logprobs(&m)? },
            truncate: true,
            keep_alive,
            format: response_format_field(&m)?,
        };
        let worker = cx.state.models.get(&entry).map_err(|m| Reply::error(503, m))?;
        let (think, tools) = if chat { (reasoning_effort(&m)?, tools_field(&m)?) } else { (Think::Unset, None) };
        let rx = worker.submit(chat_input(&entry, messages, think, tools), opts, &cx.meter);
        let created = unix(SystemTime::now());
        let n = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos() % 1000);
        let id = format!("{}-{n}", if chat { "chatcmpl" } else { "cmpl" });
        let framer = Box::new(SseFramer {
            id,
            model: name,
            created,
            include_usage,
            chat,
            logprobs: Vec::new(),
            reasoning: String::new(),
            tool_calls: Vec::new(),
            text_offset: 0,
        });
        respond(cx, rx, stream, keep_alive, framer)
    }

    /// OpenAI's `reasoning_effort` ("none", "low", "medium", "high"), or `reasoning.effort`,
    /// as a `think`.
    fn reasoning_effort(m: &Body) -> Result<Think, Reply> {
        let effort = match (m.get("reasoning_effort"), m.get("reasoning").and_then(|r| r.get("effort"))) {
            (Some(Value::String(s)), _) | (None, Some(Value::String(s))) => s.as_str(),
            (None | Some(Value::Null), None | Some(Value::Null)) => return Ok(Think::Unset),
            _ => return Err(type_error("reasoning_effort", "string")),
        };
        match effort {
            "none" => Ok(Think::Off),
            "low" | "medium" | "high" => Ok(Think::Level(effort.to_string())),
            other => Err(Reply::error(
                400,
                format!("invalid reasoning_effort: {other:?} (expected \"none\", \"low\", \"medium\" or \"high\")"),
            )),
        }
    }

    struct SseFramer {
        id: String,
        model: String,
        created: u64,
        include_usage: bool,
        /// Chat completion chunks (`delta`) or text completion ones (`text`).
        chat: bool,
        /// Log-probabilities of tokens whose text has not gone out yet (chat only).
        logprobs: Vec<Value>,
        /// Reasoning gathered for a `stream: false` chat answer.
        reasoning: String,
        /// Tool calls so far, in OpenAI's shape (their count gives each its index).
        tool_calls: Vec<Value>,
        /// Characters of completion text before the next token (legacy logprobs).
        text_offset: usize,
    }

    /// Text completions' `logprobs`: an integer, how many alternatives to report per
    /// token (0 reports only the chosen token's); None when absent.
    fn legacy_logprobs(m: &Body) -> Result<Option<usize>, Reply> {
        match m.get("logprobs") {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= MAX_TOP_LOGPROBS => Ok(Some(n as usize)),
                _ => Err(Reply::error(400, format!("logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}"))),
            },
        }
    }

    /// An Ollama-shaped call as OpenAI sends it: an id, and the arguments as a string.
    fn openai_call(call: &Value, index: usize) -> Value {
        let f = &call["function"];
        let arguments = match &f["arguments"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let n = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        json!({ "index": index, "id": format!("call_{n:08x}{index}"), "type": "function",
                "function": { "name": f["name"], "arguments": arguments } })
    }

    fn sse(v: &Value) -> Vec<u8> {
        format!("data: {v}\n\n").into_bytes()
    }

    fn finish_reason(d: &Done, called: bool) -> &'static str {
        match (d.done_reason, called) {
            ("length", _) => "length",
            (_, true) => "tool_calls",
            _ => "stop",
        }
    }

    fn usage(d: &Done) -> Value {
        json!({
            "prompt_tokens": d.prompt_eval_count,
            "completion_tokens": d.eval_count,
            "total_tokens": d.prompt_eval_count + d.eval_count,
        })
    }

    impl SseFramer {
        fn object(&self, stream: bool) -> &'static str {
            match (self.chat, stream) {
                (true, true) => "chat.completion.chunk",
                (true, false) => "chat.completion",
                (false, _) => "text_completion",
            }
        }

        /// `{"content": [...]}` of the pending log-probabilities, if any.
        /// The pending log-probabilities: chat's `{"content": [...]}`, or text completions'
        /// legacy `{tokens, token_logprobs, top_logprobs, text_offset}`.
        fn take_logprobs(&mut self) -> Option<Value> {
            if self.logprobs.is_empty() {
                return None;
            }
            let entries = std::mem::take(&mut self.logprobs);
            if self.chat {
                return Some(json!({ "content": entries }));
            }
            let mut legacy = json!({ "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": [] });
            for e in entries {
                let token = e["token"].as_str().unwrap_or("").to_string();
                let top: serde_json::Map<String, Value> = e["top_logprobs"]
                    .as_array()
                    .map(|alts| {
                        alts.iter()
                            .map(|a| (a["token"].as_str().unwrap_or("").to_string(), a["logprob"].clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                for (key, v) in [
                    ("tokens", json!(token)),
                    ("token_logprobs", e["logprob"].clone()),
                    ("top_logprobs", Value::Object(top)),
                    ("text_offset", json!(self.text_offset)),
                ] {
                    if let Some(a) = legacy[key].as_array_mut() {
                        a.push(v);
                    }
                }
                self.text_offset += token.chars().count();
            }
            Some(legacy)
        }

        fn chunk(&mut self, text: &str, finish: Value) -> Value {
            let mut choice = if self.chat {
                json!({ "index": 0, "delta": { "role": "assistant", "content": text }, "finish_reason": finish })
            } else {
                json!({ "index": 0, "text": text, "finish_reason": finish })
            };
            if let Some(lp) = self.take_logprobs() {
                choice["logprobs"] = lp;
            }
            json!({
                "id": self.id, "object": self.object(true), "created": self.created,
                "model": self.model, "system_fingerprint": "fp_ollama", "choices": [choice],
            })
        }
    }

    impl Framer for SseFramer {
        fn add_logprob(&mut self, logprob: Value) {
            self.logprobs.push(logprob);
        }
        fn text(&mut self, text: &str) -> Vec<u8> {
            sse(&self.chunk(text, Value::Null))
        }
        /// Chat only, as Ollama's compatibility layer: `delta.reasoning` when streaming,
        /// `message.reasoning` in a whole answer.
        fn thinking(&mut self, text: &str, stream: bool) -> Vec<u8> {
            if !self.chat {
                return Vec::new();
            }
            if !stream {
                self.reasoning.push_str(text);
                return Vec::new();
            }
            let mut v = self.chunk("", Value::Null);
            v["choices"][0]["delta"]["reasoning"] = json!(text);
            sse(&v)
        }
        fn tool_call(&mut self, call: Value, stream: bool) -> Vec<u8> {
            let call = openai_call(&call, self.tool_calls.len());
            self.tool_calls.push(call.clone());
            if !stream || !self.chat {
                return Vec::new();
            }
            let mut v = self.chunk("", Value::Null);
            v["choices"][0]["delta"] = json!({ "role": "assistant", "tool_calls": [call] });
            sse(&v)
        }
        fn done(&mut self, d: &Done) -> Vec<u8> {
            let mut out = sse(&self.chunk("", json!(finish_reason(d, !self.tool_calls.is_empty()))));
            if self.include_usage {
                out.extend(sse(&json!({
                    "id": self.id, "object": self.object(true), "created": self.created,
                    "model": self.model, "system_fingerprint": "fp_ollama", "choices": [], "usage": usage(d),
                })));
            }
            out.extend_from_slice(b"data: [DONE]\n\n");
            out
        }
        fn error(&mut self, message: &str) -> Vec<u8> {
            let mut out =
                sse(&json!({ "error": { "message": message, "type": "api_error", "param": null, "code": null } }));
            out.extend_from_slice(b"data: [DONE]\n\n");
            out
        }
        fn whole(&mut self, text: &str, d: &Done) -> Value {
            let reason = finish_reason(d, !self.tool_calls.is_empty());
            let mut choice = if self.chat {
                json!({ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": reason })
            } else {
                json!({ "index": 0, "text": text, "finish_reason": reason })
            };
            if self.chat && !self.reasoning.is_empty() {
                choice["message"]["reasoning"] = json!(std::mem::take(&mut self.reasoning));
            }
            if self.chat && !self.tool_calls.is_empty() {
                choice["message"]["tool_calls"] = Value::Array(std::mem::take(&mut self.tool_calls));
            }
            if let Some(lp) = self.take_logprobs() {
                choice["logprobs"] = lp;
            }
            json!({
                "id": self.id, "object": self.object(false), "created": self.created,
                "model": self.model, "system_fingerprint": "fp_ollama", "choices": [choice], "usage": usage(d),
            })
        }
        fn error_reply(&self, status: u16, message: &str) -> Reply {
            error(status, message)
        }
        fn content_type(&self) -> &'static str {
            "text/event-stream"
        }
    }
}
