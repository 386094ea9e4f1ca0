/*
 * misuse.c: calls Turbine's C API the wrong way and checks each call returns its
 * documented status and a message, without crashing. Run by tests/c_api.rs:
 *
 *     misuse MODEL.gguf MISSING_PATH TRUNCATED_HEAD TRUNCATED_TAIL GARBAGE
 *
 * Prints one line per check ("ok ..." or "FAIL ..."), then "checks: N failed" and exits 1
 * if any failed.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "turbine.h"

static int failures = 0;

/* Checks a status; failures must come with a non-empty message. */
static void expect(const char *what, int line, int got, int want) {
    const char *msg = turbine_last_error();
    if (got != want) {
        printf("FAIL line %d: %s returned %d (%s), expected %d: %s\n", line, what, got,
               turbine_status_string(got), want, msg);
        failures++;
    } else if (want < 0 && (msg == NULL || msg[0] == '\0')) {
        printf("FAIL line %d: %s returned %d with no message\n", line, what, got);
        failures++;
    } else {
        printf("ok %s -> %d (%s)%s%s\n", what, got, got > 0 ? "a count" : turbine_status_string(got),
               want < 0 ? ": " : "", want < 0 ? msg : "");
    }
}

static void check(const char *what, int line, int ok) {
    if (!ok) {
        printf("FAIL line %d: %s\n", line, what);
        failures++;
    } else {
        printf("ok %s\n", what);
    }
}

#define EXPECT(call, want) expect(#call, __LINE__, (call), (want))
#define CHECK(cond) check(#cond, __LINE__, (cond))

static void bad_files(const char *missing, const char *head, const char *tail, const char *garbage) {
    turbine_model *m = (turbine_model *)&failures; /* must be overwritten with NULL */
    EXPECT(turbine_model_load(NULL, &m), TURBINE_ERR_NULL_ARGUMENT);
    CHECK(m == NULL);
    EXPECT(turbine_model_load(missing, NULL), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_model_load(missing, &m), TURBINE_ERR_IO);
    CHECK(m == NULL && strstr(turbine_last_error(), missing) != NULL);
    EXPECT(turbine_model_load("\xff\xfe.gguf", &m), TURBINE_ERR_INVALID_ARGUMENT);
    EXPECT(turbine_model_load(head, &m), TURBINE_ERR_MODEL);
    CHECK(m == NULL);
    EXPECT(turbine_model_load(tail, &m), TURBINE_ERR_MODEL);
    CHECK(m == NULL);
    EXPECT(turbine_model_load(garbage, &m), TURBINE_ERR_MODEL);
    CHECK(m == NULL);
    /* Split loads: counts out of range, then the file's own errors. */
    EXPECT(turbine_model_load_split(missing, 0, 1, &m), TURBINE_ERR_INVALID_ARGUMENT);
    CHECK(m == NULL && strstr(turbine_last_error(), "n_ranks") != NULL);
    EXPECT(turbine_model_load_split(missing, 65, 1, &m), TURBINE_ERR_INVALID_ARGUMENT);
    EXPECT(turbine_model_load_split(missing, 2, 0, &m), TURBINE_ERR_INVALID_ARGUMENT);
    EXPECT(turbine_model_load_split(missing, 2, 1, NULL), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_model_load_split(missing, 2, 1, &m), TURBINE_ERR_IO);
    EXPECT(turbine_model_load_split(garbage, 2, 1, &m), TURBINE_ERR_MODEL);
    CHECK(m == NULL);
    /* Loads on a device: an unknown one, then the file's own errors. */
    EXPECT(turbine_model_load_on(missing, NULL, &m), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_model_load_on(missing, "gpu", &m), TURBINE_ERR_INVALID_ARGUMENT);
    CHECK(m == NULL && strstr(turbine_last_error(), "cuda:N") != NULL);
    EXPECT(turbine_model_load_on(missing, "cpu", NULL), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_model_load_on(missing, "cpu", &m), TURBINE_ERR_IO);
    EXPECT(turbine_model_load_on(garbage, "auto", &m), TURBINE_ERR_MODEL);
    CHECK(m == NULL);
}

/* This machine has no GPU (and the test build no CUDA backend): a GPU is refused with a
 * message naming it; "auto" loads on the CPU. */
