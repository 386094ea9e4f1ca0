//! `turbine serve` end to end: the real binary on a free loopback port, driven over raw
//! HTTP/1.1 on the default model.

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use turbine::engine::backend::cpu::CpuBackend;
use turbine::engine::generate::{GenerateOptions, LoadedModel, Session};
use turbine::engine::sampler::SamplerParams;

const MODEL: &str = "gemma3:270m";
const MODEL_SHA: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

mod common;
use common::Resp;

/// A running server (default settings).
struct Server(common::ServeProcess);

impl Server {
    fn start() -> Server {
        Server(common::ServeProcess::start(&[]))
    }

    fn try_request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> std::io::Result<Resp> {
        common::request(self.0.port, method, path, headers, body)
    }

    fn request(&self, method: &str, path: &str, body: &[u8]) -> Resp {
        self.try_request(method, path, &[], body).expect("request")
    }

    fn post(&self, path: &str, body: &Value) -> Resp {
        self.request("POST", path, body.to_string().as_bytes())
    }
}

fn model_path() -> PathBuf {
    let p = turbine::engine::store::models_dir().join("blobs").join(format!("sha256-{MODEL_SHA}"));
    assert!(p.is_file(), "default model not found at {}: run scripts/fetch-default-model.sh", p.display());
    p
}

/// What the engine itself generates greedily from `text` (BOS added, specials parsed).
fn engine_greedy(text: &str, n: usize) -> (Vec<u32>, String) {
    greedy_with(&LoadedModel::load(&model_path()).expect("load"), text, n)
}

/// [`engine_greedy`] with `model`.
fn greedy_with(model: &LoadedModel<CpuBackend>, text: &str, n: usize) -> (Vec<u32>, String) {
    let ids = model.tokenizer.encode(text, true, true);
    let opts = GenerateOptions {
        num_predict: Some(n),
        num_ctx: 4096,
        sampler: SamplerParams::greedy(),
        stop: vec![],
        logprobs: None,
        render_special: false,
        format: None,
    };
    let mut out = String::new();
    Session::new(model, 4096)
        .generate(&ids, &opts, |t| {
            out.push_str(t);
            true
        })
        .expect("generate");
    (ids, out)
}

