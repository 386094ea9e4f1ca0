//! Who may talk to the server from a browser: CORS origins (OLLAMA_ORIGINS plus Ollama's
//! defaults) and, when bound to loopback, a Host-header check against DNS rebinding, as
//! Ollama does it.

use std::net::IpAddr;

/// Headers a browser may send cross-origin (Ollama's list).
pub const ALLOW_HEADERS: &str =
    "Authorization, Content-Type, User-Agent, Accept, X-Requested-With, OpenAI-Beta, x-stainless-*";
pub const ALLOW_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS";

/// Allowed origins, each a pattern where `*` matches any run of characters.
#[derive(Clone, Debug)]
pub struct Origins(Vec<String>);

impl Origins {
    /// OLLAMA_ORIGINS (comma separated) and the local origins Ollama always allows.
    pub fn from_env() -> Origins {
        Origins::new(&std::env::var("OLLAMA_ORIGINS").unwrap_or_default())
    }

    pub fn new(env: &str) -> Origins {
        let mut v: Vec<String> = env.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        for host in ["localhost", "127.0.0.1", "0.0.0.0"] {
            for scheme in ["http", "https"] {
                v.push(format!("{scheme}://{host}"));
                v.push(format!("{scheme}://{host}:*"));
            }
        }
        for scheme in ["app", "file", "tauri", "vscode-webview", "vscode-file"] {
            v.push(format!("{scheme}://*"));
        }
        Origins(v)
    }

    /// Only visible ASCII is ever allowed (the origin is echoed into a response header).
    pub fn allows(&self, origin: &str) -> bool {
        origin.bytes().all(|b| b.is_ascii_graphic()) && self.0.iter().any(|p| glob(p.as_bytes(), origin.as_bytes()))
    }
}

/// `*` matches any run of bytes (possibly empty); everything else matches itself. Greedy
/// with backtracking to the last star: O(pattern × input) at worst, never exponential.
fn glob(pattern: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if p < pattern.len() && pattern[p] == s[i] {
            p += 1;
            i += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Whether a request's Host header is acceptable for a server bound to loopback: an IP
/// that is loopback, private or unspecified, `localhost`, this machine's name, or a name
/// under `.localhost`, `.local` or `.internal`. A server bound elsewhere takes any Host.
pub fn host_allowed(bound_to_loopback: bool, host_header: Option<&str>) -> bool {
    if !bound_to_loopback {
        return true;
    }
    let raw = host_header.unwrap_or("").trim().to_ascii_lowercase();
    let host = strip_port(&raw);
    if let Ok(ip) = host.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>() {
        return ip.is_loopback() || ip.is_unspecified() || is_private(ip);
    }
    if host.is_empty() || host == "localhost" || machine_name().is_some_and(|n| n == host) {
        return true;
    }
    [".localhost", ".local", ".internal"].iter().any(|tld| host.ends_with(tld))
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_link_local(),
        // fc00::/7 unique local, fe80::/10 link local.
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00 || (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn machine_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    Some(name.trim().to_ascii_lowercase()).filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let o = Origins::new("https://chat.example.com, http://*.corp.test");
        assert!(o.allows("https://chat.example.com"));
        assert!(o.allows("http://a.corp.test"));
        assert!(o.allows("http://localhost:3000"));
        assert!(o.allows("vscode-webview://abc"));
        assert!(!o.allows("https://evil.example"));
        assert!(!o.allows("http://localhost.evil.example"));
        assert!(!o.allows("app://x\nSet-Cookie: a=b"));
    }

    #[test]
    fn hosts() {
        for ok in
            ["localhost:11434", "127.0.0.1:11434", "[::1]:11434", "10.1.2.3", "0.0.0.0", "box.local", "x.internal"]
        {
            assert!(host_allowed(true, Some(ok)), "{ok}");
        }
        for bad in ["evil.example", "evil.example:11434", "8.8.8.8", "localhost.evil.example"] {
            assert!(!host_allowed(true, Some(bad)), "{bad}");
            assert!(host_allowed(false, Some(bad)), "{bad}");
        }
    }
}