static void devices(const char *model) {
    turbine_model *m = NULL;
    EXPECT(turbine_model_load_on(model, "cuda:1", &m), TURBINE_ERR_DEVICE);
    CHECK(m == NULL && strstr(turbine_last_error(), "cuda:1") != NULL);
    CHECK(strcmp(turbine_status_string(TURBINE_ERR_DEVICE), "device unavailable or failed") == 0);
    EXPECT(turbine_model_load_on(model, "auto", &m), TURBINE_OK);
    CHECK(m != NULL && turbine_model_n_vocab(m) > 0);
    turbine_model_free(m);
}

static void null_handles(void) {
    turbine_token t = 0;
    size_t n = 0;
    char buf[16];
    const float *logits = NULL;
    EXPECT(turbine_model_n_vocab(NULL), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_model_context_length(NULL), TURBINE_ERR_NULL_ARGUMENT);
    CHECK(turbine_model_architecture(NULL) == NULL);
    EXPECT(turbine_tokenize(NULL, "hi", true, true, &t, 1, &n), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_token_to_piece(NULL, 0, false, buf, sizeof buf, &n), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_detokenize(NULL, &t, 1, false, false, buf, sizeof buf, &n), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_token_is_eog(NULL, 0), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_context_new(NULL, 0, 0, NULL), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_context_n_ctx(NULL), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_context_n_tokens(NULL), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_context_clear(NULL), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_decode(NULL, &t, 1), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_get_logits(NULL, &logits, &n), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_sampler_accept(NULL, 0), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_sample(NULL, NULL, &t), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_generate(NULL, "hi", NULL, 1, NULL, NULL, NULL), TURBINE_ERR_NULL_ARGUMENT);
    turbine_model_free(NULL);
    turbine_context_free(NULL);
    turbine_sampler_free(NULL);
    CHECK(strcmp(turbine_status_string(12345), "unknown status") == 0);
}

static void tokenizer(const turbine_model *m) {
    const char *text = "Hello, world: a sentence of several tokens.";
    turbine_token tokens[64] = {-7, -7};
    size_t n = 0, len = 0;
    EXPECT(turbine_tokenize(m, NULL, true, true, tokens, 64, &n), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_tokenize(m, text, true, true, NULL, 64, &n), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_tokenize(m, "caf\xc3(", true, true, tokens, 64, &n), TURBINE_ERR_INVALID_ARGUMENT);
    EXPECT(turbine_tokenize(m, text, true, true, tokens, 1, &n), TURBINE_ERR_BUFFER_TOO_SMALL);
    CHECK(n > 1 && tokens[0] == -7); /* needed size reported, nothing written */
    EXPECT(turbine_tokenize(m, text, true, true, NULL, 0, &n), TURBINE_ERR_BUFFER_TOO_SMALL);
    EXPECT(turbine_tokenize(m, text, true, true, tokens, n, &n), TURBINE_OK);

    char buf[256];
    int32_t n_vocab = turbine_model_n_vocab(m);
    EXPECT(turbine_token_to_piece(m, -1, false, buf, sizeof buf, &len), TURBINE_ERR_TOKEN_OUT_OF_RANGE);
    EXPECT(turbine_token_to_piece(m, n_vocab, false, buf, sizeof buf, &len), TURBINE_ERR_TOKEN_OUT_OF_RANGE);
    EXPECT(turbine_token_to_piece(m, tokens[1], false, NULL, 0, &len), TURBINE_ERR_BUFFER_TOO_SMALL);
    CHECK(len > 0);
    buf[0] = 'x';
    EXPECT(turbine_token_to_piece(m, tokens[1], false, buf, len, &len), TURBINE_ERR_BUFFER_TOO_SMALL);
    CHECK(buf[0] == '\0');
    EXPECT(turbine_token_to_piece(m, tokens[1], false, buf, len + 1, &len), TURBINE_OK);
    CHECK(buf[len] == '\0' && strlen(buf) == len);

    EXPECT(turbine_detokenize(m, NULL, 3, false, false, buf, sizeof buf, &len), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_detokenize(m, tokens, n, true, false, buf, 4, &len), TURBINE_ERR_BUFFER_TOO_SMALL);
    CHECK(len == strlen(text));
    EXPECT(turbine_detokenize(m, tokens, n, true, false, buf, sizeof buf, &len), TURBINE_OK);
    CHECK(strcmp(buf, text) == 0);
    turbine_token bad[2] = {tokens[1], n_vocab + 5};
    EXPECT(turbine_detokenize(m, bad, 2, false, false, buf, sizeof buf, &len), TURBINE_ERR_TOKEN_OUT_OF_RANGE);
    EXPECT(turbine_token_is_eog(m, -5), TURBINE_ERR_TOKEN_OUT_OF_RANGE);
    EXPECT(turbine_token_is_eog(m, tokens[1]), 0);
}

