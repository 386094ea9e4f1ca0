//! Thinking models end to end: `think` on /api/chat and /api/generate splits a model's
//! reasoning into Ollama's `thinking` field. The model is the synthetic Qwen3 of
//! scripts/synth/ (written by scripts/fetch-test-data.sh) with a Qwen3-style thinking
//! template: its generation prompt opens `<think>`, and its random weights never close it,
//! so everything it generates is reasoning unless `think` is false (the template then
//! closes an empty reasoning block and the output is answer).

use serde_json::{json, Value};
use std::path::PathBuf;

mod common;
use common::{request, Resp, ServeProcess};

fn synth(name: &str) -> String {
    let dir = std::env::var_os("TURBINE_SYNTH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/turbine-synth"));
    let path = dir.join(name);
    assert!(path.is_file(), "{}: run scripts/fetch-test-data.sh", path.display());
    path.to_string_lossy().into_owned()
}

fn post(port: u16, path: &str, body: &Value) -> Resp {
    request(port, "POST", path, &[], body.to_string().as_bytes()).expect("request")
}

/// A server with an empty store of its own, and the synthetic Qwen3 (`thinker`) and Llama
/// (`plain`, no chat template) created in it.
fn serve() -> ServeProcess {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let store = std::env::temp_dir().join(format!("turbine-thinking-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    std::fs::create_dir_all(&store).expect("store");
    let server = ServeProcess::start(&[("OLLAMA_MODELS", store.to_str().expect("utf-8"))]);
    for (name, file) in [("thinker", "qwen3-q8_0.gguf"), ("plain", "llama-q8_0.gguf")] {
        let r = post(server.port, "/api/create", &json!({ "model": name, "from": synth(file), "stream": false }));
        assert_eq!(r.status, 200, "create {name}: {}", r.text());
    }
    server
}

fn chat(think: Value, stream: bool) -> Value {
    json!({
        "model": "thinker",
        "messages": [{ "role": "user", "content": "What is 2 + 2?" }],
        "think": think,
        "stream": stream,
        "options": { "temperature": 0, "num_predict": 12 },
    })
}

#[test]
fn think_splits_reasoning_from_the_answer() {
    let server = serve();
    let port = server.port;

    let show = post(port, "/api/show", &json!({ "model": "thinker" })).json();
    assert!(show["capabilities"].as_array().expect("capabilities").contains(&json!("thinking")), "{show}");
    let show = post(port, "/api/show", &json!({ "model": "plain" })).json();
    assert!(!show["capabilities"].as_array().expect("capabilities").contains(&json!("thinking")), "{show}");

    // think: true — the open reasoning block takes the whole output.
    let r = post(port, "/api/chat", &chat(json!(true), false));
    assert_eq!(r.status, 200, "{}", r.text());
    let m = &r.json()["message"];
    assert!(!m["thinking"].as_str().unwrap_or("").is_empty(), "{m}");
    assert_eq!(m["content"], "", "{m}");

    // Streamed, the reasoning arrives in chunks of its own; together they are the same text.
    let r = post(port, "/api/chat", &chat(json!("high"), true));
    assert_eq!(r.status, 200, "{}", r.text());
    let lines = r.lines();
    let streamed: String = lines.iter().filter_map(|l| l["message"]["thinking"].as_str()).collect();
    assert_eq!(streamed, m["thinking"].as_str().unwrap_or(""), "greedy, so the same reasoning");
    assert!(lines.last().is_some_and(|l| l["done"] == true));

    // think: false — the template closes an empty block, the output is the answer.
    let r = post(port, "/api/chat", &chat(json!(false), false));
    let m = &r.json()["message"];
    assert!(m.get("thinking").is_none(), "{m}");
    assert!(!m["content"].as_str().unwrap_or("").is_empty(), "{m}");

    // Unset is the model's default: it thinks, and the reasoning comes back split out.
    let r = post(port, "/api/chat", &chat(Value::Null, false));
    let m = &r.json()["message"];
    assert!(!m["thinking"].as_str().unwrap_or("").is_empty(), "{m}");
    assert_eq!(m["content"], "", "{m}");

    // /api/generate carries it in `thinking`.
    let body = json!({ "model": "thinker", "prompt": "Hi", "think": true, "stream": false,
                       "options": { "temperature": 0, "num_predict": 6 } });
    let g = post(port, "/api/generate", &body).json();
    assert!(!g["thinking"].as_str().unwrap_or("").is_empty(), "{g}");

    // OpenAI's compatibility layer: reasoning_effort in, `reasoning` out.
    let mut body = json!({ "model": "thinker", "messages": [{ "role": "user", "content": "2 + 2?" }],
                       "reasoning_effort": "low", "temperature": 0, "max_tokens": 6 });
    let r = post(port, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let m = &r.json()["choices"][0]["message"];
    assert!(!m["reasoning"].as_str().unwrap_or("").is_empty(), "{m}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let r = post(port, "/v1/chat/completions", &streamed);
    let events: Vec<Value> = r
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).expect("json"))
        .collect();
    let reasoning: String = events.iter().filter_map(|e| e["choices"][0]["delta"]["reasoning"].as_str()).collect();
    assert_eq!(reasoning, m["reasoning"].as_str().unwrap_or(""));
    body["reasoning_effort"] = json!("extreme");
    let r = post(port, "/v1/chat/completions", &body);
    assert_eq!(r.status, 400, "{}", r.text());

    // A model that does not think, and a think value that is not one.
    let mut body = chat(json!(true), false);
    body["model"] = json!("plain");
    let r = post(port, "/api/chat", &body);
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "\"plain:latest\" does not support thinking");
    let r = post(port, "/api/chat", &chat(json!("deep"), false));
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap_or("").contains("invalid think value"), "{}", r.text());
}

