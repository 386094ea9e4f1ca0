//! GGUF reader: parses the header of a GGUF v2/v3 little-endian file (metadata key/values
//! and tensor infos) and hands out zero-copy slices of tensor data.
//!
//! Layout (`ggml-org/ggml:docs/gguf.md`; llama.cpp's `ggml/src/gguf.cpp` for the checks):
//! magic "GGUF", version u32, tensor_count u64, kv_count u64, kv pairs, tensor infos,
//! zero padding to `general.alignment`, then the data section. Tensor offsets in the file
//! are relative to the data section; [`TensorInfo::offset`] is absolute.
//!
//! Every count, length, dim and offset comes from an untrusted file. The parser never
//! allocates more than the remaining bytes could encode, does all size arithmetic with
//! checked operations, and reports each malformed field as a [`GgufError`] that names the
//! field and the bad value. It does not interpret model hyperparameters (the model loader
//! does) or dequantize tensors (`turbine_cpu` does).

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use turbine_cpu::GgmlType;

const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u32 = 32;
const ALIGNMENT_KEY: &str = "general.alignment";
/// ggml tensors have at most 4 dimensions (`GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Keys are at most 65535 bytes (`docs/gguf.md`).
pub const MAX_KEY_LEN: u64 = 65535;
/// `GGML_MAX_NAME` is 64 including the NUL terminator.
pub const MAX_TENSOR_NAME_LEN: u64 = 63;
/// Real files nest arrays at most one deep; the cap stops stack exhaustion on crafted files.
pub const MAX_ARRAY_DEPTH: u32 = 8;

