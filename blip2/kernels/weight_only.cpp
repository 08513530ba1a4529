// blip2's weight-only matmuls for the CPU, activations quantized to int8 and products summed in int32 by VNNI
// (AVX-512 VNNI vpdpbusd; AVX2: vpmaddubsw + vpmaddwd, or AVX-VNNI). Built and loaded by blip2/native.py; no torch
// headers, threads from the OpenMP runtime torch already loaded (the same libgomp.so.1).
//
// int4 (blip2_int4_mm): weights in groups along the inputs (scale and zero per group and output channel,
// w = (q - 8) * s + z). Packed layout ("layout 0" in weight_only.py): a block of 16 output channels by a chunk of 8
// inputs is 64 bytes; byte 4j + t holds q[16b + j][8c + t] in its low nibble and q[16b + j][8c + 4 + t] in its
// high nibble, so one 32-bit lane j carries 4 consecutive inputs of channel j, as vpdpbusd wants. Bytes run
// (N/16, K/8, 64). scales_and_zeros: (N/16, K/group, 16, 2) bfloat16, a block's groups one after another (one
// stream beside its weights' stream; the (K/group, N, 2) order of PyTorch's kernel would cost a page per group and
// block): lane j of a 64-byte load is (s_j, z_j). Activations: int8 with one symmetric scale per row and group (as
// llama.cpp's Q8 blocks: an outlier channel coarsens only its own group). Per row and group:
// sum_k x_k w_k = xs * (s * (dot - 8 * asum) + z * asum), with dot = sum_k xq_k q_k, asum = sum_k xq_k.
//
// int8 (blip2_int8_mm, for decoding steps): W (N, K) int8 as saved, one scale per output channel; each row of x
// int8 with one symmetric scale (as the prompt pass's torch._int_mm). vpdpbusd multiplies unsigned by signed
// bytes: |w| times x carrying w's sign (x is quantized to -127..127, so its negation fits; w may be -128, whose
// negation as a signed byte would wrap). vpmaddubsw's pair sums stay below 2 * 128 * 127 < 32768. 4 channels at a time, one accumulator each, summed across lanes at the end.

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>

#include "bf16.h"
#include "pool.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define BLIP2_ISA 2
#elif defined(__AVX2__) && defined(__FMA__)
#define BLIP2_ISA 1
#else
#define BLIP2_ISA 0
#endif

