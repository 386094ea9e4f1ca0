//! GGUF reader tests: valid files round-trip, and every kind of malformed file is a typed
//! error that names the bad field, never a panic or an unbounded allocation.
//!
//! Files are built byte by byte with the small builder below, so each test controls every
//! field. The last test runs against the real default model when it is present.

use std::path::PathBuf;

use turbine_cpu::GgmlType;
use turbine_engine::gguf::{Array, Gguf, GgufError, U32OrArray, Value, ValueType};

// ---------------------------------------------------------------------------------------
// A byte-level GGUF builder
// ---------------------------------------------------------------------------------------

fn gguf_str(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// The payload of a value, without its type id.
fn encode_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.extend(x.to_le_bytes()),
        Value::I8(x) => out.extend(x.to_le_bytes()),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => out.extend(gguf_str(s.as_bytes())),
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
        Value::Array(a) => encode_array(out, a),
    }
}

/// Element type, count, elements.
fn encode_array(out: &mut Vec<u8>, a: &Array) {
    out.extend(a.elem_type().id().to_le_bytes());
    out.extend((a.len() as u64).to_le_bytes());
    fn each<T: Clone>(out: &mut Vec<u8>, v: &[T], f: fn(T) -> Value) {
        for x in v {
            encode_value(out, &f(x.clone()));
        }
    }
    match a {
        Array::U8(v) => each(out, v, Value::U8),
        Array::I8(v) => each(out, v, Value::I8),
        Array::U16(v) => each(out, v, Value::U16),
        Array::I16(v) => each(out, v, Value::I16),
        Array::U32(v) => each(out, v, Value::U32),
        Array::I32(v) => each(out, v, Value::I32),
        Array::F32(v) => each(out, v, Value::F32),
        Array::Bool(v) => each(out, v, Value::Bool),
        Array::String(v) => each(out, v, Value::String),
        Array::U64(v) => each(out, v, Value::U64),
        Array::I64(v) => each(out, v, Value::I64),
        Array::F64(v) => each(out, v, Value::F64),
        Array::Array(v) => each(out, v, Value::Array),
    }
}

fn tensor_info(name: &[u8], dims: &[u64], type_id: u32, offset: u64) -> Vec<u8> {
    let mut out = gguf_str(name);
    out.extend((dims.len() as u32).to_le_bytes());
    for d in dims {
        out.extend(d.to_le_bytes());
    }
    out.extend(type_id.to_le_bytes());
    out.extend(offset.to_le_bytes());
    out
}

/// Builds a GGUF file. Counts are tracked automatically unless overridden; raw entries
/// let a test write any bytes it likes where a key/value pair or tensor info goes.
#[derive(Clone)]
struct Builder {
    version: u32,
    n_kv: u64,
    kv: Vec<u8>,
    n_tensors: u64,
    infos: Vec<u8>,
    data: Vec<u8>,
    alignment: usize,
    n_kv_override: Option<u64>,
    n_tensors_override: Option<u64>,
}

impl Builder {
    fn new(version: u32) -> Builder {
        Builder {
            version,
            n_kv: 0,
            kv: Vec::new(),
            n_tensors: 0,
            infos: Vec::new(),
            data: Vec::new(),
            alignment: 32,
            n_kv_override: None,
            n_tensors_override: None,
        }
    }

    fn kv(self, key: &str, value: Value) -> Builder {
        let mut entry = gguf_str(key.as_bytes());
        entry.extend(value.value_type().id().to_le_bytes());
        encode_value(&mut entry, &value);
        self.kv_raw(&entry)
    }

    fn kv_raw(mut self, entry: &[u8]) -> Builder {
        self.kv.extend_from_slice(entry);
        self.n_kv += 1;
        self
    }

    /// Sets `general.alignment` and pads the data section to match.
    fn alignment(mut self, a: u32) -> Builder {
        self.alignment = a as usize;
        self.kv("general.alignment", Value::U32(a))
    }

    /// A tensor with real data appended to the data section (padded before, not after, so
    /// the file ends exactly where the last tensor ends).
    fn tensor(mut self, name: &str, ty: GgmlType, dims: &[u64], data: &[u8]) -> Builder {
        while !self.data.len().is_multiple_of(self.alignment) {
            self.data.push(0);
        }
        let offset = self.data.len() as u64;
        self.data.extend_from_slice(data);
        self.tensor_raw(&tensor_info(name.as_bytes(), dims, ty.id(), offset))
    }

