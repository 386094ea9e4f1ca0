/*
 * generate.c: greedy generation through Turbine's C API.
 *
 *     generate [--step] MODEL.gguf N PROMPT
 *
 * Prints the first N tokens (-1: until end of generation) of the greedy continuation of
 * PROMPT on stdout, followed by a newline, as
 * `turbine generate -m MODEL.gguf -n N --temperature 0 PROMPT` does (context 4096).
 * By default it uses turbine_generate (streaming callback); with --step it runs the token
 * loop itself: turbine_tokenize, turbine_decode, turbine_sample, turbine_token_to_piece.
 *
 * Build (from the repository root, after `cargo build --release`):
 *     cc -O2 -Iinclude examples/c/generate.c target/release/libturbine.a \
 *        -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc -o generate
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "turbine.h"

static int fail(const char *what, turbine_status status) {
    fprintf(stderr, "error: %s: %s (%s)\n", what, turbine_last_error(), turbine_status_string(status));
    return 1;
}

/* turbine_generate's callback: print each piece as it comes. */
static bool print_piece(const char *piece, size_t len, void *user_data) {
    (void)user_data;
    return fwrite(piece, 1, len, stdout) == len && fflush(stdout) == 0;
}

static int generate_streaming(turbine_model *model, int n, const char *prompt) {
    turbine_context *ctx = NULL;
    turbine_status st = turbine_context_new(model, 4096, 0, &ctx);
    if (st != TURBINE_OK) return fail("creating the context", st);
    turbine_sampling_params params = turbine_sampling_params_greedy();
    st = turbine_generate(ctx, prompt, &params, n, print_piece, NULL, NULL);
    turbine_context_free(ctx);
    return st == TURBINE_OK ? 0 : fail("generating", st);
}

/* Prints one token's text; returns 0 on success. */
static int print_token(const turbine_model *model, turbine_token token) {
    char small[64], *buf = small;
    size_t len = 0;
    turbine_status st = turbine_token_to_piece(model, token, false, buf, sizeof small, &len);
    if (st == TURBINE_ERR_BUFFER_TOO_SMALL && (buf = malloc(len + 1)) != NULL)
        st = turbine_token_to_piece(model, token, false, buf, len + 1, &len);
    if (st == TURBINE_OK) fwrite(buf, 1, len, stdout);
    if (buf != small) free(buf);
    return st == TURBINE_OK ? 0 : fail("token to piece", st);
}

/* Tokenizes text (BOS added, control tokens parsed, as turbine_generate does) into a
 * malloc'd array of the size turbine_tokenize reports. */
static turbine_status tokenize(const turbine_model *model, const char *text, turbine_token **tokens, size_t *n) {
    turbine_status st = turbine_tokenize(model, text, true, true, NULL, 0, n); /* asks for the size */
    if (st != TURBINE_OK && st != TURBINE_ERR_BUFFER_TOO_SMALL) return st;
    *tokens = malloc((*n ? *n : 1) * sizeof **tokens);
    if (*tokens == NULL) return TURBINE_ERR_INTERNAL;
    return turbine_tokenize(model, text, true, true, *tokens, *n, n);
}

/* Samples, prints and decodes one token at a time, stopping where turbine_generate does. */
static int step_loop(const turbine_model *model, turbine_context *ctx, turbine_sampler *sampler, int n) {
    int limit = n < 0 ? INT_MAX : n, n_ctx = turbine_context_n_ctx(ctx);
    for (int i = 0; i < limit && turbine_context_n_tokens(ctx) < n_ctx; i++) {
        turbine_token next;
        turbine_status st = turbine_sample(sampler, ctx, &next);
        if (st != TURBINE_OK) return fail("sampling", st);
        if (turbine_token_is_eog(model, next) == 1) break;
        if (print_token(model, next) != 0) return 1;
        fflush(stdout);
        if (i + 1 < limit && turbine_context_n_tokens(ctx) < n_ctx && (st = turbine_decode(ctx, &next, 1)) != TURBINE_OK)
            return fail("decoding", st);
    }
    return 0;
}

static int generate_stepwise(turbine_model *model, int n, const char *prompt) {
    size_t n_prompt = 0;
    turbine_token *tokens = NULL;
    turbine_status st = tokenize(model, prompt, &tokens, &n_prompt);
    if (st != TURBINE_OK) {
        free(tokens);
        return fail("tokenizing", st);
    }
    turbine_context *ctx = NULL;
    turbine_sampler *sampler = NULL;
    int rc = 1;
    st = turbine_context_new(model, 4096, 0, &ctx);
    if (st != TURBINE_OK) {
        fail("creating the context", st);
    } else if ((st = turbine_sampler_new(0.0f, 0, 1.0f, 0.0f, 1.0f, 0, &sampler)) != TURBINE_OK) {
        fail("creating the sampler", st);
    } else if ((st = turbine_decode(ctx, tokens, n_prompt)) != TURBINE_OK) {
        fail("decoding the prompt", st);
    } else {
        rc = step_loop(model, ctx, sampler, n);
    }
    turbine_sampler_free(sampler);
    turbine_context_free(ctx);
    free(tokens);
    return rc;
}

int main(int argc, char **argv) {
    /* Options: --step, and --tp RANKS (the model split over tensor-parallel ranks). */
    int step = 0, ranks = 0, first = 1;
    for (; first < argc && strncmp(argv[first], "--", 2) == 0; first++) {
        if (strcmp(argv[first], "--step") == 0) {
            step = 1;
        } else if (strcmp(argv[first], "--tp") == 0 && first + 1 < argc) {
            ranks = atoi(argv[++first]);
        } else {
            break;
        }
    }
    if (argc - first != 3) {
        fprintf(stderr, "usage: %s [--step] [--tp RANKS] MODEL.gguf N PROMPT\n", argv[0]);
        return 2;
    }
    const char *path = argv[first], *prompt = argv[first + 2];
    int n = atoi(argv[first + 1]);
    turbine_model *model = NULL;
    turbine_status st = ranks > 0 ? turbine_model_load_split(path, ranks, 1, &model) : turbine_model_load(path, &model);
    if (st != TURBINE_OK) return fail("loading the model", st);
    fprintf(stderr, "%s: %s, %d tokens, context %d\n", path, turbine_model_architecture(model),
            turbine_model_n_vocab(model), turbine_model_context_length(model));
    int rc = step ? generate_stepwise(model, n, prompt) : generate_streaming(model, n, prompt);
    turbine_model_free(model);
    if (rc == 0) putchar('\n');
    return rc;
}
