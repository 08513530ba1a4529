// torch's LayerNorm of bfloat16 rows (OPT's), bit for bit, for a decoding step (blip2/decoder_step.py): the mean and
// variance by the Welford moments and the cascade that ATen's CPU LayerNorm computes them with (its
// moments_utils.h: vectors of `lanes` floats, chunks of 16 vectors, a stack of partial moments merged as a binary
// counter), then y = the normalised row times the weight plus the bias, in float32, rounded once. How ATen's build
// forms the last line has changed between its versions, and the width its build runs at is not in its source, so
// `form` picks one of four, and opt.layer_norm_form() finds the one that gives torch's bits here, once per
// process, or none (the compiler fuses products into sums as torch's does: GCC, by default; the probe checks it).
//
// x, y (rows, d) bfloat16; w, b (d,) bfloat16; d a multiple of 2 * lanes (ATen's scalar tail is not done).

#include <math.h>
#include <stdint.h>

#include "bf16.h"

namespace {

constexpr int CHUNK = 16;  // vectors a chunk's moments gather before they join the stack

template <int L>
struct Moments {  // per lane: count, mean, sum of squared deviations
    long n = 0;
    float m1[L] = {}, m2[L] = {};
};

template <int L>
void add_vec(long n_add, const float* m1_add, const float* m2_add, Moments<L>& s) {  // AddMomentsVec
    const long n = s.n + n_add;
    const float c = n == 0 ? 0.f : (float)n_add / (float)n;
    for (int l = 0; l < L; l++) {
        const float delta = m1_add[l] - s.m1[l];
        const float m2_tmp = s.m2[l] + m2_add[l];
        const float c_delta = c * delta;
        const float n0_delta = delta * (float)s.n;
        s.m1[l] = s.m1[l] + c_delta;
        s.m2[l] = fmaf(n0_delta, c_delta, m2_tmp);
    }
    s.n = n;
}

template <int L>
void update_vec(long count, const uint16_t* x, Moments<L>& top) {  // UpdateMomentsVec, bfloat16: two float halves
    float m1[2][L] = {}, m2[2][L] = {};
    for (long j = 0; j < count; j++) {
        const float c = 1.f / (float)(j + 1);
        for (int h = 0; h < 2; h++)
            for (int l = 0; l < L; l++) {
                const float v = bf16f(x[j * 2 * L + h * L + l]);
                const float delta = v - m1[h][l];
                m1[h][l] = fmaf(delta, c, m1[h][l]);
                m2[h][l] = fmaf(delta, v - m1[h][l], m2[h][l]);
            }
    }
    add_vec<L>(count, m1[0], m2[0], top);
    add_vec<L>(count, m1[1], m2[1], top);
}

void add_scalar(long n_add, float m1_add, float m2_add, long& n0, float& m1, float& m2) {  // AddMoments
    const long n = n0 + n_add;
    const float c = n == 0 ? 0.f : (float)n_add / (float)n;
    const float delta = m1_add - m1;
    m1 += c * delta;
    m2 += m2_add + delta * delta * c * (float)n0;
    n0 = n;
}

template <int L>
void moments(const uint16_t* x, long d, float& mean, float& var) {  // RowwiseMoments (d a multiple of 2L)
    const long n = d / (2 * L), m = (n + CHUNK - 1) / CHUNK;
    int depth = 1;  // ATen's CeilLog2(m), at least 1
    while ((1L << depth) < m) depth++;
    Moments<L> stack[64];
    for (long i = 0; i < m; i++) {
        const long count = n - i * CHUNK < CHUNK ? n - i * CHUNK : CHUNK;
        update_vec<L>(count, x + i * CHUNK * 2 * L, stack[0]);
        long mask = i + 1;
        for (int j = 1; j < depth && (mask & 1) == 0; ++j) {
            add_vec<L>(stack[j - 1].n, stack[j - 1].m1, stack[j - 1].m2, stack[j]);
            stack[j - 1] = Moments<L>();
            mask >>= 1;
        }
    }
    for (int i = 1; i < depth; i++) add_vec<L>(stack[i].n, stack[i].m1, stack[i].m2, stack[0]);
    long n0 = 0;
    float m1 = 0.f, m2 = 0.f;
    for (int l = 0; l < L; l++) add_scalar(n * 2, stack[0].m1[l], stack[0].m2[l], n0, m1, m2);
    mean = m1, var = m2 / (float)d;
}

template <int L>
void norm_row(const uint16_t* x, long d, const uint16_t* w, const uint16_t* b, float eps, bool centred, uint16_t* y) {
    float mean, var;
    moments<L>(x, d, mean, var);
    const float rstd = 1.f / sqrtf(var + eps);
    const float shift = -rstd * mean, neg_mean = -mean;
    for (long i = 0; i < d; i++) {
        const float v = bf16f(x[i]);
        y[i] = to_bf16(centred ? (v + neg_mean) * rstd * bf16f(w[i]) + bf16f(b[i])
                               : (v * rstd + shift) * bf16f(w[i]) + bf16f(b[i]));
    }
}

}  // namespace

extern "C" {

// y (rows, d) = torch's layer_norm of x (rows, d) with weight w and bias b, all bfloat16. form: bit 0 the width
// (0: 8 lanes, 1: 16), bit 1 the last line ((x * rstd - mean * rstd) * w + b, or (x - mean) * rstd * w + b). Returns
// 0, or -1 (d not a multiple of twice the width).
int blip2_layer_norm(const uint16_t* x, int rows, int d, const uint16_t* w, const uint16_t* b, float eps, int form,
                     uint16_t* y) {
    const int lanes = form & 1 ? 16 : 8;
    const bool centred = form & 2;
    if (d % (2 * lanes)) return -1;
    for (int r = 0; r < rows; r++) {
        if (lanes == 8)
            norm_row<8>(x + (size_t)r * d, d, w, b, eps, centred, y + (size_t)r * d);
        else
            norm_row<16>(x + (size_t)r * d, d, w, b, eps, centred, y + (size_t)r * d);
    }
    return 0;
}
}