/// Tools reach the template (the prompt grows by their listing), an assistant's earlier
/// calls and tool results are accepted and rendered, and a model whose template has no
/// tools refuses them. Whether the model then calls one is its own business (the synthetic
/// model's random weights never do; the parsing of calls is checked on text in
/// `server::thinking`).
/// `format` leaves the reasoning free (this model never closes it, so its reasoning is all
/// there is) and, with `think: false`, constrains the answer from its first token.
#[test]
fn a_format_applies_to_the_answer_not_the_reasoning() {
    let server = serve();
    let schema = json!({ "type": "object", "properties": { "a": { "type": "boolean" } }, "required": ["a"] });
    let mut body = chat(json!(true), false);
    body["format"] = schema.clone();
    let r = post(server.port, "/api/chat", &body).json();
    let thinking = r["message"]["thinking"].as_str().unwrap_or_default();
    assert!(!thinking.is_empty() && !thinking.trim_start().starts_with('{'), "reasoning constrained: {r}");
    body = chat(json!(false), false);
    body["format"] = schema;
    body["options"]["num_predict"] = json!(64);
    let r = post(server.port, "/api/chat", &body).json();
    let content = r["message"]["content"].as_str().expect("content");
    let doc: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {r}"));
    assert!(doc["a"].is_boolean(), "{r}");
    assert_eq!(r["done_reason"], "stop", "{r}");
}

#[test]
fn tools_are_offered_through_the_template() {
    let server = serve();
    let port = server.port;
    let show = post(port, "/api/show", &json!({ "model": "thinker" })).json();
    assert!(show["capabilities"].as_array().expect("capabilities").contains(&json!("tools")), "{show}");

    let tools = json!([{ "type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": { "type": "object", "properties": { "city": { "type": "string" } } } } }]);
    let ask = |body: Value| -> Value {
        let r = post(port, "/api/chat", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    let question = json!([{ "role": "user", "content": "Weather in Paris?" }]);
    let base = json!({ "model": "thinker", "messages": question, "stream": false,
                       "options": { "temperature": 0, "num_predict": 2 } });
    let plain = ask(base.clone())["prompt_eval_count"].as_u64().expect("count");
    let mut with_tools = base.clone();
    with_tools["tools"] = tools.clone();
    let offered = ask(with_tools.clone())["prompt_eval_count"].as_u64().expect("count");
    assert!(offered > plain + 5, "the tools are in the prompt: {offered} vs {plain} tokens");

    // A follow-up after a call: the assistant's call and the tool's result are rendered.
    let mut follow = with_tools.clone();
    follow["messages"] = json!([
        { "role": "user", "content": "Weather in Paris?" },
        { "role": "assistant", "content": "", "tool_calls": [
            { "function": { "name": "get_weather", "arguments": { "city": "Paris" } } }] },
        { "role": "tool", "tool_name": "get_weather", "content": "18 degrees, sunny" },
    ]);
    let after = ask(follow)["prompt_eval_count"].as_u64().expect("count");
    assert!(after > offered + 10, "call and result are in the prompt: {after} vs {offered} tokens");

    // OpenAI's shape works too (arguments as a JSON string).
    let body = json!({ "model": "thinker", "tools": tools, "max_tokens": 2, "messages": [
        { "role": "user", "content": "Weather in Paris?" },
        { "role": "assistant", "content": null, "tool_calls": [{ "id": "call_1", "type": "function",
            "function": { "name": "get_weather", "arguments": "{\"city\": \"Paris\"}" } }] },
        { "role": "tool", "tool_call_id": "call_1", "content": "18 degrees" },
    ] });
    let r = post(port, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());

    let mut refused = with_tools.clone();
    refused["model"] = json!("plain");
    let r = post(port, "/api/chat", &refused);
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "\"plain:latest\" does not support tools");
    let mut nameless = with_tools;
    nameless["tools"] = json!([{ "type": "function", "function": {} }]);
    assert_eq!(post(port, "/api/chat", &nameless).status, 400);
}

/// `turbine run --think` prints the reasoning framed as Ollama's CLI frames it;
/// `--hidethinking` leaves it out.
#[test]
fn run_prints_or_hides_the_reasoning() {
    let server = serve();
    let host = format!("127.0.0.1:{}", server.port);
    let run = |extra: &[&str]| -> String {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_turbine"))
            .args(["run", "thinker"])
            .args(extra)
            .arg("What is 2 + 2?")
            .env("OLLAMA_HOST", &host)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("turbine run");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let shown = run(&["--think"]);
    assert!(shown.starts_with("Thinking...\n") && shown.len() > "Thinking...\n".len() + 1, "{shown:?}");
    let hidden = run(&["--think=high", "--hidethinking"]);
    assert!(!hidden.contains("Thinking..."), "{hidden:?}");
}
