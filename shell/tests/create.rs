//! Making models end to end: blob uploads (verified), `/api/create` (from an uploaded
//! GGUF, from an installed model, the older `modelfile` field), `turbine create -f
//! Modelfile`, and what a created model's TEMPLATE, SYSTEM and PARAMETERs then do to
//! generate, chat and show; `suffix` and a request's own `template`.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{request, Resp, ServeProcess};

const MODEL_SHA: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

/// A store of its own holding gemma3:270m (its blobs linked from the real store).
fn store(label: &str) -> PathBuf {
    let real = turbine::engine::store::models_dir();
    let dir = std::env::temp_dir().join(format!("turbine-create-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let manifests = dir.join("manifests/registry.ollama.ai/library/gemma3");
    std::fs::create_dir_all(&manifests).expect("store");
    std::fs::create_dir_all(dir.join("blobs")).expect("blobs");
    for blob in std::fs::read_dir(real.join("blobs")).expect("real blobs").flatten() {
        std::os::unix::fs::symlink(blob.path(), dir.join("blobs").join(blob.file_name())).expect("link");
    }
    std::fs::copy(real.join("manifests/registry.ollama.ai/library/gemma3/270m"), manifests.join("270m"))
        .expect("manifest");
    dir
}

fn serve(store: &Path) -> ServeProcess {
    ServeProcess::start(&[("OLLAMA_MODELS", store.to_str().expect("utf-8"))])
}

fn post(port: u16, path: &str, body: &Value) -> Resp {
    request(port, "POST", path, &[], body.to_string().as_bytes()).expect("request")
}

/// The smallest GGUF that reads: version 3, no tensors, one key.
fn tiny_gguf() -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    out.extend(1u64.to_le_bytes());
    let key = b"general.architecture";
    out.extend((key.len() as u64).to_le_bytes());
    out.extend(key);
    out.extend(8u32.to_le_bytes()); // string
    out.extend(4u64.to_le_bytes());
    out.extend(b"tiny");
    out
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

#[test]
fn blobs_are_verified_and_models_are_created_from_them() {
    let dir = store("blobs");
    let server = serve(&dir);
    let port = server.port;
    let gguf = tiny_gguf();
    let digest = sha(&gguf);
    let path = format!("/api/blobs/{digest}");
    assert_eq!(request(port, "HEAD", &path, &[], b"").expect("head").status, 404);
    // Bytes that do not hash to the digest are refused, and nothing is left behind.
    let wrong = request(port, "POST", &path, &[], b"not the right bytes").expect("post");
    assert_eq!(wrong.status, 400, "{}", wrong.text());
    assert!(wrong.json()["error"].as_str().is_some_and(|e| e.contains("does not match")));
    assert_eq!(request(port, "HEAD", &path, &[], b"").expect("head").status, 404);
    let leftovers = std::fs::read_dir(dir.join("blobs"))
        .expect("blobs")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .count();
    assert_eq!(leftovers, 0, "no partial upload stays in the store");
    assert_eq!(request(port, "POST", &path, &[], &gguf).expect("post").status, 201);
    assert_eq!(request(port, "HEAD", &path, &[], b"").expect("head").status, 200);
    assert_eq!(request(port, "HEAD", "/api/blobs/sha256:12", &[], b"").expect("head").status, 400);
    assert_eq!(request(port, "POST", "/api/blobs/../../etc", &[], b"x").expect("post").status, 400);

    // A model from the uploaded file, streamed progress ending in success.
    let r = post(port, "/api/create", &json!({ "model": "tiny", "files": { "tiny.gguf": digest } }));
    assert_eq!(r.status, 200, "{}", r.text());
    let statuses: Vec<String> = r.lines().iter().filter_map(|l| l["status"].as_str().map(String::from)).collect();
    assert_eq!(statuses.last().map(String::as_str), Some("success"), "{statuses:?}");
    let tags = request(port, "GET", "/api/tags", &[], b"").expect("tags").json();
    let tiny = tags["models"]
        .as_array()
        .expect("models")
        .iter()
        .find(|m| m["name"] == "tiny:latest")
        .cloned()
        .expect("tiny listed");
    assert_eq!(tiny["details"]["family"], "tiny");

    // A GGUF path on the server's own disk is imported into the store.
    let local = dir.join("local.gguf");
    std::fs::write(&local, &gguf).expect("local gguf");
    let r = post(port, "/api/create", &json!({ "model": "local", "from": local, "stream": false }));
    assert_eq!(r.json(), json!({ "status": "success" }), "{}", r.text());

    // Refusals, each with its reason.
    let cases = [
        (json!({ "model": "x", "files": { "a.gguf": sha(b"never uploaded") } }), 400, "has not been uploaded"),
        (json!({ "model": "x", "from": "gemma3:270m", "files": { "a.gguf": digest } }), 400, "not both"),
        (json!({ "model": "x" }), 400, "neither"),
        (json!({ "model": "../x", "from": "gemma3:270m" }), 400, "invalid model name"),
        (json!({ "model": "x", "from": "no-such:model" }), 404, "not found"),
        (json!({ "model": "x", "from": "gemma3:270m", "parameters": { "temprature": 1 } }), 400, "unknown parameter"),
        (json!({ "model": "x", "from": "gemma3:270m", "parameters": { "temperature": "hot" } }), 400, "temperature"),
        (json!({ "model": "x", "from": "gemma3:270m", "template": "{{ if }}" }), 400, "template"),
        (json!({ "model": "x", "from": "gemma3:270m", "quantize": "q4_K_M" }), 400, "quantize"),
        (json!({ "model": "x", "from": "/etc/passwd.gguf" }), 400, "invalid model name"),
    ];
    for (body, status, says) in cases {
        let r = post(port, "/api/create", &body);
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert!(r.json()["error"].as_str().is_some_and(|e| e.contains(says)), "{body}: {}", r.text());
    }
}

/// Token ids of `text` under the default model's tokenizer (BOS first).
fn tokens(text: &str) -> Vec<u64> {
    let blob = turbine::engine::store::models_dir().join("blobs").join(format!("sha256-{MODEL_SHA}"));
    let model = turbine::engine::generate::LoadedModel::load(&blob).expect("model");
    model.tokenizer.encode(text, true, true).into_iter().map(u64::from).collect()
}

fn context(r: &Resp) -> Vec<u64> {
    r.json()["context"].as_array().expect("context").iter().filter_map(Value::as_u64).collect()
}

#[test]
fn a_modelfile_sets_template_system_and_parameters() {
    let dir = store("modelfile");
    let server = serve(&dir);
    let port = server.port;
    let work = dir.join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    std::os::unix::fs::symlink(dir.join("blobs").join(format!("sha256-{MODEL_SHA}")), work.join("g.gguf"))
        .expect("link");
    let modelfile = work.join("Modelfile");
    std::fs::write(
        &modelfile,
        "FROM ./g.gguf\nPARAMETER temperature 0\nPARAMETER num_predict 6\nPARAMETER stop \"\\n\"\n\
         SYSTEM \"\"\"You are a pirate.\"\"\"\n\
         TEMPLATE \"\"\"{{ if .System }}System: {{ .System }}\n{{ end }}User: {{ .Prompt }}\nAssistant:{{ .Response }}\"\"\"\n",
    )
    .expect("Modelfile");
    let out = Command::new(env!("CARGO_BIN_EXE_turbine"))
        .args(["create", "pirate", "-f"])
        .arg(&modelfile)
        .env("OLLAMA_HOST", format!("127.0.0.1:{port}"))
        .output()
        .expect("turbine create");
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && progress.trim_end().ends_with("success"), "{progress}");

    let show = post(port, "/api/show", &json!({ "model": "pirate" })).json();
    assert_eq!(show["system"], "You are a pirate.");
    assert!(show["template"].as_str().is_some_and(|t| t.starts_with("{{ if .System }}")));
    let params = show["parameters"].as_str().expect("parameters");
    assert!(params.contains("temperature") && params.contains("num_predict") && params.contains("\"\\n\""), "{params}");
    assert!(show["modelfile"].as_str().is_some_and(|m| m.contains("SYSTEM \"\"\"You are a pirate.\"\"\"")));

    // generate: the model's system and template shape the prompt; its parameters apply.
    let r =
        post(port, "/api/generate", &json!({ "model": "pirate", "prompt": "Where is the treasure?", "stream": false }));
    assert_eq!(r.status, 200, "{}", r.text());
    let expected = tokens("System: You are a pirate.\nUser: Where is the treasure?\nAssistant:");
    let ctx = context(&r);
    assert_eq!(&ctx[..expected.len()], &expected[..], "the prompt as the TEMPLATE renders it");
    let v = r.json();
    assert!(v["eval_count"].as_u64().is_some_and(|n| n <= 6), "num_predict 6 from the Modelfile: {v}");
    assert!(!v["response"].as_str().unwrap_or("\n").contains('\n'), "stop \\n from the Modelfile");
    // A request's own system replaces the model's; its options override the model's.
    let r = post(
        port,
        "/api/generate",
        &json!({ "model": "pirate", "prompt": "Hi", "system": "Be kind.", "stream": false,
                                                 "options": { "num_predict": 2, "stop": [] } }),
    );
    let expected = tokens("System: Be kind.\nUser: Hi\nAssistant:");
    assert_eq!(&context(&r)[..expected.len()], &expected[..]);
    assert_eq!(r.json()["eval_count"], 2);

    // Chat through an older-style template: one run per exchange, the last cut after .Response.
    // (Its own system message, so no earlier prompt's cached blocks make the count smaller.)
    let chat = json!({ "model": "pirate", "stream": false, "options": { "num_predict": 1 }, "messages": [
        { "role": "system", "content": "Matey." }, { "role": "user", "content": "Ahoy" },
        { "role": "assistant", "content": "Arr" }, { "role": "user", "content": "Gold?" } ] });
    let r = post(port, "/api/chat", &chat);
    assert_eq!(r.status, 200, "{}", r.text());
    let want = tokens("System: Matey.\nUser: Ahoy\nAssistant:ArrUser: Gold?\nAssistant:");
    assert_eq!(r.json()["prompt_eval_count"].as_u64(), Some(want.len() as u64), "{}", r.text());

    // The older API: the Modelfile itself in `modelfile`, building on the new model.
    let r = post(
        port,
        "/api/create",
        &json!({ "model": "quiet-pirate", "stream": false,
                                               "modelfile": "FROM pirate\nPARAMETER num_predict 3\n" }),
    );
    assert_eq!(r.json(), json!({ "status": "success" }));
    let show = post(port, "/api/show", &json!({ "model": "quiet-pirate" })).json();
    let params = show["parameters"].as_str().expect("parameters");
    assert!(
        params.contains("num_predict                    3") && params.contains("temperature"),
        "inherited and overridden: {params}"
    );
    assert_eq!(show["system"], "You are a pirate.", "layers are inherited");
}

#[test]
fn suffix_needs_an_insert_template_and_requests_may_bring_their_own_template() {
    let dir = store("suffix");
    let server = serve(&dir);
    let port = server.port;
    let r = post(port, "/api/generate", &json!({ "model": "gemma3:270m", "prompt": "def f(", "suffix": "return x" }));
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().is_some_and(|e| e.contains("does not support insert")), "{}", r.text());
    let fim = "<PRE>{{ .Prompt }}{{ if .Suffix }}<SUF>{{ .Suffix }}{{ end }}<MID>";
    let r =
        post(port, "/api/create", &json!({ "model": "fim", "from": "gemma3:270m", "template": fim, "stream": false }));
    assert_eq!(r.status, 200, "{}", r.text());
    let caps = post(port, "/api/show", &json!({ "model": "fim" })).json()["capabilities"].clone();
    assert_eq!(caps, json!(["completion", "insert"]));
    let r = post(
        port,
        "/api/generate",
        &json!({ "model": "fim", "prompt": "def f(", "suffix": "return x",
                                                 "stream": false, "options": { "num_predict": 1 } }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let expected = tokens("<PRE>def f(<SUF>return x<MID>");
    assert_eq!(&context(&r)[..expected.len()], &expected[..]);
    // A request's template, rendered as Ollama renders it, in place of the model's.
    let r = post(
        port,
        "/api/generate",
        &json!({ "model": "gemma3:270m", "prompt": "Hi", "system": "S",
                                                 "template": "[{{ .System }}] {{ .Prompt }} =>", "stream": false,
                                                 "options": { "num_predict": 1 } }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let expected = tokens("[S] Hi =>");
    assert_eq!(&context(&r)[..expected.len()], &expected[..]);
    let bad = post(port, "/api/generate", &json!({ "model": "gemma3:270m", "prompt": "Hi", "template": "{{ .Prompt" }));
    assert_eq!(bad.status, 400);
}
