// A language model's decoding step, all its decoder layers in one call (blip2/decoder_step.py): the layers'
// weight-only matmuls, norms and one-query attentions are blip2's kernels (weight_only.cpp, rms_norm.cpp,
// layer_norm.cpp, attention.cpp); the residual adds, the query's scaling, the KV cache's append and the feed-forward's
// activation are done here, in bfloat16 rounded as torch's ops round, so the step's output has the bits of the layers'
// own forward. In Python a step ran ~850 torch ops and ~700 module calls between its ~200 kernels, each slowed by the
// megabytes of weights the kernel before it streamed through the core's caches; here nothing runs between the kernels
// but these loops.
//
// A pre-norm layer (x (B, D) bfloat16; norm: T5's RMSNorm, or a LayerNorm with its bias (OPT)):
//   x += o(attend(scaled(q n(x)), [cache; k n(x)], [cache; v n(x)], mask))   self-attention
//   x += co(attend(cq n(x), ck, cv, cmask))                                  cross-attention (T5: to the encoder)
//   x += wo(act(wi0 n(x)) * wi1 n(x))  or, not gated, wo(act(wi1 n(x)))       feed-forward (OPT: fc2(act(fc1)))
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
int blip2_layer_norm(const uint16_t* x, int rows, int d, const uint16_t* w, const uint16_t* b, float eps, int form,
                     uint16_t* y);
int blip2_attend(const void* q, const void* k, const void* v, const void* mask, void* out, int is_bf16, int B, int H,
                 int T, int hd, int64_t kb, int64_t kh, int64_t kt, int64_t vb, int64_t vh, int64_t vt, int64_t mb,
                 int64_t mh, int64_t mt, float scale, int threads);
}

namespace {

struct Linear {  // a weight-only layer as native.Call binds it: int4 (extra: group size) or int8 (extra: bf16 scales)
    int bits, k, n, extra;  // bits 0: none
    const void* w;
    const void* scales;
    const void* bias;  // bfloat16 (n,) or null
};

struct Norm {
    const uint16_t* w;  // (D,) bfloat16
    const uint16_t* b;  // a LayerNorm's bias, or null: RMSNorm
};

struct Layer {  // the weights, fixed while the model is
    Norm norm[3];  // self-attention's, cross-attention's, feed-forward's
    Linear q, k, v, o, cq, co, wi0, wi1, wo;  // cq.bits == 0: no cross-attention; wi0.bits == 0: not gated
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
    int B, D, H, hd, F, layers, pos;  // rows, width, heads, head width, feed-forward width, layers, cached positions
    float eps;
    int norm_form;  // RMSNorm: torch's sum width (t5.norm_lanes); LayerNorm: opt.layer_norm_form
    int threads;  // blip2's kernels' threads
    float q_scale;  // the query's scaling, rounded to bfloat16 as torch rounds it (OPT), or 0: none (T5)
    float attn_scale;  // attention's own scale (1: T5 and OPT, whose queries are scaled)
    const uint16_t* mask;  // self-attention's additive mask (T5: with the position bias), strides over (B, H, pos + 1)
    int64_t ms[3];
    const uint16_t* cmask;  // cross-attention's, strides over (B, H, ct), or null
    int64_t cms[3];
    const uint16_t* act;  // (65536,) the activation of each bfloat16
};

int mm(const Linear& l, const uint16_t* x, int rows, uint16_t* y, int threads) {
    if (l.bits == 4)
        return blip2_int4_mm(x, 1, rows, l.k, l.n, (const uint8_t*)l.w, (const uint16_t*)l.scales, l.extra, l.bias, y,
                             1, threads);
    return blip2_int8_mm(x, 1, rows, l.k, l.n, (const int8_t*)l.w, l.scales, l.extra, l.bias, y, 1, threads);
}

void norm(const Norm& n, const uint16_t* x, uint16_t* y, const Step& s) {
    if (n.b)
        blip2_layer_norm(x, s.B, s.D, n.w, n.b, s.eps, s.norm_form, y);
    else
        blip2_rms_norm(x, 1, s.B, s.D, n.w, 1, s.eps, y, s.norm_form, s.threads);
}

void add(uint16_t* x, const uint16_t* y, size_t n) {  // x + y, as torch adds bfloat16: in float, rounded once
    for (size_t i = 0; i < n; i++) x[i] = to_bf16(bf16f(x[i]) + bf16f(y[i]));
}

}  // namespace