namespace {

constexpr int PREFETCH = 4096;  // bytes ahead in a stream of weights, into L2 (bench.realsize --kernels: streaming rows)

struct Rows {  // the quantized activations
    const int8_t* q;     // (M, K)
    const int32_t* sum;  // (M, G)
    const float* scale;  // (M, G)
    int K, G;
};

inline int32_t load4(const int8_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

// Where the kernels' sums go: y (M, N) in float32, or in bfloat16 rounded as torch rounds; bias (N,) in y's dtype or
// null. In bfloat16 the product is rounded, then the sum with the bias (torch's y.to(bfloat16) + bias), so that a
// model's outputs are those of the two torch ops this replaces, without their two passes over y.
struct Out {
    void* y;
    int bf16, N;
    const void* bias;

    void put(const float* v, int n, int r, int n0) const {  // v[0..n) -> row r, channels n0 ..
        const size_t at = (size_t)r * N + n0;
        if (bf16 && bias) {
            uint16_t* d = (uint16_t*)y + at;
            const uint16_t* b = (const uint16_t*)bias + n0;
            for (int c = 0; c < n; c++) d[c] = to_bf16(bf16f(to_bf16(v[c])) + bf16f(b[c]));
        } else if (bf16) {
            uint16_t* d = (uint16_t*)y + at;
            for (int c = 0; c < n; c++) d[c] = to_bf16(v[c]);
        } else if (bias) {
            const float* b = (const float*)bias + n0;
            for (int c = 0; c < n; c++) ((float*)y)[at + c] = v[c] + b[c];
        } else {
            memcpy((float*)y + at, v, sizeof(float) * n);
        }
    }
};

// n values of x (bfloat16 or float32) from `at` -> int8 with one symmetric scale, and the sum of the int8 values
void quantize(const void* x, int is_bf16, size_t at, int n, int8_t* q, int32_t* sum, float* scale) {
    float amax = 0.f;
    bool nan = false;
    for (int k = 0; k < n; k++) {
        float a = fabsf(load_float(x, is_bf16, at + k));
        amax = a > amax ? a : amax;
        nan |= a != a;
    }
    if (nan || amax > FLT_MAX) {  // an inf or a NaN: the products are NaN, as in float arithmetic
        memset(q, 0, n);
        *sum = 0, *scale = NAN;
        return;
    }
    const float s = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / s;
    int32_t acc = 0;
    for (int k = 0; k < n; k++) {
        q[k] = (int8_t)nearbyintf(load_float(x, is_bf16, at + k) * inv);
        acc += q[k];
    }
    *sum = acc, *scale = s;
}

#if BLIP2_ISA == 2
// MR rows by one block of 16 channels: y[r][0..16)
template <int MR>
inline void tile(const uint8_t* w, const uint16_t* sz, int group, const Rows& a, int r0, const Out& o, int n0) {
    const __m512i low = _mm512_set1_epi8(0x0F), high16 = _mm512_set1_epi32((int)0xFFFF0000);
    const int chunks = group / 8;
    __m512 acc[MR];
    for (int r = 0; r < MR; r++) acc[r] = _mm512_setzero_ps();
    for (int g = 0; g < a.G; g++) {
        __m512i dot[MR];
        for (int r = 0; r < MR; r++) dot[r] = _mm512_setzero_si512();
        const uint8_t* wg = w + (size_t)g * chunks * 64;
        for (int c = 0; c < chunks; c++) {
            __m512i v = _mm512_loadu_si512(wg + c * 64);
            _mm_prefetch((const char*)(wg + c * 64 + PREFETCH), _MM_HINT_T1);
            __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            const int8_t* x = a.q + (size_t)r0 * a.K + g * group + c * 8;
            for (int r = 0; r < MR; r++) {
                dot[r] = _mm512_dpbusd_epi32(dot[r], lo, _mm512_set1_epi32(load4(x + (size_t)r * a.K)));
                dot[r] = _mm512_dpbusd_epi32(dot[r], hi, _mm512_set1_epi32(load4(x + (size_t)r * a.K + 4)));
            }
        }
        __m512i p = _mm512_loadu_si512(sz + (size_t)g * 32);
        __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(p, 16)), z = _mm512_castsi512_ps(_mm512_and_si512(p, high16));
        for (int r = 0; r < MR; r++) {
            const size_t i = (size_t)(r0 + r) * a.G + g;
            __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(dot[r], _mm512_set1_epi32(8 * a.sum[i])));
            __m512 t = _mm512_fmadd_ps(_mm512_set1_ps((float)a.sum[i]), z, _mm512_mul_ps(d, s));
            acc[r] = _mm512_fmadd_ps(t, _mm512_set1_ps(a.scale[i]), acc[r]);
        }
    }
    for (int r = 0; r < MR; r++) {
        float v[16];
        _mm512_storeu_ps(v, acc[r]);
        o.put(v, 16, r0 + r, n0);
    }
}
// int8: MR rows x NR channels (rows of w, K apart), full 64-byte chunks; the tail is summed in scalar code
template <int MR, int NR>
inline void dot8(const int8_t* w, const int8_t* xq, int K, int32_t* out) {
    __m512i acc[MR][NR];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NR; c++) acc[r][c] = _mm512_setzero_si512();
    const int full = K / 64 * 64;
    for (int k = 0; k < full; k += 64) {
        __m512i aw[NR];  // |w| as unsigned bytes (|-128| = 128 fits), its sign carried by x (|x| <= 127)
        __mmask64 neg[NR];
        for (int c = 0; c < NR; c++) {
            __m512i wv = _mm512_loadu_si512(w + (size_t)c * K + k);
            _mm_prefetch((const char*)(w + (size_t)c * K + k + PREFETCH), _MM_HINT_T1);
            aw[c] = _mm512_abs_epi8(wv), neg[c] = _mm512_movepi8_mask(wv);
        }
        for (int r = 0; r < MR; r++) {
            __m512i x = _mm512_loadu_si512(xq + (size_t)r * K + k);
            for (int c = 0; c < NR; c++)
                acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], aw[c],
                                                _mm512_mask_sub_epi8(x, neg[c], _mm512_setzero_si512(), x));
        }
    }
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NR; c++) {
            int32_t t = _mm512_reduce_add_epi32(acc[r][c]);
            for (int k = full; k < K; k++) t += (int32_t)xq[(size_t)r * K + k] * w[(size_t)c * K + k];
            out[r * NR + c] = t;
        }
}
constexpr int MAX_ROWS = 8;
#elif BLIP2_ISA == 1
inline __m256i dot4(__m256i acc, __m256i u, __m256i s) {  // 8 lanes += sum of 4 u8 * s8 products
#ifdef __AVXVNNI__
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

template <int MR>
inline void tile(const uint8_t* w, const uint16_t* sz, int group, const Rows& a, int r0, const Out& o, int n0) {
    const __m256i low = _mm256_set1_epi8(0x0F), high16 = _mm256_set1_epi32((int)0xFFFF0000);
    const int chunks = group / 8;
    __m256 acc[MR][2];
    for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int g = 0; g < a.G; g++) {
        __m256i dot[MR][2];
        for (int r = 0; r < MR; r++) dot[r][0] = dot[r][1] = _mm256_setzero_si256();
        const uint8_t* wg = w + (size_t)g * chunks * 64;
        for (int c = 0; c < chunks; c++) {
            const int8_t* x = a.q + (size_t)r0 * a.K + g * group + c * 8;
            _mm_prefetch((const char*)(wg + c * 64 + PREFETCH), _MM_HINT_T1);
            for (int h = 0; h < 2; h++) {  // channels 8h .. 8h + 7
                __m256i v = _mm256_loadu_si256((const __m256i*)(wg + c * 64 + h * 32));
                __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                for (int r = 0; r < MR; r++) {
                    dot[r][h] = dot4(dot[r][h], lo, _mm256_set1_epi32(load4(x + (size_t)r * a.K)));
                    dot[r][h] = dot4(dot[r][h], hi, _mm256_set1_epi32(load4(x + (size_t)r * a.K + 4)));
                }
            }
        }
        for (int h = 0; h < 2; h++) {
            __m256i p = _mm256_loadu_si256((const __m256i*)(sz + (size_t)g * 32 + h * 16));
            __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(p, 16));
            __m256 z = _mm256_castsi256_ps(_mm256_and_si256(p, high16));
            for (int r = 0; r < MR; r++) {
                const size_t i = (size_t)(r0 + r) * a.G + g;
                __m256 d = _mm256_cvtepi32_ps(_mm256_sub_epi32(dot[r][h], _mm256_set1_epi32(8 * a.sum[i])));
                __m256 t = _mm256_fmadd_ps(_mm256_set1_ps((float)a.sum[i]), z, _mm256_mul_ps(d, s));
                acc[r][h] = _mm256_fmadd_ps(t, _mm256_set1_ps(a.scale[i]), acc[r][h]);
            }
        }
    }
    for (int r = 0; r < MR; r++) {
        float v[16];
        _mm256_storeu_ps(v, acc[r][0]), _mm256_storeu_ps(v + 8, acc[r][1]);
        o.put(v, 16, r0 + r, n0);
    }
}
inline int32_t hsum(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// int8: MR rows x NR channels (rows of w, K apart), full 32-byte chunks; the tail is summed in scalar code
template <int MR, int NR>
inline void dot8(const int8_t* w, const int8_t* xq, int K, int32_t* out) {
    __m256i acc[MR][NR];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NR; c++) acc[r][c] = _mm256_setzero_si256();
    const int full = K / 32 * 32;
    for (int k = 0; k < full; k += 32) {
        __m256i wv[NR], aw[NR];  // |w| as unsigned bytes (|-128| = 128 fits), its sign carried by x (|x| <= 127)
        for (int c = 0; c < NR; c++) {
            wv[c] = _mm256_loadu_si256((const __m256i*)(w + (size_t)c * K + k));
            _mm_prefetch((const char*)(w + (size_t)c * K + k + PREFETCH), _MM_HINT_T1);
            aw[c] = _mm256_abs_epi8(wv[c]);
        }
        for (int r = 0; r < MR; r++) {
            __m256i x = _mm256_loadu_si256((const __m256i*)(xq + (size_t)r * K + k));
            for (int c = 0; c < NR; c++) acc[r][c] = dot4(acc[r][c], aw[c], _mm256_sign_epi8(x, wv[c]));
        }
    }
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NR; c++) {
            int32_t t = hsum(acc[r][c]);
            for (int k = full; k < K; k++) t += (int32_t)xq[(size_t)r * K + k] * w[(size_t)c * K + k];
            out[r * NR + c] = t;
        }
}
constexpr int MAX_ROWS = 2;
#endif

