// bfloat16 <-> float32 as torch converts them, shared by blip2's CPU kernels (blip2/native.py builds them).
#pragma once

#include <stdint.h>
#include <string.h>

namespace {

inline float bf16f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline float load_float(const void* p, int is_bf16, size_t i) {
    return is_bf16 ? bf16f(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

inline uint16_t to_bf16(float f) {  // rounded to nearest even, as torch rounds (a NaN stays a NaN); no branch, so
    uint32_t u;                      // that loops over it vectorize
    memcpy(&u, &f, 4);
    const uint16_t r = (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
    return f != f ? (uint16_t)0x7FC0 : r;
}

}  // namespace
