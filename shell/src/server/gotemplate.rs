//! Go `text/template`, the part of it Ollama's TEMPLATEs use: text with `{{ }}` actions
//! (`{{-`/`-}}` trim whitespace), comments, `if`/`else if`/`else`, `range` (with `$i, $v :=`,
//! `else`, `break`, `continue`), `with`, variables (`$`, `$x :=`, `$x =`), fields (`.A.B`,
//! `$x.A`), pipelines with `|` and parentheses, literals, and the functions `and or not eq
//! ne lt le gt ge len index slice print printf json currentDate`. Data is JSON: the
//! template sees objects with Ollama's field names (`.Messages`, `.Role`, `.Content`...).
//!
//! Templates come from model files and users: parsing and running them is bounded
//! (nesting depth, output size) and every failure is an error, never a panic.

use serde_json::Value;
use std::collections::HashMap;

/// Deepest nesting of blocks and parentheses accepted.
const MAX_DEPTH: usize = 64;
/// Largest output a template may produce.
const MAX_OUTPUT: usize = 64 << 20;

#[derive(Debug, Clone)]
enum Node {
    Text(String),
    /// `{{ pipeline }}`: its value is printed (unless it declares or assigns a variable).
    Action(Pipeline),
    /// `if` / `else if` branches, then the `else` body.
    If(Vec<(Pipeline, Vec<Node>)>, Vec<Node>),
    Range {
        key: Option<String>,
        value: Option<String>,
        over: Pipeline,
        body: Vec<Node>,
        otherwise: Vec<Node>,
    },
    With {
        pipe: Pipeline,
        body: Vec<Node>,
        otherwise: Vec<Node>,
    },
    Break,
    Continue,
}

#[derive(Debug, Clone)]
struct Pipeline {
    /// `$x :=` (declare) or `$x =` (assign).
    set: Option<(String, bool)>,
    /// Commands joined by `|`: each one's result is the last argument of the next.
    cmds: Vec<Vec<Arg>>,
}

#[derive(Debug, Clone)]
enum Arg {
    /// `.A.B` (empty: the dot itself).
    Field(Vec<String>),
    /// `$x.A.B` (`$` is the root).
    Var(String, Vec<String>),
    Lit(Value),
    Func(String),
    Sub(Box<Pipeline>),
}

/// A parsed template.
#[derive(Debug, Clone)]
pub struct Template {
    nodes: Vec<Node>,
}

impl Template {
    pub fn parse(source: &str) -> Result<Template, String> {
        let segments = split(source)?;
        let mut pos = 0;
        let (nodes, end) = parse_nodes(&segments, &mut pos, 0)?;
        match end {
            None => Ok(Template { nodes }),
            Some(kw) => Err(format!("template: unexpected {{{{{kw}}}}}")),
        }
    }

    /// Whether the template reads `.Field` anywhere (e.g. `Messages`, `Suffix`).
    pub fn uses(&self, field: &str) -> bool {
        fn in_pipe(p: &Pipeline, f: &str) -> bool {
            p.cmds.iter().flatten().any(|a| match a {
                Arg::Field(path) | Arg::Var(_, path) => path.first().is_some_and(|x| x == f),
                Arg::Sub(p) => in_pipe(p, f),
                _ => false,
            })
        }
        fn in_nodes(nodes: &[Node], f: &str) -> bool {
            nodes.iter().any(|n| match n {
                Node::Text(_) | Node::Break | Node::Continue => false,
                Node::Action(p) => in_pipe(p, f),
                Node::If(branches, otherwise) => {
                    branches.iter().any(|(p, b)| in_pipe(p, f) || in_nodes(b, f)) || in_nodes(otherwise, f)
                }
                Node::Range { over, body, otherwise, .. } => {
                    in_pipe(over, f) || in_nodes(body, f) || in_nodes(otherwise, f)
                }
                Node::With { pipe, body, otherwise } => in_pipe(pipe, f) || in_nodes(body, f) || in_nodes(otherwise, f),
            })
        }
        in_nodes(&self.nodes, field)
    }