    fn tensor_raw(mut self, info: &[u8]) -> Builder {
        self.infos.extend_from_slice(info);
        self.n_tensors += 1;
        self
    }

    fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend(self.n_tensors_override.unwrap_or(self.n_tensors).to_le_bytes());
        out.extend(self.n_kv_override.unwrap_or(self.n_kv).to_le_bytes());
        out.extend_from_slice(&self.kv);
        out.extend_from_slice(&self.infos);
        while !out.len().is_multiple_of(self.alignment) {
            out.push(0);
        }
        out.extend_from_slice(&self.data);
        out
    }
}

/// Deterministic bytes for tensor data.
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// A deterministic PRNG (splitmix64), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn parse_err(bytes: Vec<u8>) -> GgufError {
    match Gguf::from_bytes(bytes) {
        Ok(g) => panic!("expected an error, parsed {g:?}"),
        Err(e) => e,
    }
}

/// Assert the error's message mentions each fragment (the field name and bad value).
fn assert_msg(e: &GgufError, fragments: &[&str]) {
    let msg = e.to_string();
    for f in fragments {
        assert!(msg.contains(f), "message {msg:?} should mention {f:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Valid files
// ---------------------------------------------------------------------------------------

/// One metadata value of every type, including nested arrays of mixed element types.
fn every_value() -> Vec<(&'static str, Value)> {
    vec![
        ("t.u8", Value::U8(200)),
        ("t.i8", Value::I8(-100)),
        ("t.u16", Value::U16(60000)),
        ("t.i16", Value::I16(-30000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.f32", Value::F32(1e-6)),
        ("t.bool", Value::Bool(true)),
        ("t.string", Value::String("héllo ▁world".into())),
        ("t.u64", Value::U64(u64::MAX)),
        ("t.i64", Value::I64(i64::MIN)),
        ("t.f64", Value::F64(-2.5e300)),
        ("t.arr.u8", Value::Array(Array::U8(vec![0, 1, 255]))),
        ("t.arr.i8", Value::Array(Array::I8(vec![-128, 127]))),
        ("t.arr.u16", Value::Array(Array::U16(vec![1, 65535]))),
        ("t.arr.i16", Value::Array(Array::I16(vec![-1, 2]))),
        ("t.arr.u32", Value::Array(Array::U32(vec![7, 8, 9]))),
        ("t.arr.i32", Value::Array(Array::I32(vec![1, -1, 3]))),
        ("t.arr.f32", Value::Array(Array::F32(vec![0.5, -0.25]))),
        ("t.arr.bool", Value::Array(Array::Bool(vec![true, false, true]))),
        ("t.arr.string", Value::Array(Array::String(vec!["a".into(), "".into(), "ü".into()]))),
        ("t.arr.u64", Value::Array(Array::U64(vec![u64::MAX]))),
        ("t.arr.i64", Value::Array(Array::I64(vec![i64::MIN, 0]))),
        ("t.arr.f64", Value::Array(Array::F64(vec![1e-300]))),
        ("t.arr.empty", Value::Array(Array::F32(vec![]))),
        (
            "t.arr.nested",
            Value::Array(Array::Array(vec![
                Array::U8(vec![1, 2]),
                Array::String(vec!["x".into()]),
                Array::Array(vec![Array::I32(vec![-5]), Array::Array(vec![])]),
            ])),
        ),
    ]
}

/// Tensors of several types; data sizes follow each type's block layout.
fn tensors() -> Vec<(&'static str, GgmlType, Vec<u64>, Vec<u8>)> {
    vec![
        ("token_embd.weight", GgmlType::Q8_0, vec![64, 3], pattern(34 * 2 * 3, 1)),
        ("blk.0.attn_norm.weight", GgmlType::F32, vec![5], pattern(20, 2)),
        ("blk.0.ffn_up.weight", GgmlType::Q4_K, vec![256, 2], pattern(144 * 2, 3)),
        ("blk.0.ffn_gate_exps.weight", GgmlType::F16, vec![4, 3, 2], pattern(2 * 24, 4)),
        ("blk.0.attn_q.weight", GgmlType::Q4_0, vec![32, 1, 1, 2], pattern(18 * 2, 5)),
    ]
}

fn valid_builder(version: u32, alignment: Option<u32>) -> Builder {
    let mut b = Builder::new(version).kv("general.architecture", Value::String("gemma3".into()));
    if let Some(a) = alignment {
        b = b.alignment(a);
    }
    for (k, v) in every_value() {
        b = b.kv(k, v);
    }
    for (name, ty, dims, data) in tensors() {
        b = b.tensor(name, ty, &dims, &data);
    }
    b
}

fn check_round_trip(version: u32, alignment: Option<u32>) {
    let bytes = valid_builder(version, alignment).build();
    let file_size = bytes.len() as u64;
    let g = Gguf::from_bytes(bytes).expect("valid file parses");
    let align = alignment.unwrap_or(32);
    assert_eq!(g.version(), version);
    assert_eq!(g.alignment(), align);
    assert_eq!(g.data_offset() % align as u64, 0);
    assert_eq!(g.file_size(), file_size);
    assert_eq!(g.architecture().unwrap(), "gemma3");

    // Metadata in file order, each value intact.
    let mut expected: Vec<(String, Value)> = vec![("general.architecture".into(), Value::String("gemma3".into()))];
    if let Some(a) = alignment {
        expected.push(("general.alignment".into(), Value::U32(a)));
    }
    expected.extend(every_value().into_iter().map(|(k, v)| (k.to_string(), v)));
    let got: Vec<(String, Value)> = g.metadata().map(|(k, v)| (k.to_string(), v.clone())).collect();
    assert_eq!(got, expected);
    for (k, v) in &expected {
        assert_eq!(g.get(k), Some(v), "key {k}");
    }
    assert_eq!(g.get("missing"), None);

    // Tensors in file order, aligned, with the bytes that were written.
    assert_eq!(g.tensors().len(), tensors().len());
    for (info, (name, ty, dims, data)) in g.tensors().iter().zip(tensors()) {
        assert_eq!(info.name, name);
        assert_eq!(info.ty, ty);
        assert_eq!(info.dims, dims);
        assert_eq!(info.n_bytes, data.len());
        assert_eq!(info.offset % align as u64, 0, "{name} aligned");
        assert_eq!(g.tensor_data(info), &data[..], "{name} data");
        assert_eq!(g.tensor(name), Some(info));
        let n: u64 = dims.iter().product();
        assert_eq!(info.n_elements() as u64, n);
        assert_eq!(info.cols() as u64, dims[0]);
        assert_eq!(info.rows() as u64, n / dims[0]);
    }
    assert!(g.tensor("nope").is_none());
}

#[test]
fn v3_round_trips_with_default_alignment() {
    check_round_trip(3, None);
}

#[test]
fn v2_round_trips_with_custom_alignment() {
    check_round_trip(2, Some(64));
    check_round_trip(3, Some(8));
    check_round_trip(3, Some(1));
}

#[test]
fn file_without_tensors_or_metadata_parses() {
    let g = Gguf::from_bytes(Builder::new(3).build()).unwrap();
    assert!(g.tensors().is_empty());
    assert_eq!(g.metadata().count(), 0);
    assert!(matches!(g.architecture(), Err(GgufError::MissingKey(_))));
}

#[test]
fn typed_getters_convert_or_name_the_type() {
    let b = Builder::new(3)
        .kv("small", Value::U8(7))
        .kv("wide", Value::I64(70_000))
        .kv("neg", Value::I32(-1))
        .kv("huge", Value::U64(u64::MAX))
        .kv("f64", Value::F64(0.5))
        .kv("name", Value::String("x".into()))
        .kv("flag", Value::Bool(true))
        .kv("vocab", Value::Array(Array::String(vec!["a".into(), "b".into()])))
        .kv("scores", Value::Array(Array::F32(vec![1.0, 2.0])))
        .kv("types", Value::Array(Array::I32(vec![1, 3])))
        .kv("per_layer", Value::Array(Array::I32(vec![4, 8, 4])))
        .kv("per_layer_bad", Value::Array(Array::I32(vec![4, -8])))
        .kv("bools", Value::Array(Array::Bool(vec![true])));
    let g = Gguf::from_bytes(b.build()).unwrap();

    assert_eq!(g.get_u32("small").unwrap(), Some(7));
    assert_eq!(g.get_u32("wide").unwrap(), Some(70_000));
    assert_eq!(g.get_u64("huge").unwrap(), Some(u64::MAX));
    assert_eq!(g.get_u32("absent").unwrap(), None);
    assert_eq!(g.get_f32("f64").unwrap(), Some(0.5));
    assert_eq!(g.get_bool("flag").unwrap(), Some(true));
    assert_eq!(g.get_str("name").unwrap(), Some("x"));
    assert_eq!(g.get_str_array("vocab").unwrap().unwrap(), ["a", "b"]);
    assert_eq!(g.get_f32_array("scores").unwrap().unwrap(), [1.0, 2.0]);
    assert_eq!(g.get_i32_array("types").unwrap().unwrap(), [1, 3]);
    assert_eq!(g.get("neg").unwrap().as_i64(), Some(-1));
    assert_eq!(g.get("neg").unwrap().as_u64(), None);

    let e = g.get_u32("neg").unwrap_err();
    assert!(matches!(e, GgufError::OutOfRange { .. }));
    assert_msg(&e, &["neg", "-1", "u32"]);
    let e = g.get_u32("huge").unwrap_err();
    assert_msg(&e, &["huge", &u64::MAX.to_string()]);

    let e = g.get_u32("name").unwrap_err();
    assert!(matches!(e, GgufError::WrongType { expected: "u32", .. }));
    assert_msg(&e, &["name", "string", "u32"]);
    let e = g.get_f32_array("types").unwrap_err();
    assert_msg(&e, &["types", "array[i32]", "array[f32]"]);
    let e = g.get_str("vocab").unwrap_err();
    assert_msg(&e, &["vocab", "array[string]"]);
    assert!(matches!(g.get_bool("small"), Err(GgufError::WrongType { .. })));

    // Per-layer keys: a scalar applies to every layer, an array has one entry per layer.
    assert_eq!(g.get_u32_or_array("small").unwrap(), Some(U32OrArray::Scalar(7)));
    let per = g.get_u32_or_array("per_layer").unwrap().unwrap();
    assert_eq!(per, U32OrArray::Array(vec![4, 8, 4]));
    assert_eq!((per.layer(1), per.layer(3)), (Some(8), None));
    assert_eq!(g.get_u32_per_layer("small", 3).unwrap(), Some(vec![7, 7, 7]));
    assert_eq!(g.get_u32_per_layer("per_layer", 3).unwrap(), Some(vec![4, 8, 4]));
    let e = g.get_u32_per_layer("per_layer", 4).unwrap_err();
    assert!(matches!(e, GgufError::ArrayLength { expected: 4, found: 3, .. }));
    assert_msg(&e, &["per_layer", "4", "3"]);
    assert!(matches!(g.get_u32_or_array("per_layer_bad"), Err(GgufError::OutOfRange { .. })));
    assert!(matches!(g.get_u32_or_array("bools"), Err(GgufError::WrongType { .. })));
    assert!(matches!(g.get_u32_or_array("name"), Err(GgufError::WrongType { .. })));
}

#[test]
fn open_maps_a_file_and_names_the_path_on_error() {
    let dir = std::env::temp_dir();
    let path = dir.join(format!("turbine-gguf-test-{}.gguf", std::process::id()));
    let bytes = valid_builder(3, None).build();
    std::fs::write(&path, &bytes).unwrap();
    let opened = Gguf::open(&path);
    let empty_path = dir.join(format!("turbine-gguf-empty-{}.gguf", std::process::id()));
    std::fs::write(&empty_path, b"").unwrap();
    let empty = Gguf::open(&empty_path);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&empty_path);

    let g = opened.unwrap();
    assert_eq!(g.file_size(), bytes.len() as u64);
    let (_, _, dims, data) = &tensors()[2];
    let info = g.tensor("blk.0.ffn_up.weight").unwrap();
    assert_eq!(&info.dims, dims);
    assert_eq!(g.tensor_data(info), &data[..]);
    assert!(matches!(empty, Err(GgufError::Truncated { .. })), "{empty:?}");

    let missing = PathBuf::from("/nonexistent/turbine/model.gguf");
    let e = Gguf::open(&missing).unwrap_err();
    assert!(matches!(e, GgufError::Io { .. }));
    assert_msg(&e, &["/nonexistent/turbine/model.gguf"]);
}

// ---------------------------------------------------------------------------------------
// Malformed headers
// ---------------------------------------------------------------------------------------

#[test]
fn bad_magic() {
    let mut bytes = Builder::new(3).build();
    bytes[..4].copy_from_slice(b"GGML");
    let e = parse_err(bytes);
    assert!(matches!(e, GgufError::BadMagic(m) if &m == b"GGML"));
    assert_msg(&e, &["magic"]);
}

#[test]
fn unsupported_versions() {
    for v in [0, 1, 4, 1000] {
        let e = parse_err(Builder::new(v).build());
        assert!(matches!(e, GgufError::UnsupportedVersion(x) if x == v), "{e}");
        assert_msg(&e, &[&format!("version {v}")]);
    }
    // A big-endian v3 file: the version's bytes are swapped.
    let e = parse_err(Builder::new(3u32.swap_bytes()).build());
    assert!(matches!(e, GgufError::BigEndian(_)), "{e}");
    assert_msg(&e, &["big-endian GGUF not supported"]);
}

#[test]
fn counts_larger_than_the_file() {
    // tensor_count and kv_count are checked before anything is allocated for them.
    for n in [u64::MAX, 1 << 40, 1000] {
        let mut b = Builder::new(3);
        b.n_tensors_override = Some(n);
        let e = parse_err(b.build());
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
        assert_msg(&e, &["tensor_count", &n.to_string()]);

        let mut b = Builder::new(3).kv("a", Value::U8(1));
        b.n_kv_override = Some(n);
        let e = parse_err(b.build());
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
        assert_msg(&e, &["metadata_kv_count", &n.to_string()]);
    }
}

#[test]
fn string_and_array_lengths_past_the_end() {
    // A string value whose length runs past the end of the file.
    let mut entry = gguf_str(b"general.name");
    entry.extend(8u32.to_le_bytes());
    entry.extend(1_000_000u64.to_le_bytes());
    entry.extend(b"short");
    let e = parse_err(Builder::new(3).kv_raw(&entry).build());
    assert!(matches!(e, GgufError::Truncated { needed: 1_000_000, .. }), "{e}");
    assert_msg(&e, &["general.name", "1000000"]);

    // Arrays with counts the remaining bytes cannot hold, for small and large elements.
    for (elem, count) in [(0u32, 1u64 << 40), (8, u64::MAX / 2), (9, 1 << 33), (12, 100)] {
        let mut entry = gguf_str(b"tokenizer.ggml.tokens");
        entry.extend(9u32.to_le_bytes());
        entry.extend(elem.to_le_bytes());
        entry.extend(count.to_le_bytes());
        let e = parse_err(Builder::new(3).kv_raw(&entry).build());
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
        assert_msg(&e, &["tokenizer.ggml.tokens", &count.to_string()]);
    }

    // A string array whose count fits but whose last string does not.
    let mut entry = gguf_str(b"vocab");
    entry.extend(9u32.to_le_bytes());
    entry.extend(8u32.to_le_bytes());
    entry.extend(2u64.to_le_bytes());
    entry.extend(gguf_str(b"ok"));
    entry.extend(50u64.to_le_bytes());
    entry.extend([b'x'; 20]);
    let e = parse_err(Builder::new(3).kv_raw(&entry).build());
    assert!(matches!(e, GgufError::Truncated { needed: 50, .. }), "{e}");
    assert_msg(&e, &["string #1", "vocab"]);
}

#[test]
fn bad_keys() {
    let mut entry = 0u64.to_le_bytes().to_vec();
    entry.extend(4u32.to_le_bytes());
    entry.extend(1u32.to_le_bytes());
    let e = parse_err(Builder::new(3).kv_raw(&entry).build());
    assert!(matches!(e, GgufError::EmptyKey { index: 0 }), "{e}");

    let long = vec![b'k'; 70_000];
    let e = parse_err(Builder::new(3).kv("a", Value::U8(0)).kv_raw(&gguf_str(&long)).build());
    assert!(matches!(e, GgufError::KeyTooLong { index: 1, len: 70_000 }), "{e}");
    assert_msg(&e, &["#1", "70000"]);

    let mut entry = gguf_str(b"bad\xffkey");
    entry.extend(4u32.to_le_bytes());
    entry.extend(1u32.to_le_bytes());
    let e = parse_err(Builder::new(3).kv_raw(&entry).build());
    assert!(matches!(e, GgufError::InvalidUtf8 { .. }), "{e}");
    assert_msg(&e, &["metadata key #0"]);

    let e = parse_err(Builder::new(3).kv("dup", Value::U8(1)).kv("dup", Value::U32(2)).build());
    assert!(matches!(&e, GgufError::DuplicateKey(k) if k == "dup"), "{e}");
    assert_msg(&e, &["dup"]);
}

#[test]
fn bad_values() {
    let mut entry = gguf_str(b"general.name");
    entry.extend(8u32.to_le_bytes());
    entry.extend(gguf_str(b"\xc3\x28"));
    let e = parse_err(Builder::new(3).kv_raw(&entry).build());
    assert!(matches!(e, GgufError::InvalidUtf8 { .. }), "{e}");
    assert_msg(&e, &["general.name"]);

    let mut entry = gguf_str(b"weird");
    entry.extend(13u32.to_le_bytes());
    entry.extend([0u8; 8]);
    let e = parse_err(Builder::new(3).kv_raw(&entry).build());
    assert!(matches!(e, GgufError::UnknownValueType { type_id: 13, .. }), "{e}");
    assert_msg(&e, &["weird", "13"]);

    // The element type of an array is checked too.
    let mut entry = gguf_str(b"weird.arr");
    entry.extend(9u32.to_le_bytes());
    entry.extend(u32::MAX.to_le_bytes());
    entry.extend(1u64.to_le_bytes());
    let e = parse_err(Builder::new(3).kv_raw(&entry).build());
    assert!(matches!(e, GgufError::UnknownValueType { type_id: u32::MAX, .. }), "{e}");
    assert_msg(&e, &["weird.arr", &u32::MAX.to_string()]);

    let mut entry = gguf_str(b"flag");
    entry.extend(7u32.to_le_bytes());
    entry.push(2);
    let e = parse_err(Builder::new(3).kv_raw(&entry).build());
    assert!(matches!(e, GgufError::InvalidBool { value: 2, .. }), "{e}");
    assert_msg(&e, &["flag", "2"]);
}

/// `depth` levels of array-of-array headers around an empty u8 array.
fn nested_arrays(depth: usize) -> Vec<u8> {
    let mut entry = gguf_str(b"deep");
    entry.extend(9u32.to_le_bytes());
    for _ in 1..depth {
        entry.extend(9u32.to_le_bytes());
        entry.extend(1u64.to_le_bytes());
    }
    entry.extend(0u32.to_le_bytes());
    entry.extend(0u64.to_le_bytes());
    entry
}

#[test]
fn array_nesting_is_bounded() {
    let g = Gguf::from_bytes(Builder::new(3).kv_raw(&nested_arrays(8)).build()).unwrap();
    assert_eq!(g.get("deep").unwrap().value_type(), ValueType::Array);
    for depth in [9, 10_000] {
        let e = parse_err(Builder::new(3).kv_raw(&nested_arrays(depth)).build());
        assert!(matches!(e, GgufError::NestingTooDeep { depth: 9, .. }), "{e}");
        assert_msg(&e, &["deep", "9"]);
    }
}

#[test]
fn bad_alignment() {
    for a in [0u32, 3, 48, u32::MAX] {
        let b = Builder::new(3).kv("general.alignment", Value::U32(a));
        let e = parse_err(b.build());
        assert!(matches!(e, GgufError::BadAlignment(x) if x == a), "{e}");
        assert_msg(&e, &["general.alignment", &a.to_string()]);
    }
    for v in [Value::I32(32), Value::U64(32), Value::String("32".into())] {
        let e = parse_err(Builder::new(3).kv("general.alignment", v).build());
        assert!(matches!(e, GgufError::WrongType { expected: "u32", .. }), "{e}");
        assert_msg(&e, &["general.alignment", "u32"]);
    }
}

// ---------------------------------------------------------------------------------------
// Malformed tensor infos
// ---------------------------------------------------------------------------------------

/// A valid tensor 'good' (8 f32 at relative offset 0), then one raw tensor info under test.
fn with_bad_tensor(info: &[u8]) -> Vec<u8> {
    Builder::new(3).tensor("good", GgmlType::F32, &[8], &pattern(32, 0)).tensor_raw(info).build()
}

#[test]
fn tensor_names() {
    let long = [b'n'; 64];
    let e = parse_err(with_bad_tensor(&tensor_info(&long, &[4], 0, 64)));
    assert!(matches!(e, GgufError::TensorNameTooLong { index: 1, len: 64 }), "{e}");
    assert_msg(&e, &["#1", "64"]);

    let e = parse_err(with_bad_tensor(&tensor_info(b"\xfe", &[4], 0, 64)));
    assert!(matches!(e, GgufError::InvalidUtf8 { .. }), "{e}");
    assert_msg(&e, &["tensor #1"]);

    let e = parse_err(with_bad_tensor(&tensor_info(b"good", &[4], 0, 64)));
    assert!(matches!(&e, GgufError::DuplicateTensor(n) if n == "good"), "{e}");
    assert_msg(&e, &["good"]);
}

#[test]
fn tensor_types() {
    for id in [4u32, 5, 31, 99, u32::MAX] {
        let e = parse_err(with_bad_tensor(&tensor_info(b"t", &[32], id, 64)));
        assert!(matches!(e, GgufError::UnknownTensorType { type_id, .. } if type_id == id));
        assert_msg(&e, &["'t'", &id.to_string()]);
    }
}

#[test]
fn tensor_dims() {
    let e = parse_err(with_bad_tensor(&tensor_info(b"t", &[], 0, 64)));
    assert!(matches!(e, GgufError::NoDims { .. }), "{e}");

    // n_dims is checked before the dims are read, so a huge n_dims allocates nothing.
    for n_dims in [5u32, u32::MAX] {
        let mut info = gguf_str(b"t");
        info.extend(n_dims.to_le_bytes());
        info.extend([1u8; 48]);
        let e = parse_err(with_bad_tensor(&info));
        assert!(matches!(e, GgufError::TooManyDims { n_dims: x, .. } if x == n_dims), "{e}");
        assert_msg(&e, &["'t'", &n_dims.to_string()]);
    }

    for dims in [[0u64, 4], [4, 0]] {
        let e = parse_err(with_bad_tensor(&tensor_info(b"t", &dims, 0, 64)));
        assert!(matches!(e, GgufError::ZeroDim { .. }), "{e}");
        assert_msg(&e, &["'t'", &format!("{dims:?}")]);
    }

    // Element count overflows u64, and (for F32) byte size overflows usize.
    let huge: [&[u64]; 3] = [&[1 << 32, 1 << 32, 2], &[u64::MAX, u64::MAX], &[1 << 62]];
    for dims in huge {
        let e = parse_err(with_bad_tensor(&tensor_info(b"t", dims, 0, 64)));
        assert!(matches!(e, GgufError::DimOverflow { .. }), "{dims:?}: {e}");
        assert_msg(&e, &["'t'", &format!("{dims:?}")]);
    }

    let e = parse_err(with_bad_tensor(&tensor_info(b"t", &[33, 2], GgmlType::Q4_0.id(), 64)));
    assert!(matches!(e, GgufError::RowNotBlockMultiple { ne0: 33, block: 32, .. }), "{e}");
    assert_msg(&e, &["'t'", "Q4_0", "33", "32"]);
    let e = parse_err(with_bad_tensor(&tensor_info(b"t", &[32 * 9], GgmlType::Q6_K.id(), 64)));
    assert!(matches!(e, GgufError::RowNotBlockMultiple { ne0: 288, block: 256, .. }), "{e}");
}

#[test]
fn tensor_offsets() {
    let e = parse_err(with_bad_tensor(&tensor_info(b"t", &[4], 0, 36)));
    assert!(matches!(e, GgufError::Misaligned { offset: 36, alignment: 32, .. }), "{e}");
    assert_msg(&e, &["'t'", "36", "32"]);

    // Data past the end, including offsets whose sum with the data offset overflows.
    for rel in [32u64, 1 << 40, u64::MAX - 31] {
        let bytes = with_bad_tensor(&tensor_info(b"t", &[4], 0, rel));
        let file_size = bytes.len() as u64;
        let e = parse_err(bytes);
        assert!(matches!(e, GgufError::DataPastEnd { size: 16, file_size: f, .. } if f == file_size), "{e}");
        assert_msg(&e, &["'t'", "16", &file_size.to_string()]);
    }

    // Two tensors sharing bytes.
    let e = parse_err(with_bad_tensor(&tensor_info(b"t", &[4], 0, 0)));
    assert!(matches!(&e, GgufError::Overlap { .. }), "{e}");
    assert_msg(&e, &["'t'", "'good'"]);
}

// ---------------------------------------------------------------------------------------
// Truncation and corruption never panic
// ---------------------------------------------------------------------------------------

#[test]
fn every_truncation_of_a_small_file_is_an_error() {
    for bytes in [valid_builder(3, None).build(), valid_builder(2, Some(64)).build()] {
        assert!(Gguf::from_bytes(bytes.clone()).is_ok());
        for len in 0..bytes.len() {
            let r = Gguf::from_bytes(bytes[..len].to_vec());
            assert!(r.is_err(), "prefix of {len} of {} bytes parsed", bytes.len());
        }
    }
}

#[test]
fn random_corruption_never_panics() {
    let bytes = valid_builder(3, None).build();
    let mut rng = Rng(42);
    let (mut ok, mut err) = (0, 0);
    for _ in 0..20_000 {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(b.len());
            b[i] = match rng.below(3) {
                0 => rng.next() as u8,
                1 => 0xff,
                _ => b[i] ^ (1 << rng.below(8)),
            };
        }
        match Gguf::from_bytes(b) {
            Ok(g) => {
                // Whatever parsed must still hand out in-bounds data.
                for t in g.tensors() {
                    assert_eq!(g.tensor_data(t).len(), t.n_bytes);
                }
                ok += 1;
            }
            Err(e) => {
                let _ = e.to_string();
                err += 1;
            }
        }
    }
    println!("random corruption: {ok} parsed, {err} rejected");
}

// ---------------------------------------------------------------------------------------
// The real model
// ---------------------------------------------------------------------------------------

const DEFAULT_BLOB: &str = "sha256-a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

/// TURBINE_TEST_MODEL, else the Gemma 3 270M blob in the Ollama model store.
fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TURBINE_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let models = std::env::var_os("OLLAMA_MODELS").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").unwrap_or_default();
        PathBuf::from(home).join(".ollama/models")
    });
    models.join("blobs").join(DEFAULT_BLOB)
}

