//! The model store, laid out as Ollama lays it out, so models pulled by Ollama load too:
//!   $OLLAMA_MODELS/manifests/<host>/<namespace>/<model>/<tag>   JSON manifest
//!   $OLLAMA_MODELS/blobs/sha256-<hex>                          layers (the GGUF among them)
//! OLLAMA_MODELS defaults to ~/.ollama/models.

use crate::EngineError;
use std::path::{Path, PathBuf};

pub const DEFAULT_HOST: &str = "registry.ollama.ai";
pub const DEFAULT_NAMESPACE: &str = "library";
pub const DEFAULT_TAG: &str = "latest";
const MODEL_MEDIA_TYPE: &str = media::MODEL;

/// The store's root directory.
pub fn models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("OLLAMA_MODELS") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".ollama").join("models")
}

/// A model name split Ollama's way: `[host/][namespace/]model[:tag]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelName {
    pub host: String,
    pub namespace: String,
    pub model: String,
    pub tag: String,
}

impl ModelName {
    /// Parses a name; None when a part is empty or holds characters that could escape
    /// the store directory.
    pub fn parse(name: &str) -> Option<ModelName> {
        let (path, tag) = match name.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') => (p, t),
            _ => (name, DEFAULT_TAG),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (host, namespace, model) = match parts[..] {
            [m] => (DEFAULT_HOST, DEFAULT_NAMESPACE, m),
            [ns, m] => (DEFAULT_HOST, ns, m),
            [h, ns, m] => (h, ns, m),
            _ => return None,
        };
        let ok = |s: &str| {
            !s.is_empty() && s != "." && s != ".." && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        };
        if ![host, namespace, model, tag].iter().all(|s| ok(s)) {
            return None;
        }
        Some(ModelName {
            host: host.to_string(),
            namespace: namespace.to_string(),
            model: model.to_lowercase(),
            tag: tag.to_string(),
        })
    }

    pub fn manifest_path(&self, root: &Path) -> PathBuf {
        root.join("manifests").join(&self.host).join(&self.namespace).join(&self.model).join(&self.tag)
    }
}

/// The GGUF file a `-m` argument names: an existing file path, or a model name in the
/// store.
pub fn resolve(name_or_path: &str) -> Result<PathBuf, EngineError> {
    let as_path = Path::new(name_or_path);
    if as_path.is_file() {
        return Ok(as_path.to_path_buf());
    }
    let root = models_dir();
    let not_found =
        || EngineError::ModelNotFound { name: name_or_path.to_string(), looked_in: root.display().to_string() };
    let name = ModelName::parse(name_or_path).ok_or_else(not_found)?;
    let manifest_path = name.manifest_path(&root);
    let text = std::fs::read_to_string(&manifest_path).map_err(|_| not_found())?;
    let digest = model_layer_digest(&text).ok_or_else(|| EngineError::BadValue {
        key: manifest_path.display().to_string(),
        value: "manifest".into(),
        why: "has no model layer with a valid sha256 digest",
    })?;
    let blob = root.join("blobs").join(format!("sha256-{digest}"));
    if !blob.is_file() {
        return Err(EngineError::Io {
            path: blob.display().to_string(),
            error: std::io::Error::new(std::io::ErrorKind::NotFound, "model blob missing"),
        });
    }
    Ok(blob)
}

/// The hex digest of the manifest's model layer, checked to be 64 hex digits.
fn model_layer_digest(manifest: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(manifest).ok()?;
    let layer = v
        .get("layers")?
        .as_array()?
        .iter()
        .find(|l| l.get("mediaType").and_then(|m| m.as_str()) == Some(MODEL_MEDIA_TYPE))?;
    let hex = layer.get("digest")?.as_str()?.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hex.to_ascii_lowercase())
}