    /// Runs the template on `data`.
    pub fn render(&self, data: &Value) -> Result<String, String> {
        self.run(data, None)
    }

    /// Runs the template, stopping after the first action that reads `.Response` (what
    /// Ollama does for the last turn of a template without `.Messages`).
    pub fn render_until_response(&self, data: &Value) -> Result<String, String> {
        self.run(data, Some("Response"))
    }

    fn run(&self, data: &Value, cut_after: Option<&str>) -> Result<String, String> {
        let mut ex = Exec {
            out: String::new(),
            scopes: vec![HashMap::from([("$".to_string(), data.clone())])],
            cut_after,
            halted: false,
        };
        ex.nodes(&self.nodes, data, 0)?;
        Ok(ex.out)
    }
}

/// A piece of source: text, or an action's inside with its trim markers applied.
#[derive(Debug)]
enum Segment {
    Text(String),
    Action(String),
}

/// Splits the source into text and actions, applying `{{-` and `-}}`.
fn split(src: &str) -> Result<Vec<Segment>, String> {
    let mut out = Vec::new();
    let mut rest = src;
    let mut trim_next = false;
    while let Some(open) = rest.find("{{") {
        let mut text = &rest[..open];
        if trim_next {
            text = text.trim_start_matches(is_space);
        }
        let after = &rest[open + 2..];
        let trim_before =
            after.starts_with("- ") || after.starts_with("-\t") || after.starts_with("-\n") || after.starts_with("-\r");
        if trim_before {
            text = text.trim_end_matches(is_space);
        }
        out.push(Segment::Text(text.to_string()));
        let body_start = if trim_before { 1 } else { 0 };
        let close = find_close(&after[body_start..]).ok_or("template: unclosed action")?;
        let mut inner = &after[body_start..body_start + close];
        trim_next = inner.ends_with(" -") || inner.ends_with("\t-") || inner.ends_with("\n-") || inner.ends_with("\r-");
        if trim_next {
            inner = &inner[..inner.len() - 1];
        }
        let inner = inner.trim();
        if !(inner.starts_with("/*") && inner.ends_with("*/")) {
            out.push(Segment::Action(inner.to_string()));
        }
        rest = &after[body_start + close + 2..];
    }
    let text = if trim_next { rest.trim_start_matches(is_space) } else { rest };
    out.push(Segment::Text(text.to_string()));
    Ok(out)
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// The offset of the `}}` closing an action, skipping quoted strings.
fn find_close(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 0;
    while i + 1 < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'`' => {
                i += 1;
                while i < b.len() && b[i] != b'`' {
                    i += 1;
                }
            }
            b'}' if b[i + 1] == b'}' => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

/// Parses nodes up to an `end`, `else` (returned with its remainder) or the source's end.
fn parse_nodes(segs: &[Segment], pos: &mut usize, depth: usize) -> Result<(Vec<Node>, Option<String>), String> {
    if depth > MAX_DEPTH {
        return Err("template: blocks nested too deeply".into());
    }
    let mut nodes = Vec::new();
    while let Some(seg) = segs.get(*pos) {
        *pos += 1;
        let action = match seg {
            Segment::Text(t) => {
                if !t.is_empty() {
                    nodes.push(Node::Text(t.clone()));
                }
                continue;
            }
            Segment::Action(a) => a,
        };
        let toks = lex(action)?;
        let (kw, rest) = match toks.first() {
            Some(Tok::Ident(k)) => (k.as_str(), &toks[1..]),
            _ => ("", &toks[..]),
        };
        match kw {
            "end" => return Ok((nodes, Some("end".into()))),
            "else" => return Ok((nodes, Some(format!("else {}", join(rest))))),
            "if" => nodes.push(parse_if(segs, pos, rest, depth)?),
            "range" | "with" => {
                let (body, end) = parse_nodes(segs, pos, depth + 1)?;
                let otherwise = match end.as_deref() {
                    Some("end") => Vec::new(),
                    Some("else ") => expect_end(parse_nodes(segs, pos, depth + 1)?)?,
                    other => return Err(format!("template: {kw} ended by {other:?}")),
                };
                if kw == "with" {
                    nodes.push(Node::With { pipe: parse_pipeline(rest, depth)?, body, otherwise });
                } else {
                    let (key, value, over) = range_vars(rest)?;
                    nodes.push(Node::Range { key, value, over: parse_pipeline(over, depth)?, body, otherwise });
                }
            }
            "break" => nodes.push(Node::Break),
            "continue" => nodes.push(Node::Continue),
            "define" | "template" | "block" => return Err(format!("template: {{{{{kw}}}}} is not supported")),
            _ => nodes.push(Node::Action(parse_pipeline(&toks, depth)?)),
        }
    }
    Ok((nodes, None))
}

fn expect_end((nodes, end): (Vec<Node>, Option<String>)) -> Result<Vec<Node>, String> {
    match end.as_deref() {
        Some("end") => Ok(nodes),
        other => Err(format!("template: expected {{{{end}}}}, found {other:?}")),
    }
}

/// `if` with its `else if` chain and `else`.
fn parse_if(segs: &[Segment], pos: &mut usize, cond: &[Tok], depth: usize) -> Result<Node, String> {
    let mut branches = vec![];
    let mut cond = parse_pipeline(cond, depth)?;
    loop {
        let (body, end) = parse_nodes(segs, pos, depth + 1)?;
        branches.push((cond, body));
        match end.as_deref() {
            Some("end") => return Ok(Node::If(branches, Vec::new())),
            Some("else ") => return Ok(Node::If(branches, expect_end(parse_nodes(segs, pos, depth + 1)?)?)),
            Some(e) if e.starts_with("else if ") => {
                cond = parse_pipeline(&lex(&e["else if ".len()..])?, depth)?;
            }
            other => return Err(format!("template: if ended by {other:?}")),
        }
    }
}

/// `range $i, $v := pipeline`, `range $v := pipeline` or `range pipeline`.
fn range_vars(toks: &[Tok]) -> Result<(Option<String>, Option<String>, &[Tok]), String> {
    match toks {
        [Tok::Var(k, p1), Tok::Comma, Tok::Var(v, p2), Tok::Declare, rest @ ..] if p1.is_empty() && p2.is_empty() => {
            Ok((Some(k.clone()), Some(v.clone()), rest))
        }
        [Tok::Var(v, p), Tok::Declare, rest @ ..] if p.is_empty() => Ok((None, Some(v.clone()), rest)),
        _ => Ok((None, None, toks)),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Field(Vec<String>),
    Var(String, Vec<String>),
    Lit(Value),
    Open,
    Close,
    Pipe,
    Comma,
    Declare,
    Assign,
}

fn join(toks: &[Tok]) -> String {
    // Re-lexable text of an `else ...` remainder (only `if <pipeline>` follows an else).
    toks.iter()
        .map(|t| match t {
            Tok::Ident(s) => s.clone(),
            Tok::Field(p) => format!(".{}", p.join(".")),
            Tok::Var(v, p) => std::iter::once(v.clone()).chain(p.iter().cloned()).collect::<Vec<_>>().join("."),
            Tok::Lit(v) => v.to_string(),
            Tok::Open => "(".into(),
            Tok::Close => ")".into(),
            Tok::Pipe => "|".into(),
            Tok::Comma => ",".into(),
            Tok::Declare => ":=".into(),
            Tok::Assign => "=".into(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let b = s.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    let name_end = |mut j: usize| {
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
            j += 1;
        }
        j
    };
    // `.A.B` after a variable or at the start of a field.
    let path = |mut j: usize| -> (Vec<String>, usize) {
        let mut p = Vec::new();
        while j < b.len() && b[j] == b'.' {
            let end = name_end(j + 1);
            if end == j + 1 {
                break;
            }
            p.push(s[j + 1..end].to_string());
            j = end;
        }
        (p, j)
    };
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\r' | b'\n' => i += 1,
            b'(' => (toks.push(Tok::Open), i += 1).1,
            b')' => (toks.push(Tok::Close), i += 1).1,
            b'|' => (toks.push(Tok::Pipe), i += 1).1,
            b',' => (toks.push(Tok::Comma), i += 1).1,
            b':' if b.get(i + 1) == Some(&b'=') => (toks.push(Tok::Declare), i += 2).1,
            b'=' => (toks.push(Tok::Assign), i += 1).1,
            b'.' => {
                let (p, j) = path(i);
                toks.push(Tok::Field(p));
                i = if j == i { i + 1 } else { j };
            }
            b'$' => {
                let end = name_end(i + 1);
                let (p, j) = path(end);
                toks.push(Tok::Var(s[i..end].to_string(), p));
                i = j;
            }
            b'"' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                let lit = s.get(i..=j).ok_or("template: unterminated string")?;
                let v: String = serde_json::from_str(lit).map_err(|e| format!("template: bad string {lit}: {e}"))?;
                toks.push(Tok::Lit(Value::String(v)));
                i = j + 1;
            }
            b'`' => {
                let end = s[i + 1..].find('`').ok_or("template: unterminated raw string")? + i + 1;
                toks.push(Tok::Lit(Value::String(s[i + 1..end].to_string())));
                i = end + 1;
            }
            b'-' | b'0'..=b'9' => {
                let mut j = i + 1;
                while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'.' || b[j] == b'e' || b[j] == b'-') {
                    j += 1;
                }
                let n: f64 = s[i..j].parse().map_err(|_| format!("template: bad number {}", &s[i..j]))?;
                toks.push(Tok::Lit(serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)));
                i = j;
            }
            _ if c.is_ascii_alphabetic() || c == b'_' => {
                let end = name_end(i);
                let word = &s[i..end];
                toks.push(match word {
                    "true" => Tok::Lit(Value::Bool(true)),
                    "false" => Tok::Lit(Value::Bool(false)),
                    "nil" => Tok::Lit(Value::Null),
                    _ => Tok::Ident(word.to_string()),
                });
                i = end;
            }
            _ => return Err(format!("template: unexpected {:?} in {{{{{s}}}}}", c as char)),
        }
    }
    Ok(toks)
}

