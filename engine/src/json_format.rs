//! Structured outputs: Ollama's `format` (`"json"`, or a JSON schema) as a byte-level
//! pushdown automaton that tells whether a text can still grow into an allowed document.
//! The sampler asks it about candidate tokens, most likely first, and takes only tokens
//! that keep the output a prefix of an allowed document; generation stops when the
//! document is complete.
//!
//! What is allowed, as llama.cpp's JSON grammars allow it: `"json"` is any JSON object;
//! a schema's objects list their properties in the schema's order, required ones always,
//! optional ones or not, and no others (an object schema without `properties` takes any
//! keys, with values of `additionalProperties` when that is a schema). Supported keywords:
//! `type` (one or a list), `properties`, `required`, `additionalProperties`, `items`,
//! `enum`, `const`, `anyOf`, `oneOf`, a one-element `allOf`, and `$ref` into `$defs` or
//! `definitions`; annotations (`title`, `description`, ...) and bounds (`minLength`,
//! `maximum`, ...) are ignored. Between tokens comes at most one space, or a newline and
//! up to [`MAX_INDENT`] spaces or tabs; an integer part has at most 16 digits, a fraction
//! 16 and an exponent 3 (llama.cpp's limits), so a model cannot pad or count forever.

use serde_json::Value;
use std::sync::Arc;

/// Most spaces or tabs after a newline between two JSON tokens.
pub const MAX_INDENT: usize = 20;

/// Most digits of an integer part and of a fraction; of an exponent.
const MAX_DIGITS: u8 = 16;
const MAX_EXP_DIGITS: u8 = 3;

/// The deepest nesting of objects and arrays, and of `$ref`s while reading a schema.
const MAX_DEPTH: usize = 64;

/// Alternatives followed at once (from `anyOf` and lists of types).
const MAX_ALTERNATIVES: usize = 64;

/// Most schema nodes (an `enum` value counts as one) one format may expand to (`$ref`s are
/// expanded where they are used, so a small schema could otherwise describe an enormous
/// tree).
const MAX_NODES: usize = 10_000;

/// Most work one byte may take across all alternatives, in [`Frame::weight`] units
/// (nested `anyOf`s that all reject a byte would otherwise be explored exhaustively).
/// Above [`MAX_NODES`], so the largest frame a schema can make always fits.
const MAX_STEPS_PER_BYTE: usize = 1 << 16;

/// What a value may be.
#[derive(Debug, PartialEq)]
enum Node {
    Any,
    Object {
        /// (name as it appears between the quotes, its schema, required).
        props: Vec<(Vec<u8>, Arc<Node>, bool)>,
        /// With no `props`: any key, its value of this schema.
        extra: Arc<Node>,
    },
    Array(Arc<Node>),
    String,
    Number,
    Integer,
    /// The JSON texts allowed (`enum`, `const`, booleans, null).
    Literals(Vec<Arc<[u8]>>),
    OneOf(Vec<Arc<Node>>),
}

/// A parsed `format`: what the output must be, from its start or from a marker on.
#[derive(Clone, Debug)]
pub struct JsonFormat {
    root: Arc<Node>,
    /// Tokens after which the document starts (a reasoning model's end of thinking);
    /// empty: from the first token.
    after: Vec<u32>,
}

/// Why a `format` cannot be used.
#[derive(Debug, Clone, PartialEq)]
pub struct FormatError(pub String);

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid format: {}", self.0)
    }
}

impl JsonFormat {
    /// `"json"`: any JSON object.
    pub fn any_object() -> JsonFormat {
        JsonFormat { root: Arc::new(Node::Object { props: Vec::new(), extra: Arc::new(Node::Any) }), after: Vec::new() }
    }

    /// From a request's `format` value: `"json"` or a schema object (null and `""`: none).
    pub fn from_request(format: &Value) -> Result<Option<JsonFormat>, FormatError> {
        match format {
            Value::Null => Ok(None),
            Value::String(s) if s.is_empty() => Ok(None),
            Value::String(s) if s == "json" => Ok(Some(JsonFormat::any_object())),
            Value::Object(_) => JsonFormat::schema(format).map(Some),
            _ => Err(FormatError("expected \"json\" or a JSON schema object".into())),
        }
    }

    /// From a JSON schema.
    pub fn schema(schema: &Value) -> Result<JsonFormat, FormatError> {
        let reader = SchemaReader { doc: schema, nodes: std::cell::Cell::new(0) };
        Ok(JsonFormat { root: Arc::new(reader.node(schema, 0)?), after: Vec::new() })
    }

