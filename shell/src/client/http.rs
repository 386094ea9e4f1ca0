//! A minimal HTTP/1.1 client for the CLI clients and the gateway: one request per connection
//! (`Connection: close`), JSON bodies, `Content-Length` or chunked responses read
//! incrementally so that NDJSON streams print as they arrive; HTTPS through the system's
//! OpenSSL (its default trust store; `SSL_CERT_FILE` adds a CA).

use serde_json::Value;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use crate::server::host::parse_ollama_host;

/// Where the server is and how to authenticate, from OLLAMA_HOST and OLLAMA_API_KEY.
pub struct Target {
    /// `host:port` (`[v6]:port`) to connect to and send as `Host`.
    pub addr: String,
    pub api_key: Option<String>,
    /// Limit on connecting and on each wait for the server's bytes (None: no limit).
    pub timeout: Option<std::time::Duration>,
    /// For HTTPS, the name (or IP) the server's certificate must carry.
    pub tls_name: Option<String>,
}

impl Target {
    /// OLLAMA_HOST parsed as the server parses it; an unspecified host (`:8080`, `0.0.0.0`)
    /// means this machine, as Ollama's client connects there.
    pub fn from_env() -> Result<Target, String> {
        let raw = std::env::var("OLLAMA_HOST").unwrap_or_default();
        let https = raw.trim().trim_matches(|c| c == '"' || c == '\'').starts_with("https://");
        if https && !cfg!(feature = "tls") {
            return Err(format!("OLLAMA_HOST={raw}: this turbine was built without TLS"));
        }
        let hp = parse_ollama_host(&raw);
        let host = match hp.host.as_str() {
            "" | "0.0.0.0" => "127.0.0.1".to_string(),
            "::" => "::1".to_string(),
            h => h.to_string(),
        };
        let addr = if host.contains(':') { format!("[{host}]:{}", hp.port) } else { format!("{host}:{}", hp.port) };
        let api_key = std::env::var("OLLAMA_API_KEY").ok().filter(|k| !k.is_empty());
        Ok(Target { addr, api_key, timeout: None, tls_name: https.then_some(host) })
    }

    /// Sends a request and returns the status and a reader over the (de-chunked) body.
    pub fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Response, String> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        self.request(method, path, body.as_bytes()).map_err(|e| match e {
            Fail::Connect(e) => {
                format!("could not connect to a running server at {} ({e}): start it with `turbine serve`", self.addr)
            }
            Fail::Exchange(e) => format!("{method} {path}: {e}"),
        })
    }

    /// Sends a request (a JSON body unless empty); returns once the response head is in.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> Result<Response, Fail> {
        let has_body = method != "GET" && method != "HEAD";
        let content = has_body.then_some(("application/json", body.len() as u64));
        self.exchange(method, path, content, &mut &body[..])
    }

    /// POSTs `len` bytes read from `body` (a file being uploaded, say).
    pub fn upload(&self, path: &str, len: u64, body: &mut dyn Read) -> Result<Response, Fail> {
        self.exchange("POST", path, Some(("application/octet-stream", len)), body)
    }

    /// One request: the head, then the body copied from `body`, then the response head.
    fn exchange(
        &self,
        method: &str,
        path: &str,
        content: Option<(&str, u64)>,
        body: &mut dyn Read,
    ) -> Result<Response, Fail> {
        let mut stream = self.connect().map_err(Fail::Connect)?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: turbine/{}\r\nAccept: application/x-ndjson, application/json\r\n",
            self.addr,
            env!("CARGO_PKG_VERSION")
        );
        if let Some((content_type, len)) = content {
            head.push_str(&format!("Content-Type: {content_type}\r\nContent-Length: {len}\r\n"));
        }
        if let Some(key) = &self.api_key {
            head.push_str(&format!("Authorization: Bearer {key}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).map_err(Fail::Exchange)?;
        let len = content.map_or(0, |(_, n)| n);
        let sent = io::copy(&mut body.take(len), &mut stream).map_err(Fail::Exchange)?;
        if sent != len {
            return Err(Fail::Exchange(io::Error::new(io::ErrorKind::UnexpectedEof, "the body ended early")));
        }
        stream.flush().map_err(Fail::Exchange)?;
        read_head(BufReader::new(stream)).map_err(Fail::Exchange)
    }

    /// A connection, TLS set up when the target is HTTPS.
    fn connect(&self) -> io::Result<Conn> {
        let tcp = self.connect_tcp()?;
        match &self.tls_name {
            None => Ok(Conn::Plain(tcp)),
            Some(name) => Conn::tls(tcp, name),
        }
    }

    fn connect_tcp(&self) -> io::Result<TcpStream> {
        let Some(limit) = self.timeout else { return TcpStream::connect(&self.addr) };
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{}: no address", self.addr));
        for a in std::net::ToSocketAddrs::to_socket_addrs(&self.addr)? {
            match TcpStream::connect_timeout(&a, limit) {
                Ok(s) => {
                    s.set_read_timeout(Some(limit))?;
                    s.set_write_timeout(Some(limit))?;
                    return Ok(s);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// A request whose answer is one JSON object; an error status becomes its `error` text.
    pub fn json(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let mut r = self.send(method, path, body)?;
        let mut text = String::new();
        r.body.read_to_string(&mut text).map_err(|e| format!("{method} {path}: {e}"))?;
        if r.status >= 400 {
            return Err(error_text(r.status, &text));
        }
        serde_json::from_str(&text).map_err(|e| format!("{method} {path}: bad JSON from server ({e})"))
    }

    /// A streamed request: calls `each` for every NDJSON line until the stream ends; an error
    /// status, or an `{"error":…}` line, becomes an error.
    pub fn stream(
        &self,
        path: &str,
        body: &Value,
        mut each: impl FnMut(&Value) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut r = self.send("POST", path, Some(body))?;
        if r.status >= 400 {
            let mut text = String::new();
            let _ = r.body.read_to_string(&mut text);
            return Err(error_text(r.status, &text));
        }
        let mut line = String::new();
        loop {
            line.clear();
            if r.body.read_line(&mut line).map_err(|e| format!("POST {path}: {e}"))? == 0 {
                return Ok(());
            }
            if line.trim().is_empty() {
                continue;
            }
            let v: Value =
                serde_json::from_str(line.trim()).map_err(|e| format!("POST {path}: bad NDJSON line ({e})"))?;
            if let Some(err) = v.get("error").and_then(Value::as_str) {
                return Err(err.to_string());
            }
            each(&v)?;
        }
    }
}

/// The server's `{"error":"…"}` message, else the status and body.
pub fn error_text(status: u16, body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(v) => match v.get("error") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Object(o)) if o.get("message").is_some_and(Value::is_string) => {
                o["message"].as_str().unwrap_or_default().to_string()
            }
            _ => format!("{status}: {}", body.trim()),
        },
        Err(_) => format!("{status}: {}", body.trim()),
    }
}

/// Why a request failed: before the connection was made (nothing was sent), or after.
#[derive(Debug)]
pub enum Fail {
    Connect(io::Error),
    Exchange(io::Error),
}

pub struct Response {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: BufReader<Body>,
}

/// The response body: everything to EOF, `Content-Length` bytes, or de-chunked.
pub enum Body {
    Plain(io::Take<BufReader<Conn>>),
    Chunked { inner: BufReader<Conn>, left: usize, done: bool },
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Body::Plain(r) => r.read(buf),
            Body::Chunked { inner, left, done } => {
                if *done || buf.is_empty() {
                    return Ok(0);
                }
                if *left == 0 {
                    // A connection that ends before the last (empty) chunk cut the body short.
                    let eof =
                        || io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before the last chunk");
                    let mut line = String::new();
                    if inner.read_line(&mut line)? == 0 {
                        return Err(eof());
                    }
                    if line.trim().is_empty() {
                        // CRLF after the previous chunk's data.
                        line.clear();
                        if inner.read_line(&mut line)? == 0 {
                            return Err(eof());
                        }
                    }
                    let size = line.trim().split(';').next().unwrap_or("");
                    let n = usize::from_str_radix(size, 16)
                        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
                    if n == 0 {
                        *done = true;
                        return Ok(0);
                    }
                    *left = n;
                }
                let want = buf.len().min(*left);
                let got = inner.read(&mut buf[..want])?;
                if got == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-chunk"));
                }
                *left -= got;
                Ok(got)
            }
        }
    }
}

