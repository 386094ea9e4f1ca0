//! A `turbine serve` process for end-to-end tests: started on a free loopback port,
//! waited for, and killed when dropped; and raw HTTP/1.1 requests to it.
#![allow(dead_code)] // each test binary uses its own part

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

pub struct ServeProcess {
    child: Child,
    pub port: u16,
}

impl ServeProcess {
    /// Starts `turbine serve` with extra environment variables and waits until it accepts
    /// connections.
    pub fn start(env: &[(&str, &str)]) -> ServeProcess {
        ServeProcess::start_with(env, &[], None)
    }

    /// `turbine serve ARGS`, its log (stderr) written to `log` if given.
    pub fn start_with(env: &[(&str, &str)], args: &[&str], log: Option<&std::path::Path>) -> ServeProcess {
        ServeProcess::launch(&[&["serve"], args].concat(), env, log, None)
    }

    /// `turbine ARGS` listening on OLLAMA_HOST=127.0.0.1:`port` (None: a free port; tests
    /// run in parallel, so another test's server may take it between `free_port` and the
    /// bind, and this one then exits: a few ports are tried).
    pub fn launch(
        args: &[&str],
        env: &[(&str, &str)],
        log: Option<&std::path::Path>,
        port: Option<u16>,
    ) -> ServeProcess {
        ServeProcess::launch_program(env!("CARGO_BIN_EXE_turbine"), args, env, log, port)
    }

    /// [`ServeProcess::launch`] of another program that starts the server (`mpirun`).
    pub fn launch_program(
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
        log: Option<&std::path::Path>,
        port: Option<u16>,
    ) -> ServeProcess {
        for _ in 0..5 {
            let port = port.unwrap_or_else(free_port);
            let stderr = match log {
                Some(p) => Stdio::from(std::fs::File::create(p).expect("log file")),
                None => Stdio::null(),
            };
            let child = Command::new(program)
                .args(args)
                .env("OLLAMA_HOST", format!("127.0.0.1:{port}"))
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("start turbine");
            let mut server = ServeProcess { child, port };
            let deadline = Instant::now() + Duration::from_secs(30);
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "turbine {args:?} did not answer on port {port}");
                std::thread::sleep(Duration::from_millis(50));
            }
            // Whoever answered, our server must still be running (it binds at once).
            std::thread::sleep(Duration::from_millis(200));
            if matches!(server.child.try_wait(), Ok(None)) {
                return server;
            }
        }
        panic!("turbine {args:?} could not bind a free port in 5 tries");
    }
}

impl ServeProcess {
    /// The process id of what was started.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `limit` for the process to exit; its status, if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request on its own connection (`Connection: close`) to the server on `port`.
pub fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    head.push_str("Connection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length")) {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()?;
    read_response(BufReader::new(s), method == "HEAD")
}

/// A whole response, its body de-chunked.
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("utf-8 body")
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    /// NDJSON lines, each parsed.
    pub fn lines(&self) -> Vec<Value> {
        self.text().lines().map(|l| serde_json::from_str(l).expect("NDJSON line")).collect()
    }
}

fn read_response(mut r: BufReader<TcpStream>, head_only: bool) -> std::io::Result<Resp> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let get =
        |n: &str| headers.iter().find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if head_only {
    } else if get("Transfer-Encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let n = usize::from_str_radix(line.trim(), 16).expect("chunk size");
            if n == 0 {
                break;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = get("Content-Length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(Resp { status, headers, body })
}

/// A model store of its own (named after `label` and this process) holding the default
/// model under two names, `gemma3:270m` and `gemma3:second`. Each blob is a link to the
/// real one, so removing the store removes only the links.
pub fn two_model_store(label: &str) -> std::path::PathBuf {
    let real = turbine::engine::store::models_dir();
    let dir = std::env::temp_dir().join(format!("turbine-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let manifests = dir.join("manifests/registry.ollama.ai/library/gemma3");
    std::fs::create_dir_all(&manifests).expect("store");
    std::fs::create_dir_all(dir.join("blobs")).expect("store");
    for blob in std::fs::read_dir(real.join("blobs")).expect("blobs") {
        let blob = blob.expect("blob");
        std::os::unix::fs::symlink(blob.path(), dir.join("blobs").join(blob.file_name())).expect("link");
    }
    let manifest = real.join("manifests/registry.ollama.ai/library/gemma3/270m");
    for tag in ["270m", "second"] {
        std::fs::copy(&manifest, manifests.join(tag)).expect("manifest");
    }
    dir
}
