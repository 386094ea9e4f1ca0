/*
 * turbine.h: the C API of Turbine, a kernel-first LLM inference engine.
 *
 * Link against libturbine.a (`cargo build --release` puts it in target/release/) and the
 * system libraries Rust's standard library needs; on Linux with glibc:
 *
 *     cc prog.c -Iinclude target/release/libturbine.a -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
 *
 * Conventions
 * -----------
 * - Handles (turbine_model, turbine_context, turbine_sampler) are opaque. Each is created
 *   by one function (..._load / ..._new) and released by one (..._free). A free function
 *   accepts NULL and does nothing; freeing a handle twice, or using it after freeing it, is
 *   undefined behaviour.
 * - Most functions return a turbine_status: TURBINE_OK (0) on success, a negative
 *   TURBINE_ERR_* code on failure. Accessors that return a count return it directly, or a
 *   negative TURBINE_ERR_* code on failure. On every failure the calling thread's message
 *   (turbine_last_error) says what went wrong; output handles are set to NULL.
 * - Strings passed in are NUL-terminated UTF-8; text coming out is written into caller
 *   buffers with a terminating NUL, and the length (without the NUL) is reported.
 * - Pointers documented as optional may be NULL; every other NULL pointer is refused with
 *   TURBINE_ERR_NULL_ARGUMENT. A buffer pointer may be NULL when its size is 0.
 * - Turbine never lets a Rust panic cross into C: a panic becomes TURBINE_ERR_INTERNAL and
 *   a message. A handle whose call returned TURBINE_ERR_INTERNAL should only be freed.
 *
 * Thread safety
 * -------------
 * - A turbine_model is immutable once loaded: any number of threads may use one model at
 *   the same time (tokenizing, creating contexts, ...).
 * - A turbine_context or turbine_sampler is used by one thread at a time; it may move
 *   between threads. Different contexts on the same model run in parallel.
 * - turbine_last_error is per thread.
 *
 * Ownership
 * ---------
 * - A context keeps its model alive: turbine_model_free may be called while contexts made
 *   from the model exist; the model's memory is released with the last of them.
 * - Pointers Turbine returns (turbine_model_architecture, turbine_get_logits,
 *   turbine_last_error, turbine_status_string) point into memory Turbine owns; their
 *   lifetimes are given below. The caller never frees them.
 */
#ifndef TURBINE_H
#define TURBINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Status codes ----------------------------------------------------------------- */

typedef int32_t turbine_status;

#define TURBINE_OK 0
/* A required pointer argument was NULL. */
#define TURBINE_ERR_NULL_ARGUMENT (-1)
/* An argument is outside its documented range, misaligned, or not valid UTF-8. */
#define TURBINE_ERR_INVALID_ARGUMENT (-2)
/* The caller's buffer is too small; the needed size was reported (nothing else written). */
#define TURBINE_ERR_BUFFER_TOO_SMALL (-3)
/* A token id is negative or not below turbine_model_n_vocab. */
#define TURBINE_ERR_TOKEN_OUT_OF_RANGE (-4)
/* A file could not be opened or read (it does not exist, permissions, ...). */
#define TURBINE_ERR_IO (-5)
/* A model file is corrupt, truncated, or of an unsupported architecture or tokenizer. */
#define TURBINE_ERR_MODEL (-6)
/* The tokens do not fit in the context's length. */
#define TURBINE_ERR_CONTEXT_FULL (-7)
/* The call needs state the handle does not have yet (logits before any decode). */
#define TURBINE_ERR_INVALID_STATE (-8)
/* A bug inside Turbine (a caught panic). */
#define TURBINE_ERR_INTERNAL (-9)
/* The device asked for cannot be used (a build without CUDA, no driver, no such GPU, an
 * unsupported GPU), or it failed (out of its memory, a failed kernel launch). */
#define TURBINE_ERR_DEVICE (-10)

/* The message of the last failed call on the calling thread ("" if none has failed yet).
 * Successful calls do not clear it. Never NULL; valid until the next failing call on this
 * thread. */