/// A connection to the server, plain or TLS.
pub enum Conn {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<openssl::ssl::SslStream<TcpStream>>),
}

impl Conn {
    /// TLS over `tcp`, verifying the server's certificate against the default trust store
    /// and `name` (a host name or an IP address).
    #[cfg(feature = "tls")]
    fn tls(tcp: TcpStream, name: &str) -> io::Result<Conn> {
        let fail = |e: String| io::Error::other(format!("TLS with {name}: {e}"));
        let connector = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client())
            .map_err(|e| fail(e.to_string()))?
            .build();
        let stream = connector.connect(name, tcp).map_err(|e| fail(e.to_string()))?;
        Ok(Conn::Tls(Box::new(stream)))
    }

    #[cfg(not(feature = "tls"))]
    fn tls(_: TcpStream, name: &str) -> io::Result<Conn> {
        Err(io::Error::new(io::ErrorKind::Unsupported, format!("{name}: this turbine was built without TLS")))
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            #[cfg(feature = "tls")]
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            #[cfg(feature = "tls")]
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            #[cfg(feature = "tls")]
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// Largest response head read (status line and headers together).
const MAX_HEAD: u64 = 64 << 10;

/// One line of a response head, counted against what is left of `MAX_HEAD`.
fn head_line(r: &mut BufReader<Conn>, line: &mut String, left: &mut u64) -> io::Result<usize> {
    let n = r.by_ref().take(*left + 1).read_line(line)?;
    *left = left.checked_sub(n as u64).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, format!("response head longer than {MAX_HEAD} bytes"))
    })?;
    Ok(n)
}

fn read_head(mut r: BufReader<Conn>) -> io::Result<Response> {
    let mut line = String::new();
    let mut left = MAX_HEAD;
    head_line(&mut r, &mut line, &mut left)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an HTTP response"))?;
    let (mut chunked, mut length, mut content_type) = (false, None, None);
    loop {
        line.clear();
        if head_line(&mut r, &mut line, &mut left)? == 0 {
            break;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            } else if k.eq_ignore_ascii_case("content-length") {
                length = v.parse::<u64>().ok();
            } else if k.eq_ignore_ascii_case("content-type") {
                content_type = Some(v.to_string());
            }
        }
    }
    let body = if chunked {
        Body::Chunked { inner: r, left: 0, done: false }
    } else {
        Body::Plain(r.take(length.unwrap_or(u64::MAX)))
    };
    Ok(Response { status, content_type, body: BufReader::new(body) })
}
