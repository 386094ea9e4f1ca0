//! The models in the store as the API lists them: names, manifests, sizes, digests, and
//! the details and model_info read from each GGUF.

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;
use turbine::engine::gguf::{Array, Gguf, Value as GValue};
use turbine::engine::store::{self, ModelName, DEFAULT_HOST, DEFAULT_NAMESPACE};

const MODEL_MEDIA_TYPE: &str = "application/vnd.ollama.image.model";

/// One installed model.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Ollama's shortest display name (`gemma3:270m`).
    pub name: String,
    /// The GGUF blob.
    pub blob: PathBuf,
    /// Sum of the manifest's layer sizes.
    pub size: u64,
    /// sha256 of the manifest, hex.
    pub digest: String,
    pub modified: SystemTime,
    /// The manifest's TEMPLATE, SYSTEM and PARAMETER layers (`turbine create`).
    pub template: Option<String>,
    pub system: Option<String>,
    pub params: Option<Value>,
}

/// Largest template, system or parameter layer read.
const MAX_TEXT_LAYER: u64 = 1 << 20;

/// The text of a manifest's layer of `media_type`, if it has one we can read.
fn text_layer(root: &Path, layers: &[Value], media_type: &str) -> Option<String> {
    let layer = layers.iter().find(|l| l.get("mediaType").and_then(Value::as_str) == Some(media_type))?;
    let hex = store::parse_digest(layer.get("digest")?.as_str()?)?;
    let file = std::fs::File::open(root.join("blobs").join(format!("sha256-{hex}"))).ok()?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_TEXT_LAYER), &mut text).ok()?;
    Some(text)
}

/// `host/namespace/model:tag` with the default host and namespace left out.
pub fn display_name(n: &ModelName) -> String {
    let mut s = String::new();
    if n.host != DEFAULT_HOST {
        s.push_str(&n.host);
        s.push('/');
    }
    if n.host != DEFAULT_HOST || n.namespace != DEFAULT_NAMESPACE {
        s.push_str(&n.namespace);
        s.push('/');
    }
    s.push_str(&n.model);
    s.push(':');
    s.push_str(&n.tag);
    s
}

/// The installed model a request names; None when the name is invalid or not installed.
pub fn lookup(name: &str) -> Option<Entry> {
    let parsed = ModelName::parse(name)?;
    let root = store::models_dir();
    read_entry(&root, &parsed, &parsed.manifest_path(&root))
}

fn read_entry(root: &Path, name: &ModelName, manifest: &Path) -> Option<Entry> {
    let bytes = std::fs::read(manifest).ok()?;
    let modified = std::fs::metadata(manifest).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    let layers = v.get("layers")?.as_array()?;
    let model = layers.iter().find(|l| l.get("mediaType").and_then(Value::as_str) == Some(MODEL_MEDIA_TYPE))?;
    let hex = model.get("digest")?.as_str()?.strip_prefix("sha256:")?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let blob = root.join("blobs").join(format!("sha256-{}", hex.to_ascii_lowercase()));
    if !blob.is_file() {
        return None;
    }
    let size = layers.iter().filter_map(|l| l.get("size").and_then(Value::as_u64)).sum();
    let digest = format!("{:x}", Sha256::digest(&bytes));
    Some(Entry {
        name: display_name(name),
        blob,
        size,
        digest,
        modified,
        template: text_layer(root, layers, store::media::TEMPLATE),
        system: text_layer(root, layers, store::media::SYSTEM),
        params: text_layer(root, layers, store::media::PARAMS).and_then(|t| serde_json::from_str(&t).ok()),
    })
}

