//! OLLAMA_HOST parsed as Ollama's `envconfig.Host` parses it, and the small time helpers
//! the API needs (RFC 3339 timestamps, Go-style durations for keep_alive).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where to listen: `(host, port)`; an empty host means every interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    /// The address as `ToSocketAddrs` wants it (`[v6]:port`, `0.0.0.0:port` for all).
    pub fn bind_addr(&self) -> String {
        match self.host.as_str() {
            "" => format!("0.0.0.0:{}", self.port),
            h if h.contains(':') => format!("[{h}]:{}", self.port),
            h => format!("{h}:{}", self.port),
        }
    }
}

/// Parses an OLLAMA_HOST value: `""` → 127.0.0.1:11434, `0.0.0.0` → 0.0.0.0:11434,
/// `:8080` → all interfaces on 8080, `host:port`, `http://host[:port][/path]` (port 80 by
/// default, 443 for https), bracketed or bare IPv6. A bad port falls back to the default.
pub fn parse_ollama_host(raw: &str) -> HostPort {
    let s = raw.trim().trim_matches(|c| c == '"' || c == '\'');
    let mut default_port = 11434u16;
    let hostport = match s.split_once("://") {
        None if s == "ollama.com" => {
            default_port = 443;
            "ollama.com:443"
        }
        None => s,
        Some((scheme, rest)) => {
            match scheme {
                "http" => default_port = 80,
                "https" => default_port = 443,
                _ => {}
            }
            rest
        }
    };
    let hostport = hostport.split_once('/').map_or(hostport, |(hp, _path)| hp);
    let (host, port) = match split_host_port(hostport) {
        Some((h, p)) => (h.to_string(), p.to_string()),
        None => {
            let bare = hostport.trim_matches(|c| c == '[' || c == ']');
            let host = if bare.parse::<std::net::IpAddr>().is_ok() {
                bare.to_string()
            } else if !hostport.is_empty() {
                hostport.to_string()
            } else {
                "127.0.0.1".to_string()
            };
            (host, String::new())
        }
    };
    let port = port.parse::<u16>().unwrap_or(default_port);
    HostPort { host, port }
}

/// Go's `net.SplitHostPort`: `host:port` or `[v6]:port`; None when there is no port
/// separator or too many colons.
fn split_host_port(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':')?;
        return Some((host, port));
    }
    let (host, port) = s.rsplit_once(':')?;
    if host.contains(':') || host.contains('[') || host.contains(']') {
        return None;
    }
    Some((host, port))
}

/// RFC 3339 in UTC with nanoseconds, as Go's `time.Time` marshals (`2024-01-02T03:04:05.123456789Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, dd) = civil_from_days(days);
    let (hh, mm, ss) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let nanos = d.subsec_nanos();
    let frac = if nanos == 0 {
        String::new()
    } else {
        let f = format!(".{nanos:09}");
        f.trim_end_matches('0').to_string()
    };
    format!("{y:04}-{m:02}-{dd:02}T{hh:02}:{mm:02}:{ss:02}{frac}Z")
}

/// Howard Hinnant's days → (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// How long a model stays loaded after a request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KeepAlive {
    Forever,
    For(Duration),
}

/// Parses keep_alive as Ollama's `Duration.UnmarshalJSON`: a number of seconds, or a Go
/// duration string (`"5m"`, `"1h30m"`, `"-1"`, `"0"`); negative means forever.
pub fn parse_keep_alive(v: &serde_json::Value) -> Result<KeepAlive, String> {
    let secs = match v {
        serde_json::Value::Number(n) => n.as_f64().ok_or("invalid keep_alive")?,
        serde_json::Value::String(s) => match s.trim().parse::<f64>() {
            Ok(n) => n,
            Err(_) => parse_go_duration(s.trim()).ok_or_else(|| format!("time: invalid duration \"{s}\""))?,
        },
        _ => return Err("invalid keep_alive".into()),
    };
    if secs < 0.0 || !secs.is_finite() {
        return Ok(KeepAlive::Forever);
    }
    Ok(KeepAlive::For(Duration::from_secs_f64(secs.min(1e12))))
}

/// The default keep_alive: OLLAMA_KEEP_ALIVE, else five minutes.
pub fn default_keep_alive() -> KeepAlive {
    std::env::var("OLLAMA_KEEP_ALIVE")
        .ok()
        .and_then(|s| parse_keep_alive(&serde_json::Value::String(s)).ok())
        .unwrap_or(KeepAlive::For(Duration::from_secs(300)))
}

/// Go's `time.ParseDuration` in seconds (units ns, us, µs, ms, s, m, h; signed).
fn parse_go_duration(s: &str) -> Option<f64> {
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(0.0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_end == 0 {
            return None;
        }
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * scale;
        rest = &rest[unit_end..];
    }
    Some(if neg { -total } else { total })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(s: &str) -> (String, u16) {
        let h = parse_ollama_host(s);
        (h.host, h.port)
    }

    #[test]
    fn ollama_host_forms() {
        assert_eq!(hp(""), ("127.0.0.1".into(), 11434));
        assert_eq!(hp("0.0.0.0"), ("0.0.0.0".into(), 11434));
        assert_eq!(hp(":8080"), ("".into(), 8080));
        assert_eq!(hp("1.2.3.4:99"), ("1.2.3.4".into(), 99));
        assert_eq!(hp("http://example.com"), ("example.com".into(), 80));
        assert_eq!(hp("https://example.com/path"), ("example.com".into(), 443));
        assert_eq!(hp("http://127.0.0.1:5000"), ("127.0.0.1".into(), 5000));
        assert_eq!(hp("[::1]:7"), ("::1".into(), 7));
        assert_eq!(hp("::1"), ("::1".into(), 11434));
        assert_eq!(hp("\"localhost:1\""), ("localhost".into(), 1));
        assert_eq!(hp("host:notaport"), ("host".into(), 11434));
        assert_eq!(parse_ollama_host(":8080").bind_addr(), "0.0.0.0:8080");
        assert_eq!(parse_ollama_host("[::1]:7").bind_addr(), "[::1]:7");
    }

    #[test]
    fn timestamps_and_durations() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let ka = |v: serde_json::Value| parse_keep_alive(&v).unwrap();
        assert_eq!(ka(serde_json::json!("5m")), KeepAlive::For(Duration::from_secs(300)));
        assert_eq!(ka(serde_json::json!("1h30m")), KeepAlive::For(Duration::from_secs(5400)));
        assert_eq!(ka(serde_json::json!(0)), KeepAlive::For(Duration::ZERO));
        assert_eq!(ka(serde_json::json!("0")), KeepAlive::For(Duration::ZERO));
        assert_eq!(ka(serde_json::json!(-1)), KeepAlive::Forever);
        assert_eq!(ka(serde_json::json!("-1m")), KeepAlive::Forever);
        assert!(parse_keep_alive(&serde_json::json!("soon")).is_err());
        assert!(parse_keep_alive(&serde_json::json!(true)).is_err());
    }
}