static void contexts(const turbine_model *m) {
    turbine_context *c = (turbine_context *)&failures;
    uint32_t too_long = (uint32_t)turbine_model_context_length(m) + 1;
    EXPECT(turbine_context_new(m, too_long, 0, &c), TURBINE_ERR_INVALID_ARGUMENT);
    CHECK(c == NULL);
    EXPECT(turbine_context_new(m, 8, TURBINE_MAX_THREADS + 1, &c), TURBINE_ERR_INVALID_ARGUMENT);
    EXPECT(turbine_context_new(m, 4, 1, &c), TURBINE_OK);
    const float *logits = (const float *)&failures;
    size_t n_vocab = 0;
    EXPECT(turbine_get_logits(c, &logits, &n_vocab), TURBINE_ERR_INVALID_STATE);
    CHECK(logits == NULL);
    EXPECT(turbine_get_logits(c, NULL, &n_vocab), TURBINE_ERR_NULL_ARGUMENT);
    turbine_token five[5] = {2, 100, 200, 300, 400};
    EXPECT(turbine_decode(c, five, 0), TURBINE_ERR_INVALID_ARGUMENT);
    EXPECT(turbine_decode(c, NULL, 2), TURBINE_ERR_NULL_ARGUMENT);
    turbine_token bad[2] = {2, -3};
    EXPECT(turbine_decode(c, bad, 2), TURBINE_ERR_TOKEN_OUT_OF_RANGE);
    EXPECT(turbine_decode(c, five, 5), TURBINE_ERR_CONTEXT_FULL);
    EXPECT(turbine_context_n_tokens(c), 0); /* failed decodes leave it unchanged */
    EXPECT(turbine_decode(c, five, 4), TURBINE_OK);
    EXPECT(turbine_decode(c, five, 1), TURBINE_ERR_CONTEXT_FULL);
    EXPECT(turbine_context_n_tokens(c), 4);
    EXPECT(turbine_get_logits(c, &logits, &n_vocab), TURBINE_OK);
    CHECK(logits != NULL && (int32_t)n_vocab == turbine_model_n_vocab(m) && isfinite(logits[0]));
    EXPECT(turbine_context_clear(c), TURBINE_OK);
    EXPECT(turbine_get_logits(c, &logits, &n_vocab), TURBINE_ERR_INVALID_STATE);
    turbine_context_free(c);
}

static void samplers(const turbine_model *m) {
    turbine_sampler *s = (turbine_sampler *)&failures;
    EXPECT(turbine_sampler_new(NAN, 40, 0.9f, 0.0f, 1.1f, 1, &s), TURBINE_ERR_INVALID_ARGUMENT);
    CHECK(s == NULL);
    EXPECT(turbine_sampler_new(0.8f, 40, 0.9f, 0.0f, 0.0f, 1, &s), TURBINE_ERR_INVALID_ARGUMENT);
    EXPECT(turbine_sampler_new(0.8f, 40, -1.0f, 0.0f, 1.1f, 1, &s), TURBINE_ERR_INVALID_ARGUMENT);
    EXPECT(turbine_sampler_new(0.8f, 40, 0.9f, 0.0f, 1.1f, 1, NULL), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_sampler_new(0.8f, 40, 0.9f, 0.0f, 1.1f, 1, &s), TURBINE_OK);
    EXPECT(turbine_sampler_accept(s, -1), TURBINE_ERR_TOKEN_OUT_OF_RANGE);
    turbine_context *c = NULL;
    turbine_token t = -1;
    EXPECT(turbine_context_new(m, 16, 0, &c), TURBINE_OK);
    EXPECT(turbine_sample(s, NULL, &t), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_sample(s, c, NULL), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_sample(s, c, &t), TURBINE_ERR_INVALID_STATE);
    turbine_token bos = 2;
    EXPECT(turbine_decode(c, &bos, 1), TURBINE_OK);
    EXPECT(turbine_sample(s, c, &t), TURBINE_OK);
    CHECK(t >= 0 && t < turbine_model_n_vocab(m));
    turbine_sampler_free(s);
    turbine_context_free(c);
}

