//! Making models: `HEAD`/`POST /api/blobs/:digest` (uploads, verified against their
//! digest as they are written) and `POST /api/create` (a new model from an uploaded GGUF,
//! a GGUF path on the server or an installed model, with TEMPLATE, SYSTEM, PARAMETERs and
//! LICENSE layers; the older `modelfile` field is parsed too).

use super::*;
use crate::modelfile::Modelfile;
use turbine::engine::store::{self, media, Layer};

/// Largest blob accepted by an upload.
pub const MAX_BLOB: u64 = 1 << 40;

/// The digest of a `/api/blobs/sha256:<hex>` path, or a 400.
fn path_digest(path: &str) -> Result<String, Reply> {
    let d = path.trim_start_matches("/api/blobs/");
    store::parse_digest(d)
        .map(|hex| format!("sha256:{hex}"))
        .ok_or_else(|| Reply::error(400, format!("invalid digest {d:?}: expected sha256:<64 hex digits>")))
}

/// HEAD /api/blobs/:digest: 200 if the store has it, else 404.
pub fn has_blob(path: &str) -> R {
    let digest = path_digest(path)?;
    let found = store::has_blob(&digest).unwrap_or(false);
    Ok(Reply::Full { status: if found { 200 } else { 404 }, content_type: "text/plain; charset=utf-8", body: vec![] })
}

/// POST /api/blobs/:digest with the bytes as the body: 201 once stored and verified.
pub fn upload(path: &str, body: &mut dyn std::io::Read) -> R {
    let digest = path_digest(path)?;
    if store::has_blob(&digest).unwrap_or(false) {
        // Drain what was sent so the connection stays in step; the blob is there already.
        let _ = std::io::copy(&mut std::io::Read::take(body, MAX_BLOB), &mut std::io::sink());
        return Ok(Reply::Full { status: 200, content_type: "text/plain; charset=utf-8", body: vec![] });
    }
    store::write_blob(&digest, body, MAX_BLOB).map_err(|e| match e {
        turbine::engine::EngineError::BadValue { .. } => Reply::error(400, e.to_string()),
        e => Reply::error(500, e.to_string()),
    })?;
    Ok(Reply::Full { status: 201, content_type: "text/plain; charset=utf-8", body: vec![] })
}

/// What `/api/create` asks for.
#[derive(Default)]
struct Spec {
    from: Option<String>,
    /// File name → digest of an uploaded blob.
    files: Vec<(String, String)>,
    template: Option<String>,
    system: Option<String>,
    license: Vec<String>,
    parameters: Map<String, Value>,
}

fn spec_of(m: &Body) -> Result<Spec, Reply> {
    for unsupported in ["quantize", "adapters", "messages"] {
        match m.get(unsupported) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.is_empty() => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(Value::Object(o)) if o.is_empty() => {}
            Some(_) => return Err(Reply::error(400, format!("'{unsupported}' is not supported by turbine create"))),
        }
    }
    let mut spec = Spec {
        from: str_field(m, "from")?.filter(|s| !s.is_empty()),
        template: str_field(m, "template")?,
        system: str_field(m, "system")?,
        ..Spec::default()
    };
    match m.get("files") {
        None | Some(Value::Null) => {}
        Some(Value::Object(files)) => {
            for (name, digest) in files {
                let d = digest.as_str().ok_or_else(|| type_error("files", "map[string]string"))?;
                spec.files.push((name.clone(), d.to_string()));
            }
        }
        Some(_) => return Err(type_error("files", "map[string]string")),
    }
    spec.license = match m.get("license") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| type_error("license", "[]string"))?,
        Some(_) => return Err(type_error("license", "string or []string")),
    };
    match m.get("parameters") {
        None | Some(Value::Null) => {}
        Some(Value::Object(p)) => spec.parameters = p.clone(),
        Some(_) => return Err(type_error("parameters", "object")),
    }
    // The older API sent the Modelfile itself.
    if let Some(text) = str_field(m, "modelfile")?.filter(|t| !t.is_empty()) {
        let mf = Modelfile::parse(&text).map_err(|e| Reply::error(400, e))?;
        let from = mf.from.unwrap_or_default();
        match from.strip_prefix('@') {
            Some(digest) => spec.files.push(("model.gguf".into(), digest.to_string())),
            None => spec.from = Some(from),
        }
        spec.template = spec.template.or(mf.template);
        spec.system = spec.system.or(mf.system);
        spec.license.extend(mf.license);
        spec.parameters.extend(mf.parameters);
    }
    Ok(spec)
}

/// The layers of the model to build on, with a line of progress for each.
fn base_layers(spec: &Spec, progress: &mut Vec<String>) -> Result<Vec<Layer>, Reply> {
    match (&spec.from, spec.files.as_slice()) {
        (Some(_), [_, ..]) => Err(Reply::error(400, "give either 'from' or 'files', not both")),
        (None, []) => Err(Reply::error(400, "neither 'from' nor 'files' was specified")),
        (None, [(name, digest)]) => {
            let path = store::blob_path(digest)
                .map_err(|_| Reply::error(400, format!("blob {digest} for {name:?} has not been uploaded")))?;
            progress.push("parsing GGUF".into());
            gguf_layer(&path, digest)
        }
        (None, _) => Err(Reply::error(400, "exactly one GGUF file is supported in 'files'")),
        (Some(from), []) if from.ends_with(".gguf") && std::path::Path::new(from).is_file() => {
            progress.push("parsing GGUF".into());
            import_gguf(std::path::Path::new(from))
        }
        (Some(from), []) => {
            let layers = store::layers(from).map_err(|e| store_error(from, e))?;
            if !layers.iter().any(|l| l.media_type == media::MODEL) {
                return Err(Reply::error(400, format!("model {from:?} has no model layer")));
            }
            Ok(layers)
        }
    }
}

