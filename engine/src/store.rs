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

#[cfg(test)]
mod tests {
    use super::*;

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
