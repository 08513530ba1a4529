// blip2's worker threads for decoding steps (pool.h). A decoding step runs ~200 weight-only matmuls with Python
// between them, during which the memory bus idles; OpenMP's workers can only spin there. These workers, once done with
// their share of a matmul, read ahead the share they will take of the next one (the caller names it), so the next
// matmul finds part of its weights in cache (`python -m bench.step --ab`: the step with and without, BLIP2_POOL=0
// turning the pool off, read at each call). Torch's own ops must stay off OpenMP's workers meanwhile, or a worker
// spinning after one (F.gelu forks at 5120 elements) holds the core this pool's worker needs: native.decoding_step().
// Workers spin ~0.2 ms after a job, then sleep; a forked child makes its own pool.

#include "pool.h"

#include <immintrin.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace blip2 {
namespace {

constexpr int MAX_THREADS = 64;
constexpr size_t READ_AHEAD = 1 << 20;  // bytes of its next share a worker prefetches (bench.step: 0.5-2 MB alike)
constexpr auto SPIN = std::chrono::microseconds(200);

struct alignas(64) Share {  // one thread's tasks [next, end), claimed one at a time
    std::atomic<long> next;
    long end;
};

struct Pool {
    int threads;
    pid_t pid;
    std::atomic<unsigned> gen{0};  // the job's number: workers wait for it to change
    std::atomic<int> finished{0};  // workers done with the job
    std::atomic<int> sleepers{0};
    std::atomic_flag busy = ATOMIC_FLAG_INIT;
    std::mutex mutex;
    std::condition_variable wake;
    // the job
    void (*task)(const void*, long) = nullptr;
    const void* ctx = nullptr;
    Hint next{};
    bool has_next = false;
    Share share[MAX_THREADS];

    explicit Pool(int t) : threads(t), pid(getpid()) {
        for (int k = 1; k < t; k++) std::thread(&Pool::work, this, k).detach();
    }

    void take(int k) {  // own share first, then the others'
        for (int j = 0; j < threads; j++) {
            Share& s = share[(k + j) % threads];
            for (long i; (i = s.next.fetch_add(1, std::memory_order_relaxed)) < s.end;) task(ctx, i);
        }
    }

    void work(int k) {
        unsigned seen = 0;
        for (;;) {
            const auto t0 = std::chrono::steady_clock::now();
            unsigned g;
            while ((g = gen.load(std::memory_order_acquire)) == seen) {
                if (std::chrono::steady_clock::now() - t0 < SPIN) {
                    _mm_pause();
                    continue;
                }
                std::unique_lock<std::mutex> lock(mutex);
                sleepers.fetch_add(1);
                wake.wait(lock, [&] { return gen.load(std::memory_order_acquire) != seen; });
                sleepers.fetch_sub(1);
            }
            seen = g;
            take(k);
            const bool ahead = has_next;
            const Hint h = next;  // read before saying done: the caller may post the next job at once
            finished.fetch_add(1, std::memory_order_acq_rel);
            if (ahead) prefetch(h, k, g);
        }
    }

    void prefetch(const Hint& h, int k, unsigned g) {  // until READ_AHEAD bytes of weights, or the next job
        const long first = h.n * k / threads, last = h.n * (k + 1) / threads;
        for (long i = first; i < last && (size_t)(i - first) * h.stride[0] < READ_AHEAD; i++)
            for (int s = 0; s < 2; s++) {
                const char* p = h.base[s] + (size_t)i * h.stride[s];
                for (size_t b = 0; b < h.stride[s]; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);  // never faults
                if (gen.load(std::memory_order_relaxed) != g) return;
            }
    }

    void run(long n, void (*f)(const void*, long), const void* c, const Hint* h) {
        task = f, ctx = c, has_next = h != nullptr;
        if (h) next = *h;
        for (int k = 0; k < threads; k++) {
            share[k].next.store(n * k / threads, std::memory_order_relaxed);
            share[k].end = n * (k + 1) / threads;
        }
        finished.store(0, std::memory_order_relaxed);
        gen.fetch_add(1, std::memory_order_acq_rel);
        if (sleepers.load()) {
            std::lock_guard<std::mutex> lock(mutex);
            wake.notify_all();
        }
        take(0);
        while (finished.load(std::memory_order_acquire) != threads - 1) _mm_pause();
    }
};

std::atomic<Pool*> the_pool{nullptr};
std::mutex creating;
thread_local bool allowed = false;  // blip2_pool_allow: inside native.decoding_step(), on this thread
std::atomic<long> runs{0};  // jobs the pool ran (blip2_pool_runs)

}  // namespace

bool pool_run(int threads, long n, void (*task)(const void* ctx, long i), const void* ctx, const Hint* next) {
    const char* flag = getenv("BLIP2_POOL");  // read at each call: bench.step --ab turns it on and off in one process
    if (!allowed || (flag && flag[0] == '0') || threads < 2 || threads > MAX_THREADS) return false;
    Pool* p = the_pool.load(std::memory_order_acquire);
    if (!p || p->pid != getpid()) {  // none yet, or this process is a fork (its parent's workers are not here)
        std::lock_guard<std::mutex> lock(creating);
        p = the_pool.load();
        if (!p || p->pid != getpid()) the_pool.store(p = new Pool(threads));  // a fork's old pool is left as is
    }
    if (p->threads != threads || p->busy.test_and_set(std::memory_order_acquire)) return false;
    p->run(n, task, ctx, next);
    p->busy.clear(std::memory_order_release);
    runs.fetch_add(1, std::memory_order_relaxed);
    return true;
}

}  // namespace blip2

// Whether this thread's kernels may run on the pool: native.decoding_step() allows it while it keeps torch's ops off
// OpenMP's workers (else a worker spinning after one of them can hold the core the pool's worker needs).
extern "C" void blip2_pool_allow(int on) { blip2::allowed = on != 0; }

// Jobs the pool has run in this process (the tests check that it serves where it should).
extern "C" long blip2_pool_runs(void) { return blip2::runs.load(); }