const char *turbine_last_error(void);

/* A fixed English description of a status code ("buffer too small"). Never NULL; static. */
const char *turbine_status_string(turbine_status status);

/* ---- Models ----------------------------------------------------------------------- */

/* A token id: 0 <= id < turbine_model_n_vocab(model). */
typedef int32_t turbine_token;

typedef struct turbine_model turbine_model;

/* Loads a GGUF model file (memory-mapped; weights stay in the file's quantized types) and
 * stores a new handle in *model_out (NULL on failure). Errors: TURBINE_ERR_NULL_ARGUMENT,
 * TURBINE_ERR_INVALID_ARGUMENT (path not UTF-8), TURBINE_ERR_IO (cannot open or read),
 * TURBINE_ERR_MODEL (corrupt, truncated or unsupported file). The file must not be
 * modified while the model is loaded. Release with turbine_model_free. */
turbine_status turbine_model_load(const char *path, turbine_model **model_out);

/* turbine_model_load with the model split over n_ranks tensor-parallel ranks (1 to 64):
 * threads of this process with n_threads_per_rank threads each (>= 1), each holding its
 * share of the weights (attention heads, FFN width, vocabulary, experts) and the keys and
 * values of its heads (a KV head read by several ranks, and DeepSeek's latent, are whole on
 * each). The model is used as any other: every call on a context made from it runs on
 * every rank. One rank sums as a split does, the reference for more. Errors: those of
 * turbine_model_load, TURBINE_ERR_INVALID_ARGUMENT (a count out of range) and
 * TURBINE_ERR_MODEL (a model whose heads or blocks do not split over n_ranks). */
turbine_status turbine_model_load_split(const char *path, int32_t n_ranks, int32_t n_threads_per_rank,
                                        turbine_model **model_out);

/* turbine_model_load on a device: "cpu", "cuda" (GPU 0), "cuda:N" or "auto" (GPU 0 where
 * it can be used, else the CPU). On a GPU the model's weights (quantized as in the file)
 * and its contexts' keys and values live in GPU memory; every other call works as on the
 * CPU. A GPU needs a library built with the `cuda` feature. Errors: those of
 * turbine_model_load, TURBINE_ERR_INVALID_ARGUMENT (an unknown device) and
 * TURBINE_ERR_DEVICE (a GPU that cannot be used, and why). */
turbine_status turbine_model_load_on(const char *path, const char *device, turbine_model **model_out);

/* Releases the caller's reference to a model. Contexts made from it stay usable. */
void turbine_model_free(turbine_model *model);

/* Vocabulary size: the number of logits per token. Negative status if model is NULL. */
int32_t turbine_model_n_vocab(const turbine_model *model);

/* The context length the model was trained for (the largest n_ctx a context may have).
 * Negative status if model is NULL. */
int32_t turbine_model_context_length(const turbine_model *model);

/* The architecture name from the file ("gemma3"). Owned by the model, valid until
 * turbine_model_free. NULL if model is NULL. */
const char *turbine_model_architecture(const turbine_model *model);

/* ---- Tokenizer -------------------------------------------------------------------- */

/* Token ids for `text`. add_special: add BOS/EOS as the model's metadata asks.
 * parse_special: text of control tokens ("<start_of_turn>") becomes those tokens.
 * Writes up to n_tokens_max ids to `tokens`; *n_tokens_out (optional) receives the number
 * of ids the text needs, on success and on TURBINE_ERR_BUFFER_TOO_SMALL (then nothing is
 * written), so a call with tokens = NULL, n_tokens_max = 0 asks for the size.
 * Errors: NULL_ARGUMENT, INVALID_ARGUMENT (text not UTF-8), BUFFER_TOO_SMALL. */
turbine_status turbine_tokenize(const turbine_model *model, const char *text, bool add_special,
                                bool parse_special, turbine_token *tokens, size_t n_tokens_max,
                                size_t *n_tokens_out);

/* 1 if the token ends generation (end of sequence, end of turn), 0 if not; a negative
 * status if model is NULL (NULL_ARGUMENT) or the id is out of range (TOKEN_OUT_OF_RANGE). */
