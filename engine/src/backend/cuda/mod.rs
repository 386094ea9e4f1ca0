//! The CUDA backend: the [`Backend`] seam over Turbine's own kernels (`turbine-cuda`:
//! CUDA C compiled by NVRTC at run time, driven through cudarc, both loaded dynamically).
//!
//! Memory. Weights are uploaded once, at load, as the file's raw GGUF blocks (quantized
//! weights stay quantized; nothing is repacked on the host); a 3-D tensor of a layer's
//! experts (or heads' matrices) is one allocation, each matrix a view into it, and so are
//! the experts' stacked biases ([`Backend::experts`], [`Backend::expert_vectors`]).
//! Activations are device buffers of f32, one per operation's result, from the device's
//! stream-ordered pool (`cuMemAllocAsync`), which keeps freed memory for the next step.
//! The KV cache is one device array per layer in the CPU cache's layout
//! (`[block][16 tokens][kv_dim]`, f16 or f32), driven by the same
//! [`crate::kv::BlockManager`]; each step's block tables go up in one copy (see
//! `attention.rs`).
//!
//! Streams. Everything runs on one stream in issue order (`turbine_cuda::Runtime`): host
//! copies of small index arrays are staged by the driver and need no synchronization;
//! `to_host` (the logits, a mixture-of-experts router's scores) is the only wait.
//!
//! Errors. The trait's operations return values, not `Result`s. The first device failure
//! of a forward pass (out of memory, a failed launch, an error surfacing at a copy) is
//! kept, later operations of the pass do nothing and return placeholders of the right
//! shape, and [`Backend::take_tp_error`], which every forward pass calls before it returns,
//! hands it over as an [`EngineError`]: the step fails, nothing panics. Shapes the kernels
//! cannot take are reported the same way.
//!
//! Mixture of experts. The model routes on the host (`moe::Routing`); then
//! [`Backend::moe_grouped`] runs all of a step's (token, choice) slots through their
//! experts in a few launches (matmul.cu's `matvec_id_*`, moe.cu's `moe_combine`; see
//! `moe.rs`) where that pays, and otherwise the model runs each busy expert's products with
//! the ordinary kernels.
//!
//! Not here: tensor parallelism and pipeline stages (one GPU, `tensor_parallel()` is
//! (0, 1)).

mod attention;
#[cfg(test)]
mod launch_check;
mod moe;
mod ops;
mod products;

pub use attention::CudaKv;

use super::{AttnShape, Backend, BatchLayout, ExpertWeights, Yarn};
use crate::generate::LoadedModel;
use crate::gguf::{Gguf, TensorInfo};
use crate::kv::KvSpec;
use crate::model::moe::Routes;
use crate::parallel::{row_bytes_of, shard_bytes, Part};
use crate::tokenizer::Tokenizer;
use crate::EngineError;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use turbine_cpu::GgmlType;
use turbine_cuda::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, DeviceRepr, ValidAsZeroBits,
};
use turbine_cuda::{CudaError, Runtime};

/// What failed and why, on the way to the step's [`EngineError`].
type Fallible<T> = Result<T, String>;

/// The CUDA backend of one GPU. Clones share the GPU, its kernels and the pending error.
#[derive(Clone)]
pub struct CudaBackend {
    inner: Arc<Inner>,
}

struct Inner {
    rt: Runtime,
    k: Kernels,
    ordinal: usize,
    /// The first failure since the last `take_tp_error`, and a flag to test it cheaply.
    error: Mutex<Option<String>>,
    failed: AtomicBool,
    /// Device bytes of the weights made, and of them the tables only looked up by row.
    weight_bytes: AtomicU64,
    lookup_bytes: AtomicU64,
    /// The last positions uploaded for RoPE (a forward pass rotates with the same ones
    /// several times per layer).
    positions: Mutex<Option<Uploaded>>,
    /// Whether [`Backend::moe_grouped`] may run (a switch for checks comparing it with the
    /// per-expert path), and how many layers it ran.
    grouped_moe: AtomicBool,
    grouped_moe_runs: AtomicU64,
}

/// Host values and their copy on the device.
type Uploaded = (Vec<u32>, Arc<CudaSlice<u32>>);

impl Drop for Inner {
    fn drop(&mut self) {
        self.rt.trim();
    }
}

