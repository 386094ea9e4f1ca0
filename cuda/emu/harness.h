// The checks' plumbing: seeded random inputs, comparisons and their report lines. Each
// check prints one line, "ok   <name>: <measure>" or "FAIL <name>: <measure>" followed by
// the mismatches that show why; main() ends with "<n> checks, <m> failed".
#pragma once

#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "emu.h"
#include "reference.h"

namespace harness {

using std::string;
using std::vector;

inline int checks = 0, failures = 0;

// printf into a std::string.
inline string fmt(const char* f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

inline bool report(const string& name, bool ok, const string& measure) {
    checks++;
    if (!ok) failures++;
    printf("%s %s: %s\n", ok ? "ok  " : "FAIL", name.c_str(), measure.c_str());
    fflush(stdout);
    return ok;
}

// Σ(got − want)² / Σ want², as cuda/src/bin/gpu_check.rs's nse.
inline double nse(const vector<float>& got, const vector<float>& want) {
    double err = 0.0, norm = 0.0;
    for (size_t i = 0; i < want.size(); ++i) {
        double d = (double)got[i] - (double)want[i];
        err += d * d;
        norm += (double)want[i] * (double)want[i];
    }
    return err / std::max(norm, 2.2250738585072014e-308);
}

inline size_t bits_differ(const vector<float>& got, const vector<float>& want) {
    size_t n = 0;
    for (size_t i = 0; i < want.size(); ++i) n += emu::float_bits(got[i]) != emu::float_bits(want[i]);
    return n;
}

// A failure's evidence: the first elements whose bits differ, or (by_error) the elements
// farthest from the reference.
inline void show_mismatches(const vector<float>& got, const vector<float>& want, bool by_error) {
    vector<size_t> idx;
    for (size_t i = 0; i < want.size(); ++i)
        if (emu::float_bits(got[i]) != emu::float_bits(want[i])) idx.push_back(i);
    auto error = [&](size_t i) {
        double e = std::fabs((double)got[i] - (double)want[i]);
        return e == e ? e : HUGE_VAL;  // NaN first
    };
    if (by_error) std::stable_sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return error(a) > error(b); });
    for (size_t k = 0; k < idx.size() && k < 5; ++k) {
        size_t i = idx[k];
        printf("       [%zu] got %.9g (%08x), want %.9g (%08x)\n", i, got[i], emu::float_bits(got[i]), want[i],
               emu::float_bits(want[i]));
    }
}

// Within `limit` of normalized squared error (NaN fails). Also says how many elements
// differ in their bits, which is informative only.
inline bool check_nse(const string& name, const vector<float>& got, const vector<float>& want, double limit) {
    double e = got.size() == want.size() ? nse(got, want) : HUGE_VAL;
    bool ok = std::isfinite(e) && e <= limit;
    report(name, ok,
           fmt("nse %.2e (limit %.0e; %zu of %zu differ in bits)", e, limit, bits_differ(got, want), want.size()));
    if (!ok) show_mismatches(got, want, true);
    return ok;
}

// The same bits (NaN equals NaN, −0 differs from +0).
inline bool check_bits(const string& name, const vector<float>& got, const vector<float>& want) {
    size_t bad = got.size() == want.size() ? bits_differ(got, want) : want.size();
    report(name, bad == 0, fmt("%zu of %zu differ (exact)", bad, want.size()));
    if (bad) show_mismatches(got, want, false);
    return bad == 0;
}

template <class T>
bool check_equal(const string& name, const vector<T>& got, const vector<T>& want) {
    size_t bad = got.size() == want.size() ? 0 : want.size();
    for (size_t i = 0; i < want.size() && i < got.size(); ++i) bad += !(got[i] == want[i]);
    report(name, bad == 0, fmt("%zu of %zu differ (exact)", bad, want.size()));
    int shown = 0;
    for (size_t i = 0; i < want.size() && i < got.size() && shown < 5; ++i)
        if (!(got[i] == want[i])) {
            printf("       [%zu] got %lld, want %lld\n", i, (long long)got[i], (long long)want[i]);
            shown++;
        }
    return bad == 0;
}

// cuda/src/bin/gpu_check.rs's Rng (xorshift64).
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed) {}
    uint64_t next() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        return s;
    }
    // In [−1, 1], in steps of 1e-4.
    float uniform() { return (float)(next() % 20001) / 10000.0f - 1.0f; }
    vector<float> floats(size_t n, float scale = 1.0f) {
        vector<float> v(n);
        for (auto& x : v) x = uniform() * scale;
        return v;
    }
    // In 0..n.
    int below(int n) { return (int)(next() % (uint64_t)std::max(n, 1)); }
};

inline vector<float> poisoned(size_t n) { return vector<float>(n, std::numeric_limits<float>::quiet_NaN()); }

inline void put_f16(uint8_t* p, float v) {
    uint16_t h = ref::f32_to_f16(v);
    p[0] = h & 0xff;
    p[1] = h >> 8;
}

// gpu_check.rs's random_weights: random blocks of `t` with small finite scales; finite
// values for the float types.
inline vector<uint8_t> random_weights(ref::Type t, int rows, int cols, Rng& rng) {
    size_t n = (size_t)rows * ref::row_bytes(t, cols);
    vector<uint8_t> w(n);
    if (t == ref::F32 || t == ref::F16 || t == ref::BF16) {
        for (size_t i = 0; i < (size_t)rows * cols; ++i) {
            float v = rng.uniform();
            if (t == ref::F32) {
                memcpy(&w[4 * i], &v, 4);
            } else if (t == ref::F16) {
                put_f16(&w[2 * i], v);
            } else {  // bf16: round to nearest even (half::bf16::from_f32)
                uint32_t u = emu::float_bits(v);
                u += 0x7fffu + ((u >> 16) & 1u);
                w[2 * i] = (u >> 16) & 0xff;
                w[2 * i + 1] = u >> 24;
            }
        }
        return w;
    }
    for (auto& x : w) x = (uint8_t)rng.next();
    for (size_t b = 0; b < n; b += ref::type_size(t)) {
        float d = 0.01f + (float)(rng.next() % 100) / 1e4f;
        if (t == ref::MXFP4) {
            w[b] = (uint8_t)(118 + rng.next() % 8);
        } else if (t == ref::Q6_K) {
            put_f16(&w[b + 208], d);
        } else if (t == ref::Q4_K) {
            put_f16(&w[b], d);
            put_f16(&w[b + 2], 0.003f);
        } else {
            put_f16(&w[b], d);
        }
    }
    return w;
}

// Which groups of checks run: all, or those whose name contains the filter.
inline string only;
inline bool wanted(const char* group) { return only.empty() || string(group).find(only) != string::npos; }

}  // namespace harness

// Launches `kernel` (a function of the included sources) under the emulator, recording
// its name for the coverage check.
#define EMU_LAUNCH(kernel, grid, block, ...) emu::launch(#kernel, grid, block, kernel, __VA_ARGS__)
