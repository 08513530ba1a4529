// A T5 decoder's decoding step, all its layers in one call (blip2/t5_step.py): the layers' weight-only matmuls,
// RMSNorms and one-query attentions are blip2's kernels (weight_only.cpp, rms_norm.cpp, attention.cpp), the
// residual adds, the KV cache's append and the feed-forward's activation are done here, in bfloat16 rounded as
// torch's ops round, so the step's output has the bits of the layers' own forward. In Python the step ran ~850 torch
// ops and ~700 module calls between its ~220 kernels, each slowed by the megabytes of weights the kernel before it
// streamed through the core's caches; here nothing runs between the kernels but these loops.
//
// Per layer (x (B, D) bfloat16, h its RMSNorm):
//   x += o(attend(q h, [cache; k h], [cache; v h], bias))        self-attention, T5's scale 1
//   x += co(attend(cq h, ck, cv, cmask))                          cross-attention to the cached encoder keys/values
//   x += wo(act(wi0 h) * wi1 h)  (not gated: wo(act(wi1 h)))      feed-forward
// act: a table of the activation's bfloat16 result for each of the 65536 bfloat16 inputs, made by torch's own ops.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

extern "C" {
int blip2_int4_mm(const void* x, int is_bf16, int M, int K, int N, const uint8_t* w, const uint16_t* sz, int group,
                  const void* bias, void* y, int y_bf16, int threads);
int blip2_int8_mm(const void* x, int x_bf16, int M, int K, int N, const int8_t* w, const void* scales, int s_bf16,
                  const void* bias, void* y, int y_bf16, int threads);
int blip2_rms_norm(const void* x, int x_bf16, int rows, int d, const void* w, int w_bf16, float eps, void* y,
                   int lanes, int threads);
int blip2_attend(const void* q, const void* k, const void* v, const void* mask, void* out, int is_bf16, int B, int H,
                 int T, int hd, int64_t kb, int64_t kh, int64_t kt, int64_t vb, int64_t vh, int64_t vt, int64_t mb,
                 int64_t mh, int64_t mt, float scale, int threads);
}

namespace {

struct Linear {  // a weight-only layer as native.Call binds it: int4 (extra: group size) or int8 (extra: bf16 scales)
    int bits, k, n, extra;
    const void* w;
    const void* scales;
    const void* bias;  // bfloat16 (n,) or null
};

struct Layer {  // the weights, fixed while the model is
    const uint16_t* norm[3];  // self-attention's, cross-attention's, feed-forward's RMSNorm (D,) bfloat16
    Linear q, k, v, o, cq, co, wi0, wi1, wo;  // wi0.bits == 0: not gated
};

struct Caches {  // a layer's keys and values this step, strides in elements over (B, H, T, hd)
    uint16_t* k;  // self-attention's buffers, room for pos + 1 positions: this step's are written at pos
    uint16_t* v;
    int64_t ks[3], vs[3];
    const uint16_t* ck;  // cross-attention's, ct positions
    const uint16_t* cv;
    int64_t cks[3], cvs[3];
    int64_t ct;
};

struct Step {
    int B, D, H, hd, F, layers, pos;  // rows, d_model, heads, d_kv, d_ff, layers, positions in the cache before
    float eps;
    int lanes, threads;  // torch's sum width (t5.norm_lanes), blip2's kernels' threads
    const uint16_t* bias;  // self-attention's position bias and mask, strides over (B, H, pos + 1)
    int64_t bs[3];
    const uint16_t* cmask;  // cross-attention's mask (strides over (B, H, ct)), or null
    int64_t cms[3];
    const uint16_t* act;  // (65536,) the activation of each bfloat16
};

int mm(const Linear& l, const uint16_t* x, int rows, uint16_t* y, int threads) {
    if (l.bits == 4)
        return blip2_int4_mm(x, 1, rows, l.k, l.n, (const uint8_t*)l.w, (const uint16_t*)l.scales, l.extra, l.bias, y,
                             1, threads);
    return blip2_int8_mm(x, 1, rows, l.k, l.n, (const int8_t*)l.w, l.scales, l.extra, l.bias, y, 1, threads);
}

void add(uint16_t* x, const uint16_t* y, size_t n) {  // x + y, as torch adds bfloat16: in float, rounded once
    for (size_t i = 0; i < n; i++) x[i] = to_bf16(bf16f(x[i]) + bf16f(y[i]));
}

}  // namespace