/// Fewest bytes one metadata pair can take: key length, a 1-byte key, type id, a 1-byte value.
const MIN_KV_BYTES: u64 = 8 + 1 + 4 + 1;
/// Fewest bytes one tensor info can take: name length, n_dims, one dim, type id, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Everything that can go wrong reading a GGUF file. Each variant names the field and value.
#[derive(Debug)]
pub enum GgufError {
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    BadMagic([u8; 4]),
    UnsupportedVersion(u32),
    /// The version field reads as a byte-swapped small number: a big-endian file.
    BigEndian(u32),
    /// A read ran past the end of the file, or a count could not fit in the bytes left.
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    EmptyKey {
        index: u64,
    },
    KeyTooLong {
        index: u64,
        len: u64,
    },
    InvalidUtf8 {
        what: String,
    },
    UnknownValueType {
        key: String,
        type_id: u32,
    },
    InvalidBool {
        key: String,
        value: u8,
    },
    NestingTooDeep {
        key: String,
        depth: u32,
    },
    DuplicateKey(String),
    BadAlignment(u32),
    TensorNameTooLong {
        index: u64,
        len: u64,
    },
    DuplicateTensor(String),
    UnknownTensorType {
        tensor: String,
        type_id: u32,
    },
    NoDims {
        tensor: String,
    },
    TooManyDims {
        tensor: String,
        n_dims: u32,
    },
    ZeroDim {
        tensor: String,
        dims: Vec<u64>,
    },
    /// The element count or byte size of a tensor overflows u64/usize.
    DimOverflow {
        tensor: String,
        dims: Vec<u64>,
    },
    RowNotBlockMultiple {
        tensor: String,
        ty: GgmlType,
        ne0: u64,
        block: usize,
    },
    Misaligned {
        tensor: String,
        offset: u64,
        alignment: u32,
    },
    DataPastEnd {
        tensor: String,
        offset: u64,
        size: u64,
        file_size: u64,
    },
    Overlap {
        tensor: String,
        other: String,
    },
    MissingKey(String),
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
    OutOfRange {
        key: String,
        value: String,
        target: &'static str,
    },
    ArrayLength {
        key: String,
        expected: usize,
        found: usize,
    },
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use GgufError::*;
        match self {
            Io { path, source } => write!(f, "cannot read GGUF file {}: {source}", path.display()),
            BadMagic(m) => write!(f, "not a GGUF file: magic is {m:02x?}, expected \"GGUF\""),
            UnsupportedVersion(v) => write!(f, "unsupported GGUF version {v} (supported: 2, 3)"),
            BigEndian(v) => write!(f, "big-endian GGUF not supported (version field reads {v:#010x})"),
            Truncated { what, offset, needed, available } => write!(
                f,
                "truncated GGUF: {what} at offset {offset} needs {needed} bytes, \
                 {available} available"
            ),
            EmptyKey { index } => write!(f, "metadata key #{index} is empty"),
            KeyTooLong { index, len } => write!(f, "metadata key #{index} is {len} bytes long, limit {MAX_KEY_LEN}"),
            InvalidUtf8 { what } => write!(f, "{what} is not valid UTF-8"),
            UnknownValueType { key, type_id } => {
                write!(f, "metadata key '{key}' has unknown value type id {type_id}")
            }
            InvalidBool { key, value } => {
                write!(f, "metadata key '{key}' has bool byte {value}, expected 0 or 1")
            }
            NestingTooDeep { key, depth } => {
                write!(f, "metadata key '{key}' nests arrays {depth} deep, limit {MAX_ARRAY_DEPTH}")
            }
            DuplicateKey(key) => write!(f, "duplicate metadata key '{key}'"),
            BadAlignment(a) => write!(f, "{ALIGNMENT_KEY} = {a} is not a nonzero power of two"),
            TensorNameTooLong { index, len } => {
                write!(f, "tensor #{index} name is {len} bytes long, limit {MAX_TENSOR_NAME_LEN}")
            }
            DuplicateTensor(name) => write!(f, "duplicate tensor name '{name}'"),
            UnknownTensorType { tensor, type_id } => {
                write!(f, "tensor '{tensor}' has unknown or unsupported ggml type id {type_id}")
            }
            NoDims { tensor } => write!(f, "tensor '{tensor}' has n_dims 0"),
            TooManyDims { tensor, n_dims } => {
                write!(f, "tensor '{tensor}' has n_dims {n_dims}, limit {MAX_DIMS}")
            }
            ZeroDim { tensor, dims } => write!(f, "tensor '{tensor}' has a zero dim: {dims:?}"),
            DimOverflow { tensor, dims } => {
                write!(f, "tensor '{tensor}' size overflows for dims {dims:?}")
            }
            RowNotBlockMultiple { tensor, ty, ne0, block } => write!(
                f,
                "tensor '{tensor}' of type {ty} has ne0 = {ne0}, not a multiple of the \
                 block size {block}"
            ),
            Misaligned { tensor, offset, alignment } => {
                write!(f, "tensor '{tensor}' offset {offset} is not a multiple of the alignment {alignment}")
            }
            DataPastEnd { tensor, offset, size, file_size } => write!(
                f,
                "tensor '{tensor}' data at offset {offset} with size {size} runs past the \
                 end of the file ({file_size} bytes)"
            ),
            Overlap { tensor, other } => {
                write!(f, "tensor '{tensor}' data overlaps tensor '{other}'")
            }
            MissingKey(key) => write!(f, "metadata key '{key}' is missing"),
            WrongType { key, expected, found } => {
                write!(f, "metadata key '{key}' has type {found}, expected {expected}")
            }
            OutOfRange { key, value, target } => {
                write!(f, "metadata key '{key}' value {value} does not fit in {target}")
            }
            ArrayLength { key, expected, found } => {
                write!(f, "metadata key '{key}' has {found} entries, expected {expected}")
            }
        }
    }
}

impl std::error::Error for GgufError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GgufError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, GgufError>;

// ---------------------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------------------

/// A metadata value type, with the id GGUF uses on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    pub fn from_id(id: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        self as u32
    }

    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }

    /// Fewest bytes one value of this type takes in the file; bounds counts before allocating.
    fn min_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 => 8,
            String => 8,    // the length prefix
            Array => 4 + 8, // element type and count
        }
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Array(Array),
}