/// The kernels every forward pass uses, looked up once.
struct Kernels {
    quantize_q8_0: CudaFunction,
    quantize_q8_k: CudaFunction,
    rms_norm: CudaFunction,
    rope: CudaFunction,
    geglu: CudaFunction,
    swiglu: CudaFunction,
    swiglu_oai: CudaFunction,
    scale: CudaFunction,
    add: CudaFunction,
    add_bias: CudaFunction,
    add_scaled_rows: CudaFunction,
    moe_combine: CudaFunction,
    gather_rows: CudaFunction,
    gather_cols: CudaFunction,
    copy_cols: CudaFunction,
    /// f16 and f32 caches.
    kv_store: [CudaFunction; 2],
    /// Per head width (128, 256, 576), for f16 and f32 caches.
    attn_split: [[CudaFunction; 2]; 3],
    attn_combine: CudaFunction,
}

impl Kernels {
    fn load(rt: &Runtime) -> Result<Kernels, CudaError> {
        let f = |name: &str| rt.function(name);
        let split = |w: usize| -> Result<[CudaFunction; 2], CudaError> {
            Ok([f(&format!("attn_split_f16_{w}"))?, f(&format!("attn_split_f32_{w}"))?])
        };
        Ok(Kernels {
            quantize_q8_0: f("quantize_q8_0_exact")?,
            quantize_q8_k: f("quantize_q8_k_exact")?,
            rms_norm: f("rms_norm_exact")?,
            rope: f("rope_exact")?,
            geglu: f("geglu_exact")?,
            swiglu: f("swiglu")?,
            swiglu_oai: f("swiglu_oai")?,
            scale: f("scale_exact")?,
            add: f("add_exact")?,
            add_bias: f("add_bias_rows")?,
            add_scaled_rows: f("add_scaled_rows")?,
            moe_combine: f("moe_combine")?,
            gather_rows: f("gather_rows")?,
            gather_cols: f("gather_cols")?,
            copy_cols: f("copy_cols")?,
            kv_store: [f("kv_store_f16")?, f("kv_store_f32")?],
            attn_split: [split(128)?, split(256)?, split(576)?],
            attn_combine: f("attn_combine")?,
        })
    }
}

/// Launches `$f` on the backend's stream with grid `$grid` and block `$block` (both
/// `(u32, u32, u32)`), pushing each argument (references that outlive the launch).
macro_rules! launch {
    ($be:expr, $f:expr, $grid:expr, $block:expr; $($arg:expr),* $(,)?) => {{
        use turbine_cuda::cudarc::driver::PushKernelArg;
        let cfg = turbine_cuda::cudarc::driver::LaunchConfig { grid_dim: $grid, block_dim: $block, shared_mem_bytes: 0 };
        let mut builder = $be.stream().launch_builder($f);
        $( builder.arg($arg); )*
        // SAFETY: the caller matched the arguments to the kernel's signature (its .cu
        // file's comment) and checked every index the kernel reads against the buffers.
        unsafe { builder.launch(cfg) }.map(|_| ()).map_err(|e| format!("launching {}: {e:?}", stringify!($f)))
    }};
}
pub(crate) use launch;

/// An f32 activation matrix in device memory, row-major, one row per token. `buf` is None
/// for an empty matrix, and for a placeholder left by a failed operation.
pub struct CudaAct {
    rows: usize,
    cols: usize,
    buf: Option<CudaSlice<f32>>,
}

impl CudaAct {
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Elements (checked when a buffer was made; a placeholder's saturate).
    fn len(&self) -> usize {
        self.rows.saturating_mul(self.cols)
    }

    fn placeholder(rows: usize, cols: usize) -> CudaAct {
        CudaAct { rows, cols, buf: None }
    }

    /// The device buffer of a non-empty matrix.
    fn dev(&self) -> Fallible<&CudaSlice<f32>> {
        self.buf.as_ref().ok_or_else(|| "an input was lost to an earlier failure".to_string())
    }

    fn dev_mut(&mut self) -> Fallible<&mut CudaSlice<f32>> {
        self.buf.as_mut().ok_or_else(|| "an input was lost to an earlier failure".to_string())
    }
}

/// A weight matrix as the file stores it ([rows × cols] GGUF blocks), with the kernels that
/// multiply by it and look rows of it up (where its type has them).
pub struct CudaWeight {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    /// The device memory it lies in: its own, or that of the 3-D tensor whose experts (or
    /// heads' matrices) lie side by side in it; `at` its bytes there.
    bytes: Arc<CudaSlice<u8>>,
    at: Range<usize>,
    /// rows, cols, bytes per row and blocks per row, as the kernels take them.
    dims: WeightDims,
    product: Product,
    embed: Option<CudaFunction>,
}

#[derive(Clone, Copy)]
struct WeightDims {
    rows: i32,
    cols: i32,
    row_bytes: i32,
    blocks: i32,
}

/// How a weight multiplies activations.
#[derive(Clone)]
enum Product {
    /// 8-bit activations (`mode`), dp4a kernels: one row per warp for one token, tiles of
    /// 4 rows × 8 tokens for more; and the mixture-of-experts product of a stack of such
    /// weights, each slot through its own (`matvec_id_*`, where the type has one).
    Quantized { mode: ActMode, matvec: CudaFunction, matmul: CudaFunction, by_slot: Option<CudaFunction> },
    /// F32, F16 and BF16 weights times f32 activations.
    Float(CudaFunction),
    /// A table only looked up by row.
    None,
}

/// The 8-bit activation format a quantized weight type is dotted with (the CPU's
/// `act_type`): Q8_0 (blocks of 32, f16 scale) or Q8_K (blocks of 256, f32 scale).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ActMode {
    Q8_0,
    Q8K,
}