    /// This format, applying only once the generated tokens end with `marker` (the end of
    /// a reasoning model's thinking): the reasoning before it is sampled freely.
    pub fn after(&self, marker: Vec<u32>) -> JsonFormat {
        JsonFormat { after: marker, ..self.clone() }
    }

    /// The tokens the document follows (empty: it starts at once).
    pub fn marker(&self) -> &[u32] {
        &self.after
    }

    /// The state before any output.
    pub fn start(&self) -> JsonState {
        JsonState { alts: vec![vec![Frame::Value(self.root.clone())]], ws: Ws::None }
    }
}

struct SchemaReader<'a> {
    doc: &'a Value,
    /// Nodes made so far.
    nodes: std::cell::Cell<usize>,
}

impl SchemaReader<'_> {
    fn node(&self, s: &Value, depth: usize) -> Result<Node, FormatError> {
        if depth > MAX_DEPTH {
            return Err(FormatError(format!("the schema nests (or refers) deeper than {MAX_DEPTH} levels")));
        }
        self.count(1)?;
        let s = match s {
            Value::Bool(true) => return Ok(Node::Any),
            Value::Object(o) => o,
            _ => return Err(FormatError(format!("a schema must be an object, not {s}"))),
        };
        if let Some(r) = s.get("$ref") {
            return self.node(self.resolve(r)?, depth + 1);
        }
        if let Some(c) = s.get("const") {
            return Ok(Node::Literals(vec![literal(c)]));
        }
        if let Some(e) = s.get("enum") {
            let Some(values) = e.as_array().filter(|v| !v.is_empty()) else {
                return Err(FormatError("\"enum\" must be a non-empty array".into()));
            };
            self.count(values.len())?;
            return Ok(Node::Literals(values.iter().map(literal).collect()));
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(list) = s.get(key) {
                let Some(list) = list.as_array().filter(|l| !l.is_empty()) else {
                    return Err(FormatError(format!("\"{key}\" must be a non-empty array")));
                };
                let nodes = list.iter().map(|n| self.node(n, depth + 1).map(Arc::new)).collect::<Result<_, _>>()?;
                return Ok(Node::OneOf(nodes));
            }
        }
        if let Some(all) = s.get("allOf") {
            return match all.as_array().map(Vec::as_slice) {
                Some([one]) => self.node(one, depth + 1),
                _ => Err(FormatError("\"allOf\" is supported with one schema only".into())),
            };
        }
        if s.contains_key("prefixItems") {
            return Err(FormatError("\"prefixItems\" (tuples) is not supported".into()));
        }
        match s.get("type") {
            None if s.contains_key("properties") => self.typed("object", s, depth),
            None if s.contains_key("items") => self.typed("array", s, depth),
            None => Ok(Node::Any),
            Some(Value::String(t)) => self.typed(t, s, depth),
            Some(Value::Array(types)) => {
                let nodes = types
                    .iter()
                    .map(|t| match t {
                        Value::String(t) => self.typed(t, s, depth).map(Arc::new),
                        _ => Err(FormatError(format!("unknown type {t}"))),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Node::OneOf(nodes))
            }
            Some(t) => Err(FormatError(format!("unknown type {t}"))),
        }
    }

    fn typed(&self, ty: &str, s: &serde_json::Map<String, Value>, depth: usize) -> Result<Node, FormatError> {
        Ok(match ty {
            "object" => self.object(s, depth)?,
            "array" => match s.get("items") {
                Some(items) => Node::Array(Arc::new(self.node(items, depth + 1)?)),
                None => Node::Array(Arc::new(Node::Any)),
            },
            "string" => Node::String,
            "number" => Node::Number,
            "integer" => Node::Integer,
            "boolean" => Node::Literals(vec![Arc::from(&b"true"[..]), Arc::from(&b"false"[..])]),
            "null" => Node::Literals(vec![Arc::from(&b"null"[..])]),
            other => return Err(FormatError(format!("unknown type \"{other}\""))),
        })
    }

    fn object(&self, s: &serde_json::Map<String, Value>, depth: usize) -> Result<Node, FormatError> {
        let required: Vec<&str> = match s.get("required") {
            None => Vec::new(),
            Some(Value::Array(r)) => r.iter().filter_map(Value::as_str).collect(),
            Some(_) => return Err(FormatError("\"required\" must be an array of names".into())),
        };
        let mut props = Vec::new();
        if let Some(p) = s.get("properties") {
            let Some(p) = p.as_object() else {
                return Err(FormatError("\"properties\" must be an object".into()));
            };
            for (name, schema) in p {
                let quoted = Value::String(name.clone()).to_string().into_bytes();
                let inner = quoted[1..quoted.len() - 1].to_vec();
                props.push((inner, Arc::new(self.node(schema, depth + 1)?), required.contains(&name.as_str())));
            }
        }
        let extra = match s.get("additionalProperties") {
            Some(Value::Object(_)) => Arc::new(self.node(&s["additionalProperties"], depth + 1)?),
            _ => Arc::new(Node::Any),
        };
        Ok(Node::Object { props, extra })
    }

    /// Counts `n` more parts of the expanded schema, refusing more than [`MAX_NODES`].
    fn count(&self, n: usize) -> Result<(), FormatError> {
        self.nodes.set(self.nodes.get().saturating_add(n));
        match self.nodes.get() > MAX_NODES {
            true => Err(FormatError(format!("the schema expands to more than {MAX_NODES} parts"))),
            false => Ok(()),
        }
    }

    /// The schema a local `$ref` (`#/$defs/Name`, `#/definitions/Name`, `#`) names.
    fn resolve(&self, r: &Value) -> Result<&Value, FormatError> {
        let Some(path) = r.as_str().and_then(|r| r.strip_prefix('#')) else {
            return Err(FormatError(format!("only local \"$ref\"s (#/...) are supported, not {r}")));
        };
        path.split('/').filter(|p| !p.is_empty()).try_fold(self.doc, |at, part| {
            let part = part.replace("~1", "/").replace("~0", "~");
            at.get(&part).ok_or_else(|| FormatError(format!("\"$ref\" {r} names nothing in the schema")))
        })
    }
}