/// A metadata array, stored as a typed vector so that a 262144-entry vocabulary is one
/// allocation of its element type rather than a `Vec<Value>`. Arrays of arrays nest, and
/// each inner array may have its own element type.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
    Array(Vec<Array>),
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
            Value::Array(_) => ValueType::Array,
        }
    }

    /// The type for error messages, with the element type for arrays: `array[string]`.
    pub fn type_name(&self) -> String {
        match self {
            Value::Array(a) => a.type_name(),
            v => v.value_type().name().to_string(),
        }
    }

    /// Any integer type, widened; every GGUF integer fits in i128. Bools are not integers.
    fn as_int(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// Any integer value that is non-negative and fits in u64.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_int().and_then(|v| u64::try_from(v).ok())
    }

    /// Any integer value that fits in i64.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_int().and_then(|v| i64::try_from(v).ok())
    }

    /// Any integer value that fits in u32.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_int().and_then(|v| u32::try_from(v).ok())
    }

    /// f32, or f64 rounded to f32. Integers are not converted: a float key stored as an
    /// integer is more likely a bug in the converter than a value to trust.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl Array {
    pub fn elem_type(&self) -> ValueType {
        match self {
            Array::U8(_) => ValueType::U8,
            Array::I8(_) => ValueType::I8,
            Array::U16(_) => ValueType::U16,
            Array::I16(_) => ValueType::I16,
            Array::U32(_) => ValueType::U32,
            Array::I32(_) => ValueType::I32,
            Array::F32(_) => ValueType::F32,
            Array::Bool(_) => ValueType::Bool,
            Array::String(_) => ValueType::String,
            Array::U64(_) => ValueType::U64,
            Array::I64(_) => ValueType::I64,
            Array::F64(_) => ValueType::F64,
            Array::Array(_) => ValueType::Array,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
            Array::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `array[<elem>]` for error messages.
    pub fn type_name(&self) -> String {
        format!("array[{}]", self.elem_type().name())
    }

    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            Array::String(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_f32s(&self) -> Option<&[f32]> {
        match self {
            Array::F32(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_i32s(&self) -> Option<&[i32]> {
        match self {
            Array::I32(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_u32s(&self) -> Option<&[u32]> {
        match self {
            Array::U32(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_bools(&self) -> Option<&[bool]> {
        match self {
            Array::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_arrays(&self) -> Option<&[Array]> {
        match self {
            Array::Array(v) => Some(v),
            _ => None,
        }
    }

    /// The elements of an integer array, widened; None for non-integer arrays.
    fn ints(&self) -> Option<Vec<i128>> {
        fn widen<T: Copy + Into<i128>>(v: &[T]) -> Vec<i128> {
            v.iter().map(|&x| x.into()).collect()
        }
        Some(match self {
            Array::U8(v) => widen(v),
            Array::I8(v) => widen(v),
            Array::U16(v) => widen(v),
            Array::I16(v) => widen(v),
            Array::U32(v) => widen(v),
            Array::I32(v) => widen(v),
            Array::U64(v) => widen(v),
            Array::I64(v) => widen(v),
            _ => return None,
        })
    }
}

/// A per-layer hyperparameter that files store either once for all layers or as an array
/// with one entry per layer (llama.cpp `get_key_or_arr`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum U32OrArray {
    Scalar(u32),
    Array(Vec<u32>),
}

impl U32OrArray {
    /// The value for `layer`; None when an array has no entry for it.
    pub fn layer(&self, layer: usize) -> Option<u32> {
        match self {
            U32OrArray::Scalar(v) => Some(*v),
            U32OrArray::Array(v) => v.get(layer).copied(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tensor infos
// ---------------------------------------------------------------------------------------

/// One tensor as described in the header; validated so that its data lies inside the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ty: GgmlType,
    /// ne0 first (the contiguous dimension), as in the file.
    pub dims: Vec<u64>,
    /// Absolute offset of the data in the file.
    pub offset: u64,
    pub n_bytes: usize,
}

impl TensorInfo {
    /// Product of all dims. Parsing checked it fits in usize; saturates for hand-made infos.
    pub fn n_elements(&self) -> usize {
        saturating_product(&self.dims)
    }

    /// Product of dims[1..]: the number of rows of length `cols()`.
    pub fn rows(&self) -> usize {
        saturating_product(self.dims.get(1..).unwrap_or(&[]))
    }

    /// dims[0] (ne0), the row length.
    pub fn cols(&self) -> usize {
        let ne0 = self.dims.first().copied().unwrap_or(0);
        usize::try_from(ne0).unwrap_or(usize::MAX)
    }
}

fn saturating_product(dims: &[u64]) -> usize {
    let p = dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d));
    usize::try_from(p).unwrap_or(usize::MAX)
}

// ---------------------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------------------

/// The file's bytes: mapped for real files, owned for tests and in-memory data.
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file. Metadata and tensor infos are parsed up front; tensor data stays in
/// the mapped file until a kernel reads it.
pub struct Gguf {
    bytes: Bytes,
    version: u32,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u32,
    data_offset: u64,
}

impl fmt::Debug for Gguf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gguf")
            .field("version", &self.version)
            .field("n_kv", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("file_size", &self.file_size())
            .finish()
    }
}

impl Gguf {
    /// Map and parse a file. I/O errors name the path.
    pub fn open(path: &Path) -> Result<Gguf> {
        let io_err = |source| GgufError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io_err)?;
        // SAFETY: the map is read-only. Another process truncating or rewriting the file
        // while it is mapped is undefined behaviour (SIGBUS at worst); like llama.cpp and
        // Ollama we accept that for model files, which are written once and then only read.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        Gguf::from_source(Bytes::Mapped(map))
    }

    /// Parse a GGUF file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Gguf> {
        Gguf::from_source(Bytes::Owned(bytes))
    }

    fn from_source(bytes: Bytes) -> Result<Gguf> {
        let header = parse(bytes.as_slice())?;
        Ok(Gguf {
            bytes,
            version: header.version,
            metadata: header.metadata,
            key_index: header.key_index,
            tensors: header.tensors,
            tensor_index: header.tensor_index,
            alignment: header.alignment,
            data_offset: header.data_offset,
        })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u32 {
        self.alignment
    }

    /// Absolute offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    pub fn file_size(&self) -> u64 {
        self.bytes.as_slice().len() as u64
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).and_then(|&i| self.metadata.get(i)).map(|(_, v)| v)
    }

    /// Metadata pairs in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// The tensor's bytes, borrowed from the file: exactly `info.n_bytes` long. Infos from
    /// this file were bounds-checked when parsing; an info that does not fit this file (one
    /// built by hand or taken from another file) yields an empty slice rather than a panic.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let range = usize::try_from(info.offset).ok().and_then(|start| Some(start..start.checked_add(info.n_bytes)?));
        range.and_then(|r| self.bytes.as_slice().get(r)).unwrap_or(&[])
    }

    /// `general.architecture`, required by every model.
    pub fn architecture(&self) -> Result<&str> {
        let key = "general.architecture";
        self.get_str(key)?.ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    /// Any integer type whose value fits in u32.
    pub fn get_u32(&self, key: &str) -> Result<Option<u32>> {
        self.get_int(key, "u32", |i| u32::try_from(i).ok())
    }

    /// Any integer type whose value fits in u64.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get_int(key, "u64", |i| u64::try_from(i).ok())
    }

    /// f32, or f64 rounded to f32.
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>> {
        self.get_typed(key, "f32", Value::as_f32)
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get_typed(key, "bool", Value::as_bool)
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.get_typed(key, "string", Value::as_str)
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&Array>> {
        self.get_typed(key, "array", Value::as_array)
    }

    pub fn get_str_array(&self, key: &str) -> Result<Option<&[String]>> {
        self.get_typed(key, "array[string]", |v| v.as_array()?.as_strings())
    }

    pub fn get_f32_array(&self, key: &str) -> Result<Option<&[f32]>> {
        self.get_typed(key, "array[f32]", |v| v.as_array()?.as_f32s())
    }

    pub fn get_i32_array(&self, key: &str) -> Result<Option<&[i32]>> {
        self.get_typed(key, "array[i32]", |v| v.as_array()?.as_i32s())
    }

    /// A per-layer key stored as one integer or an integer array; every value must fit u32.
    pub fn get_u32_or_array(&self, key: &str) -> Result<Option<U32OrArray>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        if let Value::Array(a) = value {
            let ints = a.ints().ok_or_else(|| wrong_type(key, "u32 or integer array", value))?;
            let vals = ints
                .into_iter()
                .map(|i| u32::try_from(i).map_err(|_| out_of_range(key, i, "u32")))
                .collect::<Result<Vec<u32>>>()?;
            return Ok(Some(U32OrArray::Array(vals)));
        }
        let scalar = self.get_u32(key)?;
        Ok(scalar.map(U32OrArray::Scalar))
    }

    /// A per-layer key expanded to exactly `n_layers` values: a scalar is repeated, an
    /// array must have one entry per layer. The caller bounds `n_layers` (it comes from
    /// the file too).
    pub fn get_u32_per_layer(&self, key: &str, n_layers: usize) -> Result<Option<Vec<u32>>> {
        match self.get_u32_or_array(key)? {
            None => Ok(None),
            Some(U32OrArray::Scalar(v)) => Ok(Some(vec![v; n_layers])),
            Some(U32OrArray::Array(v)) if v.len() == n_layers => Ok(Some(v)),
            Some(U32OrArray::Array(v)) => {
                Err(GgufError::ArrayLength { key: key.to_string(), expected: n_layers, found: v.len() })
            }
        }
    }

    /// Look up `key` and convert with `conv`; a value that does not convert is a WrongType.
    fn get_typed<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        conv: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => conv(v).map(Some).ok_or_else(|| wrong_type(key, expected, v)),
        }
    }

    /// An integer of any width narrowed by `narrow`: WrongType for non-integers,
    /// OutOfRange for integers that do not fit.
    fn get_int<T>(&self, key: &str, target: &'static str, narrow: impl Fn(i128) -> Option<T>) -> Result<Option<T>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let i = value.as_int().ok_or_else(|| wrong_type(key, target, value))?;
        narrow(i).map(Some).ok_or_else(|| out_of_range(key, i, target))
    }
}

fn wrong_type(key: &str, expected: &'static str, found: &Value) -> GgufError {
    GgufError::WrongType { key: key.to_string(), expected, found: found.type_name() }
}

fn out_of_range(key: &str, value: i128, target: &'static str) -> GgufError {
    GgufError::OutOfRange { key: key.to_string(), value: value.to_string(), target }
}

// ---------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------

/// A bounds-checked little-endian cursor. Each read names what it reads, for the error;
/// the name is a closure so the hot path (a quarter-million vocabulary strings) builds none.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

type What<'w> = &'w dyn Fn() -> String;

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn truncated(&self, what: What, needed: u64) -> GgufError {
        GgufError::Truncated { what: what(), offset: self.pos as u64, needed, available: self.remaining() as u64 }
    }

    fn take(&mut self, n: u64, what: What) -> Result<&'a [u8]> {
        let end = usize::try_from(n).ok().and_then(|n| self.pos.checked_add(n));
        let bytes = end.and_then(|end| Some((self.buf.get(self.pos..end)?, end)));
        let (bytes, end) = bytes.ok_or_else(|| self.truncated(what, n))?;
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: What) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: What) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: What) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: What) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A gguf string: u64 length, then UTF-8 bytes with no terminator.
    fn string(&mut self, what: What) -> Result<String> {
        let len = self.u64(&|| format!("length of {}", what()))?;
        self.string_body(len, what)
    }

    fn string_body(&mut self, len: u64, what: What) -> Result<String> {
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(GgufError::InvalidUtf8 { what: what() }),
        }
    }

    /// Check that `count` items of at least `min_size` bytes each could fit in the rest
    /// of the file, so a hostile count is rejected before anything is allocated for it.
    fn check_count(&self, count: u64, min_size: u64, what: What) -> Result<usize> {
        let needed = count.saturating_mul(min_size);
        if needed > self.remaining() as u64 {
            return Err(self.truncated(what, needed));
        }
        // needed <= remaining, so count fits in usize.
        usize::try_from(count).map_err(|_| self.truncated(what, needed))
    }
}