#[test]
fn real_model_parses_and_every_cut_is_an_error() {
    let path = model_path();
    // A missing model is a failure, not a skip: this check must run in CI.
    assert!(path.exists(), "model not found at {}: run scripts/fetch-default-model.sh", path.display());
    let start = std::time::Instant::now();
    let g = Gguf::open(&path).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "{}: GGUF v{}, {} metadata keys, {} tensors, data at {}, parsed in {:?}",
        path.display(),
        g.version(),
        g.metadata().count(),
        g.tensors().len(),
        g.data_offset(),
        start.elapsed()
    );
    assert_eq!(g.architecture().unwrap(), "gemma3");
    // Verified with gguf-py's GGUFReader on this blob: 18 blocks of 13 tensors, plus
    // token_embd and output_norm.
    assert_eq!(g.tensors().len(), 236);
    assert_eq!(g.get_u32("gemma3.block_count").unwrap(), Some(18));
    let n_vocab = g.get_str_array("tokenizer.ggml.tokens").unwrap().unwrap().len();
    assert_eq!(n_vocab, 262_144);
    assert_eq!(g.get_f32_array("tokenizer.ggml.scores").unwrap().unwrap().len(), n_vocab);
    assert_eq!(g.get_i32_array("tokenizer.ggml.token_type").unwrap().unwrap().len(), n_vocab);
    for t in g.tensors() {
        assert_eq!(g.tensor_data(t).len(), t.n_bytes, "{}", t.name);
    }
    check_cuts(&g, &path);
}

