//! Model handles: loading, accessors and the tokenizer.

use super::*;
use std::ffi::{c_char, CString};
use std::path::Path;
use std::sync::Arc;
use turbine_engine::backend::cpu::CpuBackend;
use turbine_engine::generate::{Device, LoadedModel};

pub(crate) type Model = LoadedModel<CpuBackend>;

/// `turbine_model` in C: a loaded model, immutable and shared by the contexts made from it.
pub struct TurbineModel {
    pub(crate) inner: Arc<Model>,
    arch_name: CString,
}

// The handle is shared across threads (header: "thread-safe").
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<TurbineModel>();
};

impl TurbineModel {
    pub(crate) fn n_vocab(&self) -> usize {
        self.inner.arch.info().n_vocab
    }
}

/// A caller's token id as the engine's, checked against the model's vocabulary.
pub(crate) fn check_token(model: &Model, id: TurbineToken) -> Res<u32> {
    let n_vocab = model.arch.info().n_vocab;
    match u32::try_from(id) {
        Ok(t) if (t as usize) < n_vocab => Ok(t),
        _ => Err(error(
            TURBINE_ERR_TOKEN_OUT_OF_RANGE,
            format!("token id {id} is out of range (vocabulary size {n_vocab})"),
        )),
    }
}

/// [`check_token`] for each id of a caller's array.
pub(crate) fn check_tokens(model: &Model, ids: &[TurbineToken]) -> Res<Vec<u32>> {
    ids.iter().map(|&id| check_token(model, id)).collect()
}

/// How a model is loaded: whole on a device, or split over tensor-parallel ranks.
enum Placement {
    Whole(Device),
    /// (ranks, threads per rank).
    Split(usize, usize),
}

fn load(path: &str, placement: Placement) -> Res<TurbineModel> {
    let model = match placement {
        Placement::Whole(device) => LoadedModel::load_on(Path::new(path), device)?,
        Placement::Split(ranks, threads) => LoadedModel::load_split(Path::new(path), ranks, threads)?,
    };
    let info = model.arch.info();
    if i32::try_from(info.n_vocab).is_err() {
        return Err(error(
            TURBINE_ERR_MODEL,
            format!("vocabulary of {} tokens does not fit turbine_token", info.n_vocab),
        ));
    }
    let arch_name = CString::new(info.architecture.as_str())
        .map_err(|_| error(TURBINE_ERR_MODEL, "architecture name contains a NUL byte"))?;
    Ok(TurbineModel { inner: Arc::new(model), arch_name })
}

/// Loads a GGUF model file; see `turbine.h`.
///
/// # Safety
/// `path` must be NULL or a NUL-terminated string; `model_out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn turbine_model_load(path: *const c_char, model_out: *mut *mut TurbineModel) -> TurbineStatus {
    guard(|| {
        let out = arg_mut(model_out, "model_out")?;
        *out = std::ptr::null_mut();
        let model = load(str_arg(path, "path")?, Placement::Whole(Device::Cpu))?;
        *out = Box::into_raw(Box::new(model));
        Ok(())
    })
}

/// Most tensor-parallel ranks `turbine_model_load_split` accepts (as `--tp`).
const MAX_RANKS: i32 = 64;

/// Loads a GGUF model file split over tensor-parallel ranks; see `turbine.h`.
///
/// # Safety
/// `path` must be NULL or a NUL-terminated string; `model_out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn turbine_model_load_split(
    path: *const c_char,
    n_ranks: i32,
    n_threads_per_rank: i32,
    model_out: *mut *mut TurbineModel,
) -> TurbineStatus {
    guard(|| {
        let out = arg_mut(model_out, "model_out")?;
        *out = std::ptr::null_mut();
        if !(1..=MAX_RANKS).contains(&n_ranks) {
            let why = format!("n_ranks is {n_ranks}: expected 1 to {MAX_RANKS}");
            return Err(error(TURBINE_ERR_INVALID_ARGUMENT, why));
        }
        if n_threads_per_rank < 1 {
            let why = format!("n_threads_per_rank is {n_threads_per_rank}: expected at least 1");
            return Err(error(TURBINE_ERR_INVALID_ARGUMENT, why));
        }
        let split = Placement::Split(n_ranks as usize, n_threads_per_rank as usize);
        let model = load(str_arg(path, "path")?, split)?;
        *out = Box::into_raw(Box::new(model));
        Ok(())
    })
}

/// Loads a GGUF model file on a device (`cpu`, `cuda`, `cuda:N`, `auto`); see `turbine.h`.
///
/// # Safety
/// `path` and `device` must be NULL or NUL-terminated strings; `model_out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn turbine_model_load_on(
    path: *const c_char,
    device: *const c_char,
    model_out: *mut *mut TurbineModel,
) -> TurbineStatus {
    guard(|| {
        let out = arg_mut(model_out, "model_out")?;
        *out = std::ptr::null_mut();
        let device =
            str_arg(device, "device")?.parse::<Device>().map_err(|e| error(TURBINE_ERR_INVALID_ARGUMENT, e))?;
        let model = load(str_arg(path, "path")?, Placement::Whole(device))?;
        *out = Box::into_raw(Box::new(model));
        Ok(())
    })
}

