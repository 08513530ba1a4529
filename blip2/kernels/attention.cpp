// One query's attention (a decoding step): out = softmax(scale * q . k + mask) . v per batch row and head, in
// float32 from bfloat16 or float32 inputs (as torch's scaled_dot_product_attention computes on the CPU), in one
// call instead of SDPA's dispatch and thread fork, which cost more than the arithmetic at one query.
// q (B, H, hd) contiguous (a linear layer's output); k, v (B, H, T, hd) with any strides but the last (1); mask (B|1, H|1, T) additive, or
// null; out (B, H * hd) in the inputs' dtype. Built and loaded by blip2/native.py.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "pool.h"

namespace {

inline float f32(float x) { return x; }
inline float f32(uint16_t x) { return bf16f(x); }
inline void put(float* y, float x) { *y = x; }
inline void put(uint16_t* y, float x) { *y = to_bf16(x); }

// e^x for the softmax's x <= 0 (scores less their maximum), within 2 ulp of expf and vectorizable (expf is a
// call per element: half the kernel's time at 35 keys): x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor
// polynomial to r^7 (Horner), times 2^n from the exponent bits; 0 below -87.33 (e^x under FLT_MIN).
inline float exp_le0(float x) {
    const float n = __builtin_rintf(x * 1.44269504f);
    const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln 2 in two parts: r exact to float32
    float p = 1.f / 5040;
    p = p * r + 1.f / 720, p = p * r + 1.f / 120, p = p * r + 1.f / 24, p = p * r + 1.f / 6, p = p * r + 0.5f;
    p = (p * r + 1.f) * r + 1.f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, 4);
    return x < -87.33f ? 0.f : p * two_n;
}

struct Shape {
    int B, H, T, hd;
    int64_t kb, kh, kt, vb, vh, vt, mb, mh, mt;  // strides in elements
};

// Batch row b, heads [h0, h1): s (H, T) scores, qf and acc (H, hd) float32, all of the row's
template <typename E>
void attend_heads(const E* q, const E* k, const E* v, const E* mask, E* out, const Shape& a, float scale, int b,
                  int h0, int h1, float* s, float* qf, float* acc) {
    const int H = a.H, T = a.T, hd = a.hd, nh = h1 - h0;
    const bool heads_inside_k = a.kh < a.kt, heads_inside_v = a.vh < a.vt;
    for (int i = h0 * hd; i < h1 * hd; i++) qf[i] = f32(q[(size_t)b * H * hd + i]);
    for (int o = 0; o < (heads_inside_k ? T : nh); o++)
        for (int i = 0; i < (heads_inside_k ? nh : T); i++) {
            const int h = h0 + (heads_inside_k ? i : o), t = heads_inside_k ? o : i;
            const E* kr = k + b * a.kb + h * a.kh + t * a.kt;
            const float* qh = qf + (size_t)h * hd;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < hd; d++) dot += qh[d] * f32(kr[d]);
            s[(size_t)h * T + t] = dot * scale + (mask ? f32(mask[b * a.mb + h * a.mh + t * a.mt]) : 0.f);
        }
    for (int h = h0; h < h1; h++) {  // each head's scores -> probabilities
        float* sh = s + (size_t)h * T;
        float top = -INFINITY, sum = 0.f;
        for (int t = 0; t < T; t++) top = sh[t] > top ? sh[t] : top;
#pragma omp simd reduction(+ : sum)
        for (int t = 0; t < T; t++) sum += sh[t] = exp_le0(sh[t] - top);
        for (int t = 0; t < T; t++) sh[t] /= sum;
    }
    for (int i = h0 * hd; i < h1 * hd; i++) acc[i] = 0.f;
    for (int o = 0; o < (heads_inside_v ? T : nh); o++)
        for (int i = 0; i < (heads_inside_v ? nh : T); i++) {
            const int h = h0 + (heads_inside_v ? i : o), t = heads_inside_v ? o : i;
            const E* vr = v + b * a.vb + h * a.vh + t * a.vt;
            const float p = s[(size_t)h * T + t];
            float* ah = acc + (size_t)h * hd;
#pragma omp simd
            for (int d = 0; d < hd; d++) ah[d] += p * f32(vr[d]);
        }
    for (int i = h0 * hd; i < h1 * hd; i++) put(out + (size_t)b * H * hd + i, acc[i]);
}

template <typename E>
struct Job {
    const E *q, *k, *v, *mask;
    E* out;
    Shape a;
    float scale;
    int chunks;
    float* buf;
};

template <typename E>
void attend_task(const void* ctx, long job) {  // batch row job / chunks, its chunk of the heads
    const Job<E>& j = *(const Job<E>*)ctx;
    const Shape& a = j.a;
    const int b = (int)(job / j.chunks), c = (int)(job % j.chunks);
    float* s = j.buf + ((size_t)a.H * a.T + 2 * (size_t)a.H * a.hd) * b;
    attend_heads(j.q, j.k, j.v, j.mask, j.out, a, j.scale, b, a.H * c / j.chunks, a.H * (c + 1) / j.chunks, s,
                 s + (size_t)a.H * a.T, s + (size_t)a.H * a.T + (size_t)a.H * a.hd);
}

template <typename E>
void attend(const Job<E>& j, int threads) {  // on blip2's pool where it serves (a decoding step's), else OpenMP
    const long jobs = (long)j.a.B * j.chunks;
    if (j.chunks > 1 && blip2::pool_run(threads, jobs, attend_task<E>, &j, nullptr)) return;
#pragma omp parallel for num_threads(j.chunks) schedule(static) if (j.chunks > 1)
    for (long job = 0; job < jobs; job++) attend_task<E>(&j, job);
}

}  // namespace

extern "C" {

// Returns 0, or -1 (no memory for the scores). Keys and values are read in their memory's order (heads inside
// positions for a cross-attention's (B, T, H, hd) keys, positions inside heads for the KV cache's (B, H, T, hd)),
// by `threads` threads each taking a share of the heads from 64 KB of keys and values on: in a decoding step they
// come from DRAM, where streams the prefetcher follows, on both cores, are what make them cheap.
int blip2_attend(const void* q, const void* k, const void* v, const void* mask, void* out, int is_bf16, int B,
                 int H, int T, int hd, int64_t kb, int64_t kh, int64_t kt, int64_t vb, int64_t vh, int64_t vt,
                 int64_t mb, int64_t mh, int64_t mt, float scale, int threads) {
    float* buf = (float*)malloc(sizeof(float) * ((size_t)H * T + 2 * (size_t)H * hd) * B);
    if (!buf) return -1;
    const Shape a{B, H, T, hd, kb, kh, kt, vb, vh, vt, mb, mh, mt};
    const int64_t bytes = (int64_t)B * H * T * hd * (is_bf16 ? 4 : 8);
    const int chunks = bytes >= 65536 && threads > 1 ? (threads < H ? threads : H) : 1;
    if (is_bf16)
        attend(Job<uint16_t>{(const uint16_t*)q, (const uint16_t*)k, (const uint16_t*)v, (const uint16_t*)mask,
                             (uint16_t*)out, a, scale, chunks, buf}, threads);
    else
        attend(Job<float>{(const float*)q, (const float*)k, (const float*)v, (const float*)mask, (float*)out, a,
                          scale, chunks, buf}, threads);
    free(buf);
    return 0;
}
}