/// A JSON value's text, as the model must write it.
fn literal(v: &Value) -> Arc<[u8]> {
    Arc::from(v.to_string().into_bytes())
}

/// Where in a number the text is (with the digits of the current part).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Num {
    Minus,
    Zero,
    Int(u8),
    Dot,
    Frac(u8),
    Exp,
    ExpSign,
    ExpDigits(u8),
}

impl Num {
    fn accepting(self) -> bool {
        matches!(self, Num::Zero | Num::Int(_) | Num::Frac(_) | Num::ExpDigits(_))
    }

    /// The state after `b`, or None when `b` does not continue the number.
    fn next(self, b: u8, integer: bool) -> Option<Num> {
        Some(match (self, b) {
            (Num::Minus, b'0') => Num::Zero,
            (Num::Minus, b'1'..=b'9') => Num::Int(1),
            (Num::Int(n), b'0'..=b'9') if n < MAX_DIGITS => Num::Int(n + 1),
            (Num::Zero | Num::Int(_), b'.') if !integer => Num::Dot,
            (Num::Dot, b'0'..=b'9') => Num::Frac(1),
            (Num::Frac(n), b'0'..=b'9') if n < MAX_DIGITS => Num::Frac(n + 1),
            (Num::Zero | Num::Int(_) | Num::Frac(_), b'e' | b'E') if !integer => Num::Exp,
            (Num::Exp, b'+' | b'-') => Num::ExpSign,
            (Num::Exp | Num::ExpSign, b'0'..=b'9') => Num::ExpDigits(1),
            (Num::ExpDigits(n), b'0'..=b'9') if n < MAX_EXP_DIGITS => Num::ExpDigits(n + 1),
            _ => return None,
        })
    }
}

/// Whitespace read since the last token.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ws {
    None,
    Space,
    /// A newline and this many spaces or tabs.
    Newline(usize),
}