/// Cut the model at 1,000 pseudo-random lengths, half inside the header and half anywhere
/// before the end of the last tensor, and check each prefix is rejected without a panic.
///
/// The parser never reads the data section, so a prefix is built as the real header bytes
/// followed by zeros: `vec![0; len]` is lazily zeroed by the OS, which keeps 500 cuts of a
/// 250 MB file cheap. Only the length of the data part matters, and that is exact.
fn check_cuts(g: &Gguf, path: &std::path::Path) {
    use std::io::Read;
    let header_len = g.data_offset() as usize;
    let mut header = vec![0u8; header_len];
    std::fs::File::open(path).unwrap().read_exact(&mut header).unwrap();
    // Cuts inside trailing padding after the last tensor would still be valid files.
    let data_end = g.tensors().iter().map(|t| t.offset + t.n_bytes as u64).max().unwrap();

    let start = std::time::Instant::now();
    let mut rng = Rng(0x7e57);
    for i in 0..1000 {
        let len = if i % 2 == 0 { rng.below(header_len) } else { rng.below(data_end as usize) };
        let mut bytes = vec![0u8; len];
        let n = len.min(header_len);
        bytes[..n].copy_from_slice(&header[..n]);
        let r = Gguf::from_bytes(bytes);
        assert!(r.is_err(), "cut at {len} of {} parsed", g.file_size());
    }
    println!("1000 cuts rejected in {:?}", start.elapsed());
}
