//! Request `options` with Ollama's names, types and defaults (`api.Options.FromMap`):
//! unknown keys are ignored, a value of the wrong type is a 400.

use serde_json::{Map, Value};
use turbine::engine::sampler::SamplerParams;

/// Ollama's options after validation.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    pub sampler: SamplerParams,
    /// None: no limit (Ollama's -1 and -2).
    pub num_predict: Option<usize>,
    pub num_ctx: usize,
    pub stop: Vec<String>,
}

/// Default context length: OLLAMA_CONTEXT_LENGTH, else 4096 (Ollama's tier without a
/// large GPU).
pub fn default_num_ctx() -> usize {
    std::env::var("OLLAMA_CONTEXT_LENGTH").ok().and_then(|s| s.trim().parse().ok()).filter(|&n| n > 0).unwrap_or(4096)
}

impl Default for Options {
    fn default() -> Self {
        Options {
            sampler: SamplerParams {
                temperature: 0.8,
                top_k: 40,
                top_p: 0.9,
                min_p: 0.0,
                typical_p: 1.0,
                repeat_penalty: 1.0,
                repeat_last_n: 64,
                presence_penalty: 0.0,
                frequency_penalty: 0.0,
                seed: None,
            },
            num_predict: None,
            num_ctx: default_num_ctx(),
            stop: Vec::new(),
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Int,
    Float,
    Bool,
    Strings,
}

/// Every option Ollama's Options and Runner structs accept (the ones we do not use are
/// still type-checked, as Ollama does).
const KNOWN: &[(&str, Kind)] = &[
    ("num_keep", Kind::Int),
    ("seed", Kind::Int),
    ("num_predict", Kind::Int),
    ("top_k", Kind::Int),
    ("top_p", Kind::Float),
    ("min_p", Kind::Float),
    ("typical_p", Kind::Float),
    ("repeat_last_n", Kind::Int),
    ("temperature", Kind::Float),
    ("repeat_penalty", Kind::Float),
    ("presence_penalty", Kind::Float),
    ("frequency_penalty", Kind::Float),
    ("stop", Kind::Strings),
    ("num_ctx", Kind::Int),
    ("num_batch", Kind::Int),
    ("num_gpu", Kind::Int),
    ("main_gpu", Kind::Int),
    ("use_mmap", Kind::Bool),
    ("num_thread", Kind::Int),
    ("draft_num_predict", Kind::Int),
    ("numa", Kind::Bool),
    ("low_vram", Kind::Bool),
    ("use_mlock", Kind::Bool),
    ("mirostat", Kind::Int),
    ("mirostat_tau", Kind::Float),
    ("mirostat_eta", Kind::Float),
    ("tfs_z", Kind::Float),
    ("penalize_newline", Kind::Bool),
];

/// Whether `key` is one of Ollama's options.
pub fn is_known(key: &str) -> bool {
    KNOWN.iter().any(|(k, _)| *k == key)
}

/// Applies an `options` object over `base`. Errors carry Ollama's messages.
pub fn apply(base: Options, options: Option<&Value>) -> Result<Options, String> {
    let mut o = base;
    let map: &Map<String, Value> = match options {
        None | Some(Value::Null) => return Ok(o),
        Some(Value::Object(m)) => m,
        Some(_) => return Err("options must be an object".into()),
    };
    for (key, val) in map {
        let Some(&(_, kind)) = KNOWN.iter().find(|(k, _)| k == key) else {
            eprintln!("turbine serve: invalid option provided: {key}");
            continue;
        };
        if val.is_null() {
            continue;
        }
        match kind {
            Kind::Int => {
                let n = val.as_i64().or_else(|| val.as_f64().map(|f| f as i64));
                let n = n.ok_or_else(|| format!("option \"{key}\" must be of type integer"))?;
                match key.as_str() {
                    "seed" => o.sampler.seed = (n >= 0).then_some(n as u64),
                    "num_predict" => o.num_predict = usize::try_from(n).ok(),
                    "top_k" => o.sampler.top_k = n.clamp(i32::MIN.into(), i32::MAX.into()) as i32,
                    "repeat_last_n" => o.sampler.repeat_last_n = n.clamp(-1, i32::MAX.into()) as i32,
                    "num_ctx" => o.num_ctx = usize::try_from(n).unwrap_or(0).max(4),
                    _ => {}
                }
            }
            Kind::Float => {
                let f = val.as_f64().ok_or_else(|| format!("option \"{key}\" must be of type float32"))? as f32;
                let s = &mut o.sampler;
                match key.as_str() {
                    "temperature" => s.temperature = f,
                    "top_p" => s.top_p = f,
                    "min_p" => s.min_p = f,
                    "typical_p" => s.typical_p = f,
                    "repeat_penalty" => s.repeat_penalty = f,
                    "presence_penalty" => s.presence_penalty = f,
                    "frequency_penalty" => s.frequency_penalty = f,
                    _ => {}
                }
            }
            Kind::Bool => {
                val.as_bool().ok_or_else(|| format!("option \"{key}\" must be of type boolean"))?;
            }
            Kind::Strings => {
                let arr = val.as_array().ok_or_else(|| format!("option \"{key}\" must be of type array"))?;
                let strs = arr
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| format!("option \"{key}\" must be of an array of strings"))?;
                o.stop = strs;
            }
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_types_and_defaults() {
        let d = Options::default();
        assert_eq!((d.sampler.temperature, d.sampler.top_k, d.sampler.top_p), (0.8, 40, 0.9));
        assert_eq!(d.num_predict, None);
        let o = apply(
            d.clone(),
            Some(&json!({"temperature": 0, "top_k": 5.0, "num_predict": 8, "seed": 42, "stop": ["x"],
                         "num_ctx": 256, "unknown": "ignored", "use_mmap": true, "repeat_penalty": null})),
        )
        .unwrap();
        assert_eq!(o.sampler.temperature, 0.0);
        assert_eq!(o.sampler.top_k, 5);
        assert_eq!(o.num_predict, Some(8));
        assert_eq!(o.sampler.seed, Some(42));
        assert_eq!(o.stop, vec!["x".to_string()]);
        assert_eq!(o.num_ctx, 256);
        assert_eq!(apply(d.clone(), Some(&json!({"num_predict": -1}))).unwrap().num_predict, None);
        assert_eq!(apply(d.clone(), Some(&json!({"seed": -1}))).unwrap().sampler.seed, None);
        let err = |v: Value| apply(d.clone(), Some(&v)).unwrap_err();
        assert_eq!(err(json!({"temperature": "hot"})), "option \"temperature\" must be of type float32");
        assert_eq!(err(json!({"top_k": "5"})), "option \"top_k\" must be of type integer");
        assert_eq!(err(json!({"stop": "x"})), "option \"stop\" must be of type array");
        assert_eq!(err(json!({"stop": [1]})), "option \"stop\" must be of an array of strings");
        assert_eq!(err(json!({"use_mmap": 1})), "option \"use_mmap\" must be of type boolean");
    }
}
