// blip2's own worker threads for a decoding step's kernels (blip2/kernels/pool.cpp).
#pragma once

#include <stddef.h>

namespace blip2 {

// Where the next job's data starts, for the workers to prefetch while the caller runs Python between kernels: task
// i of the next job reads stride[s] bytes from base[s] + i * stride[s] (s: its weights' and its scales' streams),
// and worker k of `threads` begins that job at task n * k / threads.
struct Hint {
    const char* base[2];
    size_t stride[2];
    long n;
};

// Runs task(ctx, i) for every i < n on `threads` threads: this one and threads - 1 workers of the pool, each
// beginning at its own share (n / threads tasks in a row, this thread at the first) and then taking what is left of
// the others'. A worker that has no task left prefetches its share of `next` (if not null) until the next job comes.
// Returns false, running nothing, where the pool does not serve: outside blip2_pool_allow(1) on this thread (native.
// decoding_step()), threads < 2, another caller inside it, or a pool of another size (the caller then runs the tasks
// itself).
bool pool_run(int threads, long n, void (*task)(const void* ctx, long i), const void* ctx, const Hint* next);

}  // namespace blip2