/// Everything the header says, before it is attached to the bytes.
struct Header {
    version: u32,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u32,
    data_offset: u64,
}

/// A tensor info as read, with its offset still relative to the data section.
struct RawTensor {
    name: String,
    ty: GgmlType,
    dims: Vec<u64>,
    rel_offset: u64,
    n_bytes: usize,
}

fn parse(buf: &[u8]) -> Result<Header> {
    let mut r = Reader { buf, pos: 0 };
    let magic = r.array::<4>(&|| "magic".into())?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic(magic));
    }
    let version = read_version(&mut r)?;
    let n_tensors = r.u64(&|| "tensor_count".into())?;
    let n_kv = r.u64(&|| "metadata_kv_count".into())?;
    check_header_counts(&r, n_tensors, n_kv)?;

    let (metadata, key_index) = read_metadata(&mut r, n_kv)?;
    let alignment = alignment_from(&metadata, &key_index)?;
    let raw = read_tensor_infos(&mut r, n_tensors, alignment)?;

    // The data section starts at the next alignment boundary after the tensor infos.
    let data_offset = align_up(r.pos as u64, alignment)
        .ok_or_else(|| r.truncated(&|| "padding before tensor data".into(), u64::from(alignment)))?;
    let tensors = place_tensors(raw, data_offset, buf.len() as u64)?;
    check_overlaps(&tensors)?;
    let tensor_index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
    Ok(Header { version, metadata, key_index, tensors, tensor_index, alignment, data_offset })
}