/// `[$x :=|=] cmd | cmd ...`
fn parse_pipeline(toks: &[Tok], depth: usize) -> Result<Pipeline, String> {
    if depth > MAX_DEPTH {
        return Err("template: expression nested too deeply".into());
    }
    let (set, toks) = match toks {
        [Tok::Var(v, p), Tok::Declare, rest @ ..] if p.is_empty() => (Some((v.clone(), true)), rest),
        [Tok::Var(v, p), Tok::Assign, rest @ ..] if p.is_empty() => (Some((v.clone(), false)), rest),
        _ => (None, toks),
    };
    let mut cmds = vec![Vec::new()];
    let mut i = 0;
    while i < toks.len() {
        let arg = match &toks[i] {
            Tok::Pipe => {
                cmds.push(Vec::new());
                i += 1;
                continue;
            }
            Tok::Open => {
                let close = matching_close(toks, i)?;
                let inner = parse_pipeline(&toks[i + 1..close], depth + 1)?;
                i = close;
                Arg::Sub(Box::new(inner))
            }
            Tok::Field(p) => Arg::Field(p.clone()),
            Tok::Var(v, p) => Arg::Var(v.clone(), p.clone()),
            Tok::Lit(v) => Arg::Lit(v.clone()),
            Tok::Ident(f) => Arg::Func(f.clone()),
            t => return Err(format!("template: unexpected {t:?}")),
        };
        if let Some(cmd) = cmds.last_mut() {
            cmd.push(arg);
        }
        i += 1;
    }
    if cmds.iter().any(Vec::is_empty) {
        return Err("template: empty command".into());
    }
    Ok(Pipeline { set, cmds })
}

