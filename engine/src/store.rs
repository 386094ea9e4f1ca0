//! The model store, laid out as Ollama lays it out, so models pulled by Ollama load too:
//!   $OLLAMA_MODELS/manifests/<host>/<namespace>/<model>/<tag>   JSON manifest
//!   $OLLAMA_MODELS/blobs/sha256-<hex>                          layers (the GGUF among them)
//! OLLAMA_MODELS defaults to ~/.ollama/models.

use crate::EngineError;
use std::path::{Path, PathBuf};

pub const DEFAULT_HOST: &str = "registry.ollama.ai";
pub const DEFAULT_NAMESPACE: &str = "library";
pub const DEFAULT_TAG: &str = "latest";
const MODEL_MEDIA_TYPE: &str = "application/vnd.ollama.image.model";

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
    let tmp =
        dir.join(format!(".{}.tmp-{}", target.file_name().and_then(|f| f.to_str()).unwrap_or("m"), std::process::id()));
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