/// Every sha256 digest a manifest names (config and layers), each checked to be 64 hex
/// digits; others are skipped.
fn manifest_digests(manifest: &str) -> Vec<String> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(manifest) else { return Vec::new() };
    let layers = v.get("layers").and_then(|l| l.as_array()).into_iter().flatten();
    layers
        .chain(v.get("config"))
        .filter_map(|l| l.get("digest")?.as_str()?.strip_prefix("sha256:"))
        .filter(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|hex| hex.to_ascii_lowercase())
        .collect()
}

/// Every manifest file under `root/manifests` (host/namespace/model/tag).
fn manifest_files(root: &Path) -> Vec<PathBuf> {
    let children = |p: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(p).map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect()).unwrap_or_default()
    };
    let mut level = vec![root.join("manifests")];
    for _ in 0..4 {
        level = level.iter().flat_map(|p| children(p)).collect();
    }
    level.into_iter().filter(|p| p.is_file()).collect()
}

fn bad_name(name: &str) -> EngineError {
    EngineError::BadValue { key: "model".into(), value: format!("{name:?}"), why: "is not a valid model name" }
}

fn io_error(path: &Path, error: std::io::Error) -> EngineError {
    EngineError::Io { path: path.display().to_string(), error }
}

/// The manifest of an installed model: its path and text.
fn installed(root: &Path, name: &str) -> Result<(PathBuf, String), EngineError> {
    let parsed = ModelName::parse(name).ok_or_else(|| bad_name(name))?;
    let path = parsed.manifest_path(root);
    let not_found = || EngineError::ModelNotFound { name: name.to_string(), looked_in: root.display().to_string() };
    let text = std::fs::read_to_string(&path).map_err(|_| not_found())?;
    Ok((path, text))
}

/// Serializes copies and deletes within this process, so a delete cannot prune a blob a
/// copy is about to name.
static STORE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Installs `src`'s model under the name `dst` too: a copy of the manifest (the blobs are
/// shared), written to a temporary file and renamed into place.
pub fn copy(src: &str, dst: &str) -> Result<(), EngineError> {
    let _store = STORE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let root = models_dir();
    let (_, text) = installed(&root, src)?;
    let target = ModelName::parse(dst).ok_or_else(|| bad_name(dst))?.manifest_path(&root);
    let dir = target.parent().ok_or_else(|| bad_name(dst))?;
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        target.file_name().and_then(|f| f.to_str()).unwrap_or("m"),
        std::process::id(),
        unique()
    ));
    std::fs::write(&tmp, &text).map_err(|e| io_error(&tmp, e))?;
    std::fs::rename(&tmp, &target).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_error(&target, e)
    })
}

/// Uninstalls `name`: removes its manifest, then those of its blobs no other manifest
/// names. Returns the blobs removed.
pub fn delete(name: &str) -> Result<Vec<PathBuf>, EngineError> {
    let _store = STORE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let root = models_dir();
    let (path, text) = installed(&root, name)?;
    std::fs::remove_file(&path).map_err(|e| io_error(&path, e))?;
    // Empty model and namespace folders go too, as Ollama leaves no husks.
    for dir in path.ancestors().skip(1).take(3) {
        if std::fs::remove_dir(dir).is_err() {
            break;
        }
    }
    let mut still_used = std::collections::HashSet::new();
    for m in manifest_files(&root) {
        let digests = std::fs::read_to_string(&m).ok().map(|t| manifest_digests(&t)).unwrap_or_default();
        if digests.is_empty() {
            // A manifest we cannot read might name any blob: keep them all.
            return Ok(Vec::new());
        }
        still_used.extend(digests);
    }
    let mut removed = Vec::new();
    for digest in manifest_digests(&text).into_iter().filter(|d| !still_used.contains(d)) {
        let blob = root.join("blobs").join(format!("sha256-{digest}"));
        if std::fs::remove_file(&blob).is_ok() {
            removed.push(blob);
        }
    }
    Ok(removed)
}

/// Media types of the layers a manifest may hold (Ollama's).
pub mod media {
    pub const MODEL: &str = "application/vnd.ollama.image.model";
    pub const TEMPLATE: &str = "application/vnd.ollama.image.template";
    pub const SYSTEM: &str = "application/vnd.ollama.image.system";
    pub const PARAMS: &str = "application/vnd.ollama.image.params";
    pub const LICENSE: &str = "application/vnd.ollama.image.license";
    pub const MESSAGES: &str = "application/vnd.ollama.image.messages";
    pub const CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
}