fn assert_final_stats(last: &Value, eval_count: u64) {
    assert_eq!(last["done"], json!(true), "{last}");
    assert_eq!(last["done_reason"], json!("length"));
    assert_eq!(last["eval_count"], json!(eval_count));
    assert!(last["prompt_eval_count"].as_u64().unwrap() > 0);
    for k in ["total_duration", "prompt_eval_duration", "eval_duration"] {
        assert!(last[k].as_u64().unwrap() > 0, "{k}: {last}");
    }
    assert!(last["load_duration"].is_u64());
    assert!(last["created_at"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn info_routes() {
    let s = Server::start();
    let r = s.request("GET", "/", b"");
    assert_eq!((r.status, r.text().as_str()), (200, "Ollama is running"));
    let r = s.request("HEAD", "/", b"");
    assert_eq!((r.status, r.body.len()), (200, 0));
    let r = s.request("GET", "/api/version", b"");
    assert_eq!(r.status, 200);
    assert!(r.json()["version"].is_string());

    let tags = s.request("GET", "/api/tags", b"").json();
    let m = tags["models"].as_array().unwrap().iter().find(|m| m["name"] == MODEL).expect("gemma3:270m listed");
    assert_eq!(m["model"], MODEL);
    assert_eq!(m["digest"].as_str().unwrap().len(), 64);
    assert!(m["size"].as_u64().unwrap() > 200_000_000);
    assert_eq!(m["details"]["format"], "gguf");
    assert_eq!(m["details"]["family"], "gemma3");
    assert_eq!(m["details"]["parameter_size"], "268.10M");
    assert_eq!(m["details"]["quantization_level"], "Q4_K_M");

    let show = s.post("/api/show", &json!({ "model": MODEL }));
    assert_eq!(show.status, 200);
    let show = show.json();
    assert_eq!(show["model_info"]["general.architecture"], "gemma3");
    assert_eq!(show["model_info"]["general.parameter_count"], 268_098_176);
    assert!(show["model_info"]["tokenizer.ggml.tokens"].is_null(), "vocabulary hidden unless verbose");
    assert!(show["template"].as_str().unwrap().contains("<start_of_turn>"));
    assert_eq!(show["capabilities"], json!(["completion"]));
    assert_eq!(show["details"]["family"], "gemma3");

    let models = s.request("GET", "/v1/models", b"").json();
    assert_eq!(models["object"], "list");
    assert!(models["data"].as_array().unwrap().iter().any(|m| m["id"] == MODEL && m["owned_by"] == "library"));
    assert_eq!(s.request("GET", "/v1/models/gemma3:270m", b"").json()["id"], MODEL);
}

#[test]
fn generate_matches_the_engine_and_streams_ndjson() {
    let s = Server::start();
    let prompt = "The capital of France is";
    let (ids, want) = engine_greedy(prompt, 8);
    assert!(!want.trim().is_empty());
    let req = json!({ "model": MODEL, "prompt": prompt, "raw": true, "stream": false,
                      "options": { "temperature": 0, "num_predict": 8 } });
    let r = s.post("/api/generate", &req);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("Content-Type").unwrap().starts_with("application/json"));
    let v = r.json();
    assert_eq!(v["response"].as_str().unwrap(), want);
    assert_eq!(v["model"], MODEL);
    assert_final_stats(&v, 8);
    let context: Vec<u32> = serde_json::from_value(v["context"].clone()).unwrap();
    assert_eq!(context.len(), ids.len() + 8);
    assert_eq!(&context[..ids.len()], &ids[..]);

    let mut req = req;
    req["stream"] = json!(true);
    let r = s.post("/api/generate", &req);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("application/x-ndjson"));
    assert_eq!(r.header("Transfer-Encoding"), Some("chunked"));
    let lines = r.lines();
    assert!(lines.len() >= 2);
    let (last, chunks) = lines.split_last().unwrap();
    assert!(chunks.iter().all(|c| c["done"] == json!(false) && c["model"] == MODEL));
    let text: String = chunks.iter().map(|c| c["response"].as_str().unwrap()).collect();
    assert_eq!(text, want);
    assert_eq!(last["response"], "");
    assert_final_stats(last, 8);
    assert!(last["context"].is_array());

    // Templated (not raw), with a system prompt, stream left at its default (true).
    let r = s.post(
        "/api/generate",
        &json!({ "model": MODEL, "prompt": "Hello", "system": "Be brief.",
                 "options": { "temperature": 0, "num_predict": 4 } }),
    );
    let lines = r.lines();
    assert_eq!(lines.last().unwrap()["done"], json!(true));
    // Two user turns (system, prompt) and the opened model turn: 3 × <start_of_turn>.
    let last = lines.last().unwrap();
    let context: Vec<u64> = serde_json::from_value(last["context"].clone()).unwrap();
    let n_prompt = last["prompt_eval_count"].as_u64().unwrap() as usize;
    assert_eq!(context[..n_prompt].iter().filter(|&&t| t == 105).count(), 3, "{context:?}");
}

#[test]
fn chat_streamed_and_not_follows_the_gemma_template() {
    let s = Server::start();
    let messages = json!([
        { "role": "system", "content": "You are terse." },
        { "role": "user", "content": "Name a colour." },
    ]);
    let rendered = "<start_of_turn>user\nYou are terse.<end_of_turn>\n<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n";
    let (_, want) = engine_greedy(rendered, 8);
    let req = json!({ "model": MODEL, "messages": messages, "stream": false,
                      "options": { "temperature": 0, "num_predict": 8 } });
    let v = s.post("/api/chat", &req).json();
    assert_eq!(v["message"]["role"], "assistant");
    let content = v["message"]["content"].as_str().unwrap().to_string();
    assert!(v.get("context").is_none());
    if v["done_reason"] == "length" {
        assert_final_stats(&v, 8);
    }
    // The engine stops at <end_of_turn>; the server must produce the same text.
    assert_eq!(content, want);

    let mut req = req;
    req["stream"] = json!(true);
    let lines = s.post("/api/chat", &req).lines();
    let (last, chunks) = lines.split_last().unwrap();
    let text: String = chunks.iter().map(|c| c["message"]["content"].as_str().unwrap()).collect();
    assert_eq!(text, content);
    assert!(chunks.iter().all(|c| c["message"]["role"] == "assistant" && c["done"] == json!(false)));
    assert_eq!(last["done"], json!(true));
    assert_eq!(last["message"]["content"], "");
    assert!(last["eval_duration"].as_u64().is_some());
}

#[test]
fn load_ps_and_unload() {
    let s = Server::start();
    assert_eq!(s.request("GET", "/api/ps", b"").json()["models"], json!([]));
    let v = s.post("/api/generate", &json!({ "model": MODEL })).json();
    assert_eq!((v["done"].clone(), v["done_reason"].clone()), (json!(true), json!("load")));
    let v = s.post("/api/chat", &json!({ "model": MODEL, "messages": [] })).json();
    assert_eq!(v["done_reason"], "load");
    assert_eq!(v["message"]["content"], "");
    let ps = s.request("GET", "/api/ps", b"").json();
    let m = &ps["models"][0];
    assert_eq!(m["name"], MODEL);
    assert_eq!(m["details"]["family"], "gemma3");
    assert!(m["expires_at"].is_string());
    assert!(m["context_length"].as_u64().unwrap() > 0);
    let file_size = std::fs::metadata(model_path()).unwrap().len();
    assert!(m["size"].as_u64().unwrap() > file_size, "size counts the weights and the KV cache pool");
    let v = s.post("/api/generate", &json!({ "model": MODEL, "keep_alive": 0 })).json();
    assert_eq!(v["done_reason"], "unload");
    assert_eq!(s.request("GET", "/api/ps", b"").json()["models"], json!([]));
    // keep_alive 0 on a real request unloads after it.
    let r = s.post(
        "/api/generate",
        &json!({ "model": MODEL, "prompt": "Hi", "stream": false, "keep_alive": "0s", "options": { "num_predict": 1 } }),
    );
    assert_eq!(r.status, 200);
    assert_eq!(s.request("GET", "/api/ps", b"").json()["models"], json!([]));
}

#[test]
fn openai_chat_completions() {
    let s = Server::start();
    let req = json!({ "model": MODEL, "messages": [{ "role": "user", "content": "Hi" }],
                      "max_tokens": 3, "temperature": 0 });
    let v = s.post("/v1/chat/completions", &req).json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let usage = &v["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap())
    );

    let mut req = req;
    req["stream"] = json!(true);
    req["stream_options"] = json!({ "include_usage": true });
    let r = s.post("/v1/chat/completions", &req);
    assert_eq!(r.header("Content-Type"), Some("text/event-stream"));
    let text = r.text();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.iter().all(|e| e.starts_with("data: ")), "{text}");
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(&e["data: ".len()..]).unwrap()).collect();
    let streamed: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(streamed, content);
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], *usage);
    let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
    assert_eq!(finish, &v["choices"][0]["finish_reason"]);

    // /v1/completions: the same prompt path, `text` choices.
    let req = json!({ "model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 0 });
    let v = s.post("/v1/completions", &req).json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"].as_str(), Some(content.as_str()));
    let mut req = req;
    req["stream"] = json!(true);
    let text = s.post("/v1/completions", &req).text();
    assert!(text.ends_with("data: [DONE]\n\n"));
    let streamed: String = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(streamed, content);

    let r = s.post("/v1/chat/completions", &json!({ "model": "nope", "messages": [] }));
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["type"], "not_found_error");
}

