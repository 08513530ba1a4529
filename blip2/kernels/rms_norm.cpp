// T5's RMSNorm (transformers' T5LayerNorm) in one call, with torch's roundings, so that its outputs are those of the
// eight torch ops it replaces (x.float().pow(2).mean(-1) -> + eps -> rsqrt -> x * r -> .to(bfloat16) -> weight *):
//   var = sum(x * x) / d in float32, summed in the order of torch's CPU sum (below), then 1 / sqrt(var + eps);
//   h = x * r rounded to float32; a bfloat16 weight: h rounded to bfloat16, then weight * h rounded to bfloat16; a
//   float32 weight: weight * h in float32.
// torch's sum of a contiguous row (aten/src/ATen/native/cpu/SumKernel.cpp, cascade_sum -> vectorized_inner_sum): the
// row as vectors of L floats; vector i goes to accumulator i % 4 (row_sum's 4-way ILP); each accumulator adds
// 2^level_power vectors at a time into a cascade of 4 levels (multi_row_sum); the vectors past the last multiple of
// 4 go to accumulator 0; the 4 accumulators add up; then a float starts at 0, takes the elements past the last
// vector, then the L lanes in order. Fewer than L elements: the same with scalars (scalar_inner_sum). L is the
// width torch's sum runs at (8 or 16): native.py finds it by comparing with torch, and keeps torch's ops where
// neither width gives torch's bits.

#include <math.h>
#include <stdint.h>

#include "bf16.h"

namespace {

inline int ceil_log2(int64_t x) { return x <= 2 ? 1 : 64 - __builtin_clzll((uint64_t)x - 1); }  // ATen's CeilLog2

// multi_row_sum<acc, 4> over `size` steps of 4 vectors of L floats (L = 1: scalars): acc (4, L) <- the sums
template <int L>
void cascade(const float* v, int64_t size, float acc[4][L]) {
    constexpr int levels = 4;
    const int power = ceil_log2(size) / levels > 4 ? ceil_log2(size) / levels : 4;
    const int64_t step = (int64_t)1 << power, mask = step - 1;
    float lvl[levels][4][L] = {};
    int64_t i = 0;
    while (i + step <= size) {
        for (int64_t j = 0; j < step; ++j, ++i)
            for (int k = 0; k < 4; ++k)
                for (int l = 0; l < L; ++l) lvl[0][k][l] += v[(i * 4 + k) * L + l];
        for (int j = 1; j < levels; ++j) {
            for (int k = 0; k < 4; ++k)
                for (int l = 0; l < L; ++l) lvl[j][k][l] += lvl[j - 1][k][l], lvl[j - 1][k][l] = 0.f;
            if (i & (mask << (j * power))) break;
        }
    }
    for (; i < size; ++i)
        for (int k = 0; k < 4; ++k)
            for (int l = 0; l < L; ++l) lvl[0][k][l] += v[(i * 4 + k) * L + l];
    for (int j = 1; j < levels; ++j)
        for (int k = 0; k < 4; ++k)
            for (int l = 0; l < L; ++l) lvl[0][k][l] += lvl[j][k][l];
    for (int k = 0; k < 4; ++k)
        for (int l = 0; l < L; ++l) acc[k][l] = lvl[0][k][l];
}

// row_sum: n / L vectors (L = 1: scalars) through the cascade, 4 at a time, the rest into accumulator 0
template <int L>
void row_sum(const float* v, int64_t vectors, float out[L]) {
    float acc[4][L];
    const int64_t size = vectors / 4;
    cascade<L>(v, size, acc);
    for (int64_t e = size * 4; e < vectors; ++e)
        for (int l = 0; l < L; ++l) acc[0][l] += v[e * L + l];
    for (int k = 1; k < 4; ++k)
        for (int l = 0; l < L; ++l) acc[0][l] += acc[k][l];
    for (int l = 0; l < L; ++l) out[l] = acc[0][l];
}

template <int L>
float torch_sum(const float* v, int64_t n) {
    if (n < L) {
        float s;
        row_sum<1>(v, n, &s);
        return s;
    }
    const int64_t vectors = n / L;
    float lanes[L];
    row_sum<L>(v, vectors, lanes);
    float s = 0.f;
    for (int64_t e = vectors * L; e < n; ++e) s += v[e];
    for (int l = 0; l < L; ++l) s += lanes[l];
    return s;
}

template <int L>
void norm_row(const void* x, int x_bf16, int d, const void* w, int w_bf16, float eps, void* y, float* h) {
    for (int i = 0; i < d; ++i) {
        const float a = load_float(x, x_bf16, i);
        h[i] = a * a;
    }
    const float r = 1.f / sqrtf(torch_sum<L>(h, d) / (float)d + eps);
    if (w_bf16)
        for (int i = 0; i < d; ++i)
            ((uint16_t*)y)[i] = to_bf16(bf16f(((const uint16_t*)w)[i]) * bf16f(to_bf16(load_float(x, x_bf16, i) * r)));
    else
        for (int i = 0; i < d; ++i) ((float*)y)[i] = ((const float*)w)[i] * (load_float(x, x_bf16, i) * r);
}

}  // namespace

extern "C" {

// y (rows, d) = T5's RMSNorm of x (rows, d); x bfloat16 (x_bf16) or float32; w (d,) bfloat16 (w_bf16, then y is
// bfloat16) or float32 (y float32); lanes: the width of torch's sum, 8 or 16. Returns 0, or -1 (lanes unknown).
int blip2_rms_norm(const void* x, int x_bf16, int rows, int d, const void* w, int w_bf16, float eps, void* y,
                   int lanes, int threads) {
    if (lanes != 8 && lanes != 16) return -1;
    const size_t xs = x_bf16 ? 2 : 4, ys = w_bf16 ? 2 : 4;
#pragma omp parallel num_threads(threads) if ((int64_t)rows * d >= 65536)
    {
        float* h = new float[d];
#pragma omp for schedule(static)
        for (int r = 0; r < rows; ++r) {
            const void* xr = (const char*)x + xs * d * r;
            void* yr = (char*)y + ys * d * r;
            if (lanes == 8)
                norm_row<8>(xr, x_bf16, d, w, w_bf16, eps, yr, h);
            else
                norm_row<16>(xr, x_bf16, d, w, w_bf16, eps, yr, h);
        }
        delete[] h;
    }
    return 0;
}
}
