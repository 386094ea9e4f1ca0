//! Embeddings: Ollama's `/api/embed` and legacy `/api/embeddings`, OpenAI's
//! `/v1/embeddings`. Each input's final hidden states are pooled (the file's pooling type,
//! else their mean) and scaled to unit length on the model's worker thread.

use super::*;

/// Most inputs one request may embed.
const MAX_INPUTS: usize = 4096;

/// `input` as Ollama takes it: a string or an array of strings (absent: none).
fn inputs(m: &Body, key: &str) -> Result<Vec<String>, Reply> {
    let list = match m.get(key) {
        None | Some(Value::Null) => Some(Vec::new()),
        Some(Value::String(s)) => Some(vec![s.clone()]),
        Some(Value::Array(a)) => a.iter().map(|v| v.as_str().map(str::to_string)).collect(),
        Some(_) => None,
    };
    let list = list.ok_or_else(|| {
        Reply::error(400, format!("invalid input type: {key} must be a string or an array of strings"))
    })?;
    if list.len() > MAX_INPUTS {
        return Err(Reply::error(400, format!("{} inputs, at most {MAX_INPUTS} per request", list.len())));
    }
    Ok(list)
}

/// `dimensions`: a positive whole number, or absent.
fn dimensions(m: &Body) -> Result<Option<usize>, Reply> {
    match m.get("dimensions") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => Ok(Some(n as usize)),
            _ => Err(Reply::error(400, "dimensions must be a positive integer")),
        },
    }
}

/// Keeps the first `dims` values and scales them back to unit length, as Ollama does.
fn shorten(mut v: Vec<f32>, dims: Option<usize>) -> Vec<f32> {
    if let Some(d) = dims.filter(|&d| d < v.len()) {
        v.truncate(d);
        turbine::engine::generate::normalize(&mut v);
    }
    v
}

/// Runs an embedding job on the model's worker.
fn run(cx: &Cx, entry: &Entry, inputs: Vec<String>, opts: JobOptions) -> Result<Done, Reply> {
    let worker = cx.state.models.get(entry).map_err(|m| Reply::error(503, m))?;
    wait_for_done(worker.submit(JobInput::Embed { inputs }, opts, &cx.meter))
}

/// The parts every embedding route shares: model, inputs, options.
fn request(m: &Body, input_key: &str) -> Result<(String, Entry, Vec<String>, JobOptions), Reply> {
    let (name, entry) = model_field(m)?;
    let texts = inputs(m, input_key)?;
    let keep_alive = keep_alive_field(m)?;
    let opts = job_options(m, model_options(&entry)?, keep_alive)?;
    Ok((name, entry, texts, opts))
}

/// POST /api/embed.
pub fn embed(cx: &Cx, body: &[u8]) -> R {
    let start = Instant::now();
    let m = parse_body(body)?;
    let dims = dimensions(&m)?;
    let (name, entry, texts, opts) = request(&m, "input")?;
    if texts.is_empty() {
        // Ollama loads the model and answers with no embeddings.
        run(cx, &entry, Vec::new(), opts)?;
        return Ok(Reply::json(200, &json!({ "model": name, "embeddings": [] })));
    }
    let done = run(cx, &entry, texts, opts)?;
    let embeddings: Vec<Vec<f32>> = done.embeddings.into_iter().map(|v| shorten(v, dims)).collect();
    Ok(Reply::json(
        200,
        &json!({
            "model": name, "embeddings": embeddings, "total_duration": ns(start.elapsed()),
            "load_duration": ns(done.load_duration), "prompt_eval_count": done.prompt_eval_count,
        }),
    ))
}

/// POST /api/embeddings (legacy: one `prompt`, one `embedding`).
pub fn embeddings(cx: &Cx, body: &[u8]) -> R {
    let m = parse_body(body)?;
    let (_, entry, texts, opts) = request(&m, "prompt")?;
    if texts.iter().all(String::is_empty) {
        run(cx, &entry, Vec::new(), opts)?;
        return Ok(Reply::json(200, &json!({ "embedding": [] })));
    }
    let done = run(cx, &entry, texts, opts)?;
    let embedding = done.embeddings.into_iter().next().unwrap_or_default();
    Ok(Reply::json(200, &json!({ "embedding": embedding })))
}

/// POST /v1/embeddings, with OpenAI's shapes and errors.
pub fn openai(cx: &Cx, body: &[u8]) -> R {
    openai_inner(cx, body).map_err(super::openai::reshape)
}

fn openai_inner(cx: &Cx, body: &[u8]) -> R {
    let m = parse_body(body)?;
    let dims = dimensions(&m)?;
    let base64 = match str_field(&m, "encoding_format")?.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(Reply::error(400, format!("invalid encoding_format {other:?}: use float or base64")))
        }
    };
    let (name, entry, texts, opts) = request(&m, "input")?;
    if texts.is_empty() {
        return Err(Reply::error(400, "invalid input: input is empty"));
    }
    let done = run(cx, &entry, texts, opts)?;
    let data: Vec<Value> = done
        .embeddings
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let v = shorten(v, dims);
            let embedding = match base64 {
                true => json!(base64_f32(&v)),
                false => json!(v),
            };
            json!({ "object": "embedding", "embedding": embedding, "index": i })
        })
        .collect();
    let n = done.prompt_eval_count;
    Ok(Reply::json(
        200,
        &json!({ "object": "list", "data": data, "model": name,
                 "usage": { "prompt_tokens": n, "total_tokens": n } }),
    ))
}

/// Little-endian f32 bytes in standard base64, as OpenAI's `encoding_format: base64`.
fn base64_f32(v: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for (k, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            let c = if k <= chunk.len() { ALPHABET[(n >> shift & 63) as usize] as char } else { '=' };
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        // 1.0f32 = 00 00 80 3f; 2.0 = 00 00 00 40.
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, 2.0]), "AACAPwAAAEA=");
        assert_eq!(base64_f32(&[]), "");
    }

    #[test]
    fn shortened_vectors_are_unit_length_again() {
        let v = shorten(vec![0.6, 0.8, 0.0, 0.0], Some(1));
        assert_eq!(v, vec![1.0]);
        assert_eq!(shorten(vec![0.6, 0.8], Some(5)), vec![0.6, 0.8]);
    }
}