/// One layer of a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    pub media_type: String,
    /// 64 lowercase hex digits.
    pub digest: String,
    pub size: u64,
}

/// The 64 hex digits of `sha256:<hex>` (or `sha256-<hex>`), lowercased; None for anything else.
pub fn parse_digest(digest: &str) -> Option<String> {
    let hex = digest.strip_prefix("sha256:").or_else(|| digest.strip_prefix("sha256-"))?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hex.to_ascii_lowercase())
}

fn blob_file(root: &Path, hex: &str) -> PathBuf {
    root.join("blobs").join(format!("sha256-{hex}"))
}

/// Whether the store holds the blob `sha256:<hex>`.
pub fn has_blob(digest: &str) -> Result<bool, EngineError> {
    let hex = parse_digest(digest).ok_or_else(|| bad_digest(digest))?;
    Ok(blob_file(&models_dir(), &hex).is_file())
}

/// The path of a blob the store holds.
pub fn blob_path(digest: &str) -> Result<PathBuf, EngineError> {
    let hex = parse_digest(digest).ok_or_else(|| bad_digest(digest))?;
    let path = blob_file(&models_dir(), &hex);
    if !path.is_file() {
        return Err(io_error(&path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such blob")));
    }
    Ok(path)
}

fn bad_digest(digest: &str) -> EngineError {
    EngineError::BadValue { key: "digest".into(), value: format!("{digest:?}"), why: "is not sha256:<64 hex digits>" }
}

/// Writes a blob from `data`, at most `max_bytes`, checking as it goes that its sha256 is
/// `digest`: the bytes go to a temporary file renamed into place only when they match,
/// so a short, long or wrong upload leaves nothing behind. Returns the size.
pub fn write_blob(digest: &str, data: &mut dyn std::io::Read, max_bytes: u64) -> Result<u64, EngineError> {
    use sha2::Digest;
    use std::io::Write;
    let want = parse_digest(digest).ok_or_else(|| bad_digest(digest))?;
    let root = models_dir();
    let dir = root.join("blobs");
    std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
    let tmp = dir.join(format!(".sha256-{want}.partial-{}-{}", std::process::id(), unique()));
    let result = (|| -> Result<u64, EngineError> {
        let mut file = std::fs::File::create(&tmp).map_err(|e| io_error(&tmp, e))?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = data.read(&mut buf).map_err(|e| io_error(&tmp, e))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            if size > max_bytes {
                return Err(EngineError::BadValue {
                    key: "blob".into(),
                    value: format!("more than {max_bytes} bytes"),
                    why: "is larger than the store accepts",
                });
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(|e| io_error(&tmp, e))?;
        }
        let got = format!("{:x}", hasher.finalize());
        if got != want {
            return Err(EngineError::BadValue {
                key: "digest".into(),
                value: format!("sha256:{want}"),
                why: "does not match the uploaded bytes",
            });
        }
        file.sync_all().map_err(|e| io_error(&tmp, e))?;
        let path = blob_file(&root, &want);
        std::fs::rename(&tmp, &path).map_err(|e| io_error(&path, e))?;
        Ok(size)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Stores `bytes` as a blob (if not there yet) and returns its layer.
pub fn put_blob(media_type: &str, bytes: &[u8]) -> Result<Layer, EngineError> {
    use sha2::Digest;
    let hex = format!("{:x}", sha2::Sha256::digest(bytes));
    if !blob_file(&models_dir(), &hex).is_file() {
        write_blob(&format!("sha256:{hex}"), &mut &bytes[..], bytes.len() as u64)?;
    }
    Ok(Layer { media_type: media_type.to_string(), digest: hex, size: bytes.len() as u64 })
}

/// A number no other call in this process gets (for temporary file names).
fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The layers of an installed model's manifest (those with a valid digest).
pub fn layers(name: &str) -> Result<Vec<Layer>, EngineError> {
    let (_, text) = installed(&models_dir(), name)?;
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    Ok(v.get("layers")
        .and_then(|l| l.as_array())
        .into_iter()
        .flatten()
        .filter_map(|l| {
            Some(Layer {
                media_type: l.get("mediaType")?.as_str()?.to_string(),
                digest: parse_digest(l.get("digest")?.as_str()?)?,
                size: l.get("size").and_then(|s| s.as_u64()).unwrap_or(0),
            })
        })
        .collect())
}

/// Installs `name` with these layers (every blob already in the store) and a config blob
/// describing the model; the manifest is written to a temporary file and renamed.
pub fn write_manifest(name: &str, layers: &[Layer], config: &serde_json::Value) -> Result<(), EngineError> {
    let _store = STORE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let root = models_dir();
    let target = ModelName::parse(name).ok_or_else(|| bad_name(name))?.manifest_path(&root);
    for l in layers {
        if !blob_file(&root, &l.digest).is_file() {
            return Err(io_error(
                &blob_file(&root, &l.digest),
                std::io::Error::new(std::io::ErrorKind::NotFound, "layer blob missing"),
            ));
        }
    }
    let config_bytes = serde_json::to_vec(config).map_err(|e| EngineError::BadValue {
        key: "config".into(),
        value: e.to_string(),
        why: "cannot be encoded",
    })?;
    let config_layer = put_blob(media::CONFIG, &config_bytes)?;
    let layer_json = |l: &Layer| serde_json::json!({ "mediaType": l.media_type, "digest": format!("sha256:{}", l.digest), "size": l.size });
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::MANIFEST,
        "config": layer_json(&config_layer),
        "layers": layers.iter().map(layer_json).collect::<Vec<_>>(),
    });
    let dir = target.parent().ok_or_else(|| bad_name(name))?;
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        target.file_name().and_then(|f| f.to_str()).unwrap_or("m"),
        std::process::id(),
        unique()
    ));
    std::fs::write(&tmp, manifest.to_string()).map_err(|e| io_error(&tmp, e))?;
    std::fs::rename(&tmp, &target).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_error(&target, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_digests_skip_anything_but_hex() {
        let m = format!(
            r#"{{"config":{{"digest":"sha256:{}"}},"layers":[{{"digest":"sha256:{}"}},{{"digest":"sha256:../../x"}},{{"digest":"md5:1"}}]}}"#,
            "b".repeat(64),
            "A".repeat(64)
        );
        assert_eq!(manifest_digests(&m), vec!["a".repeat(64), "b".repeat(64)]);
        assert!(manifest_digests("[").is_empty());
    }

    #[test]
    fn parses_names_like_ollama() {
        let n = ModelName::parse("gemma3:270m").unwrap();
        assert_eq!(
            (n.host.as_str(), n.namespace.as_str(), n.model.as_str(), n.tag.as_str()),
            ("registry.ollama.ai", "library", "gemma3", "270m")
        );
        assert_eq!(ModelName::parse("me/mine").unwrap().tag, "latest");
        assert_eq!(ModelName::parse("h.io/me/mine:v1").unwrap().host, "h.io");
        for bad in ["", "../x", "a/../b", "a:b/c", "a/b/c/d", "x:..", "sp ace"] {
            assert_eq!(ModelName::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn manifest_digest_is_validated() {
        let good =
            format!(r#"{{"layers":[{{"mediaType":"{MODEL_MEDIA_TYPE}","digest":"sha256:{}"}}]}}"#, "a".repeat(64));
        assert_eq!(model_layer_digest(&good), Some("a".repeat(64)));
        let evil = format!(r#"{{"layers":[{{"mediaType":"{MODEL_MEDIA_TYPE}","digest":"sha256:../../etc/passwd"}}]}}"#);
        assert_eq!(model_layer_digest(&evil), None);
        assert_eq!(model_layer_digest("not json"), None);
    }
}
