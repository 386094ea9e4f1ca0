// Reference dumper: runs llama.cpp (libllama) on a GGUF and prints what Turbine's fixtures
// compare against. Built by build.sh; driven by gen_fixtures.py.
//
//   llama-ref-dump tokenize MODEL RECORDS        one line of token ids per record
//   llama-ref-dump logits   MODEL IDS OUT.bin    teacher-forced logits, f32 [n × vocab]
//   llama-ref-dump greedy   MODEL RECORDS N      greedy continuation ids per record
//   llama-ref-dump tensors  MODEL IDS OUT.bin    every graph tensor of one forward pass
//                                                (for debugging: name, dims, f32 data)
//
// RECORDS holds texts as "<byte length>\n<bytes>\n" (so texts may contain newlines).
// IDS holds whitespace-separated token ids. Tokenization adds BOS as the model says and
// parses special-token text.
#include "ggml.h"
#include "ggml-backend.h"
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

static std::vector<std::string> read_records(const char * path) {
    std::ifstream in(path, std::ios::binary);
    std::vector<std::string> out;
    std::string line;
    while (std::getline(in, line)) {
        if (line.empty()) continue;
        size_t n = std::stoul(line);
        std::string text(n, '\0');
        in.read(&text[0], (std::streamsize) n);
        in.get();  // trailing newline
        out.push_back(text);
    }
    return out;
}

static std::vector<llama_token> tokenize(const llama_vocab * vocab, const std::string & text) {
    std::vector<llama_token> ids(text.size() + 8);
    int n = llama_tokenize(vocab, text.data(), (int) text.size(), ids.data(), (int) ids.size(), true, true);
    if (n < 0) {
        ids.resize(-n);
        n = llama_tokenize(vocab, text.data(), (int) text.size(), ids.data(), (int) ids.size(), true, true);
    }
    ids.resize(n);
    return ids;
}

// Graph callback that writes each computed f32 tensor as: name (64 bytes), ne[4] (i64),
// data (f32, ne0*ne1*ne2*ne3 values).
static bool dump_tensor(struct ggml_tensor * t, bool ask, void * user) {
    if (ask) return true;
    if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t)) return true;
    FILE * out = (FILE *) user;
    char name[64] = {0};
    snprintf(name, sizeof(name), "%s", t->name);
    fwrite(name, 1, 64, out);
    int64_t ne[4] = {t->ne[0], t->ne[1], t->ne[2], t->ne[3]};
    fwrite(ne, sizeof(int64_t), 4, out);
    std::vector<float> data(ggml_nelements(t));
    ggml_backend_tensor_get(t, data.data(), 0, ggml_nbytes(t));
    fwrite(data.data(), sizeof(float), data.size(), out);
    return true;
}

static llama_context * new_context(llama_model * model, int n_ctx, FILE * trace = nullptr) {
    llama_context_params cp = llama_context_default_params();
    if (trace) {
        cp.cb_eval = dump_tensor;
        cp.cb_eval_user_data = trace;
    }
    cp.n_ctx = n_ctx;
    cp.n_batch = n_ctx;
    // LLAMA_REF_UBATCH splits batches into smaller physical batches (for measuring how
    // much llama.cpp's own logits move between its batched and one-token kernels).
    const char * ub = getenv("LLAMA_REF_UBATCH");
    cp.n_ubatch = ub ? (uint32_t) atoi(ub) : (uint32_t) n_ctx;
    // LLAMA_REF_KV_F32 keeps the KV cache in f32 and attention in f32 throughout (the
    // strict check of F32 models): flash attention is off, since it casts an f32 cache
    // to f16 before attending.
    if (getenv("LLAMA_REF_KV_F32")) {
        cp.type_k = GGML_TYPE_F32;
        cp.type_v = GGML_TYPE_F32;
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    return llama_init_from_model(model, cp);
}

static int argmax(const float * logits, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (logits[i] > logits[best]) best = i;
    return best;
}

// Decodes `ids` at positions [pos0, pos0+n) of sequence 0, asking for logits of every
// token when `all` is set, else of the last one only.
static bool decode(llama_context * ctx, const std::vector<llama_token> & ids, int pos0, bool all) {
    llama_batch b = llama_batch_init((int) ids.size(), 0, 1);
    for (size_t i = 0; i < ids.size(); i++) {
        b.token[i] = ids[i];
        b.pos[i] = pos0 + (int) i;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = 0;
        b.logits[i] = all || i + 1 == ids.size();
    }
    b.n_tokens = (int) ids.size();
    int rc = llama_decode(ctx, b);
    llama_batch_free(b);
    return rc == 0;
}

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s tokenize|logits|greedy MODEL INPUT [OUT|N]\n", argv[0]);
        return 2;
    }
    std::string cmd = argv[1];
    llama_backend_init();
    // LLAMA_REF_LOG keeps llama.cpp's own log (context and cache types) on stderr.
    if (!getenv("LLAMA_REF_LOG")) llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
    llama_model * model = llama_model_load_from_file(argv[2], llama_model_default_params());
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[2]); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    if (cmd == "tokenize") {
        for (const auto & text : read_records(argv[3])) {
            for (auto id : tokenize(vocab, text)) printf("%d ", id);
            printf("\n");
        }
    } else if (cmd == "logits" && argc >= 5) {
        std::ifstream in(argv[3]);
        std::vector<llama_token> ids;
        for (int id; in >> id;) ids.push_back(id);
        llama_context * ctx = new_context(model, (int) ids.size());
        if (!decode(ctx, ids, 0, true)) { fprintf(stderr, "decode failed\n"); return 1; }
        FILE * out = fopen(argv[4], "wb");
        for (size_t i = 0; i < ids.size(); i++) fwrite(llama_get_logits_ith(ctx, (int) i), sizeof(float), n_vocab, out);
        fclose(out);
        llama_free(ctx);
    } else if (cmd == "tensors" && argc >= 5) {
        std::ifstream in(argv[3]);
        std::vector<llama_token> ids;
        for (int id; in >> id;) ids.push_back(id);
        FILE * out = fopen(argv[4], "wb");
        llama_context * ctx = new_context(model, (int) ids.size(), out);
        if (!decode(ctx, ids, 0, true)) { fprintf(stderr, "decode failed\n"); return 1; }
        llama_free(ctx);
        fclose(out);
    } else if (cmd == "greedy" && argc >= 5) {
        int n_gen = atoi(argv[4]);
        for (const auto & text : read_records(argv[3])) {
            std::vector<llama_token> ids = tokenize(vocab, text);
            llama_context * ctx = new_context(model, (int) ids.size() + n_gen + 8);
            int pos = 0;
            std::vector<llama_token> step = ids;
            for (int i = 0; i < n_gen; i++) {
                if (!decode(ctx, step, pos, false)) { fprintf(stderr, "decode failed\n"); return 1; }
                pos += (int) step.size();
                int next = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
                printf("%d ", next);
                if (llama_vocab_is_eog(vocab, next)) break;
                step = {next};
            }
            printf("\n");
            llama_free(ctx);
        }
    } else {
        fprintf(stderr, "unknown command %s\n", cmd.c_str());
        return 2;
    }
    llama_model_free(model);
    return 0;
}