impl CudaWeight {
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Bytes on the device.
    pub fn bytes(&self) -> usize {
        self.at.len()
    }

    /// Its bytes on the device, for a kernel's argument.
    fn view(&self) -> Fallible<CudaView<'_, u8>> {
        self.bytes.try_slice(self.at.clone()).ok_or_else(|| format!("bytes {:?} of {}", self.at, self.bytes.len()))
    }
}

/// A small f32 vector in device memory (norm weights, biases, sinks, RoPE factors): its own
/// buffer, or elements `at` of its stack's (an expert's bias beside the others').
pub struct CudaVector {
    len: usize,
    buf: Option<Arc<CudaSlice<f32>>>,
    at: Range<usize>,
}

impl CudaVector {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its elements on the device, for a kernel's argument.
    fn dev(&self) -> Fallible<CudaView<'_, f32>> {
        let buf = self.buf.as_ref().ok_or_else(|| "an empty vector".to_string())?;
        buf.try_slice(self.at.clone()).ok_or_else(|| format!("elements {:?} of {}", self.at, buf.len()))
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal` and loads the kernels (compiled by NVRTC through the disk cache
    /// on first use). No driver, no such GPU, an unsupported architecture and a missing
    /// NVRTC are each their own [`CudaError`].
    pub fn new(ordinal: usize) -> Result<CudaBackend, CudaError> {
        let rt = Runtime::new(ordinal)?;
        let k = Kernels::load(&rt)?;
        let inner = Inner {
            rt,
            k,
            ordinal,
            error: Mutex::new(None),
            failed: AtomicBool::new(false),
            weight_bytes: AtomicU64::new(0),
            lookup_bytes: AtomicU64::new(0),
            positions: Mutex::new(None),
            grouped_moe: AtomicBool::new(true),
            grouped_moe_runs: AtomicU64::new(0),
        };
        Ok(CudaBackend { inner: Arc::new(inner) })
    }

    /// The GPU's name, and the architecture the kernels were built for.
    pub fn device(&self) -> (String, &'static str) {
        (self.inner.rt.gpu().name.clone(), self.inner.rt.arch())
    }

    pub fn runtime(&self) -> &Runtime {
        &self.inner.rt
    }

    /// Device bytes of the weights this backend made, and of them the tables only looked
    /// up by row (which a decode step does not read whole).
    pub fn weight_bytes(&self) -> (u64, u64) {
        (self.inner.weight_bytes.load(Ordering::Relaxed), self.inner.lookup_bytes.load(Ordering::Relaxed))
    }

    /// Lets [`Backend::moe_grouped`] run where it pays (the default), or never: the models
    /// then run each busy expert's products. For checks comparing the two; clones share it.
    pub fn set_grouped_moe(&self, on: bool) {
        self.inner.grouped_moe.store(on, Ordering::Relaxed);
    }

    /// Mixture-of-experts layers the grouped path has run since the backend was made.
    pub fn grouped_moe_runs(&self) -> u64 {
        self.inner.grouped_moe_runs.load(Ordering::Relaxed)
    }

    /// Waits for every queued operation; the first failure, if any.
    pub fn synchronize(&self) -> Result<(), EngineError> {
        if let Err(e) = self.stream().synchronize() {
            self.record("synchronize", format!("{e:?}"));
        }
        self.take_tp_error().map_or(Ok(()), Err)
    }

    /// `count` vectors side by side in `data` (little-endian f32), uploaded as one
    /// allocation that each is a view into.
    fn make_vectors(&self, name: &str, data: &[u8], count: usize) -> Result<Vec<CudaVector>, EngineError> {
        let host: Vec<f32> = data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let len = host.len() / count.max(1);
        if count == 0 || len * count != host.len() || host.len() * 4 != data.len() {
            let why = "whole f32 vectors of equal length";
            return Err(EngineError::BadValue { key: name.into(), value: format!("{} bytes", data.len()), why });
        }
        let buf = match host.is_empty() {
            true => None,
            false => {
                Some(Arc::new(self.upload(&host).map_err(|e| self.device_error(format!("uploading {name}: {e}")))?))
            }
        };
        Ok((0..count).map(|i| CudaVector { len, buf: buf.clone(), at: i * len..(i + 1) * len }).collect())
    }

    fn stream(&self) -> &Arc<CudaStream> {
        self.inner.rt.stream()
    }

    fn kernels(&self) -> &Kernels {
        &self.inner.k
    }

    /// A device failure as the engine reports it.
    fn device_error(&self, what: String) -> EngineError {
        EngineError::Device { device: format!("CUDA GPU {}", self.inner.ordinal), why: what }
    }

    /// Keeps the first failure of the pass.
    fn record(&self, what: &str, why: String) {
        let mut e = self.inner.error.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_none() {
            *e = Some(format!("{what}: {why}"));
        }
        self.inner.failed.store(true, Ordering::Relaxed);
    }

    /// `f`'s result; after a failure (this one or an earlier one of the pass), `dead`.
    fn attempt<T>(&self, what: &str, dead: impl FnOnce() -> T, f: impl FnOnce() -> Fallible<T>) -> T {
        if self.inner.failed.load(Ordering::Relaxed) {
            return dead();
        }
        match f() {
            Ok(v) => v,
            Err(e) => {
                self.record(what, e);
                dead()
            }
        }
    }

    /// An operation's result matrix (uninitialized: every kernel writing one writes all of
    /// it); no buffer when empty.
    fn act(&self, rows: usize, cols: usize) -> Fallible<CudaAct> {
        let n = rows.checked_mul(cols).ok_or_else(|| format!("{rows}x{cols} overflows"))?;
        let buf = if n == 0 { None } else { Some(self.alloc::<f32>(n)?) };
        Ok(CudaAct { rows, cols, buf })
    }

    /// `n > 0` uninitialized elements.
    fn alloc<T: DeviceRepr>(&self, n: usize) -> Fallible<CudaSlice<T>> {
        // SAFETY: the memory is written by a kernel or a copy before anything reads it.
        unsafe { self.stream().alloc::<T>(n) }.map_err(|e| format!("allocating {n} elements: {e:?}"))
    }

    fn zeroed<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Fallible<CudaSlice<T>> {
        self.stream().alloc_zeros::<T>(n).map_err(|e| format!("allocating {n} elements: {e:?}"))
    }

    /// A copy of host data on the device (staged by the driver: the host may reuse `data`
    /// at once, and nothing waits for the stream).
    fn upload<T: DeviceRepr>(&self, data: &[T]) -> Fallible<CudaSlice<T>> {
        self.stream().clone_htod(data).map_err(|e| format!("copying {} elements to the GPU: {e:?}", data.len()))
    }

    /// The device address of `s` (a buffer or a view), for a kernel's optional array
    /// argument.
    fn raw<T>(&self, s: &impl DevicePtr<T>) -> u64 {
        s.device_ptr(self.stream()).0
    }

    /// `positions` on the device, uploaded again only when they change.
    fn positions(&self, positions: &[u32]) -> Fallible<Arc<CudaSlice<u32>>> {
        let mut cached = self.inner.positions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((host, dev)) = cached.as_ref() {
            if host.as_slice() == positions {
                return Ok(dev.clone());
            }
        }
        let dev = Arc::new(self.upload(positions)?);
        *cached = Some((positions.to_vec(), dev.clone()));
        Ok(dev)
    }

    /// A weight over `data` ([rows × cols] of `ty`), uploaded; `products` asks for the
    /// kernels that multiply by it (else it is a lookup table).
    fn make_weight(
        &self,
        name: &str,
        ty: GgmlType,
        shape: (usize, usize),
        data: &[u8],
        products: bool,
    ) -> Result<CudaWeight, EngineError> {
        let mut one = self.make_weights(name, ty, shape, data, 1, products)?;
        one.pop().ok_or_else(|| EngineError::shape(name, "one matrix", &[]))
    }

    /// `count` weights side by side in `data` (each [rows × cols] of `ty`), uploaded as one
    /// allocation that each is a view into.
    fn make_weights(
        &self,
        name: &str,
        ty: GgmlType,
        (rows, cols): (usize, usize),
        data: &[u8],
        count: usize,
        products: bool,
    ) -> Result<Vec<CudaWeight>, EngineError> {
        let bad =
            |why: &'static str| EngineError::BadValue { key: name.into(), value: format!("{rows}x{cols} {ty}"), why };
        let row_bytes = ty.row_bytes(cols).ok_or_else(|| bad("columns are not whole blocks"))?;
        let size = rows.checked_mul(row_bytes).filter(|&b| b > 0).ok_or_else(|| bad("an empty or too large matrix"))?;
        if size.checked_mul(count) != Some(data.len()) || data.is_empty() {
            return Err(bad("the data is not that many whole rows"));
        }
        let int = |v: usize| i32::try_from(v).map_err(|_| bad("a dimension does not fit the kernels' 32-bit sizes"));
        let dims = WeightDims {
            rows: int(rows)?,
            cols: int(cols)?,
            row_bytes: int(row_bytes)?,
            blocks: int(cols / ty.block_size())?,
        };
        let product =
            if products { self.product_kernels(ty).ok_or_else(|| bad(NO_MATRIX_KERNEL))? } else { Product::None };
        let embed = self.inner.rt.function(&format!("embed_{}", kernel_suffix(ty))).ok();
        if !products && embed.is_none() {
            return Err(bad(
                "the CUDA backend cannot look rows of this type up (F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q4_K, Q6_K)",
            ));
        }
        let bytes = Arc::new(self.upload(data).map_err(|e| self.device_error(format!("uploading {name}: {e}")))?);
        self.inner.weight_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        if !products {
            self.inner.lookup_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        // Each matrix starts at a whole row of the stack, so its rows are as aligned as
        // those of a matrix of its own (the kernels read whole rows at row_bytes strides).
        let weight = |i: usize| CudaWeight {
            ty,
            rows,
            cols,
            bytes: bytes.clone(),
            at: i * size..(i + 1) * size,
            dims,
            product: product.clone(),
            embed: embed.clone(),
        };
        Ok((0..count).map(weight).collect())
    }

    /// The product kernels of `ty`, if it has them.
    fn product_kernels(&self, ty: GgmlType) -> Option<Product> {
        let rt = &self.inner.rt;
        let suffix = kernel_suffix(ty);
        match ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                rt.function(&format!("matmul_float_{suffix}")).ok().map(Product::Float)
            }
            _ => {
                let mode = match ty.act_type() {
                    turbine_cpu::ActType::Q8_0 => ActMode::Q8_0,
                    turbine_cpu::ActType::Q8_K => ActMode::Q8K,
                    _ => return None,
                };
                let matvec = rt.function(&format!("matvec_{suffix}")).ok()?;
                let matmul = rt.function(&format!("matmul_{suffix}")).ok()?;
                let by_slot = rt.function(&format!("matvec_id_{suffix}")).ok();
                Some(Product::Quantized { mode, matvec, matmul, by_slot })
            }
        }
    }
}

/// The bytes of matrices (or vectors) `range` of the `n` equal ones of a tensor's `data`.
fn stack_bytes<'a>(
    name: &str,
    data: &'a [u8],
    n: usize,
    range: &Range<usize>,
    dims: &[u64],
) -> Result<&'a [u8], EngineError> {
    let per = data.len() / n.max(1);
    if n == 0 || per * n != data.len() || range.end > n {
        return Err(EngineError::shape(name, &format!("{n} equal slices, {range:?} of them"), dims));
    }
    data.get(range.start * per..range.end * per)
        .ok_or_else(|| EngineError::shape(name, &format!("{n} equal slices, {range:?} of them"), dims))
}

const NO_MATRIX_KERNEL: &str =
    "the CUDA backend has no matrix kernel for this type (Q8_0, Q4_0, Q5_0, MXFP4, Q4_K, Q6_K, F32, F16, BF16)";

/// The kernel-name suffix of a type: q8_0, q4_k, mxfp4, f16...
fn kernel_suffix(ty: GgmlType) -> String {
    ty.to_string().to_lowercase()
}

/// (ne0, ne1) of a 2-D tensor: columns and rows.
fn matrix_shape(tensor: &TensorInfo) -> Result<(usize, usize), EngineError> {
    match tensor.dims[..] {
        [c, r] => match (usize::try_from(c), usize::try_from(r)) {
            (Ok(c), Ok(r)) => Ok((c, r)),
            _ => Err(EngineError::shape(&tensor.name, "dimensions that fit in memory", &tensor.dims)),
        },
        _ => Err(EngineError::shape(&tensor.name, "2 dimensions", &tensor.dims)),
    }
}

impl Backend for CudaBackend {
    type Act = CudaAct;
    type Weight = CudaWeight;
    type Vector = CudaVector;
    type Kv = CudaKv;

    fn name(&self) -> &'static str {
        "CUDA"
    }

    fn weight(&self, file: &Arc<Gguf>, tensor: &TensorInfo) -> Result<CudaWeight, EngineError> {
        let (cols, rows) = matrix_shape(tensor)?;
        self.make_weight(&tensor.name, tensor.ty, (rows, cols), file.tensor_data(tensor), true)
    }

    /// A range of rows is a range of the file's bytes; a range of columns, a copy of each
    /// row's blocks. Only a tensor-parallel rank asks for a part, and this backend is never
    /// one (`tensor_parallel()` is (0, 1)); the part is uploaded all the same.
    fn weight_part(&self, file: &Arc<Gguf>, tensor: &TensorInfo, part: Part) -> Result<CudaWeight, EngineError> {
        let (cols, rows) = matrix_shape(tensor)?;
        let data = file.tensor_data(tensor);
        if let Part::Rows(r) = &part {
            let range = row_bytes_of(&tensor.name, tensor.ty, rows, cols, r)?;
            let bytes = data.get(range).ok_or_else(|| EngineError::shape(&tensor.name, "whole rows", &tensor.dims))?;
            return self.make_weight(&tensor.name, tensor.ty, (r.len(), cols), bytes, true);
        }
        let (rows, cols, bytes) = shard_bytes(&tensor.name, tensor.ty, rows, cols, data, part)?;
        self.make_weight(&tensor.name, tensor.ty, (rows, cols), &bytes, true)
    }

    fn lookup_table(&self, file: &Arc<Gguf>, tensor: &TensorInfo) -> Result<CudaWeight, EngineError> {
        let (cols, rows) = matrix_shape(tensor)?;
        self.make_weight(&tensor.name, tensor.ty, (rows, cols), file.tensor_data(tensor), false)
    }

    fn vector(&self, file: &Arc<Gguf>, tensor: &TensorInfo) -> Result<CudaVector, EngineError> {
        if tensor.dims.len() != 1 || tensor.ty != GgmlType::F32 {
            return Err(EngineError::shape(&tensor.name, "a 1-D F32 tensor", &tensor.dims));
        }
        let mut one = self.make_vectors(&tensor.name, file.tensor_data(tensor), 1)?;
        one.pop().ok_or_else(|| EngineError::shape(&tensor.name, "one vector", &tensor.dims))
    }

    /// One allocation for the whole stack (`range` of the tensor's `n` matrices), each
    /// weight a view into it, so that [`Backend::moe_grouped`] can address them all.
    fn experts(
        &self,
        file: &Arc<Gguf>,
        tensor: &TensorInfo,
        n: usize,
        range: Range<usize>,
    ) -> Result<Vec<CudaWeight>, EngineError> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let (cols, rows) = match tensor.dims[..] {
            [c, r, m] if m == n as u64 => match (usize::try_from(c), usize::try_from(r)) {
                (Ok(c), Ok(r)) => (c, r),
                _ => return Err(EngineError::shape(&tensor.name, "dimensions that fit in memory", &tensor.dims)),
            },
            _ => return Err(EngineError::shape(&tensor.name, &format!("3 dimensions, the last {n}"), &tensor.dims)),
        };
        let bytes = stack_bytes(&tensor.name, file.tensor_data(tensor), n, &range, &tensor.dims)?;
        self.make_weights(&tensor.name, tensor.ty, (rows, cols), bytes, range.len(), true)
    }

    /// One allocation for the stack of vectors, each a view into it (see `experts`).
    fn expert_vectors(
        &self,
        file: &Arc<Gguf>,
        tensor: &TensorInfo,
        n: usize,
        range: Range<usize>,
    ) -> Result<Vec<CudaVector>, EngineError> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        if tensor.dims.len() != 2 || tensor.dims[1] != n as u64 || tensor.ty != GgmlType::F32 {
            return Err(EngineError::shape(&tensor.name, &format!("a 2-D F32 tensor of {n} vectors"), &tensor.dims));
        }
        let bytes = stack_bytes(&tensor.name, file.tensor_data(tensor), n, &range, &tensor.dims)?;
        self.make_vectors(&tensor.name, bytes, range.len())
    }

    fn new_kv(&self, spec: &KvSpec) -> CudaKv {
        CudaKv::new(self, spec).unwrap_or_else(|why| CudaKv::unallocated(spec, why))
    }

    fn zeros(&self, rows: usize, cols: usize) -> CudaAct {
        self.attempt(
            "zeros",
            || CudaAct::placeholder(rows, cols),
            || {
                let n = rows.checked_mul(cols).ok_or("size overflows")?;
                let buf = if n == 0 { None } else { Some(self.zeroed::<f32>(n)?) };
                Ok(CudaAct { rows, cols, buf })
            },
        )
    }

    fn n_rows(&self, x: &CudaAct) -> usize {
        x.rows
    }

    fn from_host(&self, rows: usize, cols: usize, data: Vec<f32>) -> CudaAct {
        self.attempt(
            "from_host",
            || CudaAct::placeholder(rows, cols),
            || {
                if rows.checked_mul(cols) != Some(data.len()) {
                    return Err(format!("{} values for a {rows}x{cols} matrix", data.len()));
                }
                let buf = if data.is_empty() { None } else { Some(self.upload(&data)?) };
                Ok(CudaAct { rows, cols, buf })
            },
        )
    }

    fn embed(&self, table: &CudaWeight, tokens: &[u32], scale: f32) -> Result<CudaAct, EngineError> {
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= table.rows) {
            return Err(EngineError::TokenOutOfRange { token, n_vocab: table.rows });
        }
        self.embed_rows(table, tokens, scale).map_err(|e| self.device_error(format!("embed: {e}")))
    }

    fn matmul(&self, w: &CudaWeight, x: &CudaAct) -> CudaAct {
        let [y] = self.matmuls([w], x);
        y
    }

    /// Quantizes the input once per activation format the weights need.
    fn matmuls<const N: usize>(&self, ws: [&CudaWeight; N], x: &CudaAct) -> [CudaAct; N] {
        let mut quantized = products::QuantizedCache::default();
        ws.map(|w| {
            let dead = || CudaAct::placeholder(x.rows, w.rows);
            self.attempt("matmul", dead, || self.product(w, x, &mut quantized))
        })
    }

    fn rms_norm(&self, x: &CudaAct, w: &CudaVector, eps: f32) -> CudaAct {
        self.attempt("rms_norm", || CudaAct::placeholder(x.rows, x.cols), || self.norm(x, w, eps))
    }

    fn rope_neox(&self, x: &mut CudaAct, positions: &[u32], head_dim: usize, base: f32, freq_scale: f32) {
        let rope = ops::Rope::plain(true, base, head_dim, freq_scale, None);
        self.attempt("rope_neox", || (), || self.rope(x, positions, head_dim, rope))
    }

    fn rope_norm(
        &self,
        x: &mut CudaAct,
        positions: &[u32],
        head_dim: usize,
        base: f32,
        freq_scale: f32,
        factors: Option<&CudaVector>,
    ) {
        let rope = ops::Rope::plain(false, base, head_dim, freq_scale, factors);
        self.attempt("rope_norm", || (), || self.rope(x, positions, head_dim, rope))
    }

    fn rope_neox_yarn(&self, x: &mut CudaAct, positions: &[u32], head_dim: usize, base: f32, yarn: &Yarn) {
        let rope = ops::Rope::yarn(true, base, head_dim, yarn);
        self.attempt("rope_neox_yarn", || (), || self.rope(x, positions, head_dim, rope))
    }

    fn rope_norm_yarn(&self, x: &mut CudaAct, positions: &[u32], head_dim: usize, base: f32, yarn: &Yarn) {
        let rope = ops::Rope::yarn(false, base, head_dim, yarn);
        self.attempt("rope_norm_yarn", || (), || self.rope(x, positions, head_dim, rope))
    }

    fn scale(&self, x: &mut CudaAct, s: f32) {
        self.attempt("scale", || (), || self.scale_in_place(x, s))
    }

    fn add(&self, y: &mut CudaAct, x: &CudaAct) {
        self.attempt("add", || (), || self.add_in_place(y, x))
    }

    fn add_bias(&self, x: &mut CudaAct, bias: &CudaVector) {
        self.attempt("add_bias", || (), || self.bias_in_place(x, bias))
    }

    fn add_scaled_rows(&self, y: &mut CudaAct, x: &CudaAct, rows: &[usize], weights: &[f32]) {
        self.attempt("add_scaled_rows", || (), || self.scaled_rows(y, x, rows, weights))
    }

    fn geglu(&self, gate: &mut CudaAct, up: &CudaAct) {
        self.attempt("geglu", || (), || self.gated(ops::Gate::GeGlu, gate, up))
    }

    fn swiglu(&self, gate: &mut CudaAct, up: &CudaAct) {
        self.attempt("swiglu", || (), || self.gated(ops::Gate::SwiGlu, gate, up))
    }

    fn swiglu_oai(&self, gate: &mut CudaAct, up: &CudaAct, alpha: f32, limit: f32) {
        self.attempt("swiglu_oai", || (), || self.gated(ops::Gate::SwiGluOai { alpha, limit }, gate, up))
    }

    fn attention(
        &self,
        kv: &mut CudaKv,
        layer: usize,
        batch: &BatchLayout,
        q: &CudaAct,
        k: &CudaAct,
        v: &CudaAct,
        shape: AttnShape,
        sinks: Option<&CudaVector>,
    ) -> CudaAct {
        let dead = || CudaAct::placeholder(q.rows, shape.n_heads * shape.v_head_dim);
        self.attempt("attention", dead, || kv.attend(self, layer, batch, [q, k, v], shape, sinks))
    }

    fn gather_cols(&self, x: &CudaAct, spans: &[(usize, usize)]) -> CudaAct {
        let cols = spans.iter().map(|&(_, len)| len).sum();
        self.attempt("gather_cols", || CudaAct::placeholder(x.rows, cols), || self.columns(x, spans))
    }

    fn concat_cols(&self, parts: &[&CudaAct]) -> CudaAct {
        let rows = parts.first().map_or(0, |p| p.rows);
        let cols = parts.iter().map(|p| p.cols).sum();
        self.attempt("concat_cols", || CudaAct::placeholder(rows, cols), || self.concat(parts))
    }

    fn select_rows(&self, x: &CudaAct, rows: &[usize]) -> CudaAct {
        self.attempt("select_rows", || CudaAct::placeholder(rows.len(), x.cols), || self.pick_rows(x, rows))
    }

    /// matvec_id over every slot, where the experts are stacks with such kernels and the
    /// batch is small enough for it to pay (`moe.rs`); None otherwise.
    fn moe_grouped(&self, x: &CudaAct, routes: &Routes, experts: &ExpertWeights<'_, Self>) -> Option<CudaAct> {
        if !self.inner.grouped_moe.load(Ordering::Relaxed) {
            return None;
        }
        let plan = moe::Plan::new(x, routes, experts)?;
        self.inner.grouped_moe_runs.fetch_add(1, Ordering::Relaxed);
        let dead = || CudaAct::placeholder(x.rows, plan.d_out());
        Some(self.attempt("moe_grouped", dead, || self.grouped_experts(x, routes, &plan)))
    }

    /// The device failure this pass met first, as an [`EngineError`] (a collective cannot
    /// fail: there is none on one GPU). Clears it for the next pass.
    fn take_tp_error(&self) -> Option<EngineError> {
        // Failures cudarc met where it could not return them (freeing buffers).
        if let Err(e) = self.inner.rt.ctx().check_err() {
            self.record("releasing device memory", format!("{e:?}"));
        }
        let e = self.inner.error.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        self.inner.failed.store(false, Ordering::Relaxed);
        Some(self.device_error(e))
    }

    /// The copy waits for every operation before it; after a failure, zeros of the right
    /// size (the pass returns the failure, not these).
    fn to_host(&self, x: &CudaAct) -> Vec<f32> {
        let zeros = || vec![0.0f32; x.len()];
        self.attempt("copying to the host", zeros, || match &x.buf {
            None if x.len() == 0 => Ok(Vec::new()),
            None => Err("the matrix was lost to an earlier failure".into()),
            Some(buf) => self.stream().clone_dtoh(buf).map_err(|e| format!("{e:?}")),
        })
    }
}

impl LoadedModel<CudaBackend> {
    /// Opens a GGUF file and uploads its weights to `backend`'s GPU.
    pub fn load_cuda(path: &Path, backend: CudaBackend) -> Result<Self, EngineError> {
        let start = Instant::now();
        let file = Arc::new(Gguf::open(path)?);
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let arch = crate::model::load(&backend, &file)?;
        if tokenizer.n_vocab() > arch.info().n_vocab {
            return Err(EngineError::BadValue {
                key: "tokenizer.ggml.tokens".into(),
                value: tokenizer.n_vocab().to_string(),
                why: "more tokens than the embedding matrix has rows",
            });
        }
        // Uploads are queued; a failed one shows here rather than at the first step.
        backend.synchronize()?;
        Ok(LoadedModel { file, tokenizer, arch, backend, load_time: start.elapsed(), release: Default::default() })
    }
}