fn read_version(r: &mut Reader) -> Result<u32> {
    let version = r.u32(&|| "version".into())?;
    // A big-endian file's small version number reads with its low 16 bits zero
    // (the check in ggml's gguf.cpp).
    if version != 0 && version & 0xFFFF == 0 {
        return Err(GgufError::BigEndian(version));
    }
    match version {
        2 | 3 => Ok(version),
        v => Err(GgufError::UnsupportedVersion(v)),
    }
}

/// Both counts together must fit in the file at their smallest encodings.
fn check_header_counts(r: &Reader, n_tensors: u64, n_kv: u64) -> Result<()> {
    r.check_count(n_tensors, MIN_TENSOR_INFO_BYTES, &|| {
        format!("tensor_count {n_tensors} (at least {MIN_TENSOR_INFO_BYTES} bytes each)")
    })?;
    let tensor_bytes = n_tensors.saturating_mul(MIN_TENSOR_INFO_BYTES);
    let needed = n_kv.saturating_mul(MIN_KV_BYTES).saturating_add(tensor_bytes);
    if needed > r.remaining() as u64 {
        let what = || format!("metadata_kv_count {n_kv} (at least {MIN_KV_BYTES} bytes each)");
        return Err(r.truncated(&what, needed));
    }
    Ok(())
}