impl Ws {
    fn next(self, b: u8) -> Option<Ws> {
        match (self, b) {
            (Ws::None, b' ') => Some(Ws::Space),
            (Ws::None, b'\n') => Some(Ws::Newline(0)),
            (Ws::Newline(n), b' ' | b'\t') if n < MAX_INDENT => Some(Ws::Newline(n + 1)),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum StrEsc {
    None,
    Backslash,
    /// Hex digits still to come after `\u`.
    Hex(u8),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ObjAt {
    /// After `{`: a key or `}`.
    Open,
    /// Inside a free key string.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value: `,` or `}`.
    Value,
    /// After `,`: a key.
    Comma,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ArrAt {
    Open,
    Value,
    Comma,
}

#[derive(Clone, Debug)]
enum Frame {
    /// A value of this schema is next (whitespace may come first).
    Value(Arc<Node>),
    Str(StrEsc),
    Num {
        at: Num,
        integer: bool,
    },
    /// `options` all begin with the `at` bytes read so far.
    Lit {
        options: Vec<Arc<[u8]>>,
        at: usize,
    },
    Obj {
        node: Arc<Node>,
        at: ObjAt,
        /// The first property that may still come.
        next: usize,
        /// The schema of the value after the key just read.
        pending: Option<Arc<Node>>,
    },
    /// A key of an object with properties: `read` bytes of it so far, one of `names`.
    Key {
        read: Vec<u8>,
        names: Vec<Vec<u8>>,
    },
    Arr {
        items: Arc<Node>,
        at: ArrAt,
    },
}

impl Frame {
    /// What copying or stepping this frame costs: one, plus the lists it carries.
    fn weight(&self) -> usize {
        match self {
            Frame::Lit { options, .. } => 1 + options.len(),
            Frame::Key { names, .. } => 1 + names.len(),
            _ => 1,
        }
    }
}

fn stack_weight(stack: &[Frame]) -> usize {
    stack.iter().map(Frame::weight).sum()
}

/// Takes `cost` from `budget`; false (and the budget emptied) when it is not there.
fn spend(budget: &mut usize, cost: usize) -> bool {
    if *budget < cost {
        *budget = 0;
        return false;
    }
    *budget -= cost;
    true
}

/// What a frame did with a byte.
enum Step {
    Consumed,
    Rejected,
    /// The frame's value ended before this byte, which goes to the frame below.
    EndedBefore,
    /// The frame's value ended with this byte.
    EndedWith,
    /// The byte opened a value: replace the top frame with this one.
    Became(Frame),
    /// The byte opened a value inside the top frame: push this.
    Opened(Frame),
    /// A value starts here: push this and feed it the byte.
    Retry(Frame),
}

/// The automaton's state: every way the text so far can be read (an `anyOf` may leave
/// several), each a stack of frames; empty when the document is complete.
#[derive(Clone, Debug)]
pub struct JsonState {
    alts: Vec<Vec<Frame>>,
    ws: Ws,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl JsonState {
    /// Whether the text so far plus `bytes` can still grow into an allowed document.
    pub fn accepts(&self, bytes: &[u8]) -> bool {
        let mut s = self.clone();
        bytes.iter().all(|&b| s.push(b))
    }

    /// [`JsonState::accepts`] within `budget` units of work ([`Frame::weight`]), which it
    /// spends: false once the budget is gone. Lets a caller bound its work over many
    /// candidates.
    pub fn accepts_within(&self, bytes: &[u8], budget: &mut usize) -> bool {
        // The copy costs what its frames weigh.
        if !spend(budget, self.alts.iter().map(|s| stack_weight(s)).sum()) {
            return false;
        }
        let mut s = self.clone();
        bytes.iter().all(|&b| {
            let mut left = (*budget).min(MAX_STEPS_PER_BYTE);
            let before = left;
            let ok = s.push_counted(b, &mut left);
            *budget -= before - left;
            ok
        })
    }

    /// Appends `bytes`; false (and the state unusable) when they break the document.
    pub fn push_all(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.push(b))
    }

    /// The document is complete (nothing more may follow).
    pub fn is_complete(&self) -> bool {
        self.alts.iter().any(Vec::is_empty)
    }

    /// The text so far is a whole document, though it could go on (a number at the top
    /// level): the model may end here.
    pub fn may_end(&self) -> bool {
        self.alts.iter().any(|stack| match stack.as_slice() {
            [] => true,
            [Frame::Num { at, .. }] => at.accepting(),
            [Frame::Lit { options, at }] => options.iter().any(|o| o.len() == *at),
            _ => false,
        })
    }

    /// Appends one byte.
    pub fn push(&mut self, b: u8) -> bool {
        self.push_counted(b, &mut MAX_STEPS_PER_BYTE.clone())
    }

    /// Appends one byte within `budget` units of work (spent).
    fn push_counted(&mut self, b: u8, budget: &mut usize) -> bool {
        let mut alts = Vec::new();
        let mut ws = Ws::None;
        for stack in std::mem::take(&mut self.alts) {
            // Whitespace between tokens follows the whitespace rule; in a string it is text.
            if is_ws(b) && ws_is_between(&stack) {
                match self.ws.next(b) {
                    Some(next) => ws = next,
                    None => continue,
                }
            }
            feed(stack, b, &mut alts, budget);
        }
        self.alts = alts;
        self.ws = ws;
        !self.alts.is_empty()
    }
}

/// Whether whitespace here falls between tokens (not inside a string).
fn ws_is_between(stack: &[Frame]) -> bool {
    !matches!(stack.last(), Some(Frame::Str(_) | Frame::Key { .. }))
}

/// One byte through one stack: the stacks it leads to (none when the byte is rejected;
/// several when a choice opens) go to `out`, within `budget` units of work.
fn feed(mut stack: Vec<Frame>, b: u8, out: &mut Vec<Vec<Frame>>, budget: &mut usize) {
    loop {
        if !spend(budget, stack.last().map_or(1, Frame::weight)) {
            return;
        }
        if let Some(Frame::Value(node)) = stack.last() {
            if let Node::OneOf(options) = &**node {
                let options = options.clone();
                stack.pop();
                for o in options {
                    if out.len() >= MAX_ALTERNATIVES || !spend(budget, 1 + stack_weight(&stack)) {
                        return;
                    }
                    let mut s = stack.clone();
                    s.push(Frame::Value(o));
                    feed(s, b, out, budget);
                }
                return;
            }
        }
        let Some(top) = stack.last_mut() else { return };
        match step(top, b) {
            Step::Consumed => break,
            Step::Rejected => return,
            Step::Became(f) => {
                *top = f;
                break;
            }
            Step::Opened(f) => {
                stack.push(f);
                break;
            }
            Step::Retry(f) => stack.push(f),
            Step::EndedWith => {
                value_ended(&mut stack);
                break;
            }
            Step::EndedBefore => value_ended(&mut stack),
        }
        if stack.len() > MAX_DEPTH {
            return;
        }
    }
    if stack.len() <= MAX_DEPTH && out.len() < MAX_ALTERNATIVES {
        out.push(stack);
    }
}

/// Pops the finished value and tells its container. A finished key of an object with
/// properties moves the object past that property.
fn value_ended(stack: &mut Vec<Frame>) {
    let done = stack.pop();
    match stack.last_mut() {
        Some(Frame::Obj { at, node, next, pending }) => {
            if let Some(Frame::Key { read, .. }) = done {
                if let Node::Object { props, .. } = &**node {
                    if let Some(i) = key_candidates(props, *next).find(|&i| props[i].0 == read) {
                        *next = i + 1;
                        *pending = Some(props[i].1.clone());
                    }
                }
                *at = ObjAt::Colon;
            } else if *at == ObjAt::Key {
                *at = ObjAt::Colon;
            } else {
                *at = ObjAt::Value;
            }
        }
        Some(Frame::Arr { at, .. }) => *at = ArrAt::Value,
        _ => {}
    }
}

/// The properties that may come next: from `next` up to the first required one.
fn key_candidates(props: &[(Vec<u8>, Arc<Node>, bool)], next: usize) -> impl Iterator<Item = usize> + '_ {
    let end = props[next.min(props.len())..].iter().position(|p| p.2).map_or(props.len(), |r| next + r + 1);
    next..end
}

fn step(top: &mut Frame, b: u8) -> Step {
    match top {
        Frame::Value(node) => open_value(node, b),
        Frame::Str(esc) => match (*esc, b) {
            (StrEsc::None, b'"') => Step::EndedWith,
            (StrEsc::None, b'\\') => {
                *esc = StrEsc::Backslash;
                Step::Consumed
            }
            (StrEsc::None, 0..=0x1f) => Step::Rejected,
            (StrEsc::None, _) => Step::Consumed,
            (StrEsc::Backslash, b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                *esc = StrEsc::None;
                Step::Consumed
            }
            (StrEsc::Backslash, b'u') => {
                *esc = StrEsc::Hex(4);
                Step::Consumed
            }
            (StrEsc::Hex(n), b) if b.is_ascii_hexdigit() => {
                *esc = if n == 1 { StrEsc::None } else { StrEsc::Hex(n - 1) };
                Step::Consumed
            }
            _ => Step::Rejected,
        },
        Frame::Num { at, integer } => match at.next(b, *integer) {
            Some(n) => {
                *at = n;
                Step::Consumed
            }
            None if at.accepting() => Step::EndedBefore,
            None => Step::Rejected,
        },
        Frame::Lit { options, at } => {
            let complete = options.iter().any(|o| o.len() == *at);
            options.retain(|o| o.get(*at) == Some(&b));
            if options.is_empty() {
                return if complete { Step::EndedBefore } else { Step::Rejected };
            }
            *at += 1;
            let only_complete = options.iter().all(|o| o.len() == *at);
            // A string literal (or anything else ending where nothing can follow) ends
            // with its last byte; a number literal may still grow.
            if only_complete && options.iter().all(|o| !o.last().is_some_and(u8::is_ascii_digit)) {
                Step::EndedWith
            } else {
                Step::Consumed
            }
        }
        Frame::Key { read, names } => key_byte(read, names, b),
        Frame::Obj { node, at, next, pending } => object_byte(node, at, next, pending, b),
        Frame::Arr { items, at } => match (*at, b) {
            (_, b) if is_ws(b) => Step::Consumed,
            (ArrAt::Open, b']') | (ArrAt::Value, b']') => Step::EndedWith,
            (ArrAt::Value, b',') => {
                *at = ArrAt::Comma;
                Step::Consumed
            }
            (ArrAt::Open | ArrAt::Comma, _) => {
                *at = ArrAt::Value; // once the item ends
                Step::Retry(Frame::Value(items.clone()))
            }
            _ => Step::Rejected,
        },
    }
}

/// The frame a value of `node` starting with `b` becomes.
fn open_value(node: &Arc<Node>, b: u8) -> Step {
    if is_ws(b) {
        return Step::Consumed;
    }
    let lit = |texts: &[&[u8]]| Frame::Lit { options: texts.iter().map(|t| Arc::from(*t)).collect(), at: 0 };
    let frame = match (&**node, b) {
        (Node::Any, b'{') => Frame::Obj {
            node: Arc::new(Node::Object { props: Vec::new(), extra: Arc::new(Node::Any) }),
            at: ObjAt::Open,
            next: 0,
            pending: None,
        },
        (Node::Object { .. }, b'{') => Frame::Obj { node: node.clone(), at: ObjAt::Open, next: 0, pending: None },
        (Node::Any, b'[') => Frame::Arr { items: Arc::new(Node::Any), at: ArrAt::Open },
        (Node::Array(items), b'[') => Frame::Arr { items: items.clone(), at: ArrAt::Open },
        (Node::Any | Node::String, b'"') => Frame::Str(StrEsc::None),
        (Node::Any | Node::Number, b'-' | b'0'..=b'9') => Frame::Num { at: Num::Minus, integer: false },
        (Node::Integer, b'-' | b'0'..=b'9') => Frame::Num { at: Num::Minus, integer: true },
        (Node::Any, b't' | b'f' | b'n') => lit(&[b"true", b"false", b"null"]),
        (Node::Literals(options), _) => Frame::Lit { options: options.clone(), at: 0 },
        _ => return Step::Rejected,
    };
    // Numbers and literals take their first byte as any other.
    let mut frame = frame;
    match &mut frame {
        Frame::Num { at, integer } if b != b'-' => match Num::Minus.next(b, *integer) {
            Some(n) => *at = n,
            None => return Step::Rejected,
        },
        Frame::Lit { .. } => {
            return match step(&mut frame, b) {
                Step::Consumed => Step::Became(frame),
                // A one-byte literal ("1" in an enum): complete already, but a number
                // may still grow, so it stays open until the next byte.
                Step::EndedWith => Step::Became(frame),
                _ => Step::Rejected,
            };
        }
        _ => {}
    }
    Step::Became(frame)
}

/// A byte of a property name: it must continue one of the names, or close the one read.
fn key_byte(read: &mut Vec<u8>, names: &[Vec<u8>], b: u8) -> Step {
    let continues = |n: &Vec<u8>| n.len() > read.len() && n.starts_with(read) && n[read.len()] == b;
    if names.iter().any(continues) {
        read.push(b);
        Step::Consumed
    } else if b == b'"' && names.iter().any(|n| n == read) {
        Step::EndedWith
    } else {
        Step::Rejected
    }
}

fn object_byte(node: &Arc<Node>, at: &mut ObjAt, next: &mut usize, pending: &mut Option<Arc<Node>>, b: u8) -> Step {
    let Node::Object { props, extra } = &**node else { return Step::Rejected };
    let constrained = !props.is_empty();
    let required_left = props[(*next).min(props.len())..].iter().any(|p| p.2);
    let more_props = !constrained || *next < props.len();
    match (*at, b) {
        (ObjAt::Key, _) => Step::Rejected, // handled by the Str frame above
        (_, b) if is_ws(b) => Step::Consumed,
        (ObjAt::Open | ObjAt::Comma, b'"') if more_props => {
            if constrained {
                *at = ObjAt::Colon; // set again when the key ends
                let names = key_candidates(props, *next).map(|i| props[i].0.clone()).collect();
                Step::Opened(Frame::Key { read: Vec::new(), names })
            } else {
                *at = ObjAt::Key;
                *pending = Some(extra.clone());
                Step::Opened(Frame::Str(StrEsc::None))
            }
        }
        (ObjAt::Open | ObjAt::Value, b'}') if !required_left => Step::EndedWith,
        (ObjAt::Value, b',') if more_props => {
            *at = ObjAt::Comma;
            Step::Consumed
        }
        (ObjAt::Colon, b':') => match pending.take() {
            Some(value) => {
                *at = ObjAt::Value; // once the value ends
                Step::Opened(Frame::Value(value))
            }
            None => Step::Rejected,
        },
        _ => Step::Rejected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Whether `text` is accepted, and whether it is then complete.
    fn run(format: &JsonFormat, text: &str) -> (bool, bool) {
        let mut s = format.start();
        let ok = s.push_all(text.as_bytes());
        (ok, ok && s.is_complete())
    }

    fn schema(v: Value) -> JsonFormat {
        JsonFormat::schema(&v).expect("schema")
    }

    #[test]
    fn json_mode_takes_any_object_and_nothing_else() {
        let f = JsonFormat::any_object();
        let doc = r#"{"a": [1, -2.5e3, 0, "x\"y\u00e9", true, null, {}], "b" : {"c": false}}"#;
        assert_eq!(run(&f, doc), (true, true));
        for i in 0..doc.len() {
            assert_eq!(run(&f, &doc[..i]), (true, false), "prefix {:?}", &doc[..i]);
        }
        for bad in
            ["[1]", "\"s\"", "{\"a\" 1}", "{\"a\":01}", "{\"a\":1,}", "{a:1}", "{\"a\":tru1}", "{}x", "{\"a\":\"\n\"}"]
        {
            assert!(!run(&f, bad).0, "{bad:?} accepted");
        }
        assert_eq!(run(&f, &format!("{{\n{}\"a\":1}}", " ".repeat(MAX_INDENT))), (true, true));
        for pad in ["\n".to_string() + &" ".repeat(MAX_INDENT + 1), "  ".into(), "\n\n".into(), "\t".into()] {
            assert!(!run(&f, &format!("{{{pad}")).0, "whitespace {pad:?} accepted");
        }
        assert_eq!(run(&f, &format!("{{\"a\":{}}}", "9".repeat(16))), (true, true));
        assert!(!run(&f, &format!("{{\"a\":{}", "9".repeat(17))).0, "17 integer digits");
        assert!(run(&f, &format!("{{\"a\":\"{}\"}}", " ".repeat(100))).0, "spaces inside a string are text");
    }

    #[test]
    fn a_schema_fixes_keys_order_and_types() {
        let f = schema(json!({
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
                "ok": {"type": "boolean"}
            },
            "required": ["name", "age"]
        }));
        assert_eq!(run(&f, r#"{"name": "Ann", "age": 31, "tags": ["a", "b"], "ok": true}"#), (true, true));
        assert_eq!(run(&f, r#"{"name":"Ann","age":31}"#), (true, true), "optional properties may be left out");
        assert_eq!(run(&f, r#"{"name":"Ann","age":31,"ok":false}"#), (true, true), "or skipped");
        assert_eq!(run(&f, r#"{"na"#), (true, false));
        for bad in [
            r#"{"age":31,"name":"Ann"}"#,      // out of order
            r#"{"name":"Ann"}"#,               // a required property missing
            r#"{"name":"Ann","age":31.5}"#,    // not an integer
            r#"{"name":"Ann","age":31,"x":1"#, // not a property
            r#"{"name":1"#,                    // not a string
            r#"{"name":"A","age":1,"tags":["c"]"#,
            r#"{"nb"#,
        ] {
            assert!(!run(&f, bad).0, "{bad:?} accepted");
        }
    }

    /// What pydantic writes for nested models and optional fields.
    #[test]
    fn refs_and_any_of() {
        let f = schema(json!({
            "$defs": {"Pet": {"properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
                              "required": ["kind", "lives"], "title": "Pet", "type": "object"}},
            "properties": {"pets": {"items": {"$ref": "#/$defs/Pet"}, "type": "array"},
                           "nickname": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": null}},
            "required": ["pets", "nickname"], "type": "object"
        }));
        assert_eq!(run(&f, r#"{"pets":[{"kind":"cat","lives":9}],"nickname":null}"#), (true, true));
        assert_eq!(run(&f, r#"{"pets":[],"nickname":"Tom"}"#), (true, true));
        assert!(!run(&f, r#"{"pets":[{"kind":"dog""#).0);
        assert!(!run(&f, r#"{"pets":[],"nickname":3"#).0);
    }

    #[test]
    fn top_level_numbers_and_literals_may_end() {
        let f = schema(json!({"type": "number"}));
        let mut s = f.start();
        assert!(s.push_all(b"-12.5"));
        assert!(s.may_end() && !s.is_complete());
        assert!(!s.accepts(b"x"));
        let f = schema(json!({"enum": [1, 12, "x"]}));
        let mut s = f.start();
        assert!(s.push_all(b"1"));
        assert!(s.may_end() && s.accepts(b"2") && !s.accepts(b"3"));
        assert_eq!(run(&f, "\"x\""), (true, true));
    }

    /// A schema whose definition i uses definition i + 1 as `make` says, `levels` deep.
    fn doubling_defs(levels: usize, make: impl Fn(&Value) -> Value) -> Value {
        let defs: serde_json::Map<String, Value> = (0..levels)
            .map(|i| (format!("D{i}"), make(&json!({ "$ref": format!("#/$defs/D{}", i + 1) }))))
            .chain([(format!("D{levels}"), json!({ "type": "integer" }))])
            .collect();
        json!({ "$defs": defs, "$ref": "#/$defs/D0" })
    }

    /// A caller's budget bounds the work over many candidates, copies included.
    #[test]
    fn checks_spend_a_shared_budget() {
        let f = JsonFormat::any_object();
        let s = f.start();
        let mut budget = 1000;
        let mut accepted = 0;
        while s.accepts_within(b"{", &mut budget) {
            accepted += 1;
        }
        assert!(accepted > 10 && accepted < 1000, "{accepted}");
        assert_eq!(budget, 0);
        assert!(!s.accepts_within(b"{", &mut budget), "an empty budget accepts nothing");
    }

    /// Enum values count toward the size limit; the largest enum allowed still works.
    #[test]
    fn enums_are_bounded_and_usable() {
        let values = |n: usize| (0..n).map(|i| json!(format!("v{i}"))).collect::<Vec<_>>();
        let e = JsonFormat::schema(&json!({ "enum": values(MAX_NODES + 1) })).unwrap_err();
        assert!(e.0.contains("parts"), "{e}");
        let f = JsonFormat::schema(&json!({ "enum": values(MAX_NODES - 1) })).expect("at the limit");
        assert_eq!(run(&f, "\"v9997\""), (true, true));
        assert!(!run(&f, "\"w").0);
        // Each check of such a state costs what its enum weighs.
        let s = f.start();
        let mut budget = 3 * MAX_NODES;
        let mut checks = 0;
        while s.accepts_within(b"\"v1", &mut budget) {
            checks += 1;
        }
        assert!(checks <= 3, "{checks} checks of a {MAX_NODES}-value enum within {} units", 3 * MAX_NODES);
    }

    /// Nested choices (thousands of ways to read a byte) are followed within a budget.
    #[test]
    fn nested_choices_stay_bounded() {
        let f = JsonFormat::schema(&doubling_defs(
            9,
            |next| json!({ "anyOf": [next, { "type": "array", "items": next }] }),
        ))
        .expect("under the size limit");
        let start = std::time::Instant::now();
        let s = f.start();
        assert!(!s.accepts(b"x"));
        assert!(s.accepts(b"[[1"));
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn bad_formats_are_errors_naming_the_problem() {
        assert!(JsonFormat::from_request(&json!("yaml")).unwrap_err().0.contains("\"json\""));
        assert!(JsonFormat::from_request(&json!(null)).unwrap().is_none());
        assert!(JsonFormat::from_request(&json!("")).unwrap().is_none());
        for (s, why) in [
            (json!({"type": "tuple"}), "unknown type"),
            (json!({"prefixItems": []}), "prefixItems"),
            (json!({"$ref": "#/$defs/Nope"}), "names nothing"),
            (json!({"$ref": "http://x/schema"}), "local"),
            (json!({"allOf": [{}, {}]}), "allOf"),
        ] {
            let e = JsonFormat::schema(&s).unwrap_err();
            assert!(e.to_string().contains(why), "{s}: {e}");
        }
        // Definitions that each use the next twice: 2^30 nodes if expanded, refused.
        let e = JsonFormat::schema(&doubling_defs(30, |next| json!({ "anyOf": [next, next] }))).unwrap_err();
        assert!(e.0.contains("parts"), "{e}");
        // A schema that refers to itself ends at the depth limit, not in a loop.
        let e = JsonFormat::schema(&json!({"$ref": "#"})).unwrap_err();
        assert!(e.0.contains("deeper"), "{e}");
    }
}