/// Releases a model handle (NULL: nothing happens); see `turbine.h`.
///
/// # Safety
/// `model` must be NULL or a handle from `turbine_model_load` not freed before.
#[no_mangle]
pub unsafe extern "C" fn turbine_model_free(model: *mut TurbineModel) {
    guard(|| {
        if !model.is_null() {
            drop(Box::from_raw(model));
        }
        Ok(())
    });
}

/// Vocabulary size (the width of a logits row), or a negative status; see `turbine.h`.
///
/// # Safety
/// `model` must be NULL or a live model handle.
#[no_mangle]
pub unsafe extern "C" fn turbine_model_n_vocab(model: *const TurbineModel) -> i32 {
    guard_value(|status| status, || Ok(to_i32(arg(model, "model")?.n_vocab())))
}

/// The context length the model was trained for, or a negative status; see `turbine.h`.
///
/// # Safety
/// `model` must be NULL or a live model handle.
#[no_mangle]
pub unsafe extern "C" fn turbine_model_context_length(model: *const TurbineModel) -> i32 {
    guard_value(|status| status, || Ok(to_i32(arg(model, "model")?.inner.arch.info().context_length)))
}

/// The architecture name ("gemma3"), owned by the model, or NULL; see `turbine.h`.
///
/// # Safety
/// `model` must be NULL or a live model handle.
#[no_mangle]
pub unsafe extern "C" fn turbine_model_architecture(model: *const TurbineModel) -> *const c_char {
    guard_value(|_| std::ptr::null(), || Ok(arg(model, "model")?.arch_name.as_ptr()))
}

/// 1 if the token ends generation (EOS, end of turn), 0 if not, or a negative status; see
/// `turbine.h`.
///
/// # Safety
/// `model` must be NULL or a live model handle.
#[no_mangle]
pub unsafe extern "C" fn turbine_token_is_eog(model: *const TurbineModel, token: TurbineToken) -> i32 {
    guard_value(
        |status| status,
        || {
            let model = arg(model, "model")?;
            Ok(i32::from(model.inner.tokenizer.is_eog(check_token(&model.inner, token)?)))
        },
    )
}

/// Text to token ids, into a caller buffer; see `turbine.h`.
///
/// # Safety
/// `model` a live handle or NULL; `text` NULL or NUL-terminated; `tokens` NULL or
/// `n_tokens_max` writable ids; `n_tokens_out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn turbine_tokenize(
    model: *const TurbineModel,
    text: *const c_char,
    add_special: bool,
    parse_special: bool,
    tokens: *mut TurbineToken,
    n_tokens_max: usize,
    n_tokens_out: *mut usize,
) -> TurbineStatus {
    guard(|| {
        let model = arg(model, "model")?;
        let text = str_arg(text, "text")?;
        let out = slice_out(tokens, n_tokens_max, "tokens")?;
        let ids = model.inner.tokenizer.encode(text, add_special, parse_special);
        write_opt(n_tokens_out, ids.len())?;
        if ids.len() > out.len() {
            let msg = format!("token buffer holds {n_tokens_max}, {} needed", ids.len());
            return Err(error(TURBINE_ERR_BUFFER_TOO_SMALL, msg));
        }
        // Ids are below n_vocab, which load checked fits an i32.
        out.iter_mut().zip(&ids).for_each(|(o, &id)| *o = id as TurbineToken);
        Ok(())
    })
}

/// The text of one token, NUL-terminated, into a caller buffer; see `turbine.h`.
///
/// # Safety
/// `model` a live handle or NULL; `buf` NULL or `buf_size` writable bytes; `len_out`
/// NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn turbine_token_to_piece(
    model: *const TurbineModel,
    token: TurbineToken,
    render_special: bool,
    buf: *mut c_char,
    buf_size: usize,
    len_out: *mut usize,
) -> TurbineStatus {
    guard(|| {
        let model = arg(model, "model")?;
        let id = check_token(&model.inner, token)?;
        write_text(&model.inner.tokenizer.token_to_piece_with(id, render_special), buf, buf_size, len_out)
    })
}

/// The text of a token sequence, NUL-terminated, into a caller buffer; see `turbine.h`.
///
/// # Safety
/// `model` a live handle or NULL; `tokens` NULL or `n_tokens` readable ids; `buf` NULL or
/// `buf_size` writable bytes; `len_out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn turbine_detokenize(
    model: *const TurbineModel,
    tokens: *const TurbineToken,
    n_tokens: usize,
    remove_special: bool,
    render_special: bool,
    buf: *mut c_char,
    buf_size: usize,
    len_out: *mut usize,
) -> TurbineStatus {
    guard(|| {
        let model = arg(model, "model")?;
        let ids = check_tokens(&model.inner, slice_arg(tokens, n_tokens, "tokens")?)?;
        let bytes = model.inner.tokenizer.detokenize(&ids, remove_special, render_special);
        write_text(&bytes, buf, buf_size, len_out)
    })
}