int32_t turbine_token_is_eog(const turbine_model *model, turbine_token token);

/* The bytes one token stands for, written to buf with a terminating NUL. A piece may be
 * part of a multi-byte UTF-8 character (byte tokens) and may contain a NUL byte: use the
 * length. Control tokens render as "" unless render_special. *len_out (optional) receives
 * the length without the NUL, on success and on TURBINE_ERR_BUFFER_TOO_SMALL; buf needs
 * len + 1 bytes (when too small, buf gets "" if buf_size > 0).
 * Errors: NULL_ARGUMENT, TOKEN_OUT_OF_RANGE, BUFFER_TOO_SMALL. */
turbine_status turbine_token_to_piece(const turbine_model *model, turbine_token token, bool render_special,
                                      char *buf, size_t buf_size, size_t *len_out);

/* The text of n_tokens ids, written to buf as turbine_token_to_piece writes one piece.
 * remove_special: drop a leading BOS and trailing EOS where the model adds them.
 * render_special: render control tokens as their text. Bytes that are not valid UTF-8 (a
 * character cut by the end of the array) are copied as they are.
 * Errors: NULL_ARGUMENT, TOKEN_OUT_OF_RANGE, BUFFER_TOO_SMALL. */
turbine_status turbine_detokenize(const turbine_model *model, const turbine_token *tokens, size_t n_tokens,
                                  bool remove_special, bool render_special, char *buf, size_t buf_size,
                                  size_t *len_out);

/* ---- Contexts --------------------------------------------------------------------- */

typedef struct turbine_context turbine_context;

/* Most threads a context may ask for. */
#define TURBINE_MAX_THREADS 1024

/* Creates a context: one sequence of up to n_ctx tokens with its KV cache (memory grows as
 * tokens arrive; for a model on a GPU, the GPU's cache for all n_ctx tokens is made at the
 * first decode and n_threads does not apply). n_ctx 0: the model's context length; larger than it:
 * TURBINE_ERR_INVALID_ARGUMENT. n_threads 0: share the process-wide pool (one thread per
 * core); 1..TURBINE_MAX_THREADS: the context's own pool of that many threads. The context
 * holds a reference to the model. Release with turbine_context_free. */
turbine_status turbine_context_new(const turbine_model *model, uint32_t n_ctx, uint32_t n_threads,
                                   turbine_context **ctx_out);

/* Releases a context, its KV cache and its threads. */
void turbine_context_free(turbine_context *ctx);

/* The context's length (its n_ctx). Negative status if ctx is NULL. */
int32_t turbine_context_n_ctx(const turbine_context *ctx);

/* Tokens decoded into the context so far. Negative status if ctx is NULL. */
int32_t turbine_context_n_tokens(const turbine_context *ctx);

/* Forgets every token and the logits, so the context starts a new sequence. */
turbine_status turbine_context_clear(turbine_context *ctx);

/* Appends n_tokens (> 0) tokens to the context and runs the model over them in one forward
 * pass, keeping the last token's logits. On failure the context is unchanged.
 * Errors: NULL_ARGUMENT, INVALID_ARGUMENT (n_tokens 0), TOKEN_OUT_OF_RANGE, CONTEXT_FULL,
 * DEVICE (the model's GPU failed mid-pass; the context is unchanged, the model may need to be
 * loaded again). */
turbine_status turbine_decode(turbine_context *ctx, const turbine_token *tokens, size_t n_tokens);

/* The logits of the last decoded token: *logits_out points to *n_vocab_out (optional)
 * floats owned by the context, valid until the next turbine_decode, turbine_context_clear,
 * turbine_generate or turbine_context_free on it.
 * Errors: NULL_ARGUMENT, INVALID_STATE (nothing decoded since creation or clear). */
turbine_status turbine_get_logits(const turbine_context *ctx, const float **logits_out, size_t *n_vocab_out);

/* ---- Sampling --------------------------------------------------------------------- */

/* A seed that asks for a different draw each run (taken from the clock). */
#define TURBINE_SEED_RANDOM UINT64_MAX