#if BLIP2_ISA > 0
// rows r0 .. r0 + MR of y for channels n0 .. n0 + nc (nc <= 4)
template <int MR>
void channels8(const int8_t* w, const int8_t* xq, const float* xs, const void* ws, int ws_bf16, int K, int r0, int n0,
               int nc, const Out& o) {
    int32_t d[MR * 4];
    if (nc == 4) {
        dot8<MR, 4>(w + (size_t)n0 * K, xq + (size_t)r0 * K, K, d);
    } else {
        for (int c = 0; c < nc; c++) {
            int32_t one[MR];
            dot8<MR, 1>(w + (size_t)(n0 + c) * K, xq + (size_t)r0 * K, K, one);
            for (int r = 0; r < MR; r++) d[r * 4 + c] = one[r];
        }
    }
    for (int r = 0; r < MR; r++) {
        float v[4];
        for (int c = 0; c < nc; c++) v[c] = (float)d[r * 4 + c] * xs[r0 + r] * load_float(ws, ws_bf16, n0 + c);
        o.put(v, nc, r0 + r, n0);
    }
}
#endif

struct Int4Job {
    const uint8_t* w;
    const uint16_t* sz;
    int group, G, K, M;
    Rows a;
    Out o;
};

void int4_block(const void* ctx, long b) {  // block b of 16 output channels, every row
    const Int4Job& j = *(const Int4Job*)ctx;
    const uint8_t* wb = j.w + (size_t)b * j.K * 8;  // 16 channels x K/2 bytes
    const uint16_t* szb = j.sz + (size_t)32 * j.G * b;
    for (int r0 = 0; r0 < j.M; r0 += MAX_ROWS) {
        switch (j.M - r0 < MAX_ROWS ? j.M - r0 : MAX_ROWS) {
#if BLIP2_ISA == 2
            case 8: tile<8>(wb, szb, j.group, j.a, r0, j.o, 16 * (int)b); break;
            case 7: tile<7>(wb, szb, j.group, j.a, r0, j.o, 16 * (int)b); break;
            case 6: tile<6>(wb, szb, j.group, j.a, r0, j.o, 16 * (int)b); break;
            case 5: tile<5>(wb, szb, j.group, j.a, r0, j.o, 16 * (int)b); break;
            case 4: tile<4>(wb, szb, j.group, j.a, r0, j.o, 16 * (int)b); break;
            case 3: tile<3>(wb, szb, j.group, j.a, r0, j.o, 16 * (int)b); break;
#endif
            case 2: tile<2>(wb, szb, j.group, j.a, r0, j.o, 16 * (int)b); break;
            default: tile<1>(wb, szb, j.group, j.a, r0, j.o, 16 * (int)b); break;
        }
    }
}