fn matching_close(toks: &[Tok], open: usize) -> Result<usize, String> {
    let mut depth = 0;
    for (j, t) in toks.iter().enumerate().skip(open) {
        match t {
            Tok::Open => depth += 1,
            Tok::Close => {
                depth -= 1;
                if depth == 0 {
                    return Ok(j);
                }
            }
            _ => {}
        }
    }
    Err("template: unclosed parenthesis".into())
}

enum Flow {
    Normal,
    Break,
    Continue,
}

struct Exec<'a> {
    out: String,
    /// Variables, innermost scope last; `$` is the root data.
    scopes: Vec<HashMap<String, Value>>,
    cut_after: Option<&'a str>,
    halted: bool,
}

/// Go's truth: false, 0, nil, and empty strings, arrays and objects are false.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn field(mut v: &Value, path: &[String]) -> Value {
    for p in path {
        match v.get(p) {
            Some(x) => v = x,
            None => return Value::Null,
        }
    }
    v.clone()
}

fn print(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

fn num(v: &Value) -> Result<f64, String> {
    v.as_f64().ok_or_else(|| format!("template: {v} is not a number"))
}

fn compare(a: &Value, b: &Value) -> Result<std::cmp::Ordering, String> {
    match (a, b) {
        (Value::String(x), Value::String(y)) => Ok(x.cmp(y)),
        _ => num(a)?.partial_cmp(&num(b)?).ok_or_else(|| "template: cannot compare NaN".into()),
    }
}

fn equal(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn index_of(i: &Value) -> Result<usize, String> {
    let n = num(i)?;
    if n < 0.0 || n.fract() != 0.0 {
        return Err(format!("template: bad index {i}"));
    }
    Ok(n as usize)
}

impl Exec<'_> {
    fn var(&self, name: &str) -> Result<Value, String> {
        self.scopes
            .iter()
            .rev()
            .find_map(|s| s.get(name))
            .cloned()
            .ok_or_else(|| format!("template: undefined variable {name}"))
    }

    fn nodes(&mut self, nodes: &[Node], dot: &Value, depth: usize) -> Result<Flow, String> {
        for n in nodes {
            if self.halted {
                return Ok(Flow::Normal);
            }
            match self.node(n, dot, depth)? {
                Flow::Normal => {}
                flow => return Ok(flow),
            }
            if self.out.len() > MAX_OUTPUT {
                return Err("template: output too large".into());
            }
        }
        Ok(Flow::Normal)
    }

    /// Runs `body` in a scope of its own.
    fn scoped(
        &mut self,
        body: &[Node],
        dot: &Value,
        depth: usize,
        vars: HashMap<String, Value>,
    ) -> Result<Flow, String> {
        self.scopes.push(vars);
        let flow = self.nodes(body, dot, depth + 1);
        self.scopes.pop();
        flow
    }

    fn node(&mut self, n: &Node, dot: &Value, depth: usize) -> Result<Flow, String> {
        match n {
            Node::Text(t) => self.out.push_str(t),
            Node::Break => return Ok(Flow::Break),
            Node::Continue => return Ok(Flow::Continue),
            Node::Action(p) => {
                let v = self.pipeline(p, dot, depth)?;
                if p.set.is_none() {
                    self.out.push_str(&print(&v));
                }
                if self.cut_after.is_some_and(|f| {
                    p.cmds.iter().flatten().any(|a| matches!(a, Arg::Field(x) if x.first().is_some_and(|y| y == f)))
                }) {
                    self.halted = true;
                }
            }
            Node::If(branches, otherwise) => {
                for (cond, body) in branches {
                    if truthy(&self.pipeline(cond, dot, depth)?) {
                        return self.scoped(body, dot, depth, HashMap::new());
                    }
                }
                return self.scoped(otherwise, dot, depth, HashMap::new());
            }
            Node::With { pipe, body, otherwise } => {
                let v = self.pipeline(pipe, dot, depth)?;
                return if truthy(&v) {
                    self.scoped(body, &v, depth, HashMap::new())
                } else {
                    self.scoped(otherwise, dot, depth, HashMap::new())
                };
            }
            Node::Range { key, value, over, body, otherwise } => {
                let items: Vec<(Value, Value)> = match self.pipeline(over, dot, depth)? {
                    Value::Array(a) => a.into_iter().enumerate().map(|(i, v)| (Value::from(i), v)).collect(),
                    Value::Object(o) => {
                        let mut kv: Vec<_> = o.into_iter().map(|(k, v)| (Value::String(k), v)).collect();
                        kv.sort_by(|a, b| a.0.as_str().cmp(&b.0.as_str()));
                        kv
                    }
                    Value::Null => Vec::new(),
                    other => return Err(format!("template: cannot range over {other}")),
                };
                if items.is_empty() {
                    return self.scoped(otherwise, dot, depth, HashMap::new());
                }
                for (k, v) in items {
                    let mut vars = HashMap::new();
                    match (key, value) {
                        (Some(kn), Some(vn)) => {
                            vars.insert(kn.clone(), k);
                            vars.insert(vn.clone(), v.clone());
                        }
                        (None, Some(vn)) => {
                            vars.insert(vn.clone(), v.clone());
                        }
                        _ => {}
                    }
                    match self.scoped(body, &v, depth, vars)? {
                        Flow::Break => break,
                        Flow::Normal | Flow::Continue => {}
                    }
                    if self.halted {
                        break;
                    }
                }
            }
        }
        Ok(Flow::Normal)
    }

    fn pipeline(&mut self, p: &Pipeline, dot: &Value, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err("template: evaluation nested too deeply".into());
        }
        let mut last: Option<Value> = None;
        for cmd in &p.cmds {
            last = Some(self.command(cmd, dot, last.take(), depth)?);
        }
        let v = last.unwrap_or(Value::Null);
        if let Some((name, declare)) = &p.set {
            if *declare {
                if let Some(scope) = self.scopes.last_mut() {
                    scope.insert(name.clone(), v.clone());
                }
            } else {
                let scope = self.scopes.iter_mut().rev().find(|s| s.contains_key(name));
                *scope
                    .ok_or_else(|| format!("template: undefined variable {name}"))?
                    .get_mut(name)
                    .ok_or("template: variable")? = v.clone();
            }
        }
        Ok(v)
    }

    fn arg(&mut self, a: &Arg, dot: &Value, depth: usize) -> Result<Value, String> {
        match a {
            Arg::Field(p) => Ok(field(dot, p)),
            Arg::Var(v, p) => Ok(field(&self.var(v)?, p)),
            Arg::Lit(v) => Ok(v.clone()),
            Arg::Sub(p) => self.pipeline(p, dot, depth + 1),
            Arg::Func(f) => self.call(f, &[], dot, depth),
        }
    }

    /// One command: a function call with arguments, or a single value; `piped` (the
    /// previous command's result) is its last argument.
    fn command(&mut self, cmd: &[Arg], dot: &Value, piped: Option<Value>, depth: usize) -> Result<Value, String> {
        match cmd {
            [Arg::Func(f), rest @ ..] => {
                let mut args = rest.to_vec();
                if let Some(v) = piped {
                    args.push(Arg::Lit(v));
                }
                self.call(f, &args, dot, depth)
            }
            [single] if piped.is_none() => self.arg(single, dot, depth),
            _ => Err("template: a value cannot take arguments".into()),
        }
    }

    fn call(&mut self, f: &str, args: &[Arg], dot: &Value, depth: usize) -> Result<Value, String> {
        // `and` and `or` stop at the first deciding argument, as Go's do.
        if f == "and" || f == "or" {
            let mut last = Value::Null;
            for a in args {
                last = self.arg(a, dot, depth)?;
                if truthy(&last) != (f == "and") {
                    return Ok(last);
                }
            }
            return Ok(last);
        }
        let v: Vec<Value> = args.iter().map(|a| self.arg(a, dot, depth)).collect::<Result<_, _>>()?;
        let want = |n: usize| if v.len() == n { Ok(()) } else { Err(format!("template: {f} takes {n} arguments")) };
        Ok(match f {
            "not" => {
                want(1)?;
                Value::Bool(!truthy(&v[0]))
            }
            "eq" => {
                let (first, rest) = v.split_first().ok_or("template: eq needs arguments")?;
                Value::Bool(rest.iter().any(|x| equal(first, x)))
            }
            "ne" => {
                want(2)?;
                Value::Bool(!equal(&v[0], &v[1]))
            }
            "lt" | "le" | "gt" | "ge" => {
                want(2)?;
                let o = compare(&v[0], &v[1])?;
                Value::Bool(match f {
                    "lt" => o.is_lt(),
                    "le" => o.is_le(),
                    "gt" => o.is_gt(),
                    _ => o.is_ge(),
                })
            }
            "len" => {
                want(1)?;
                Value::from(match &v[0] {
                    Value::Array(a) => a.len(),
                    Value::Object(o) => o.len(),
                    Value::String(s) => s.len(),
                    Value::Null => 0,
                    other => return Err(format!("template: len of {other}")),
                })
            }
            "index" => {
                let (base, keys) = v.split_first().ok_or("template: index needs arguments")?;
                let mut cur = base.clone();
                for k in keys {
                    cur = match (&cur, k) {
                        (Value::Array(a), _) => a.get(index_of(k)?).cloned().ok_or("template: index out of range")?,
                        (Value::Object(o), Value::String(s)) => o.get(s).cloned().unwrap_or(Value::Null),
                        _ => return Err(format!("template: cannot index {cur} with {k}")),
                    };
                }
                cur
            }
            "slice" => {
                let (base, bounds) = v.split_first().ok_or("template: slice needs arguments")?;
                let len = match base {
                    Value::Array(a) => a.len(),
                    Value::String(s) => s.len(),
                    other => return Err(format!("template: cannot slice {other}")),
                };
                let lo = bounds.first().map(index_of).transpose()?.unwrap_or(0);
                let hi = bounds.get(1).map(index_of).transpose()?.unwrap_or(len);
                if lo > hi || hi > len {
                    return Err(format!("template: slice [{lo}:{hi}] out of range of {len}"));
                }
                match base {
                    Value::Array(a) => Value::Array(a[lo..hi].to_vec()),
                    Value::String(s) => {
                        Value::String(s.get(lo..hi).ok_or("template: slice inside a character")?.to_string())
                    }
                    _ => Value::Null,
                }
            }
            "print" => Value::String(v.iter().map(print).collect::<Vec<_>>().join("")),
            "printf" => Value::String(printf(&v)?),
            "json" => {
                want(1)?;
                Value::String(v[0].to_string())
            }
            "currentDate" => Value::String(today()),
            other => return Err(format!("template: function {other:?} not defined")),
        })
    }
}

