//! Hosted mode end to end: API keys made with `turbine keys` and picked up by a running
//! server, per-key rate limits, /metrics, CORS and Host checks, socket timeouts and head
//! limits, TLS, and logs free of prompt and completion text.

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{request, Resp, ServeProcess};

const MODEL: &str = "gemma3:270m";

/// A fresh TURBINE_HOME for one test.
fn home(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("turbine-hosted-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp home");
    dir
}

/// Runs `turbine keys ARGS` with TURBINE_HOME=home; returns stdout.
fn keys(home: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_turbine"))
        .arg("keys")
        .args(args)
        .env("TURBINE_HOME", home)
        .output()
        .expect("run turbine keys");
    assert!(out.status.success(), "turbine keys {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Creates a key; returns (id, key).
fn create_key(home: &Path, args: &[&str]) -> (String, String) {
    let key = keys(home, &[&["create"], args].concat()).trim().to_string();
    assert!(key.starts_with("tb-"), "{key}");
    let list = keys(home, &["list"]);
    assert!(!list.contains(&key[3..]), "the list must not show the key");
    let id = list.lines().last().and_then(|l| l.split_whitespace().next()).expect("a listed key").to_string();
    (id, key)
}

fn get(port: u16, path: &str, auth: Option<&str>) -> Resp {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
    request(port, "GET", path, &headers, b"").expect("request")
}

fn post(port: u16, path: &str, auth: Option<&str>, body: &Value) -> Resp {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
    request(port, "POST", path, &headers, body.to_string().as_bytes()).expect("request")
}

#[test]
fn keys_gate_every_route_but_root_and_version_and_changes_need_no_restart() {
    let home = home("keys");
    let h = home.to_str().expect("utf-8 path");
    let server = ServeProcess::start_with(&[("TURBINE_HOME", h)], &[], Some(&home.join("serve.log")));
    let port = server.port;
    assert_eq!(get(port, "/api/tags", None).status, 200, "no key exists: open");

    let (id, key) = create_key(&home, &["--name", "ci", "--rpm", "1000"]);
    let refused = get(port, "/api/tags", None);
    assert_eq!(refused.status, 401, "a new key is picked up without a restart");
    assert_eq!(refused.json(), json!({ "error": "unauthorized" }));
    assert_eq!(get(port, "/", None).status, 200);
    assert_eq!(get(port, "/api/version", None).status, 200);
    assert_eq!(get(port, "/api/tags", Some(&format!("Bearer {key}"))).status, 200);
    assert_eq!(get(port, "/api/tags", Some(&key)).status, 200, "the bare key, as Ollama's hosted examples send it");
    assert_eq!(get(port, "/api/tags?ts=1700000000", Some(&key)).status, 200, "Ollama's ?ts= is tolerated");
    assert_eq!(get(port, "/api/tags", Some("Bearer tb-0123")).status, 401);
    assert_eq!(get(port, "/metrics", None).status, 401);
    assert_eq!(post(port, "/api/generate", None, &json!({ "model": MODEL, "prompt": "hi" })).status, 401);

    // The CLI client sends OLLAMA_API_KEY.
    let ls = Command::new(env!("CARGO_BIN_EXE_turbine"))
        .arg("ls")
        .env("OLLAMA_HOST", format!("127.0.0.1:{port}"))
        .env("OLLAMA_API_KEY", &key)
        .output()
        .expect("turbine ls");
    assert!(ls.status.success(), "{}", String::from_utf8_lossy(&ls.stderr));

    // The server records when the key was last used (flushed every few seconds).
    let deadline = Instant::now() + Duration::from_secs(30);
    while keys(&home, &["list"]).contains("never") {
        assert!(Instant::now() < deadline, "last-used time never written");
        std::thread::sleep(Duration::from_millis(250));
    }
    let mode = std::fs::metadata(home.join("keys.json")).expect("key file").permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);

    let (_, second) = create_key(&home, &[]);
    keys(&home, &["revoke", &id]);
    assert_eq!(get(port, "/api/tags", Some(&key)).status, 401, "a revoked key is refused at once");
    assert_eq!(get(port, "/api/tags", Some(&second)).status, 200);
    let second_id = keys(&home, &["list"]).lines().last().and_then(|l| l.split_whitespace().next()).map(String::from);
    keys(&home, &["revoke", &second_id.expect("second key listed")]);
    assert_eq!(get(port, "/api/tags", None).status, 401, "revoking every key locks the server, not opens it");
}

#[test]
fn require_auth_refuses_before_any_key_exists() {
    let home = home("require");
    let server =
        ServeProcess::start_with(&[("TURBINE_HOME", home.to_str().expect("utf-8"))], &["--require-auth"], None);
    assert_eq!(get(server.port, "/api/tags", None).status, 401);
    assert_eq!(get(server.port, "/", None).status, 200);
}

#[test]
fn requests_per_minute_run_out_with_429_and_retry_after() {
    let home = home("rpm");
    let (_, key) = create_key(&home, &["--rpm", "2"]);
    let server = ServeProcess::start(&[("TURBINE_HOME", home.to_str().expect("utf-8"))]);
    let auth = format!("Bearer {key}");
    let first = get(server.port, "/api/tags", Some(&auth));
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(first.header("x-ratelimit-remaining-requests"), Some("1"));
    assert!(first.header("x-ratelimit-reset-requests").is_some_and(|v| v.ends_with('s')));
    assert!(first.header("x-ratelimit-limit-tokens").is_none(), "no token limit set");
    assert_eq!(get(server.port, "/api/tags", Some(&auth)).header("x-ratelimit-remaining-requests"), Some("0"));
    let limited = get(server.port, "/api/tags", Some(&auth));
    assert_eq!(limited.status, 429);
    let retry: u64 = limited.header("Retry-After").and_then(|v| v.parse().ok()).expect("Retry-After");
    assert!((1..=30).contains(&retry), "one request refills in 30 s: {retry}");
    assert!(limited.json()["error"].as_str().is_some_and(|e| e.contains("2 requests per minute")));
    assert_eq!(limited.header("x-ratelimit-remaining-requests"), Some("0"));
}

#[test]
fn tokens_per_minute_are_charged_as_they_are_used() {
    let home = home("tpm");
    let (_, key) = create_key(&home, &["--tpm", "30"]);
    let server = ServeProcess::start(&[("TURBINE_HOME", home.to_str().expect("utf-8"))]);
    let body = json!({ "model": MODEL, "prompt": "Count from one to fifty:", "stream": true,
                       "options": { "temperature": 0, "num_predict": 40 } });
    let first = post(server.port, "/api/generate", Some(&key), &body);
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("x-ratelimit-limit-tokens"), Some("30"));
    assert_eq!(first.header("x-ratelimit-remaining-tokens"), Some("30"));
    let last = first.lines().pop().expect("final chunk");
    let used = last["prompt_eval_count"].as_u64().unwrap_or(0) + last["eval_count"].as_u64().unwrap_or(0);
    assert!(used > 30, "the request used {used} tokens, more than the bucket holds");
    let limited = post(server.port, "/api/generate", Some(&key), &body);
    assert_eq!(limited.status, 429, "{}", limited.text());
    assert!(limited.json()["error"].as_str().is_some_and(|e| e.contains("30 tokens per minute")));
    let retry: u64 = limited.header("Retry-After").and_then(|v| v.parse().ok()).expect("Retry-After");
    assert!(retry >= 1 && retry <= 2 * used, "debt of {} tokens at 0.5 per second: {retry} s", used - 30);
    assert_eq!(limited.header("x-ratelimit-remaining-tokens"), Some("0"));
}