/// The model layer of a stored blob, once it reads as a GGUF.
fn gguf_layer(path: &std::path::Path, digest: &str) -> Result<Vec<Layer>, Reply> {
    Gguf::open(path).map_err(|e| Reply::error(400, format!("not a usable GGUF file: {e}")))?;
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let hex = store::parse_digest(digest).unwrap_or_default();
    Ok(vec![Layer { media_type: media::MODEL.into(), digest: hex, size }])
}

/// Copies a GGUF file on the server's disk into the store (hashed first, then written and
/// verified).
fn import_gguf(path: &std::path::Path) -> Result<Vec<Layer>, Reply> {
    use sha2::{Digest, Sha256};
    Gguf::open(path).map_err(|e| Reply::error(400, format!("{}: not a usable GGUF file: {e}", path.display())))?;
    let io = |e: std::io::Error| Reply::error(500, format!("{}: {e}", path.display()));
    let mut hasher = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path).map_err(io)?, &mut hasher).map_err(io)?;
    let digest = format!("sha256:{:x}", hasher.finalize());
    if !store::has_blob(&digest).unwrap_or(false) {
        let mut file = std::fs::File::open(path).map_err(io)?;
        store::write_blob(&digest, &mut file, MAX_BLOB).map_err(|e| Reply::error(500, e.to_string()))?;
    }
    let stored = store::blob_path(&digest).map_err(|e| Reply::error(500, e.to_string()))?;
    gguf_layer(&stored, &digest)
}

/// Replaces the layer of `layer`'s media type (or adds it).
fn set_layer(layers: &mut Vec<Layer>, layer: Layer) {
    layers.retain(|l| l.media_type != layer.media_type);
    layers.push(layer);
}

/// Stores a new layer's bytes, noting it in the progress.
fn put(media_type: &str, bytes: &[u8], progress: &mut Vec<String>) -> Result<Layer, Reply> {
    let layer = store::put_blob(media_type, bytes).map_err(|e| Reply::error(500, e.to_string()))?;
    progress.push(format!("creating new layer sha256:{}", layer.digest));
    Ok(layer)
}

/// POST /api/create.
pub fn create(body: &[u8]) -> R {
    let m = parse_body(body)?;
    let name = name_field(&m)?;
    if store::ModelName::parse(&name).is_none() {
        return Err(Reply::error(400, format!("invalid model name: {name:?}")));
    }
    let stream = bool_field(&m, "stream")?.unwrap_or(true);
    let spec = spec_of(&m)?;
    let mut progress = Vec::new();
    let mut layers = base_layers(&spec, &mut progress)?;
    for l in &layers {
        progress.push(format!("using existing layer sha256:{}", l.digest));
    }
    if let Some(t) = &spec.template {
        ChatTemplate::go(t).map_err(|e| Reply::error(400, e))?;
        set_layer(&mut layers, put(media::TEMPLATE, t.as_bytes(), &mut progress)?);
    }
    if let Some(s) = &spec.system {
        set_layer(&mut layers, put(media::SYSTEM, s.as_bytes(), &mut progress)?);
    }
    for text in &spec.license {
        layers.push(put(media::LICENSE, text.as_bytes(), &mut progress)?);
    }
    if !spec.parameters.is_empty() {
        // The base model's parameters, overridden by the new ones.
        let mut params = base_params(&layers);
        params.extend(spec.parameters.clone());
        if let Some(bad) = params.keys().find(|k| !options::is_known(k)) {
            return Err(Reply::error(400, format!("unknown parameter '{bad}'")));
        }
        options::apply(Options::default(), Some(&Value::Object(params.clone()))).map_err(|e| Reply::error(400, e))?;
        set_layer(&mut layers, put(media::PARAMS, Value::Object(params).to_string().as_bytes(), &mut progress)?);
    }
    progress.push("writing manifest".into());
    store::write_manifest(&name, &layers, &config_for(&layers)?).map_err(|e| store_error(&name, e))?;
    progress.push("success".into());
    if !stream {
        return Ok(Reply::json(200, &json!({ "status": "success" })));
    }
    let lines: Vec<u8> = progress.iter().flat_map(|p| ndjson(&json!({ "status": p }))).collect();
    Ok(Reply::Full { status: 200, content_type: "application/x-ndjson", body: lines })
}

/// The PARAMETERs of the layers' params blob, if any.
fn base_params(layers: &[Layer]) -> Map<String, Value> {
    let Some(l) = layers.iter().find(|l| l.media_type == media::PARAMS) else { return Map::new() };
    let text = store::blob_path(&format!("sha256:{}", l.digest)).ok().and_then(|p| std::fs::read_to_string(p).ok());
    match text.and_then(|t| serde_json::from_str(&t).ok()) {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

/// The config blob Ollama writes beside the layers: the model's format and family.
fn config_for(layers: &[Layer]) -> Result<Value, Reply> {
    let model =
        layers.iter().find(|l| l.media_type == media::MODEL).ok_or_else(|| Reply::error(400, "no model layer"))?;
    let path = store::blob_path(&format!("sha256:{}", model.digest)).map_err(|e| Reply::error(500, e.to_string()))?;
    let file = Gguf::open(&path).map_err(|e| Reply::error(400, format!("not a usable GGUF file: {e}")))?;
    let d = catalog::details_of(&file);
    Ok(json!({
        "model_format": "gguf",
        "model_family": d["family"],
        "model_families": d["families"],
        "model_type": d["parameter_size"],
        "file_type": d["quantization_level"],
        "architecture": std::env::consts::ARCH,
        "os": std::env::consts::OS,
        "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|l| format!("sha256:{}", l.digest)).collect::<Vec<_>>() },
    }))
}
