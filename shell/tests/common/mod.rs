//! A `turbine serve` process for end-to-end tests: started on a free loopback port,
//! waited for, and killed when dropped.

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
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_turbine"))
            .arg("serve")
            .env("OLLAMA_HOST", format!("127.0.0.1:{port}"))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start turbine serve");
        let server = ServeProcess { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "server did not answer on port {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