/// The value of an unlabelled or fully labelled sample line.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_count_requests_tokens_latency_and_cache() {
    let server = ServeProcess::start(&[]);
    let port = server.port;
    let body =
        json!({ "model": MODEL, "prompt": "Why is the sky blue?", "options": { "temperature": 0, "num_predict": 8 } });
    let r = post(port, "/api/generate", None, &body);
    assert_eq!(r.status, 200);
    let last = r.lines().pop().expect("final chunk");
    let eval_count = last["eval_count"].as_f64().expect("eval_count");
    assert_eq!(get(port, "/api/nothing-here", None).status, 404);
    let m = get(port, "/metrics", None);
    assert_eq!(m.status, 200);
    assert!(m.header("Content-Type").is_some_and(|v| v.starts_with("text/plain; version=0.0.4")));
    let text = m.text();
    assert_eq!(sample(&text, "turbine_requests_total{route=\"/api/generate\",status=\"200\"}"), Some(1.0));
    assert_eq!(sample(&text, "turbine_requests_total{route=\"other\",status=\"404\"}"), Some(1.0));
    assert_eq!(sample(&text, "turbine_generation_tokens_total"), Some(eval_count));
    assert!(sample(&text, "turbine_prompt_tokens_total").is_some_and(|n| n >= 5.0));
    assert_eq!(sample(&text, "turbine_time_to_first_token_seconds_count"), Some(1.0));
    assert!(sample(&text, "turbine_time_per_output_token_seconds_count").is_some_and(|n| n >= eval_count - 2.0));
    assert_eq!(sample(&text, "turbine_models_loaded"), Some(1.0));
    assert_eq!(sample(&text, &format!("turbine_requests_running{{model=\"{MODEL}\"}}")), Some(0.0));
    assert_eq!(sample(&text, &format!("turbine_requests_waiting{{model=\"{MODEL}\"}}")), Some(0.0));
    let free = sample(&text, &format!("turbine_kv_blocks_free{{model=\"{MODEL}\"}}")).expect("free blocks");
    let used = sample(&text, &format!("turbine_kv_blocks_used{{model=\"{MODEL}\"}}")).expect("used blocks");
    assert!(free > 0.0 && used == 0.0, "nothing runs, so no block is held: used {used}, free {free}");
}