/// Every installed model, newest first (as Ollama lists them).
pub fn list() -> Vec<Entry> {
    let root = store::models_dir();
    let mut out = Vec::new();
    let subdirs = |p: &Path| -> Vec<(String, PathBuf)> {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    for (host, hp) in subdirs(&root.join("manifests")) {
        for (ns, np) in subdirs(&hp) {
            for (model, mp) in subdirs(&np) {
                for (tag, tp) in subdirs(&mp) {
                    // Dot-files are temporary (a copy being written).
                    if !tp.is_file() || tag.starts_with('.') {
                        continue;
                    }
                    let Some(name) = ModelName::parse(&format!("{host}/{ns}/{model}:{tag}")) else { continue };
                    if let Some(e) = read_entry(&root, &name, &tp) {
                        out.push(e);
                    }
                }
            }
        }
    }
    out.sort_by(|a, b| b.modified.cmp(&a.modified).then_with(|| a.name.cmp(&b.name)));
    out
}

/// Ollama's `format.HumanNumber` (268098176 → "268.10M").
pub fn human_number(n: u64) -> String {
    let f = n as f64;
    let whole = |x: f64| x == x.floor();
    if n >= 1_000_000_000 {
        let x = f / 1e9;
        if whole(x) {
            format!("{x:.0}B")
        } else {
            format!("{x:.1}B")
        }
    } else if n >= 1_000_000 {
        let x = f / 1e6;
        if whole(x) {
            format!("{x:.0}M")
        } else {
            format!("{x:.2}M")
        }
    } else if n >= 1_000 {
        format!("{:.0}K", f / 1e3)
    } else {
        n.to_string()
    }
}

fn parameter_count(file: &Gguf) -> u64 {
    file.tensors().iter().map(|t| t.n_elements() as u64).sum()
}

/// The `details` object of tags/show/ps, read from the GGUF.
pub fn details_of(file: &Gguf) -> Value {
    let family = file.architecture().unwrap_or("").to_string();
    let quant = file
        .get_u32("general.file_type")
        .ok()
        .flatten()
        .and_then(turbine::engine::file_type::short_name)
        .unwrap_or("unknown");
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": human_number(parameter_count(file)),
        "quantization_level": quant,
    })
}

/// `details` for an entry, cached by digest (opening a GGUF parses its whole vocabulary).
pub fn details(entry: &Entry) -> Value {
    static CACHE: Mutex<Option<HashMap<String, Value>>> = Mutex::new(None);
    let key = format!("{}:{}", entry.digest, entry.blob.display());
    if let Some(v) = CACHE.lock().ok().and_then(|c| c.as_ref().and_then(|m| m.get(&key).cloned())) {
        return v;
    }
    let v = match Gguf::open(&entry.blob) {
        Ok(f) => details_of(&f),
        Err(_) => json!({"parent_model": "", "format": "gguf", "family": "", "families": null,
                         "parameter_size": "", "quantization_level": ""}),
    };
    if let Ok(mut c) = CACHE.lock() {
        c.get_or_insert_with(HashMap::new).insert(key, v.clone());
    }
    v
}

/// `model_info`: the GGUF metadata as JSON; arrays longer than 5 become null unless
/// `verbose` (Ollama hides the vocabulary this way), plus general.parameter_count.
pub fn model_info(file: &Gguf, verbose: bool) -> Value {
    let mut m = Map::new();
    for (k, v) in file.metadata() {
        let hide = !verbose && matches!(v, GValue::Array(a) if a.len() > 5);
        m.insert(k.to_string(), if hide { Value::Null } else { gguf_value(v) });
    }
    m.entry("general.parameter_count").or_insert_with(|| json!(parameter_count(file)));
    Value::Object(m)
}

fn gguf_value(v: &GValue) -> Value {
    match v {
        GValue::U8(x) => json!(x),
        GValue::I8(x) => json!(x),
        GValue::U16(x) => json!(x),
        GValue::I16(x) => json!(x),
        GValue::U32(x) => json!(x),
        GValue::I32(x) => json!(x),
        GValue::F32(x) => json!(x),
        GValue::Bool(x) => json!(x),
        GValue::String(x) => json!(x),
        GValue::U64(x) => json!(x),
        GValue::I64(x) => json!(x),
        GValue::F64(x) => json!(x),
        GValue::Array(a) => gguf_array(a),
    }
}

fn gguf_array(a: &Array) -> Value {
    match a {
        Array::U8(x) => json!(x),
        Array::I8(x) => json!(x),
        Array::U16(x) => json!(x),
        Array::I16(x) => json!(x),
        Array::U32(x) => json!(x),
        Array::I32(x) => json!(x),
        Array::F32(x) => json!(x),
        Array::Bool(x) => json!(x),
        Array::String(x) => json!(x),
        Array::U64(x) => json!(x),
        Array::I64(x) => json!(x),
        Array::F64(x) => json!(x),
        Array::Array(x) => Value::Array(x.iter().map(gguf_array).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_as_ollama_prints_them() {
        let n = ModelName::parse("gemma3:270m").unwrap();
        assert_eq!(display_name(&n), "gemma3:270m");
        assert_eq!(display_name(&ModelName::parse("me/m").unwrap()), "me/m:latest");
        assert_eq!(display_name(&ModelName::parse("h.io/me/m:v").unwrap()), "h.io/me/m:v");
        assert_eq!(human_number(268_098_176), "268.10M");
        assert_eq!(human_number(7_000_000_000), "7B");
        assert_eq!(human_number(8_030_261_248), "8.0B");
        assert_eq!(human_number(1_500), "2K");
    }
}