/* Sampling parameters, Ollama's names and meanings. Penalties look at the last 64 tokens. */
typedef struct turbine_sampling_params {
    float temperature;    /* <= 0: greedy (highest logit, lowest id on ties; no penalties) */
    int32_t top_k;        /* keep the k most likely tokens; <= 0: all */
    float top_p;          /* keep the smallest set reaching probability top_p; >= 1: all; >= 0 */
    float min_p;          /* drop tokens below min_p x the most likely one's probability; >= 0 */
    float repeat_penalty; /* > 0; 1: off */
    uint64_t seed;        /* same seed, same tokens; TURBINE_SEED_RANDOM: from the clock */
} turbine_sampling_params;

/* Ollama's defaults: temperature 0.8, top_k 40, top_p 0.9, min_p 0, repeat_penalty 1.1,
 * seed TURBINE_SEED_RANDOM. */
turbine_sampling_params turbine_sampling_params_default(void);

/* Greedy: temperature 0, repeat_penalty 1 (the rest as the defaults, seed 0). */
turbine_sampling_params turbine_sampling_params_greedy(void);

typedef struct turbine_sampler turbine_sampler;

/* Creates a sampler (parameters as in turbine_sampling_params). Non-finite values, top_p or
 * min_p below 0, or repeat_penalty <= 0: TURBINE_ERR_INVALID_ARGUMENT. A sampler is not
 * tied to a model or context. Release with turbine_sampler_free. */
turbine_status turbine_sampler_new(float temperature, int32_t top_k, float top_p, float min_p,
                                   float repeat_penalty, uint64_t seed, turbine_sampler **sampler_out);

/* Releases a sampler. */
void turbine_sampler_free(turbine_sampler *sampler);

/* Records a token the model has seen (e.g. each prompt token) for the repeat penalty.
 * Errors: NULL_ARGUMENT, TOKEN_OUT_OF_RANGE (negative id). */
turbine_status turbine_sampler_accept(turbine_sampler *sampler, turbine_token token);

/* Picks the next token from the context's last logits into *token_out and records it (as
 * turbine_sampler_accept). Errors: NULL_ARGUMENT, INVALID_STATE (no logits yet). */
turbine_status turbine_sample(turbine_sampler *sampler, const turbine_context *ctx, turbine_token *token_out);

/* ---- Generation ------------------------------------------------------------------- */

/* Why turbine_generate stopped. */
typedef int32_t turbine_done_reason;
#define TURBINE_DONE_STOP 0      /* end-of-generation token */
#define TURBINE_DONE_LENGTH 1    /* max_tokens generated, or the context is full */
#define TURBINE_DONE_CANCELLED 2 /* the callback returned false */

/* Receives one piece of generated text: `len` bytes of UTF-8 (whole characters) followed by
 * a NUL, valid only during the call. Return true to go on, false to stop. Called on the
 * thread that called turbine_generate. It must not use the same context. */
typedef bool (*turbine_piece_callback)(const char *piece, size_t len, void *user_data);

/* Continues `prompt` as `turbine generate` does: the prompt is tokenized with BOS (as the
 * model's metadata says) and control-token text parsed, run in one forward pass, then up to
 * max_tokens tokens (negative: until end of generation or a full context) are sampled with
 * `params` (optional; NULL: greedy) and their text streamed to `callback` with `user_data`.
 * The context is cleared first and afterwards holds the tokens that were run; clear it
 * before using it with turbine_decode. *done_out (optional) receives why it stopped.
 * Errors: NULL_ARGUMENT, INVALID_ARGUMENT (prompt not UTF-8, bad params), CONTEXT_FULL
 * (the prompt does not leave room for one token). Text already streamed stays streamed. */
turbine_status turbine_generate(turbine_context *ctx, const char *prompt, const turbine_sampling_params *params,
                                int32_t max_tokens, turbine_piece_callback callback, void *user_data,
                                turbine_done_reason *done_out);

#ifdef __cplusplus
}
#endif

#endif /* TURBINE_H */