#[test]
fn cors_preflight_origins_and_host_checks() {
    let server = ServeProcess::start(&[("OLLAMA_ORIGINS", "https://app.example")]);
    let port = server.port;
    let pre = request(
        port,
        "OPTIONS",
        "/api/chat",
        &[("Origin", "http://localhost:5173"), ("Access-Control-Request-Method", "POST")],
        b"",
    )
    .expect("preflight");
    assert_eq!(pre.status, 204);
    assert_eq!(pre.header("Access-Control-Allow-Origin"), Some("http://localhost:5173"));
    assert!(pre.header("Access-Control-Allow-Headers").is_some_and(|h| h.contains("Authorization")));
    let allowed = request(port, "GET", "/api/version", &[("Origin", "https://app.example")], b"").expect("get");
    assert_eq!(allowed.header("Access-Control-Allow-Origin"), Some("https://app.example"));
    let other = request(port, "GET", "/api/version", &[("Origin", "https://evil.example")], b"").expect("get");
    assert_eq!(other.status, 200);
    assert_eq!(other.header("Access-Control-Allow-Origin"), None);
    // DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host.
    let rebound = request(port, "GET", "/api/tags", &[("Host", "evil.example:11434")], b"").expect("get");
    assert_eq!(rebound.status, 403);
    for ok in ["localhost:11434", "127.0.0.1", "my-box.local"] {
        assert_eq!(request(port, "GET", "/api/version", &[("Host", ok)], b"").expect("get").status, 200, "{ok}");
    }
}

/// Reads whatever the server sends until it closes the connection (or `limit` passes).
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let start = Instant::now();
    s.set_read_timeout(Some(limit)).expect("timeout");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
}

#[test]
fn slow_idle_and_oversized_heads_are_cut_off() {
    let server = ServeProcess::start(&[("TURBINE_HTTP_TIMEOUT", "2")]);
    let port = server.port;
    // A head that never ends (slowloris): one byte a second keeps each read alive, but the
    // whole head has 2 s.
    let mut slow = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let start = Instant::now();
    slow.write_all(b"GET / HTTP/1.1\r\n").expect("write");
    let mut cut = false;
    while start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(700));
        if slow.write_all(b"X-Drip: a\r\n").is_err() {
            cut = true;
            break;
        }
    }
    let (answer, _) = read_until_closed(&mut slow, Duration::from_secs(10));
    assert!(cut || answer.starts_with("HTTP/1.1 408"), "a dripping head must be cut off: {answer:?}");
    assert!(start.elapsed() < Duration::from_secs(12));

    // An idle connection is closed without a response.
    let mut idle = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (answer, took) = read_until_closed(&mut idle, Duration::from_secs(10));
    assert!(answer.is_empty(), "{answer:?}");
    assert!(took >= Duration::from_millis(1500) && took < Duration::from_secs(8), "{took:?}");

    // An oversized header line gets 431; so do too many headers.
    let big = format!("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000));
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n{many}\r\n");
    for head in [big, many] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let _ = s.write_all(head.as_bytes());
        let (answer, _) = read_until_closed(&mut s, Duration::from_secs(10));
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    }
    // Through all this the server kept answering.
    assert_eq!(get(port, "/api/version", None).status, 200);
}

