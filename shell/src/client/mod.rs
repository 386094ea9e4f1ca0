//! CLI clients of a running `turbine serve` (or Ollama): `list`, `ps`, `show`, `stop`, `run`.
//! They find the server through OLLAMA_HOST and send OLLAMA_API_KEY as a Bearer token.

pub mod http;
mod run;

use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use http::Target;
pub use run::{run, RunArgs};

/// `turbine list`: the installed models as Ollama prints them.
pub fn list(t: &Target) -> Result<(), String> {
    let v = t.json("GET", "/api/tags", None)?;
    let now = SystemTime::now();
    let mut rows = vec![["NAME", "ID", "SIZE", "MODIFIED"].map(String::from).to_vec()];
    for m in v["models"].as_array().into_iter().flatten() {
        rows.push(vec![
            str_of(&m["name"]),
            short_id(m),
            human_bytes(m["size"].as_u64().unwrap_or(0)),
            m["modified_at"].as_str().and_then(parse_rfc3339).map_or_else(String::new, |t| human_since(now, t)),
        ]);
    }
    print_table(&rows);
    Ok(())
}

/// `turbine ps`: the loaded models.
pub fn ps(t: &Target) -> Result<(), String> {
    let v = t.json("GET", "/api/ps", None)?;
    let now = SystemTime::now();
    let mut rows = vec![["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"].map(String::from).to_vec()];
    for m in v["models"].as_array().into_iter().flatten() {
        let until = match m["expires_at"].as_str().and_then(parse_rfc3339) {
            Some(t) if t > now + Duration::from_secs(100 * 365 * 86_400) => "Forever".to_string(),
            Some(t) => human_until(now, t),
            None => String::new(),
        };
        rows.push(vec![
            str_of(&m["name"]),
            short_id(m),
            human_bytes(m["size"].as_u64().unwrap_or(0)),
            "100% CPU".to_string(),
            m["context_length"].as_u64().map_or_else(String::new, |n| n.to_string()),
            until,
        ]);
    }
    print_table(&rows);
    Ok(())
}

/// `turbine show MODEL`: architecture, size, context, quantization and capabilities.
pub fn show(t: &Target, model: &str) -> Result<(), String> {
    let v = t.json("POST", "/api/show", Some(&json!({ "model": model })))?;
    let info = &v["model_info"];
    let arch = info["general.architecture"].as_str().unwrap_or_default();
    let key = |k: &str| info[format!("{arch}.{k}")].as_u64().map(|n| n.to_string());
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut add = |k: &str, v: Option<String>| {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            rows.push((k.to_string(), v));
        }
    };
    add("architecture", Some(arch.to_string()));
    add("parameters", v["details"]["parameter_size"].as_str().map(String::from));
    add("context length", key("context_length"));
    add("embedding length", key("embedding_length"));
    add("quantization", v["details"]["quantization_level"].as_str().map(String::from));
    println!("  Model");
    print_section(&rows);
    let caps: Vec<(String, String)> = v["capabilities"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|c| (c.to_string(), String::new()))
        .collect();
    if !caps.is_empty() {
        println!("  Capabilities");
        print_section(&caps);
    }
    if let Some(p) = v["parameters"].as_str().filter(|p| !p.trim().is_empty()) {
        println!("  Parameters");
        let rows: Vec<(String, String)> = p
            .lines()
            .filter_map(|l| l.trim().split_once(char::is_whitespace))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect();
        print_section(&rows);
    }
    Ok(())
}

/// `turbine stop MODEL`: unloads it (a load request with keep_alive 0, as Ollama's CLI does).
pub fn stop(t: &Target, model: &str) -> Result<(), String> {
    t.json("POST", "/api/generate", Some(&json!({ "model": model, "keep_alive": 0 })))?;
    Ok(())
}

/// `turbine cp SRC DST`.
pub fn copy(t: &Target, src: &str, dst: &str) -> Result<(), String> {
    empty_answer(t, "POST", "/api/copy", &json!({ "source": src, "destination": dst }))?;
    println!("copied '{src}' to '{dst}'");
    Ok(())
}