type Metadata = (Vec<(String, Value)>, HashMap<String, usize>);

fn read_metadata(r: &mut Reader, n_kv: u64) -> Result<Metadata> {
    // check_header_counts bounded n_kv by the file size.
    let n = r.check_count(n_kv, MIN_KV_BYTES, &|| format!("metadata_kv_count {n_kv}"))?;
    let mut pairs = Vec::with_capacity(n);
    let mut index = HashMap::with_capacity(n);
    for i in 0..n_kv {
        let (key, value) = read_kv(r, i)?;
        if index.contains_key(&key) {
            return Err(GgufError::DuplicateKey(key));
        }
        index.insert(key.clone(), pairs.len());
        pairs.push((key, value));
    }
    Ok((pairs, index))
}

fn read_kv(r: &mut Reader, index: u64) -> Result<(String, Value)> {
    let len = r.u64(&|| format!("length of metadata key #{index}"))?;
    if len == 0 {
        return Err(GgufError::EmptyKey { index });
    }
    if len > MAX_KEY_LEN {
        return Err(GgufError::KeyTooLong { index, len });
    }
    let key = r.string_body(len, &|| format!("metadata key #{index}"))?;
    let type_id = r.u32(&|| format!("value type of key '{key}'"))?;
    let ty = ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType { key: key.clone(), type_id })?;
    let value = read_value(r, ty, &key)?;
    Ok((key, value))
}