/// Go's printf for `%s %d %v %q %%`.
fn printf(v: &[Value]) -> Result<String, String> {
    let (fmt, args) = v.split_first().ok_or("template: printf needs a format")?;
    let fmt = fmt.as_str().ok_or("template: printf format must be a string")?;
    let mut out = String::new();
    let mut args = args.iter();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some('s' | 'd' | 'v') => out.push_str(&print(args.next().unwrap_or(&Value::Null))),
            Some('q') => out.push_str(&Value::String(print(args.next().unwrap_or(&Value::Null))).to_string()),
            other => return Err(format!("template: printf verb %{} not supported", other.unwrap_or(' '))),
        }
    }
    Ok(out)
}

/// Today as `YYYY-MM-DD` (UTC).
fn today() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    super::host::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))[..10].to_string()
}

#[cfg(test)]
mod tests {
    use super::super::template::{ChatTemplate, Message, GEMMA_GO_TEMPLATE};
    use super::*;
    use serde_json::json;

    fn render(src: &str, data: Value) -> String {
        Template::parse(src).unwrap().render(&data).unwrap()
    }

    fn messages(m: &[Message]) -> Value {
        json!({ "Messages": m.iter().map(|m| json!({ "Role": m.role, "Content": m.content })).collect::<Vec<_>>() })
    }