struct collected {
    char text[4096];
    size_t len;
    int calls;
    int stop_after;
};

static bool collect(const char *piece, size_t len, void *user_data) {
    struct collected *c = user_data;
    if (c->len + len < sizeof c->text) {
        memcpy(c->text + c->len, piece, len);
        c->len += len;
        c->text[c->len] = '\0';
    }
    c->calls++;
    return c->calls < c->stop_after;
}

/* Greedy text of `prompt` on a fresh context of n_threads threads. */
static void greedy(const turbine_model *m, uint32_t n_threads, const char *prompt, struct collected *out) {
    turbine_context *c = NULL;
    memset(out, 0, sizeof *out);
    out->stop_after = 1 << 30;
    EXPECT(turbine_context_new(m, 256, n_threads, &c), TURBINE_OK);
    turbine_done_reason done = -1;
    EXPECT(turbine_generate(c, prompt, NULL, 12, collect, out, &done), TURBINE_OK);
    CHECK(done == TURBINE_DONE_LENGTH || done == TURBINE_DONE_STOP);
    turbine_context_free(c);
}

static void generation(turbine_model *m) {
    turbine_context *c = NULL;
    struct collected got = {.stop_after = 1 << 30};
    turbine_sampling_params bad = turbine_sampling_params_default();
    bad.min_p = -0.5f;
    EXPECT(turbine_context_new(m, 4, 0, &c), TURBINE_OK);
    EXPECT(turbine_generate(c, NULL, NULL, 4, collect, &got, NULL), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_generate(c, "hi", NULL, 4, NULL, &got, NULL), TURBINE_ERR_NULL_ARGUMENT);
    EXPECT(turbine_generate(c, "hi", &bad, 4, collect, &got, NULL), TURBINE_ERR_INVALID_ARGUMENT);
    EXPECT(turbine_generate(c, "\xc0\xaf", NULL, 4, collect, &got, NULL), TURBINE_ERR_INVALID_ARGUMENT);
    EXPECT(turbine_generate(c, "a prompt far longer than four tokens", NULL, 4, collect, &got, NULL),
           TURBINE_ERR_CONTEXT_FULL);
    CHECK(got.calls == 0);
    turbine_context_free(c);

    /* A callback that stops after its second piece. */
    EXPECT(turbine_context_new(m, 64, 2, &c), TURBINE_OK);
    turbine_done_reason done = -1;
    got.stop_after = 2;
    EXPECT(turbine_generate(c, "Once upon a time", NULL, 20, collect, &got, &done), TURBINE_OK);
    CHECK(done == TURBINE_DONE_CANCELLED && got.calls == 2);

    /* The context outlives its model handle, and thread counts do not change the text. */
    struct collected shared, own;
    greedy(m, 0, "The capital of France is", &shared);
    greedy(m, 1, "The capital of France is", &own);
    CHECK(shared.len > 0 && strcmp(shared.text, own.text) == 0);
    turbine_model_free(m);
    got.len = 0;
    got.calls = 0;
    got.stop_after = 1 << 30;
    EXPECT(turbine_generate(c, "The capital of France is", NULL, 12, collect, &got, &done), TURBINE_OK);
    CHECK(strcmp(got.text, shared.text) == 0);
    turbine_context_free(c);
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s MODEL MISSING TRUNCATED_HEAD TRUNCATED_TAIL GARBAGE\n", argv[0]);
        return 2;
    }
    bad_files(argv[2], argv[3], argv[4], argv[5]);
    null_handles();
    devices(argv[1]);
    turbine_model *m = NULL;
    EXPECT(turbine_model_load(argv[1], &m), TURBINE_OK);
    if (m == NULL) return 1;
    tokenizer(m);
    contexts(m);
    samplers(m);
    generation(m); /* frees m */
    printf("checks: %d failed\n", failures);
    return failures == 0 ? 0 : 1;
}