fn read_value(r: &mut Reader, ty: ValueType, key: &str) -> Result<Value> {
    let what = || format!("value of key '{key}'");
    Ok(match ty {
        ValueType::U8 => Value::U8(r.u8(&what)?),
        ValueType::I8 => Value::I8(i8::from_le_bytes(r.array(&what)?)),
        ValueType::U16 => Value::U16(u16::from_le_bytes(r.array(&what)?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(r.array(&what)?)),
        ValueType::U32 => Value::U32(u32::from_le_bytes(r.array(&what)?)),
        ValueType::I32 => Value::I32(i32::from_le_bytes(r.array(&what)?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(r.array(&what)?)),
        ValueType::U64 => Value::U64(u64::from_le_bytes(r.array(&what)?)),
        ValueType::I64 => Value::I64(i64::from_le_bytes(r.array(&what)?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(r.array(&what)?)),
        ValueType::Bool => Value::Bool(to_bool(r.u8(&what)?, key)?),
        ValueType::String => Value::String(r.string(&what)?),
        ValueType::Array => Value::Array(read_array(r, key, 1)?),
    })
}

fn to_bool(byte: u8, key: &str) -> Result<bool> {
    match byte {
        0 => Ok(false),
        1 => Ok(true),
        value => Err(GgufError::InvalidBool { key: key.to_string(), value }),
    }
}

/// An array value: element type, count, elements. `depth` is 1 for a top-level array.
fn read_array(r: &mut Reader, key: &str, depth: u32) -> Result<Array> {
    if depth > MAX_ARRAY_DEPTH {
        return Err(GgufError::NestingTooDeep { key: key.to_string(), depth });
    }
    let type_id = r.u32(&|| format!("element type of array '{key}'"))?;
    let ty =
        ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType { key: key.to_string(), type_id })?;
    let count = r.u64(&|| format!("length of array '{key}'"))?;
    let what = || format!("array '{key}' of {count} {}", ty.name());
    let n = r.check_count(count, ty.min_size(), &what)?;
    Ok(match ty {
        ValueType::U8 => Array::U8(r.take(count, &what)?.to_vec()),
        ValueType::I8 => Array::I8(read_le(r, n, i8::from_le_bytes, &what)?),
        ValueType::U16 => Array::U16(read_le(r, n, u16::from_le_bytes, &what)?),
        ValueType::I16 => Array::I16(read_le(r, n, i16::from_le_bytes, &what)?),
        ValueType::U32 => Array::U32(read_le(r, n, u32::from_le_bytes, &what)?),
        ValueType::I32 => Array::I32(read_le(r, n, i32::from_le_bytes, &what)?),
        ValueType::F32 => Array::F32(read_le(r, n, f32::from_le_bytes, &what)?),
        ValueType::U64 => Array::U64(read_le(r, n, u64::from_le_bytes, &what)?),
        ValueType::I64 => Array::I64(read_le(r, n, i64::from_le_bytes, &what)?),
        ValueType::F64 => Array::F64(read_le(r, n, f64::from_le_bytes, &what)?),
        ValueType::Bool => {
            let bytes = r.take(count, &what)?;
            Array::Bool(bytes.iter().map(|&b| to_bool(b, key)).collect::<Result<_>>()?)
        }
        ValueType::String => {
            let mut v = Vec::with_capacity(n);
            for i in 0..n {
                v.push(r.string(&|| format!("string #{i} of array '{key}'"))?);
            }
            Array::String(v)
        }
        ValueType::Array => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(read_array(r, key, depth.saturating_add(1))?);
            }
            Array::Array(v)
        }
    })
}

/// `n` fixed-size little-endian numbers in one bounds check.
fn read_le<T, const N: usize>(r: &mut Reader, n: usize, decode: fn([u8; N]) -> T, what: What) -> Result<Vec<T>> {
    let len = (n as u64).saturating_mul(N as u64);
    let bytes = r.take(len, what)?;
    let decode_chunk = |c: &[u8]| {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        decode(a)
    };
    Ok(bytes.chunks_exact(N).map(decode_chunk).collect())
}

/// `general.alignment`: a u32 power of two, 32 when absent.
fn alignment_from(metadata: &[(String, Value)], index: &HashMap<String, usize>) -> Result<u32> {
    let Some((_, value)) = index.get(ALIGNMENT_KEY).and_then(|&i| metadata.get(i)) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match *value {
        Value::U32(a) if a.is_power_of_two() => Ok(a),
        Value::U32(a) => Err(GgufError::BadAlignment(a)),
        ref other => Err(wrong_type(ALIGNMENT_KEY, "u32", other)),
    }
}

fn align_up(pos: u64, alignment: u32) -> Option<u64> {
    let a = u64::from(alignment);
    pos.checked_add(a.checked_sub(1)?)?.checked_div(a)?.checked_mul(a)
}

fn read_tensor_infos(r: &mut Reader, n_tensors: u64, alignment: u32) -> Result<Vec<RawTensor>> {
    // check_header_counts bounded n_tensors by the file size.
    let n = r.check_count(n_tensors, MIN_TENSOR_INFO_BYTES, &|| format!("tensor_count {n_tensors}"))?;
    let mut tensors = Vec::with_capacity(n);
    let mut names = HashMap::with_capacity(n);
    for i in 0..n_tensors {
        let t = read_tensor_info(r, i, alignment)?;
        if names.insert(t.name.clone(), ()).is_some() {
            return Err(GgufError::DuplicateTensor(t.name));
        }
        tensors.push(t);
    }
    Ok(tensors)
}

