//! Context handles: one sequence's KV cache, its thread pool, and the last logits.

use super::model::{check_tokens, Model, TurbineModel};
use super::*;
use std::sync::Arc;
use turbine_engine::backend::cpu::CpuBackend;
use turbine_engine::backend::{Backend, KvCache};
use turbine_engine::generate::Sequence;
use turbine_engine::model::Batch;
use turbine_engine::EngineError;

/// Most threads a context may ask for.
pub const TURBINE_MAX_THREADS: u32 = 1024;

/// `turbine_context` in C: one sequence on a model. It holds the model alive, so the model
/// handle may be freed first.
pub struct TurbineContext {
    pub(crate) model: Arc<Model>,
    kv: <CpuBackend as Backend>::Kv,
    n_ctx: usize,
    /// A dedicated pool, or None for rayon's global one.
    pool: Option<rayon::ThreadPool>,
    /// Logits of the last token decoded (empty before the first decode).
    pub(crate) logits: Vec<f32>,
}

// A context may move between threads (header: "one thread at a time").
const _: fn() = || {
    fn movable<T: Send>() {}
    movable::<TurbineContext>();
};

impl TurbineContext {
    fn new(model: &TurbineModel, n_ctx: u32, n_threads: u32) -> Res<TurbineContext> {
        let max = model.inner.arch.info().context_length;
        let n_ctx = if n_ctx == 0 { max } else { n_ctx as usize };
        if n_ctx > max {
            return Err(error(TURBINE_ERR_INVALID_ARGUMENT, format!("n_ctx {n_ctx} exceeds the model's {max}")));
        }
        if n_threads > TURBINE_MAX_THREADS {
            let msg = format!("n_threads {n_threads} exceeds {TURBINE_MAX_THREADS}");
            return Err(error(TURBINE_ERR_INVALID_ARGUMENT, msg));
        }
        let pool = match n_threads {
            0 => None,
            n => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n as usize)
                    .thread_name(|i| format!("turbine-{i}"))
                    .build()
                    .map_err(|e| error(TURBINE_ERR_INTERNAL, format!("starting {n} threads: {e}")))?,
            ),
        };
        let m = &model.inner;
        let kv = m.backend.new_kv(&m.arch.kv_spec(n_ctx, 1));
        Ok(TurbineContext { model: Arc::clone(m), kv, n_ctx, pool, logits: Vec::new() })
    }

    pub(crate) fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub(crate) fn len(&self) -> usize {
        self.kv.seq_len(0)
    }

    pub(crate) fn clear(&mut self) {
        self.kv.clear(0);
        self.logits.clear();
    }

    /// Appends checked token ids and runs the forward on the context's threads, keeping the
    /// last token's logits. On an error the tokens and logits are as they were.
    pub(crate) fn decode(&mut self, tokens: &[u32]) -> Res<()> {
        if tokens.is_empty() {
            return Err(error(TURBINE_ERR_INVALID_ARGUMENT, "n_tokens is 0"));
        }
        let (len, limit) = (self.len(), self.n_ctx);
        if len + tokens.len() > limit {
            let msg = format!("{len} tokens + {} new exceed the context length {limit}", tokens.len());
            return Err(error(TURBINE_ERR_CONTEXT_FULL, msg));
        }
        Ok(self.forward(tokens)?)
    }

    /// Runs the forward over tokens that fit, on the context's threads, keeping the last
    /// token's logits.
    fn forward(&mut self, tokens: &[u32]) -> Result<(), EngineError> {
        let batch = Batch::for_sequence(0, self.len(), tokens, false);
        let TurbineContext { model, kv, pool, .. } = self;
        let mut forward = || model.arch.forward(&model.backend, &batch, kv);
        let logits = match pool {
            Some(pool) => pool.install(forward),
            None => forward(),
        }?;
        self.logits = logits.data;
        Ok(())
    }
}

/// The engine's generation loop runs on the context's cache and threads.
impl Sequence for TurbineContext {
    fn len(&self) -> usize {
        TurbineContext::len(self)
    }

    fn append(&mut self, tokens: &[u32]) -> Result<&[f32], EngineError> {
        self.forward(tokens)?;
        Ok(&self.logits)
    }
}

/// Creates a context on a model; see `turbine.h`.
///
/// # Safety
/// `model` NULL or a live handle; `ctx_out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn turbine_context_new(
    model: *const TurbineModel,
    n_ctx: u32,
    n_threads: u32,
    ctx_out: *mut *mut TurbineContext,
) -> TurbineStatus {
    guard(|| {
        let out = arg_mut(ctx_out, "ctx_out")?;
        *out = std::ptr::null_mut();
        let ctx = TurbineContext::new(arg(model, "model")?, n_ctx, n_threads)?;
        *out = Box::into_raw(Box::new(ctx));
        Ok(())
    })
}

/// Releases a context (NULL: nothing happens); see `turbine.h`.
///
/// # Safety
/// `ctx` must be NULL or a handle from `turbine_context_new` not freed before.
#[no_mangle]
pub unsafe extern "C" fn turbine_context_free(ctx: *mut TurbineContext) {
    guard(|| {
        if !ctx.is_null() {
            drop(Box::from_raw(ctx));
        }
        Ok(())
    });
}

/// The context's length in tokens, or a negative status; see `turbine.h`.
///
/// # Safety
/// `ctx` NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn turbine_context_n_ctx(ctx: *const TurbineContext) -> i32 {
    guard_value(|status| status, || Ok(to_i32(arg(ctx, "ctx")?.n_ctx())))
}

/// Tokens decoded so far, or a negative status; see `turbine.h`.
///
/// # Safety
/// `ctx` NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn turbine_context_n_tokens(ctx: *const TurbineContext) -> i32 {
    guard_value(|status| status, || Ok(to_i32(arg(ctx, "ctx")?.len())))
}

/// Forgets every token and the logits; see `turbine.h`.
///
/// # Safety
/// `ctx` NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn turbine_context_clear(ctx: *mut TurbineContext) -> TurbineStatus {
    guard(|| {
        arg_mut(ctx, "ctx")?.clear();
        Ok(())
    })
}

/// Appends tokens to the context and runs the forward; see `turbine.h`.
///
/// # Safety
/// `ctx` NULL or a live handle; `tokens` NULL or `n_tokens` readable ids.
#[no_mangle]
pub unsafe extern "C" fn turbine_decode(
    ctx: *mut TurbineContext,
    tokens: *const TurbineToken,
    n_tokens: usize,
) -> TurbineStatus {
    guard(|| {
        let ctx = arg_mut(ctx, "ctx")?;
        let tokens = slice_arg(tokens, n_tokens, "tokens")?;
        let ids = check_tokens(&ctx.model, tokens)?;
        ctx.decode(&ids)
    })
}

/// The last decoded token's logits, owned by the context; see `turbine.h`.
///
/// # Safety
/// `ctx` NULL or a live handle; `logits_out` and `n_vocab_out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn turbine_get_logits(
    ctx: *const TurbineContext,
    logits_out: *mut *const f32,
    n_vocab_out: *mut usize,
) -> TurbineStatus {
    guard(|| {
        let out = arg_mut(logits_out, "logits_out")?;
        *out = std::ptr::null();
        let ctx = arg(ctx, "ctx")?;
        if ctx.logits.is_empty() {
            return Err(error(
                TURBINE_ERR_INVALID_STATE,
                "no logits: nothing decoded since the context was created or cleared",
            ));
        }
        write_opt(n_vocab_out, ctx.logits.len())?;
        *out = ctx.logits.as_ptr();
        Ok(())
    })
}
