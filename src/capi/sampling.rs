//! Samplers and whole-prompt generation.

use super::context::TurbineContext;
use super::*;
use std::ffi::{c_char, c_void};
use turbine_engine::generate::{DoneReason, GenerateOptions};
use turbine_engine::sampler::{Sampler, SamplerParams};

/// A seed that asks for a different draw each run (the clock's).
pub const TURBINE_SEED_RANDOM: u64 = u64::MAX;

/// `turbine_sampling_params` in C.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TurbineSamplingParams {
    /// ≤ 0: greedy (highest logit, no penalties).
    pub temperature: f32,
    /// Keep the k most likely tokens (≤ 0: all).
    pub top_k: i32,
    /// Keep the smallest set whose probability reaches top_p (≥ 1: all).
    pub top_p: f32,
    /// Drop tokens less likely than min_p × the most likely one (0: off).
    pub min_p: f32,
    /// Penalty on the last 64 tokens (1: off).
    pub repeat_penalty: f32,
    /// The same seed gives the same tokens; `TURBINE_SEED_RANDOM`: the clock's.
    pub seed: u64,
}

impl TurbineSamplingParams {
    fn to_engine(self) -> Res<SamplerParams> {
        let floats = [self.temperature, self.top_p, self.min_p, self.repeat_penalty];
        if floats.iter().any(|x| !x.is_finite()) {
            return Err(error(TURBINE_ERR_INVALID_ARGUMENT, "sampling parameters must be finite"));
        }
        if self.top_p < 0.0 || self.min_p < 0.0 || self.repeat_penalty <= 0.0 {
            let msg = "sampling parameters out of range: top_p and min_p must be ≥ 0, repeat_penalty > 0";
            return Err(error(TURBINE_ERR_INVALID_ARGUMENT, msg));
        }
        Ok(SamplerParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            seed: (self.seed != TURBINE_SEED_RANDOM).then_some(self.seed),
            ..SamplerParams::default()
        })
    }
}

/// Ollama's defaults (temperature 0.8, top_k 40, top_p 0.9, min_p 0, repeat_penalty 1.1),
/// random seed.
#[no_mangle]
pub extern "C" fn turbine_sampling_params_default() -> TurbineSamplingParams {
    let d = SamplerParams::default();
    TurbineSamplingParams {
        temperature: d.temperature,
        top_k: d.top_k,
        top_p: d.top_p,
        min_p: d.min_p,
        repeat_penalty: d.repeat_penalty,
        seed: TURBINE_SEED_RANDOM,
    }
}

/// Greedy decoding: temperature 0, no penalties.
#[no_mangle]
pub extern "C" fn turbine_sampling_params_greedy() -> TurbineSamplingParams {
    TurbineSamplingParams { temperature: 0.0, repeat_penalty: 1.0, seed: 0, ..turbine_sampling_params_default() }
}

/// `turbine_sampler` in C: sampling parameters, the random state and the recent tokens.
pub struct TurbineSampler(Sampler);

/// Creates a sampler; see `turbine.h`.
///
/// # Safety
/// `sampler_out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn turbine_sampler_new(
    temperature: f32,
    top_k: i32,
    top_p: f32,
    min_p: f32,
    repeat_penalty: f32,
    seed: u64,
    sampler_out: *mut *mut TurbineSampler,
) -> TurbineStatus {
    guard(|| {
        let out = arg_mut(sampler_out, "sampler_out")?;
        *out = std::ptr::null_mut();
        let params = TurbineSamplingParams { temperature, top_k, top_p, min_p, repeat_penalty, seed };
        *out = Box::into_raw(Box::new(TurbineSampler(Sampler::new(params.to_engine()?))));
        Ok(())
    })
}

/// Releases a sampler (NULL: nothing happens); see `turbine.h`.
///
/// # Safety
/// `sampler` must be NULL or a handle from `turbine_sampler_new` not freed before.
#[no_mangle]
pub unsafe extern "C" fn turbine_sampler_free(sampler: *mut TurbineSampler) {
    guard(|| {
        if !sampler.is_null() {
            drop(Box::from_raw(sampler));
        }
        Ok(())
    });
}