/// `turbine rm MODEL...`: each in turn, stopping at the first error.
pub fn remove(t: &Target, models: &[String]) -> Result<(), String> {
    for m in models {
        empty_answer(t, "DELETE", "/api/delete", &json!({ "model": m }))?;
        println!("deleted '{m}'");
    }
    Ok(())
}

/// A request answered by a status and no body (copy, delete).
fn empty_answer(t: &Target, method: &str, path: &str, body: &Value) -> Result<(), String> {
    let mut r = t.send(method, path, Some(body))?;
    if r.status >= 400 {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut r.body, &mut text);
        return Err(http::error_text(r.status, &text));
    }
    Ok(())
}

fn str_of(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

fn short_id(m: &Value) -> String {
    m["digest"].as_str().unwrap_or_default().trim_start_matches("sha256:").chars().take(12).collect()
}

fn print_section(rows: &[(String, String)]) {
    for (k, v) in rows {
        if v.is_empty() {
            println!("    {k}");
        } else {
            println!("    {k:<20}{v}");
        }
    }
    println!();
}

/// Left-aligned columns separated by at least three spaces, as Ollama's tables.
fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[c]));
            }
        }
        println!("{}", line.trim_end());
    }
}

/// Decimal units as Ollama's `format.HumanBytes` (`291 MB`, `1.5 GB`).
pub fn human_bytes(n: u64) -> String {
    let units = [(1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")];
    for (scale, unit) in units {
        let v = n as f64 / scale;
        if v >= 1.0 {
            return if v >= 10.0 || v.fract() == 0.0 { format!("{v:.0} {unit}") } else { format!("{v:.1} {unit}") };
        }
    }
    format!("{n} B")
}

fn human_span(d: Duration) -> String {
    let s = d.as_secs();
    let (n, unit) = match s {
        0..=1 => return "about a second".to_string(),
        2..=59 => (s, "second"),
        60..=3599 => (s / 60, "minute"),
        3600..=86_399 => (s / 3600, "hour"),
        86_400..=2_591_999 => (s / 86_400, "day"),
        2_592_000..=31_535_999 => (s / 2_592_000, "month"),
        _ => (s / 31_536_000, "year"),
    };
    if n == 1 {
        format!("1 {unit}")
    } else {
        format!("{n} {unit}s")
    }
}

fn human_since(now: SystemTime, t: SystemTime) -> String {
    match now.duration_since(t) {
        Ok(d) if d.as_secs() < 2 => "Less than a second ago".to_string(),
        Ok(d) => format!("{} ago", human_span(d)),
        Err(_) => "Less than a second ago".to_string(),
    }
}

fn human_until(now: SystemTime, t: SystemTime) -> String {
    match t.duration_since(now) {
        Ok(d) => format!("{} from now", human_span(d)),
        Err(_) => "Stopping...".to_string(),
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` → a time.
fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let num = |a: usize, b: usize| s.get(a..b)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, sec) = (num(0, 4)?, num(5, 7)?, num(8, 10)?, num(11, 13)?, num(14, 16)?, num(17, 19)?);
    let rest = &s[19..];
    let (frac, zone) = match rest.strip_prefix('.') {
        Some(r) => {
            let end = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
            (format!("0.{}", &r[..end]).parse::<f64>().ok()?, &r[end..])
        }
        None => (0.0, rest),
    };
    let offset = match zone {
        "Z" | "z" | "" => 0,
        z => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let hh = z.get(1..3)?.parse::<i64>().ok()?;
            let mm = z.get(4..6)?.parse::<i64>().ok()?;
            sign * (hh * 3600 + mm * 60)
        }
    };
    // Howard Hinnant's days_from_civil.
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_secs_f64(frac))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(human_bytes(291_000_000), "291 MB");
        assert_eq!(human_bytes(1_500_000_000), "1.5 GB");
        assert_eq!(human_bytes(512), "512 B");
        let t = parse_rfc3339("2023-11-14T22:13:20.5Z").unwrap();
        assert_eq!(t, UNIX_EPOCH + Duration::from_millis(1_700_000_000_500));
        assert_eq!(
            parse_rfc3339("2023-11-14T23:13:20+01:00").unwrap(),
            UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );
        assert_eq!(parse_rfc3339("9999-12-31T23:59:59Z").unwrap(), UNIX_EPOCH + Duration::from_secs(253_402_300_799));
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(human_since(now, now - Duration::from_secs(3 * 86_400)), "3 days ago");
        assert_eq!(human_until(now, now + Duration::from_secs(299)), "4 minutes from now");
        assert_eq!(human_until(now, now + Duration::from_secs(60)), "1 minute from now");
    }
}

/// `turbine create NAME -f Modelfile`: uploads the GGUF a FROM line names (unless the
/// server has it already), then asks the server to build the model, printing its progress.
pub fn create(t: &Target, name: &str, modelfile: &std::path::Path) -> Result<(), String> {
    use crate::modelfile::{Modelfile, MAX_MODELFILE};
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(modelfile)
        .and_then(|f| f.take(MAX_MODELFILE as u64 + 1).read_to_string(&mut text))
        .map_err(|e| format!("{}: {e}", modelfile.display()))?;
    let mf = Modelfile::parse(&text)?;
    let from = mf.from.clone().unwrap_or_default();
    let mut req = json!({ "model": name, "stream": true });
    match from_file(&from, modelfile.parent()) {
        Some(path) if path.is_dir() => {
            return Err(format!("FROM {from}: a folder (safetensors) cannot be imported; convert it to GGUF first"))
        }
        Some(path) => {
            let digest = upload_blob(t, &path)?;
            let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("model.gguf").to_string();
            req["files"] = json!({ file_name: digest });
        }
        None => req["from"] = json!(from),
    }
    if let Some(template) = &mf.template {
        req["template"] = json!(template);
    }
    if let Some(system) = &mf.system {
        req["system"] = json!(system);
    }
    if !mf.license.is_empty() {
        req["license"] = json!(mf.license);
    }
    if !mf.parameters.is_empty() {
        req["parameters"] = Value::Object(mf.parameters.clone());
    }
    t.stream("/api/create", &req, |v| {
        if let Some(status) = v.get("status").and_then(Value::as_str) {
            eprintln!("{status}");
        }
        Ok(())
    })
}

/// The file a FROM value names: `~/…`, an absolute path, or one relative to the
/// Modelfile's folder, if it exists; None for a model name.
fn from_file(from: &str, base: Option<&std::path::Path>) -> Option<std::path::PathBuf> {
    let path = match from.strip_prefix("~/") {
        Some(rest) => std::path::PathBuf::from(std::env::var_os("HOME")?).join(rest),
        None => std::path::PathBuf::from(from),
    };
    let path = if path.is_relative() { base.unwrap_or(std::path::Path::new(".")).join(path) } else { path };
    path.exists().then_some(path)
}

/// Sends a file to the server's blob store unless it is there already; returns its digest.
fn upload_blob(t: &Target, path: &std::path::Path) -> Result<String, String> {
    use sha2::{Digest, Sha256};
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    eprintln!("gathering model components");
    let mut hasher = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path).map_err(io)?, &mut hasher).map_err(io)?;
    let digest = format!("sha256:{:x}", hasher.finalize());
    let blob = format!("/api/blobs/{digest}");
    let have = t.send("HEAD", &blob, None)?;
    if have.status == 200 {
        return Ok(digest);
    }
    let mut file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    eprintln!("copying file {digest} ({})", human_bytes(len));
    let mut r = t.upload(&blob, len, &mut file).map_err(|e| match e {
        http::Fail::Connect(e) | http::Fail::Exchange(e) => format!("uploading {}: {e}", path.display()),
    })?;
    if r.status >= 300 {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut r.body, &mut text);
        return Err(http::error_text(r.status, &text));
    }
    Ok(digest)
}
