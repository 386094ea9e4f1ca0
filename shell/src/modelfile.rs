//! Modelfiles (`turbine create NAME -f Modelfile`, and `/api/create`'s legacy `modelfile`):
//! FROM, PARAMETER, TEMPLATE, SYSTEM, LICENSE; values bare to the end of the line,
//! `"quoted"`, or `"""on several lines"""`; `#` comments.

use serde_json::{Map, Value};

/// What a Modelfile asks for, in `/api/create`'s terms.
#[derive(Debug, Default, PartialEq)]
pub struct Modelfile {
    /// A model name, a GGUF path (for the client to upload) or `@sha256:<hex>`.
    pub from: Option<String>,
    pub template: Option<String>,
    pub system: Option<String>,
    pub license: Vec<String>,
    /// Option name → value (`stop` gathers its values in a list).
    pub parameters: Map<String, Value>,
}

/// Largest Modelfile accepted.
pub const MAX_MODELFILE: usize = 1 << 20;

impl Modelfile {
    pub fn parse(text: &str) -> Result<Modelfile, String> {
        if text.len() > MAX_MODELFILE {
            return Err(format!("Modelfile: more than {MAX_MODELFILE} bytes"));
        }
        let mut mf = Modelfile::default();
        let mut rest = text;
        let mut line_no = 0;
        while !rest.is_empty() {
            line_no += 1;
            let (line, after) = rest.split_once('\n').unwrap_or((rest, ""));
            rest = after;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (command, args) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let args = args.trim_start();
            // A `"""` value may run over several lines: the rest of them come from `rest`.
            let value = if let Some(open) = args.strip_prefix("\"\"\"") {
                if let Some(end) = open.find("\"\"\"") {
                    open[..end].to_string()
                } else {
                    let end = rest.find("\"\"\"").ok_or(format!("Modelfile line {line_no}: unterminated \"\"\""))?;
                    let value = format!("{open}\n{}", &rest[..end]);
                    line_no += rest[..end].matches('\n').count();
                    // Anything after the closing quotes on its line is ignored.
                    rest = rest[end + 3..].split_once('\n').map_or("", |(_, next)| next);
                    value.strip_suffix('\n').map(str::to_string).unwrap_or(value)
                }
            } else {
                unquote(args)
            };
            match command.to_ascii_uppercase().as_str() {
                "FROM" => mf.from = Some(value),
                "TEMPLATE" => mf.template = Some(value),
                "SYSTEM" => mf.system = Some(value),
                "LICENSE" => mf.license.push(value),
                "PARAMETER" => {
                    let (name, v) = value
                        .split_once(char::is_whitespace)
                        .ok_or(format!("Modelfile line {line_no}: PARAMETER needs a name and a value"))?;
                    add_parameter(&mut mf.parameters, &name.to_ascii_lowercase(), &unquote(v.trim()));
                }
                "ADAPTER" | "MESSAGE" | "REQUIRES" => {
                    return Err(format!("Modelfile line {line_no}: {command} is not supported"));
                }
                other => return Err(format!("Modelfile line {line_no}: unknown command {other:?}")),
            }
        }
        if mf.from.is_none() {
            return Err("Modelfile: no FROM line".into());
        }
        Ok(mf)
    }
}

/// `"text"` → `text` (JSON escapes understood); anything else as it is.
fn unquote(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        if let Ok(v) = serde_json::from_str::<String>(s) {
            return v;
        }
        return s[1..s.len() - 1].to_string();
    }
    s.to_string()
}

/// Adds a PARAMETER: `stop` values gather in a list; numbers and booleans become JSON
/// numbers and booleans (the server checks each against the option's type).
pub fn add_parameter(params: &mut Map<String, Value>, name: &str, value: &str) {
    if name == "stop" {
        let list = params.entry("stop").or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(a) = list {
            a.push(Value::String(value.to_string()));
        }
        return;
    }
    let v = if let Ok(i) = value.parse::<i64>() {
        Value::from(i)
    } else if let Some(f) = value.parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
        Value::Number(f)
    } else if let Ok(b) = value.parse::<bool>() {
        Value::Bool(b)
    } else {
        Value::String(value.to_string())
    };
    params.insert(name.to_string(), v);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_the_commands_ollama_documents() {
        let mf = Modelfile::parse(
            "# a comment\nFROM gemma3:270m\nPARAMETER temperature 0.2\nparameter stop \"<end_of_turn>\"\nPARAMETER stop User:\n\
             PARAMETER num_ctx 2048\nSYSTEM \"\"\"You are\nterse.\"\"\"\nTEMPLATE \"\"\"{{ .System }}\n{{ .Prompt }}\"\"\"\nLICENSE MIT\n",
        )
        .unwrap();
        assert_eq!(mf.from.as_deref(), Some("gemma3:270m"));
        assert_eq!(mf.system.as_deref(), Some("You are\nterse."));
        assert_eq!(mf.template.as_deref(), Some("{{ .System }}\n{{ .Prompt }}"));
        assert_eq!(mf.license, vec!["MIT"]);
        assert_eq!(
            Value::Object(mf.parameters),
            json!({ "temperature": 0.2, "stop": ["<end_of_turn>", "User:"], "num_ctx": 2048 })
        );
        let one_line = Modelfile::parse("FROM ./m.gguf\nSYSTEM \"\"\"Be brief.\"\"\"\n").unwrap();
        assert_eq!(one_line.system.as_deref(), Some("Be brief."));
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        assert!(Modelfile::parse("PARAMETER temperature 1\n").unwrap_err().contains("FROM"));
        assert!(Modelfile::parse("FROM x\nADAPTER ./lora.gguf\n").unwrap_err().contains("ADAPTER"));
        assert!(Modelfile::parse("FROM x\nBOGUS 1\n").unwrap_err().contains("BOGUS"));
        assert!(Modelfile::parse("FROM x\nSYSTEM \"\"\"never closed\n").unwrap_err().contains("unterminated"));
        assert!(Modelfile::parse("FROM x\nPARAMETER lonely\n").is_err());
    }
}