extern "C" {

// x (B, D) bfloat16: the decoder's input at this position -> its output (before the final norm), in place.
// Returns 0, or -1 (no memory: x and the caches' positions from pos on may hold part of the step).
int blip2_decoder_step(uint16_t* x, const Layer* layers, const Caches* caches, const Step* step) {
    const Step& s = *step;
    const int B = s.B, D = s.D, I = s.H * s.hd, F = s.F, T = s.pos + 1, th = s.threads;
    uint16_t* buf = (uint16_t*)malloc(sizeof(uint16_t) * ((size_t)B * (2 * D + 4 * I + 2 * F)));
    if (!buf) return -1;
    uint16_t *h = buf, *o = h + (size_t)B * D, *q = o + (size_t)B * D, *k = q + (size_t)B * I,
             *v = k + (size_t)B * I, *a = v + (size_t)B * I, *g = a + (size_t)B * I, *u = g + (size_t)B * F;
    int err = 0;
    for (int l = 0; l < s.layers && !err; l++) {
        const Layer& L = layers[l];
        const Caches& c = caches[l];
        // self-attention
        norm(L.norm[0], x, h, s);
        err |= mm(L.q, h, B, q, th) | mm(L.k, h, B, k, th) | mm(L.v, h, B, v, th);
        if (s.q_scale != 0.f)
            for (size_t i = 0; i < (size_t)B * I; i++) q[i] = to_bf16(bf16f(q[i]) * s.q_scale);
        for (int b = 0; b < B; b++)
            for (int j = 0; j < s.H; j++) {  // (B, H*hd) -> the caches' (B, H, pos, hd)
                memcpy(c.k + b * c.ks[0] + j * c.ks[1] + s.pos * c.ks[2], k + (size_t)b * I + j * s.hd, 2 * s.hd);
                memcpy(c.v + b * c.vs[0] + j * c.vs[1] + s.pos * c.vs[2], v + (size_t)b * I + j * s.hd, 2 * s.hd);
            }
        err |= blip2_attend(q, c.k, c.v, s.mask, a, 1, B, s.H, T, s.hd, c.ks[0], c.ks[1], c.ks[2], c.vs[0], c.vs[1],
                            c.vs[2], s.ms[0], s.ms[1], s.ms[2], s.attn_scale, th);
        err |= mm(L.o, a, B, o, th);
        add(x, o, (size_t)B * D);
        // cross-attention
        if (L.cq.bits) {
            norm(L.norm[1], x, h, s);
            err |= mm(L.cq, h, B, q, th);
            err |= blip2_attend(q, c.ck, c.cv, s.cmask, a, 1, B, s.H, (int)c.ct, s.hd, c.cks[0], c.cks[1], c.cks[2],
                                c.cvs[0], c.cvs[1], c.cvs[2], s.cms[0], s.cms[1], s.cms[2], s.attn_scale, th);
            err |= mm(L.co, a, B, o, th);
            add(x, o, (size_t)B * D);
        }
        // feed-forward
        norm(L.norm[2], x, h, s);
        err |= mm(L.wi1, h, B, u, th);
        if (L.wi0.bits) {
            err |= mm(L.wi0, h, B, g, th);
            for (size_t i = 0; i < (size_t)B * F; i++) g[i] = to_bf16(bf16f(s.act[g[i]]) * bf16f(u[i]));
        } else {
            for (size_t i = 0; i < (size_t)B * F; i++) g[i] = s.act[u[i]];
        }
        err |= mm(L.wo, g, B, o, th);
        add(x, o, (size_t)B * D);
    }
    free(buf);
    return err ? -1 : 0;
}
}
