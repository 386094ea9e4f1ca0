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
    let store = std::env::temp_dir().join(format!("turbine-thinking-{}", std::process::id()));
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