// Up to POOL_ROWS rows (decoding steps) run on blip2's pool (pool.h), whose workers read ahead the matmul that came
// after this one the last time: a decoding step runs the same matmuls in the same order. A wrong guess (another
// model's turn, a freed weight) costs only the read: prefetches never fault.
constexpr int POOL_ROWS = 8;
constexpr int FOLLOWS = 4096;
struct Followed {
    const char* w;
    blip2::Hint next;
};
Followed follows_table[FOLLOWS];
const char* last_w = nullptr;
std::atomic_flag follows_lock = ATOMIC_FLAG_INIT;

const blip2::Hint* follows(const blip2::Hint& here) {  // records `here` as what followed the last matmul
    static thread_local blip2::Hint found;
    const auto slot = [](const char* w) { return ((uintptr_t)w >> 12 ^ (uintptr_t)w >> 24) % FOLLOWS; };
    while (follows_lock.test_and_set(std::memory_order_acquire)) _mm_pause();
    if (last_w) follows_table[slot(last_w)] = Followed{last_w, here};
    last_w = here.base[0];
    const Followed& f = follows_table[slot(here.base[0])];
    const bool known = f.w == here.base[0];
    if (known) found = f.next;
    follows_lock.clear(std::memory_order_release);
    return known ? &found : nullptr;
}

}  // namespace