#[test]
fn logs_hold_no_prompt_or_completion_text() {
    let dir = home("logs");
    let log = dir.join("serve.log");
    let server = ServeProcess::start_with(&[], &[], Some(&log));
    let port = server.port;
    let secret = "zanzibar quokka marmalade";
    let opts = json!({ "temperature": 0, "num_predict": 24 });
    let mut completions = Vec::new();
    let r = post(
        port,
        "/api/generate",
        None,
        &json!({ "model": MODEL, "prompt": secret, "stream": false, "options": opts }),
    );
    completions.push(r.json()["response"].as_str().unwrap_or_default().to_string());
    let chat = json!({ "model": MODEL, "stream": false, "options": opts,
                       "messages": [{ "role": "user", "content": format!("Tell me about the {secret}") }] });
    let r = post(port, "/api/chat", None, &chat);
    completions.push(r.json()["message"]["content"].as_str().unwrap_or_default().to_string());
    let oa = json!({ "model": MODEL, "max_tokens": 24, "temperature": 0,
                     "messages": [{ "role": "user", "content": secret }] });
    let r = post(port, "/v1/chat/completions", None, &oa);
    completions.push(r.json()["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string());
    assert_eq!(post(port, "/api/embed", None, &json!({ "model": MODEL, "input": secret })).status, 200);
    // A request the server refuses, whose body it must not echo into the log either.
    assert_eq!(post(port, "/api/generate", None, &json!({ "model": 7, "prompt": secret })).status, 400);
    drop(server);
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("/api/generate 200") && text.contains("/api/embed 200"), "requests are logged:\n{text}");
    for word in secret.split(' ') {
        assert!(!text.contains(word), "the prompt word {word:?} is in the log:\n{text}");
    }
    for c in completions {
        let c = c.trim();
        assert!(c.len() >= 8, "each completion has text to look for: {c:?}");
        assert!(!text.contains(c), "a completion is in the log:\n{text}");
    }
}

/// A self-signed certificate for 127.0.0.1 and localhost, made with the openssl CLI.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("the openssl command (Debian: openssl) makes the test certificate");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (cert, key)
}

/// `curl` over TLS, trusting only `ca`.
fn curl_tls(ca: &Path, port: u16, path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}", "--cacert"])
        .arg(ca)
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl (Debian: curl) is the TLS client of this test");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn tls_with_a_self_signed_certificate() {
    let dir = home("tls");
    let (cert, key) = self_signed(&dir);
    let args = ["--tls-cert", cert.to_str().expect("utf-8"), "--tls-key", key.to_str().expect("utf-8")];
    let server = ServeProcess::start_with(&[("TURBINE_HTTP_TIMEOUT", "3")], &args, None);
    // A client that connects and never starts its handshake holds up nobody else.
    let _stalled = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    let (status, body) = curl_tls(&cert, server.port, "/api/version");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("version"));
    let (status, body) = curl_tls(&cert, server.port, "/api/tags");
    assert_eq!(status, 200, "{body}");
    // Turbine's own client over HTTPS, trusting the certificate through SSL_CERT_FILE.
    let ls = Command::new(env!("CARGO_BIN_EXE_turbine"))
        .arg("ls")
        .env("OLLAMA_HOST", format!("https://127.0.0.1:{}", server.port))
        .env("SSL_CERT_FILE", &cert)
        .output()
        .expect("turbine ls");
    assert!(ls.status.success(), "{}", String::from_utf8_lossy(&ls.stderr));
    assert!(String::from_utf8_lossy(&ls.stdout).contains("NAME"));
    let untrusted = Command::new(env!("CARGO_BIN_EXE_turbine"))
        .arg("ls")
        .env("OLLAMA_HOST", format!("https://127.0.0.1:{}", server.port))
        .env_remove("SSL_CERT_FILE")
        .output()
        .expect("turbine ls");
    assert!(!untrusted.status.success(), "a certificate nobody vouches for is refused");
    // Plain HTTP to the TLS port is not served.
    assert!(request(server.port, "GET", "/api/version", &[], b"").map_or(true, |r| r.status != 200));
}

#[test]
fn tls_flags_are_checked() {
    let out = Command::new(env!("CARGO_BIN_EXE_turbine"))
        .args(["serve", "--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"])
        .env("OLLAMA_HOST", format!("127.0.0.1:{}", common::free_port()))
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cert.pem"));
    let out = Command::new(env!("CARGO_BIN_EXE_turbine"))
        .args(["serve", "--tls-cert", "/nonexistent/cert.pem"])
        .env("OLLAMA_HOST", format!("127.0.0.1:{}", common::free_port()))
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"));
}
