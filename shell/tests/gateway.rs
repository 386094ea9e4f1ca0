//! `turbine gateway` in front of three `turbine serve` compute nodes on loopback ports:
//! keys at the gateway, load spread over the nodes, a chat kept on one node, a node killed
//! in mid-run (no request that had not started streaming is lost; the streams it was
//! serving end with a clean error line), and the node rejoining once restarted.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;
use common::{request, Resp, ServeProcess};

const MODEL: &str = "gemma3:270m";
/// Small KV pools: three nodes share this machine.
const NODE_ENV: &[(&str, &str)] = &[("TURBINE_KV_CACHE_MB", "64"), ("OLLAMA_NUM_PARALLEL", "4")];

fn post(port: u16, path: &str, key: &str, body: &Value) -> Resp {
    request(port, "POST", path, &[("Authorization", key)], body.to_string().as_bytes()).expect("request")
}

fn chat(port: u16, key: &str, messages: &[Value]) -> Resp {
    let body = json!({ "model": MODEL, "messages": messages, "stream": false,
                       "options": { "temperature": 0, "num_predict": 2 } });
    post(port, "/api/chat", key, &body)
}

fn node_of(r: &Resp) -> String {
    r.header("x-turbine-node").expect("the gateway names the node").to_string()
}

/// A streamed generation read line by line: reports its node once the first line is in,
/// then returns the node and every NDJSON line.
fn stream(port: u16, key: &str, prompt: &str, started: mpsc::Sender<String>) -> (String, Vec<Value>) {
    let body =
        json!({ "model": MODEL, "prompt": prompt, "options": { "temperature": 0, "num_predict": 200 } }).to_string();
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
    write!(
        s,
        "POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {key}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut r = BufReader::new(s);
    let mut node = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).expect("head");
        if line.trim().is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("x-turbine-node:") {
            node = v.trim().to_string();
        }
    }
    let mut lines = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let size = usize::from_str_radix(line.trim(), 16).expect("chunk size");
        if size == 0 {
            break;
        }
        let mut chunk = vec![0; size + 2];
        std::io::Read::read_exact(&mut r, &mut chunk).expect("chunk");
        let v: Value = serde_json::from_slice(&chunk[..size]).expect("each line is whole JSON");
        if lines.is_empty() {
            let _ = started.send(node.clone());
        }
        lines.push(v);
    }
    (node, lines)
}

#[test]
fn gateway_spreads_sticks_survives_a_killed_node_and_takes_it_back() {
    let mut nodes: Vec<ServeProcess> = (0..3).map(|_| ServeProcess::start(NODE_ENV)).collect();
    let urls: Vec<String> = nodes.iter().map(|n| format!("http://127.0.0.1:{}", n.port)).collect();
    let home = std::env::temp_dir().join(format!("turbine-gateway-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let out = Command::new(env!("CARGO_BIN_EXE_turbine"))
        .args(["keys", "create", "--name", "gw"])
        .env("TURBINE_HOME", &home)
        .output()
        .expect("turbine keys");
    let key = String::from_utf8(out.stdout).expect("utf-8").trim().to_string();
    let mut args = vec!["gateway"];
    for u in &urls {
        args.extend(["--node", u.as_str()]);
    }
    let gw_home = home.to_str().expect("utf-8");
    let gw = ServeProcess::launch(&args, &[("TURBINE_HOME", gw_home)], None, None);
    let port = gw.port;

    // Keys are checked at the gateway; lists merge the nodes'.
    assert_eq!(request(port, "GET", "/api/tags", &[], b"").expect("tags").status, 401);
    let tags = request(port, "GET", "/api/tags", &[("Authorization", &key)], b"").expect("tags").json();
    let names: Vec<&str> =
        tags["models"].as_array().expect("models").iter().filter_map(|m| m["name"].as_str()).collect();
    assert_eq!(names.iter().filter(|&&n| n == MODEL).count(), 1, "one entry per model: {names:?}");

    // Distinct conversations spread; one conversation stays on its node turn after turn.
    let mut used = std::collections::HashSet::new();
    for i in 0..12 {
        let first = vec![json!({ "role": "user", "content": format!("Conversation number {i}: hello") })];
        let r = chat(port, &key, &first);
        assert_eq!(r.status, 200, "{}", r.text());
        let node = node_of(&r);
        let reply = r.json()["message"].clone();
        let second = [first.clone(), vec![reply, json!({ "role": "user", "content": "And then?" })]].concat();
        assert_eq!(node_of(&chat(port, &key, &second)), node, "turn two of conversation {i} changed node");
        used.insert(node);
    }
    assert!(used.len() >= 2, "12 conversations all went to {used:?}");

    // Six streams; as soon as the first is flowing, its node is killed (streams routed to
    // it that have not started are retried elsewhere; those that have are cut).
    let (tx, rx) = mpsc::channel();
    let streams: Vec<_> = (0..6)
        .map(|i| {
            let (tx, key) = (tx.clone(), key.clone());
            std::thread::spawn(move || stream(port, &key, &format!("Story {i}: once upon a time"), tx))
        })
        .collect();
    let victim = rx.recv_timeout(Duration::from_secs(120)).expect("a stream started");
    let victim_index = urls.iter().position(|u| *u == victim).expect("a node of ours");
    let victim_port = nodes[victim_index].port;
    drop(nodes.remove(victim_index));

    // Requests sent after the kill, before any health check noticed: none is lost.
    let after: Vec<_> = (0..6)
        .map(|i| {
            let key = key.clone();
            std::thread::spawn(move || chat(port, &key, &[json!({ "role": "user", "content": format!("After {i}") })]))
        })
        .collect();
    for a in after {
        let r = a.join().expect("thread");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_ne!(node_of(&r), victim);
    }
    for s in streams {
        let (node, lines) = s.join().expect("stream thread");
        let last = lines.last().expect("lines");
        if node == victim {
            let err =
                last["error"].as_str().unwrap_or_else(|| panic!("cut stream must end with an error line: {last}"));
            assert!(err.contains(&victim), "{err}");
        } else {
            assert_eq!(last["done"], json!(true), "streams on other nodes finish: {last}");
        }
    }

    // The node comes back on its port and the gateway sends it work again.
    let _back = ServeProcess::launch(&["serve"], NODE_ENV, None, Some(victim_port));
    let deadline = Instant::now() + Duration::from_secs(20);
    let up_line = format!("turbine_gateway_node_up{{node=\"{victim}\"}} 1");
    loop {
        let m = request(port, "GET", "/metrics", &[("Authorization", &key)], b"").expect("metrics").text();
        if m.contains(&up_line) {
            break;
        }
        assert!(Instant::now() < deadline, "the restarted node was not seen up again");
        std::thread::sleep(Duration::from_millis(250));
    }
    let rejoined = (0..40).any(|i| {
        node_of(&chat(port, &key, &[json!({ "role": "user", "content": format!("Rejoin probe {i}") })])) == victim
    });
    assert!(rejoined, "no conversation went to the restarted node");
}