/// Records a token (of the prompt) for the repetition penalty; see `turbine.h`.
///
/// # Safety
/// `sampler` NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn turbine_sampler_accept(sampler: *mut TurbineSampler, token: TurbineToken) -> TurbineStatus {
    guard(|| {
        let sampler = arg_mut(sampler, "sampler")?;
        let id = u32::try_from(token)
            .map_err(|_| error(TURBINE_ERR_TOKEN_OUT_OF_RANGE, format!("token id {token} is negative")))?;
        sampler.0.accept(id);
        Ok(())
    })
}

/// Picks the next token from the context's last logits and records it; see `turbine.h`.
///
/// # Safety
/// `sampler` and `ctx` NULL or live handles; `token_out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn turbine_sample(
    sampler: *mut TurbineSampler,
    ctx: *const TurbineContext,
    token_out: *mut TurbineToken,
) -> TurbineStatus {
    guard(|| {
        let out = arg_mut(token_out, "token_out")?;
        let (sampler, ctx) = (arg_mut(sampler, "sampler")?, arg(ctx, "ctx")?);
        if ctx.logits.is_empty() {
            return Err(error(TURBINE_ERR_INVALID_STATE, "no logits: decode tokens before sampling"));
        }
        let id = sampler.0.sample(&ctx.logits);
        sampler.0.accept(id);
        *out = to_i32(id as usize);
        Ok(())
    })
}

/// Why `turbine_generate` stopped (`turbine_done_reason` in C).
pub const TURBINE_DONE_STOP: i32 = 0;
pub const TURBINE_DONE_LENGTH: i32 = 1;
pub const TURBINE_DONE_CANCELLED: i32 = 2;

/// `turbine_piece_callback` in C: one piece of text (`len` bytes of UTF-8 and a NUL),
/// valid during the call; returns false to stop.
pub type TurbinePieceCallback = unsafe extern "C" fn(piece: *const c_char, len: usize, user_data: *mut c_void) -> bool;

/// The prompt's continuation through the engine's generation loop (the CLI's path), on
/// the context's KV cache and threads, calling `on_text` on the caller's thread.
fn generate(
    ctx: &mut TurbineContext,
    prompt: &str,
    params: SamplerParams,
    max_tokens: Option<usize>,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Res<i32> {
    let model = std::sync::Arc::clone(&ctx.model);
    let prompt = model.tokenizer.encode(prompt, true, true);
    let opts = GenerateOptions {
        num_predict: max_tokens,
        num_ctx: ctx.n_ctx(),
        sampler: params,
        stop: Vec::new(),
        logprobs: None,
        render_special: false,
        format: None,
    };
    ctx.clear();
    let stats = turbine_engine::generate::generate(ctx, &model.tokenizer, &prompt, &opts, on_text)?;
    Ok(match stats.done_reason {
        DoneReason::Stop => TURBINE_DONE_STOP,
        DoneReason::Length => TURBINE_DONE_LENGTH,
        DoneReason::Cancelled => TURBINE_DONE_CANCELLED,
    })
}

/// Continues a prompt, streaming each piece of text to a callback; see `turbine.h`.
///
/// # Safety
/// `ctx` NULL or a live handle; `prompt` NULL or NUL-terminated; `params` NULL or
/// readable; `callback` NULL or a function safe to call with `user_data`; `done_out` NULL
/// or writable.
#[no_mangle]
pub unsafe extern "C" fn turbine_generate(
    ctx: *mut TurbineContext,
    prompt: *const c_char,
    params: *const TurbineSamplingParams,
    max_tokens: i32,
    callback: Option<TurbinePieceCallback>,
    user_data: *mut c_void,
    done_out: *mut i32,
) -> TurbineStatus {
    guard(|| {
        let ctx = arg_mut(ctx, "ctx")?;
        let prompt = str_arg(prompt, "prompt")?;
        let params = if params.is_null() { turbine_sampling_params_greedy() } else { *arg(params, "params")? };
        let callback = callback.ok_or_else(|| error(TURBINE_ERR_NULL_ARGUMENT, "callback is NULL"))?;
        let mut on_text = |text: &str| {
            let piece: Vec<u8> = text.bytes().chain([0]).collect();
            callback(piece.as_ptr().cast(), text.len(), user_data)
        };
        let done = generate(ctx, prompt, params.to_engine()?, usize::try_from(max_tokens).ok(), &mut on_text)?;
        write_opt(done_out, done)
    })
}