#[test]
fn errors_as_ollama_gives_them() {
    let s = Server::start();
    let err = |r: Resp| -> (u16, String) {
        let v = r.json();
        (r.status, v["error"].as_str().unwrap_or_else(|| panic!("no error field: {v}")).to_string())
    };
    let (st, _) = err(s.request("POST", "/api/generate", b"{not json"));
    assert_eq!(st, 400);
    assert_eq!(err(s.request("POST", "/api/chat", b"")), (400, "missing request body".into()));
    assert_eq!(err(s.post("/api/generate", &json!({ "prompt": "x" }))), (400, "model is required".into()));
    assert_eq!(err(s.post("/api/show", &json!({}))), (400, "model is required".into()));
    assert_eq!(
        err(s.post("/api/generate", &json!({ "model": "nope:1b", "prompt": "x" }))),
        (404, "model \"nope:1b\" not found, try pulling it first".into())
    );
    assert_eq!(err(s.post("/api/chat", &json!({ "model": "../../etc/passwd", "messages": [] }))).0, 404);
    assert_eq!(err(s.post("/api/show", &json!({ "model": "nope" }))).0, 404);
    assert_eq!(
        err(s.post("/api/generate", &json!({ "model": MODEL, "prompt": "x", "options": { "temperature": "hot" } }))),
        (400, "option \"temperature\" must be of type float32".into())
    );
    assert_eq!(
        err(s.post(
            "/api/chat",
            &json!({ "model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                          "options": { "num_predict": "many" } })
        )),
        (400, "option \"num_predict\" must be of type integer".into())
    );
    assert_eq!(err(s.post("/api/generate", &json!({ "model": 5 }))).0, 400);
    assert_eq!(err(s.post("/api/generate", &json!({ "model": MODEL, "prompt": "x", "stream": "yes" }))).0, 400);
    assert_eq!(
        err(s.post("/api/generate", &json!({ "model": MODEL, "prompt": "x", "raw": true, "system": "s" }))),
        (400, "raw mode does not support template, system, or context".into())
    );
    assert_eq!(err(s.post("/api/generate", &json!({ "model": MODEL, "prompt": "x", "keep_alive": "soon" }))).0, 400);
    assert_eq!(
        err(s.post(
            "/api/chat",
            &json!({ "model": MODEL, "messages": [{ "role": "user", "content": "hi" }], "think": true })
        )),
        (400, "\"gemma3:270m\" does not support thinking".into())
    );
    assert_eq!(
        err(s.post("/api/generate", &json!({ "model": MODEL, "prompt": "x", "images": ["aGk="] }))),
        (400, "\"gemma3:270m\" does not support images".into())
    );

    // Oversize: refused from the declared length, before the body is sent.
    let big = (17 << 20).to_string();
    let r = s.try_request("POST", "/api/generate", &[("Content-Length", &big)], b"").expect("413 answer");
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"], "request body too large");

    let r = s.request("GET", "/api/nope", b"");
    assert_eq!(r.status, 404);
    let r = s.request("GET", "/api/generate", b"");
    assert_eq!(r.status, 405);
    let r = s.request("DELETE", "/api/tags", b"");
    assert_eq!(r.status, 405);

    // Still serving after all of that.
    assert_eq!(s.request("GET", "/", b"").status, 200);
    let v = s.post(
        "/api/generate",
        &json!({ "model": MODEL, "prompt": "Hi", "stream": false,
                                             "options": { "num_predict": 2, "stop": [] } }),
    );
    assert_eq!(v.status, 200);
}

/// With room for one sequence, a client that closes its connection mid-generation, its
/// answer streamed or not, must free that room at once: the next request would otherwise
/// wait for the abandoned one's 30 000 tokens.
#[test]
fn a_client_that_goes_away_frees_the_model() {
    let log = std::env::temp_dir().join(format!("turbine-gone-{}.log", std::process::id()));
    let s = Server(common::ServeProcess::start_with(&[("OLLAMA_NUM_PARALLEL", "1")], &[], Some(&log)));
    for stream in [true, false] {
        {
            let mut c = TcpStream::connect(("127.0.0.1", s.0.port)).unwrap();
            // Greedy: a sampled continuation may end (EOS) before the client goes away.
            let body = json!({ "model": MODEL, "prompt": "Count to a thousand:", "raw": true, "stream": stream,
                               "options": { "num_predict": 30000, "num_ctx": 32768, "temperature": 0 } })
            .to_string();
            write!(c, "POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}", body.len())
                .unwrap();
            if stream {
                let mut first = [0u8; 256];
                let n = c.read(&mut first).unwrap();
                assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
            } else {
                std::thread::sleep(Duration::from_secs(2)); // generating, nothing written yet
            }
        } // dropped: the connection closes
        let start = Instant::now();
        let r = s.post(
            "/api/generate",
            &json!({ "model": MODEL, "prompt": "Hi", "stream": false, "options": { "num_predict": 2 } }),
        );
        assert_eq!(r.status, 200);
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the abandoned generation (stream {stream}) kept the model busy"
        );
    }
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(std::env::temp_dir().join(format!("turbine-gone-{}.log", std::process::id())));
    assert!(log.contains("POST /api/generate 499"), "the non-streamed request was not cut short:\n{log}");
}

/// `format` and `response_format`: the answer follows the schema and ends when the
/// document does; a bad format is a 400 naming the problem, on every route.
#[test]
fn structured_outputs_follow_the_schema() {
    let s = Server::start();
    let schema = json!({ "type": "object", "required": ["ok", "n"],
                         "properties": { "ok": { "type": "boolean" }, "n": { "type": "integer" } } });
    let r = s.post(
        "/api/generate",
        &json!({ "model": MODEL, "prompt": "Answer:", "stream": false, "format": schema,
                 "options": { "temperature": 0, "num_predict": 40 } }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let doc: Value = serde_json::from_str(v["response"].as_str().unwrap()).expect("a JSON document");
    assert!(doc["ok"].is_boolean() && doc["n"].is_i64(), "{doc}");
    assert_eq!(doc.as_object().unwrap().len(), 2);
    assert_eq!(v["done_reason"], "stop");
    let r = s.post(
        "/v1/chat/completions",
        &json!({ "model": MODEL, "messages": [{ "role": "user", "content": "Answer:" }], "max_tokens": 40,
                 "temperature": 0, "response_format": { "type": "json_schema", "json_schema": { "schema": schema } } }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let content = r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(serde_json::from_str::<Value>(&content).unwrap()["ok"].is_boolean(), "{content}");
    for (path, body) in [
        ("/api/generate", json!({ "model": MODEL, "prompt": "x", "format": "yaml" })),
        ("/api/chat", json!({ "model": MODEL, "messages": [], "format": { "type": "tuple" } })),
        ("/api/generate", json!({ "model": MODEL, "prompt": "x", "format": { "$ref": "#/$defs/Missing" } })),
        (
            "/v1/chat/completions",
            json!({ "model": MODEL, "messages": [{ "role": "user", "content": "x" }],
                                        "response_format": { "type": "xml" } }),
        ),
    ] {
        let r = s.post(path, &body);
        assert_eq!(r.status, 400, "{path} {body}: {}", r.text());
        let e = r.json();
        let message = e["error"].as_str().or(e["error"]["message"].as_str()).unwrap_or_default().to_string();
        assert!(message.contains("format"), "{path}: {message}");
    }
}

#[test]
fn concurrent_requests_are_all_answered() {
    let s = std::sync::Arc::new(Server::start());
    let threads: Vec<_> = (0..3)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || {
                let r = s.post(
                    "/api/chat",
                    &json!({ "model": MODEL, "stream": i % 2 == 0,
                    "messages": [{ "role": "user", "content": format!("Say {i}") }],
                    "options": { "num_predict": 3, "temperature": 0 } }),
                );
                assert_eq!(r.status, 200);
                r.text()
            })
        })
        .collect();
    for t in threads {
        assert!(t.join().unwrap().contains("\"done\":true"));
    }
}

#[test]
fn overload_gets_503_and_every_admitted_request_completes() {
    let s = std::sync::Arc::new(Server(common::ServeProcess::start(&[
        ("OLLAMA_NUM_PARALLEL", "1"),
        ("OLLAMA_MAX_QUEUE", "4"),
    ])));
    // Load first, so the burst meets the scheduler and not the loader.
    assert_eq!(s.post("/api/generate", &json!({ "model": MODEL })).status, 200);
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || {
                let r = s.post(
                    "/api/generate",
                    &json!({ "model": MODEL, "prompt": format!("Story number {i}:"), "stream": i % 2 == 0,
                             "options": { "num_predict": 48, "temperature": 0 } }),
                );
                (r.status, r.text())
            })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for t in threads {
        let (status, body) = t.join().unwrap();
        match status {
            200 => {
                assert!(body.contains("\"done\":true"), "admitted request did not finish: {body}");
                ok += 1;
            }
            503 => {
                let v: Value = serde_json::from_str(&body).expect("JSON error");
                assert_eq!(v["error"], "server busy, please try again.  maximum pending requests exceeded");
                busy += 1;
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!(busy >= 1 && ok >= 4, "{ok} answered, {busy} refused");
    let r = s.post(
        "/api/generate",
        &json!({ "model": MODEL, "prompt": "Hi", "stream": false,
                                               "options": { "num_predict": 2 } }),
    );
    assert_eq!(r.status, 200, "the server answers normally after the burst");
}

#[test]
fn a_second_chat_turn_computes_only_its_new_tokens() {
    let s = Server::start();
    let system = "You are a meticulous assistant. ".repeat(24);
    let turn = |messages: &Value| {
        let r = s.post(
            "/api/chat",
            &json!({ "model": MODEL, "stream": false, "messages": messages,
                                              "options": { "num_predict": 12, "temperature": 0 } }),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    let mut messages = json!([{ "role": "system", "content": system },
                              { "role": "user", "content": "Name a colour." }]);
    let one = turn(&messages);
    let reply = one["message"]["content"].as_str().expect("reply").to_string();
    messages.as_array_mut().unwrap().push(json!({ "role": "assistant", "content": reply }));
    messages.as_array_mut().unwrap().push(json!({ "role": "user", "content": "And another?" }));
    let two = turn(&messages);
    let (p1, p2) = (one["prompt_eval_count"].as_u64().unwrap(), two["prompt_eval_count"].as_u64().unwrap());
    assert!(p1 > 150, "first turn computes its whole prompt ({p1})");
    assert!((1..64).contains(&p2), "second turn computed {p2} tokens: its history should come from the cache");
    let (d1, d2) = (one["prompt_eval_duration"].as_u64().unwrap(), two["prompt_eval_duration"].as_u64().unwrap());
    assert!(d2 < d1, "time to first token drops with the cache ({d1} ns, then {d2} ns)");

    // Generate with the returned context: exactly the new tokens and at most a block more.
    let r = s.post(
        "/api/generate",
        &json!({ "model": MODEL, "prompt": "The sea is", "raw": true, "stream": false,
                                               "options": { "num_predict": 20, "temperature": 0 } }),
    );
    let first = r.json();
    let r = s.post(
        "/api/generate",
        &json!({ "model": MODEL, "prompt": " and the sky is", "stream": false,
                                               "context": first["context"],
                                               "options": { "num_predict": 4, "temperature": 0 } }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let n = r.json()["prompt_eval_count"].as_u64().unwrap();
    assert!(n <= 16 + 8, "continuing a context computed {n} tokens");
}

#[test]
fn the_least_recently_used_idle_model_makes_room() {
    let store = common::two_model_store("two-models");
    let s = std::sync::Arc::new(Server(common::ServeProcess::start(&[
        ("OLLAMA_MODELS", store.to_str().unwrap()),
        ("OLLAMA_MAX_LOADED_MODELS", "1"),
    ])));
    let loaded = |s: &Server| -> Vec<String> {
        let ps = s.request("GET", "/api/ps", b"").json();
        ps["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(s.post("/api/generate", &json!({ "model": MODEL })).status, 200);
    assert_eq!(loaded(&s), vec![MODEL.to_string()]);
    assert_eq!(s.post("/api/generate", &json!({ "model": "gemma3:second" })).status, 200);
    assert_eq!(loaded(&s), vec!["gemma3:second".to_string()], "the idle model was unloaded for the new one");

    // While the only resident model is busy, another cannot load: 503, not a wait forever.
    // The busy request decodes greedily a count that does not end (a sampled one could
    // reach its end of text before the second request arrives).
    let busy = {
        let s = s.clone();
        std::thread::spawn(move || {
            s.post(
                "/api/generate",
                &json!({ "model": "gemma3:second", "prompt": "1, 2, 3, 4, 5,", "raw": true, "stream": false,
                         "options": { "num_predict": 400, "temperature": 0 } }),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let r = s.post(
        "/api/generate",
        &json!({ "model": MODEL, "prompt": "Hi", "stream": false, "options": { "num_predict": 2 } }),
    );
    assert_eq!(r.status, 503, "{}", r.text());
    let busy = busy.join().unwrap();
    assert_eq!(busy.status, 200);
    assert_eq!(busy.json()["eval_count"], json!(400), "the busy request ran its whole length");
    let r = s.post(
        "/api/generate",
        &json!({ "model": MODEL, "prompt": "Hi", "stream": false,
                                               "options": { "num_predict": 2 } }),
    );
    assert_eq!(r.status, 200, "once idle, the other model makes room again");
    let _ = std::fs::remove_dir_all(&store);
}

#[test]
fn a_burst_of_streams_all_start_without_waiting_for_each_other() {
    // tiny_http's connection pool (patched in third_party/) used to leave a connection that
    // arrived in a burst unread until another connection closed.
    let s = Server::start();
    assert_eq!(s.post("/api/generate", &json!({ "model": MODEL })).status, 200);
    let port = s.0.port;
    let threads: Vec<_> = (0..24)
        .map(|i| {
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let body = json!({ "model": MODEL, "prompt": format!("Stream {i}:"), "raw": true,
                                   "options": { "num_predict": 100000 } })
                .to_string();
                write!(
                    c,
                    "POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
                let mut first = [0u8; 64];
                let n = c.read(&mut first).unwrap_or(0);
                let waited = start.elapsed();
                (String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"), waited, c)
            })
        })
        .collect();
    let answers: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    // Every stream has started while all the others are still running; then they close.
    for (ok, waited, _) in &answers {
        assert!(*ok && *waited < Duration::from_secs(30), "a stream waited {waited:?} to start");
    }
}

#[test]
fn embeddings_as_ollama_and_openai_shape_them() {
    let s = Server::start();
    let texts = ["Why is the sky blue?", "A recipe for bread."];
    let r = s.post("/api/embed", &json!({ "model": MODEL, "input": texts }));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let e = v["embeddings"].as_array().unwrap();
    assert_eq!(e.len(), 2);
    let vec = |x: &Value| -> Vec<f64> { x.as_array().unwrap().iter().map(|f| f.as_f64().unwrap()).collect() };
    let (a, b) = (vec(&e[0]), vec(&e[1]));
    assert_eq!(a.len(), 640);
    assert!((a.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-4, "normalized");
    assert!(a != b);
    assert!(v["prompt_eval_count"].as_u64().unwrap() > 0 && v["total_duration"].as_u64().unwrap() > 0);

    // The same text alone gives the same vector; the engine gives it too.
    let alone = s.post("/api/embed", &json!({ "model": MODEL, "input": texts[0] })).json();
    let again = vec(&alone["embeddings"][0]);
    assert!(a.iter().zip(&again).all(|(x, y)| (x - y).abs() < 1e-6));
    let m = LoadedModel::load(&model_path()).unwrap();
    let direct = m.embed(&m.tokenizer.encode(texts[0], true, true)).unwrap();
    assert!(a.iter().zip(&direct).all(|(x, y)| (x - f64::from(*y)).abs() < 1e-6));

    // dimensions: the first N values, unit length again.
    let short = s.post("/api/embed", &json!({ "model": MODEL, "input": texts[0], "dimensions": 8 })).json();
    let short = vec(&short["embeddings"][0]);
    assert_eq!(short.len(), 8);
    assert!((short.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-4);

    // Legacy route and OpenAI's.
    let legacy = s.post("/api/embeddings", &json!({ "model": MODEL, "prompt": texts[0] })).json();
    assert_eq!(vec(&legacy["embedding"]).len(), 640);
    let o = s.post("/v1/embeddings", &json!({ "model": MODEL, "input": texts })).json();
    assert_eq!(o["object"], "list");
    assert_eq!(o["data"][1]["index"], 1);
    assert_eq!(o["data"][0]["object"], "embedding");
    assert!(o["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let b64 = s.post("/v1/embeddings", &json!({ "model": MODEL, "input": "x", "encoding_format": "base64" })).json();
    assert_eq!(b64["data"][0]["embedding"].as_str().unwrap().len(), (640usize * 4).div_ceil(3) * 4);

    // Errors.
    let bad = s.post("/api/embed", &json!({ "model": MODEL, "input": 5 }));
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].as_str().unwrap().contains("input"));
    let bad = s.post("/api/embed", &json!({ "model": MODEL, "input": "x", "dimensions": -1 }));
    assert_eq!(bad.status, 400);
    let missing = s.post("/v1/embeddings", &json!({ "model": "nope:1b", "input": "x" }));
    assert_eq!(missing.status, 404);
    assert!(missing.json()["error"]["message"].is_string(), "OpenAI-shaped error");
    let empty = s.post("/api/embed", &json!({ "model": MODEL, "input": [] })).json();
    assert_eq!(empty["embeddings"], json!([]));
}

#[test]
fn copy_and_delete_share_and_prune_blobs() {
    let store = common::two_model_store("copy-delete");
    let s = Server(common::ServeProcess::start(&[("OLLAMA_MODELS", store.to_str().unwrap())]));
    let names = |s: &Server| -> Vec<String> {
        let tags = s.request("GET", "/api/tags", b"").json();
        let mut v: Vec<String> =
            tags["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect();
        v.sort();
        v
    };
    let blob = store.join("blobs").join(format!("sha256-{MODEL_SHA}"));
    let r = s.post("/api/copy", &json!({ "source": MODEL, "destination": "me/copied:v1" }));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(names(&s), vec!["gemma3:270m", "gemma3:second", "me/copied:v1"]);
    let r = s.post(
        "/api/generate",
        &json!({ "model": "me/copied:v1", "prompt": "Hi", "stream": false,
                                               "options": { "num_predict": 2 } }),
    );
    assert_eq!(r.status, 200, "the copy serves");

    // Errors: a missing source, an invalid destination, a bad body, a missing model.
    assert_eq!(s.post("/api/copy", &json!({ "source": "nope:1", "destination": "x" })).status, 404);
    assert_eq!(s.post("/api/copy", &json!({ "source": MODEL, "destination": "../../etc" })).status, 400);
    assert_eq!(s.post("/api/copy", &json!({ "source": MODEL })).status, 400);
    let del = |name: &str| s.request("DELETE", "/api/delete", json!({ "model": name }).to_string().as_bytes());
    let r = del("nope:1");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "model 'nope:1' not found");
    assert_eq!(s.request("POST", "/api/delete", b"{}").status, 405);

    // Deleting names that share the blob keeps it until the last one goes.
    assert_eq!(del("me/copied:v1").status, 200);
    assert_eq!(del(MODEL).status, 200);
    assert!(blob.exists(), "gemma3:second still uses the blob");
    assert!(!store.join("manifests/registry.ollama.ai/me").exists(), "empty folders are removed");
    assert_eq!(del("gemma3:second").status, 200);
    assert!(std::fs::symlink_metadata(&blob).is_err(), "the last name took its blob with it");
    assert!(names(&s).is_empty());
    let _ = std::fs::remove_dir_all(&store);
}

#[test]
fn logprobs_of_generated_tokens() {
    let s = Server::start();
    let body = json!({ "model": MODEL, "prompt": "The capital of France is", "stream": false, "raw": true,
                       "logprobs": true, "top_logprobs": 3, "options": { "num_predict": 6, "temperature": 0 } });
    let v = s.post("/api/generate", &body).json();
    let lps = v["logprobs"].as_array().expect("logprobs");
    assert_eq!(lps.len() as u64, v["eval_count"].as_u64().unwrap(), "one entry per generated token");
    let text: String = lps.iter().map(|l| l["token"].as_str().unwrap()).collect();
    assert_eq!(text, v["response"].as_str().unwrap());
    for l in lps {
        let lp = l["logprob"].as_f64().unwrap();
        let top = l["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert!(lp <= 0.0 && top.windows(2).all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()));
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], l["token"]);
        assert!((top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-6);
        assert!(!l["bytes"].as_array().unwrap().is_empty());
    }
    // Streamed: the entries ride on the chunks; without the flag there are none.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let lines = s.post("/api/generate", &streamed).lines();
    let n: usize = lines.iter().filter_map(|l| l["logprobs"].as_array()).map(Vec::len).sum();
    assert_eq!(n, lps.len());
    let plain = s
        .post(
            "/api/generate",
            &json!({ "model": MODEL, "prompt": "Hi", "stream": false,
                                                   "options": { "num_predict": 2 } }),
        )
        .json();
    assert!(plain.get("logprobs").is_none());
    let bad = s.post("/api/generate", &json!({ "model": MODEL, "prompt": "Hi", "logprobs": true, "top_logprobs": 21 }));
    assert_eq!(bad.status, 400);
    // OpenAI chat: choices[0].logprobs.content.
    let o = s
        .post(
            "/v1/chat/completions",
            &json!({ "model": MODEL, "messages": [{ "role": "user", "content": "Hi" }],
                                                     "logprobs": true, "top_logprobs": 2, "max_tokens": 4 }),
        )
        .json();
    let content = o["choices"][0]["logprobs"]["content"].as_array().expect("logprobs.content");
    assert_eq!(content.len() as u64, o["usage"]["completion_tokens"].as_u64().unwrap());
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);

    // OpenAI text completions: the legacy shape, whole and streamed.
    let body = json!({ "model": MODEL, "prompt": "Once upon a", "logprobs": 3, "max_tokens": 5, "temperature": 0 });
    let o = s.post("/v1/completions", &body).json();
    let lp = &o["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"].as_array().expect("tokens").iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tokens.len() as u64, o["usage"]["completion_tokens"].as_u64().unwrap());
    assert_eq!(tokens.concat(), o["choices"][0]["text"].as_str().unwrap(), "the tokens spell the text");
    let offsets: Vec<u64> = lp["text_offset"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(offsets[0], 0);
    assert_eq!(offsets[1], tokens[0].chars().count() as u64);
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().expect("token → logprob");
        assert!(!top.is_empty() && top.len() <= 3, "{top:?}");
        // Greedy: the chosen token is the most likely one.
        let best = top.values().map(|v| v.as_f64().unwrap()).fold(f64::MIN, f64::max);
        assert!((lp["token_logprobs"][i].as_f64().unwrap() - best).abs() < 1e-6);
    }
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let r = s.post("/v1/completions", &streamed);
    let n: usize = r
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|e| e["choices"][0]["logprobs"]["tokens"].as_array().map(Vec::len))
        .sum();
    assert_eq!(n, tokens.len());
    let bad = s.post("/v1/completions", &json!({ "model": MODEL, "prompt": "Hi", "logprobs": 99 }));
    assert_eq!(bad.status, 400);
}

/// `turbine serve --tp 2`: the model split over two ranks serves concurrent requests, each
/// the text the engine generates with the model as a one-rank group (which sums as a
/// split does), and embeddings.
#[test]
fn serve_with_two_tensor_parallel_ranks() {
    let one_rank = LoadedModel::load_split(&model_path(), 1, 1).expect("one-rank group");
    serve_split(&["--tp", "2"], |p| greedy_with(&one_rank, p, 12).1, "over 2 tensor-parallel ranks");
}

/// `turbine serve --pp 2`: the model in two pipeline stages serves concurrent requests,
/// each the text the whole model generates (a pipeline changes no arithmetic).
#[test]
fn serve_with_two_pipeline_stages() {
    serve_split(&["--pp", "2"], |p| engine_greedy(p, 12).1, "in 2 pipeline stages");
}

/// `turbine serve --tp 2 --pp 2`: two stages, each over two tensor-parallel ranks, serve
/// what a group of ranks serves (a pipeline changes no arithmetic), and embeddings.
#[test]
fn serve_with_stages_over_tensor_parallel_ranks() {
    let one_rank = LoadedModel::load_split(&model_path(), 1, 1).expect("one-rank group");
    let logged = "in 2 pipeline stages over 2 tensor-parallel ranks each";
    serve_split(&["--tp", "2", "--pp", "2"], |p| greedy_with(&one_rank, p, 12).1, logged);
}

/// `turbine serve SPLIT`: concurrent greedy requests each get `want`'s 12 tokens' text, an
/// embedding comes back whole, and the load's log line says `logged`.
fn serve_split(split: &[&str], want: impl Fn(&str) -> String, logged: &str) {
    let name = split.join("").replace("--", "-");
    let log = std::env::temp_dir().join(format!("turbine-split-serve{name}-{}.log", std::process::id()));
    let s = std::sync::Arc::new(Server(common::ServeProcess::start_with(&[], split, Some(&log))));
    let prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):"];
    for (got, p) in concurrent_greedy(&s, &prompts, 12).into_iter().zip(prompts) {
        assert_eq!(got, want(p), "{p:?}");
    }
    let e = s.post("/api/embed", &json!({ "model": MODEL, "input": "Why is the sky blue?" }));
    assert_eq!(e.status, 200, "{}", e.text());
    assert_eq!(e.json()["embeddings"][0].as_array().map(Vec::len), Some(640));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains(logged), "{text}");
    std::fs::remove_file(&log).ok();
}

/// /api/ps's size (and the memory budget) counts the mapped file, the weights' repacked
/// copies (none where the CPU has no interleaved kernels) and the KV pool: with a 16 MiB
/// budget the pool is small (one sequence's context at least: 23 MiB here), so the size is
/// the file and the copies within 64 MiB.
#[test]
fn ps_size_counts_the_repacked_weights() {
    let s = Server(common::ServeProcess::start(&[("TURBINE_KV_CACHE_MB", "16")]));
    assert_eq!(s.post("/api/generate", &json!({ "model": MODEL })).status, 200);
    let size = s.request("GET", "/api/ps", b"").json()["models"][0]["size"].as_u64().expect("size");
    let file_size = std::fs::metadata(model_path()).unwrap().len();
    let repacked = LoadedModel::load(&model_path()).expect("load").backend.weight_bytes().owned;
    let floor = file_size + repacked;
    assert!((floor..floor + (64 << 20)).contains(&size), "size {size}, file {file_size}, repacked {repacked}");
}

/// `prompts` sent together (raw, greedy, `n` tokens each): each response's text, in order.
fn concurrent_greedy(s: &std::sync::Arc<Server>, prompts: &[&str], n: usize) -> Vec<String> {
    let threads: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (s, p) = (s.clone(), p.to_string());
            std::thread::spawn(move || {
                let r = s.post(
                    "/api/generate",
                    &json!({ "model": MODEL, "prompt": p, "raw": true, "stream": false,
                             "options": { "num_predict": n, "temperature": 0 } }),
                );
                assert_eq!(r.status, 200, "{}", r.text());
                r.json()["response"].as_str().expect("response").to_string()
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().expect("request")).collect()
}