extern "C" {

// 2: AVX-512 VNNI, 1: AVX2, 0: neither (then blip2 keeps PyTorch's kernels)
int blip2_isa(void) { return BLIP2_ISA; }

// y (M, N) = x (M, K) @ W^T + bias; x bfloat16 (is_bf16) or float32; w packed (N/16, K/8, 64) bytes;
// sz (N/16, K/group, 16, 2) bfloat16; y and bias (N,) (or null) in bfloat16 (y_bf16) or float32 (Out). N a multiple
// of 16, K of group, group a multiple of 8 up to 256. Returns 0, or -1 (no vector unit, or out of memory).
int blip2_int4_mm(const void* x, int is_bf16, int M, int K, int N, const uint8_t* w, const uint16_t* sz,
                  int group, const void* bias, void* y, int y_bf16, int threads) {
#if BLIP2_ISA == 0
    (void)x, (void)is_bf16, (void)M, (void)K, (void)N, (void)w, (void)sz, (void)group, (void)bias, (void)y,
        (void)y_bf16, (void)threads;
    return -1;
#else
    const int G = K / group;
    int8_t* q = (int8_t*)malloc((size_t)M * K);
    int32_t* sums = (int32_t*)malloc(sizeof(int32_t) * M * G);
    float* scales = (float*)malloc(sizeof(float) * M * G);
    if (!q || !sums || !scales) {
        free(q), free(sums), free(scales);
        return -1;
    }
#pragma omp parallel for num_threads(threads) schedule(static) if (M * K >= 65536)
    for (int i = 0; i < M * G; i++)
        quantize(x, is_bf16, (size_t)i * group, group, q + (size_t)i * group, sums + i, scales + i);
    const Int4Job job{w, sz, group, G, K, M, Rows{q, sums, scales, K, G}, Out{y, y_bf16, N, bias}};
    const long blocks = N / 16;
    const blip2::Hint here{{(const char*)w, (const char*)sz}, {(size_t)K * 8, (size_t)G * 64}, blocks};
    if (M > POOL_ROWS || !blip2::pool_run(threads, blocks, int4_block, &job, follows(here))) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (long b = 0; b < blocks; b++) int4_block(&job, b);
    }
    free(q), free(sums), free(scales);
    return 0;
#endif
}

// y (M, N) = x (M, K) @ W^T * scales + bias; x bfloat16 (x_bf16) or float32; w int8 (N, K) row-major; scales (N,)
// bfloat16 (s_bf16) or float32; y and bias (N,) (or null) in bfloat16 (y_bf16) or float32 (Out). Returns 0, or -1
// (no vector unit, or out of memory).
int blip2_int8_mm(const void* x, int x_bf16, int M, int K, int N, const int8_t* w, const void* scales, int s_bf16,
                  const void* bias, void* y, int y_bf16, int threads) {
#if BLIP2_ISA == 0
    (void)x, (void)x_bf16, (void)M, (void)K, (void)N, (void)w, (void)scales, (void)s_bf16, (void)bias, (void)y,
        (void)y_bf16, (void)threads;
    return -1;
#else
    int8_t* q = (int8_t*)malloc((size_t)M * K);
    float* xs = (float*)malloc(sizeof(float) * M);
    if (!q || !xs) {
        free(q), free(xs);
        return -1;
    }
    for (int m = 0; m < M; m++) {
        int32_t unused;
        quantize(x, x_bf16, (size_t)m * K, K, q + (size_t)m * K, &unused, xs + m);
    }
    const Out o{y, y_bf16, N, bias};
    const int quads = (N + 3) / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = 0; i < quads; i++) {
        const int n0 = 4 * i, nc = N - n0 < 4 ? N - n0 : 4;
        int r0 = 0;
        for (; r0 + 3 <= M; r0 += 3) channels8<3>(w, q, xs, scales, s_bf16, K, r0, n0, nc, o);
        if (M - r0 == 2) channels8<2>(w, q, xs, scales, s_bf16, K, r0, n0, nc, o);
        if (M - r0 == 1) channels8<1>(w, q, xs, scales, s_bf16, K, r0, n0, nc, o);
    }
    free(q), free(xs);
    return 0;
#endif
}
}