    #[test]
    fn ollamas_gemma3_template_matches_the_built_in_renderer() {
        let t = Template::parse(GEMMA_GO_TEMPLATE).unwrap();
        assert!(t.uses("Messages") && !t.uses("Suffix"));
        let convs = [
            vec![Message::new("user", "Hi")],
            vec![
                Message::new("system", "Be brief."),
                Message::new("user", "Hi"),
                Message::new("assistant", "Hello!"),
                Message::new("user", "Bye"),
            ],
            vec![Message::new("user", "Hi"), Message::new("assistant", "Hel")],
            vec![],
        ];
        for c in convs {
            assert_eq!(t.render(&messages(&c)).unwrap(), ChatTemplate::Gemma.render(&c).unwrap(), "{c:?}");
        }
    }

    #[test]
    fn legacy_prompt_templates_and_the_response_cut() {
        let chatml = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}<|im_end|>\n";
        let t = Template::parse(chatml).unwrap();
        assert_eq!(
            t.render_until_response(&json!({ "System": "S", "Prompt": "Hi", "Response": "" })).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&json!({ "Prompt": "Hi", "Response": "Yo" })).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
        );
    }

    #[test]
    fn trims_variables_functions_and_pipes() {
        assert_eq!(render("a  {{- 1 -}}  b", json!({})), "a1b");
        assert_eq!(render("{{/* note */}}x{{ \"q\\\"\" }}", json!({})), "xq\"");
        assert_eq!(render("{{ $x := .A }}{{ $x }}{{ $x = \"B\" }}{{ $x }}", json!({ "A": "a" })), "aB");
        assert_eq!(
            render("{{ range $i, $v := .L }}{{ $i }}={{ $v }};{{ else }}none{{ end }}", json!({ "L": ["a", "b"] })),
            "0=a;1=b;"
        );
        assert_eq!(render("{{ range .L }}{{ . }}{{ else }}none{{ end }}", json!({ "L": [] })), "none");
        assert_eq!(
            render("{{ range .L }}{{ if eq . 2 }}{{ break }}{{ end }}{{ . }}{{ end }}", json!({ "L": [1, 2, 3] })),
            "1"
        );
        assert_eq!(render("{{ with .O }}{{ .K }}{{ end }}", json!({ "O": { "K": "v" } })), "v");
        assert_eq!(
            render("{{ if and .A (not .B) }}y{{ else if .B }}b{{ else }}n{{ end }}", json!({ "A": 1, "B": "" })),
            "y"
        );
        assert_eq!(render("{{ or .Missing \"default\" }}", json!({})), "default");
        assert_eq!(render("{{ len .L }} {{ index .L 1 }} {{ slice .L 1 }}", json!({ "L": ["a", "b"] })), "2 b [\"b\"]");
        assert_eq!(
            render("{{ .A | printf \"<%s>\" }} {{ json .O }}", json!({ "A": "x", "O": { "k": 1 } })),
            "<x> {\"k\":1}"
        );
        assert_eq!(render("{{ $.A }}{{ range .L }}{{ $.A }}{{ end }}", json!({ "A": "r", "L": [0, 1] })), "rrr");
        assert_eq!(render("{{ if lt 1 2 }}lt{{ end }}{{ if ne \"a\" \"b\" }}ne{{ end }}", json!({})), "ltne");
    }

    #[test]
    fn hostile_templates_fail_cleanly() {
        for bad in [
            "{{",
            "{{ if .A }}",
            "{{ end }}",
            "{{ nosuch 1 }}",
            "{{ (1 }}",
            "{{ \"x }}",
            "{{ define \"a\" }}{{ end }}",
            "{{ 1 2 }}",
        ] {
            let r = Template::parse(bad).and_then(|t| t.render(&json!({})));
            assert!(r.is_err(), "{bad:?} gave {r:?}");
        }
        let deep = "{{ if 1 }}".repeat(100) + &"{{ end }}".repeat(100);
        assert!(Template::parse(&deep).is_err());
        assert!(Template::parse("{{ slice .L 3 }}").unwrap().render(&json!({ "L": [1] })).is_err());
        assert!(Template::parse("{{ index .L 5 }}").unwrap().render(&json!({ "L": [1] })).is_err());
    }
}