fn read_tensor_info(r: &mut Reader, index: u64, alignment: u32) -> Result<RawTensor> {
    let len = r.u64(&|| format!("name length of tensor #{index}"))?;
    if len > MAX_TENSOR_NAME_LEN {
        return Err(GgufError::TensorNameTooLong { index, len });
    }
    let name = r.string_body(len, &|| format!("name of tensor #{index}"))?;
    let n_dims = r.u32(&|| format!("n_dims of tensor '{name}'"))?;
    if n_dims == 0 {
        return Err(GgufError::NoDims { tensor: name });
    }
    if n_dims > MAX_DIMS {
        return Err(GgufError::TooManyDims { tensor: name, n_dims });
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for d in 0..n_dims {
        dims.push(r.u64(&|| format!("dim {d} of tensor '{name}'"))?);
    }
    let type_id = r.u32(&|| format!("type of tensor '{name}'"))?;
    let rel_offset = r.u64(&|| format!("offset of tensor '{name}'"))?;

    let Some(ty) = GgmlType::from_id(type_id) else {
        return Err(GgufError::UnknownTensorType { tensor: name, type_id });
    };
    let n_bytes = tensor_bytes(&name, ty, &dims)?;
    if !rel_offset.is_multiple_of(u64::from(alignment)) {
        return Err(GgufError::Misaligned { tensor: name, offset: rel_offset, alignment });
    }
    Ok(RawTensor { name, ty, dims, rel_offset, n_bytes })
}

/// Byte size of a tensor, with every way the dims can be hostile rejected: a zero dim,
/// an element count or byte size that overflows, a row that is not whole blocks.
fn tensor_bytes(name: &str, ty: GgmlType, dims: &[u64]) -> Result<usize> {
    let overflow = || GgufError::DimOverflow { tensor: name.to_string(), dims: dims.to_vec() };
    if dims.contains(&0) {
        return Err(GgufError::ZeroDim { tensor: name.to_string(), dims: dims.to_vec() });
    }
    let to_usize = |d: u64| usize::try_from(d).map_err(|_| overflow());
    let mut n_elements = 1usize;
    for &d in dims {
        n_elements = n_elements.checked_mul(to_usize(d)?).ok_or_else(overflow)?;
    }
    let Some(&ne0) = dims.first() else {
        return Err(GgufError::NoDims { tensor: name.to_string() });
    };
    let block = ty.block_size();
    if ne0.checked_rem(block as u64) != Some(0) {
        return Err(GgufError::RowNotBlockMultiple { tensor: name.to_string(), ty, ne0, block });
    }
    // Rows are whole blocks, so None here can only mean overflow.
    let row_bytes = ty.row_bytes(to_usize(ne0)?).ok_or_else(overflow)?;
    let rows = n_elements.checked_div(to_usize(ne0)?).ok_or_else(overflow)?;
    row_bytes.checked_mul(rows).ok_or_else(overflow)
}

/// Turn relative offsets into absolute ones and check each tensor lies inside the file.
fn place_tensors(raw: Vec<RawTensor>, data_offset: u64, file_size: u64) -> Result<Vec<TensorInfo>> {
    raw.into_iter().map(|t| place_tensor(t, data_offset, file_size)).collect()
}

fn place_tensor(t: RawTensor, data_offset: u64, file_size: u64) -> Result<TensorInfo> {
    let size = t.n_bytes as u64;
    let offset = data_offset.checked_add(t.rel_offset);
    let end = offset.and_then(|o| o.checked_add(size));
    match (offset, end) {
        (Some(offset), Some(end)) if end <= file_size => {
            Ok(TensorInfo { name: t.name, ty: t.ty, dims: t.dims, offset, n_bytes: t.n_bytes })
        }
        _ => Err(GgufError::DataPastEnd { tensor: t.name, offset: offset.unwrap_or(u64::MAX), size, file_size }),
    }
}

/// Two tensors sharing bytes is never produced by a writer; reject it as a crafted file.
fn check_overlaps(tensors: &[TensorInfo]) -> Result<()> {
    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| t.offset);
    for pair in order.windows(2) {
        let [a, b] = pair else { continue };
        // place_tensors checked offset + n_bytes <= file_size, so this does not saturate.
        if a.offset.saturating_add(a.n_bytes as u64) > b.offset {
            return Err(GgufError::Overlap { tensor: b.name.clone(), other: a.name.clone() });
        }
    }
    Ok(())
}