extern "C" {

// x (B, D) bfloat16: the decoder's input at this position -> its output (before the final RMSNorm), in place.
// Returns 0, or -1 (no memory: x and the caches' positions from pos on may hold part of the step).
int blip2_t5_decoder_step(uint16_t* x, const Layer* layers, const Caches* caches, const Step* s) {
    const int B = s->B, D = s->D, I = s->H * s->hd, F = s->F, T = s->pos + 1;
    uint16_t* buf = (uint16_t*)malloc(sizeof(uint16_t) * ((size_t)B * (2 * D + 4 * I + 2 * F)));
    if (!buf) return -1;
    uint16_t *h = buf, *o = h + (size_t)B * D, *q = o + (size_t)B * D, *k = q + (size_t)B * I,
             *v = k + (size_t)B * I, *a = v + (size_t)B * I, *g = a + (size_t)B * I, *u = g + (size_t)B * F;
    int err = 0;
    for (int l = 0; l < s->layers && !err; l++) {
        const Layer& L = layers[l];
        const Caches& c = caches[l];
        // self-attention
        blip2_rms_norm(x, 1, B, D, L.norm[0], 1, s->eps, h, s->lanes, s->threads);
        err |= mm(L.q, h, B, q, s->threads) | mm(L.k, h, B, k, s->threads) | mm(L.v, h, B, v, s->threads);
        for (int b = 0; b < B; b++)
            for (int j = 0; j < s->H; j++) {  // (B, H*hd) -> the caches' (B, H, pos, hd)
                memcpy(c.k + b * c.ks[0] + j * c.ks[1] + s->pos * c.ks[2], k + (size_t)b * I + j * s->hd, 2 * s->hd);
                memcpy(c.v + b * c.vs[0] + j * c.vs[1] + s->pos * c.vs[2], v + (size_t)b * I + j * s->hd, 2 * s->hd);
            }
        err |= blip2_attend(q, c.k, c.v, s->bias, a, 1, B, s->H, T, s->hd, c.ks[0], c.ks[1], c.ks[2], c.vs[0],
                            c.vs[1], c.vs[2], s->bs[0], s->bs[1], s->bs[2], 1.f, s->threads);
        err |= mm(L.o, a, B, o, s->threads);
        add(x, o, (size_t)B * D);
        // cross-attention
        blip2_rms_norm(x, 1, B, D, L.norm[1], 1, s->eps, h, s->lanes, s->threads);
        err |= mm(L.cq, h, B, q, s->threads);
        err |= blip2_attend(q, c.ck, c.cv, s->cmask, a, 1, B, s->H, (int)c.ct, s->hd, c.cks[0], c.cks[1], c.cks[2],
                            c.cvs[0], c.cvs[1], c.cvs[2], s->cms[0], s->cms[1], s->cms[2], 1.f, s->threads);
        err |= mm(L.co, a, B, o, s->threads);
        add(x, o, (size_t)B * D);
        // feed-forward
        blip2_rms_norm(x, 1, B, D, L.norm[2], 1, s->eps, h, s->lanes, s->threads);
        err |= mm(L.wi1, h, B, u, s->threads);
        if (L.wi0.bits) {
            err |= mm(L.wi0, h, B, g, s->threads);
            for (size_t i = 0; i < (size_t)B * F; i++) g[i] = to_bf16(bf16f(s->act[g[i]]) * bf16f(u[i]));
        } else {
            for (size_t i = 0; i < (size_t)B * F; i++) g[i] = s->act[u[i]];
        }
        err |= mm(L.wo, g, B, o, s->threads);
        add(x, o, (size_t)B * D);
    }
    free(buf);
    return err ? -1 : 0;
}
}
