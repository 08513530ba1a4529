// One query's attention (a decoding step): out = softmax(scale * q . k + mask) . v per batch row and head, in
// float32 from bfloat16 or float32 inputs (as torch's scaled_dot_product_attention computes on the CPU), in one
// call instead of SDPA's dispatch and thread fork, which cost more than the arithmetic at one query.
// q (B, H, hd) contiguous; k, v (B, H, T, hd) with any strides but the last (1); mask (B|1, H|1, T) additive, or
// null; out (B, H * hd) in the inputs' dtype. Built and loaded by blip2/native.py.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

extern "C" {

// Returns 0, or -1 (no memory for the scores). Keys and values are read in their memory's order (heads inside
// positions for a cross-attention's (B, T, H, hd) keys, positions inside heads for the KV cache's (B, H, T, hd)),
// by `threads` threads each taking a share of the heads from 64 KB of keys and values on: in a decoding step they
// come from DRAM, where streams the prefetcher follows, on both cores, are what make them cheap.
int blip2_attend(const void* q, const void* k, const void* v, const void* mask, void* out, int is_bf16, int B,
                 int H, int T, int hd, int64_t kb, int64_t kh, int64_t kt, int64_t vb, int64_t vh, int64_t vt,
                 int64_t mb, int64_t mh, int64_t mt, float scale, int threads) {
    const size_t per_b = (size_t)H * T + 2 * (size_t)H * hd;  // scores (H, T), q and out (H, hd) in float32
    float* buf = (float*)malloc(sizeof(float) * per_b * B);
    if (!buf) return -1;
    const bool heads_inside_k = kh < kt, heads_inside_v = vh < vt;
    const int64_t bytes = (int64_t)B * H * T * hd * (is_bf16 ? 4 : 8);
    const int chunks = bytes >= 65536 && threads > 1 ? (threads < H ? threads : H) : 1;
#pragma omp parallel for num_threads(chunks) schedule(static) if (chunks > 1)
    for (int job = 0; job < B * chunks; job++) {
        const int b = job / chunks, h0 = H * (job % chunks) / chunks, h1 = H * (job % chunks + 1) / chunks;
        const int nh = h1 - h0;
        float *s = buf + per_b * b, *qf = s + (size_t)H * T, *acc = qf + (size_t)H * hd;
        for (int i = h0 * hd; i < h1 * hd; i++) qf[i] = load_float(q, is_bf16, (size_t)b * H * hd + i);
        for (int o = 0; o < (heads_inside_k ? T : nh); o++)
            for (int i = 0; i < (heads_inside_k ? nh : T); i++) {
                const int h = h0 + (heads_inside_k ? i : o), t = heads_inside_k ? o : i;
                const size_t at = b * kb + h * kh + t * kt;
                const float* qh = qf + (size_t)h * hd;
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int d = 0; d < hd; d++) dot += qh[d] * load_float(k, is_bf16, at + d);
                s[(size_t)h * T + t] = dot * scale + (mask ? load_float(mask, is_bf16, b * mb + h * mh + t * mt) : 0.f);
            }
        for (int h = h0; h < h1; h++) {  // each head's scores -> probabilities
            float* sh = s + (size_t)h * T;
            float top = -INFINITY, sum = 0.f;
            for (int t = 0; t < T; t++) top = sh[t] > top ? sh[t] : top;
            for (int t = 0; t < T; t++) sum += sh[t] = expf(sh[t] - top);
            for (int t = 0; t < T; t++) sh[t] /= sum;
        }
        for (int i = h0 * hd; i < h1 * hd; i++) acc[i] = 0.f;
        for (int o = 0; o < (heads_inside_v ? T : nh); o++)
            for (int i = 0; i < (heads_inside_v ? nh : T); i++) {
                const int h = h0 + (heads_inside_v ? i : o), t = heads_inside_v ? o : i;
                const size_t at = b * vb + h * vh + t * vt;
                const float p = s[(size_t)h * T + t];
                float* ah = acc + (size_t)h * hd;
#pragma omp simd
                for (int d = 0; d < hd; d++) ah[d] += p * load_float(v, is_bf16, at + d);
            }
        for (int i = h0 * hd; i < h1 * hd; i++) {
            const size_t at = (size_t)b * H * hd + i;
            if (is_bf16)
                ((uint16_t*)out)[at] = to_bf16(acc[i]);
            else
                ((float*)out)[at] = acc[i];
        }
    }
    free(buf);
    return 0;
}
}
