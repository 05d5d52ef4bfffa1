/* Machine-peak probes for benchmarks/bench.py: the rates the attention kernels are measured against.
 *
 * This one file is compiled several times at benchmark time, once per ISA, each with its own
 * explicit -m flags (never -march=native) and one PROBE_* macro that selects what it exports:
 *
 *   PROBE_DRAM        (no ISA flags)              probe_dram_read_gbs: streaming read bandwidth
 *   PROBE_FMA_AVX2    (-mavx2 -mfma)              probe_fma_avx2_gflops: fp32 FMA peak, 8 lanes
 *   PROBE_FMA_AVX512  (-mavx512f)                 probe_fma_avx512_gflops: fp32 FMA peak, 16 lanes
 *   PROBE_AMX         (-mamx-tile -mamx-bf16)     probe_amx_request, probe_amx_bf16_gflops
 *
 * so no ISA leaks into code that runs before the caller has checked the CPU supports it. Every
 * probe runs on `threads` OpenMP threads, calibrates its iteration count until one measurement
 * lasts at least `min_seconds`, repeats the measurement `reps` times and returns the best rate
 * (the peak is what the machine can do, so the least-disturbed repetition is the right one).
 *
 * Two rates come back: the return value divides the work by wall-clock time (what this run got),
 * and *cpu_rate divides it by the longest per-thread CPU time (CLOCK_THREAD_CPUTIME_ID), which
 * excludes the time a thread was descheduled: on a machine shared with other processes this is
 * the hardware's rate, the one to compare kernels against. It assumes the threads fit on the
 * CPUs (threads <= CPUs); the caller ensures that.
 * A negative return value is an error (allocation or AMX permission failure).
 */
#define _GNU_SOURCE
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Keeps results alive so the compiler cannot delete the work that produced them. */
static volatile double probe_sink;

static double thread_cpu_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* A body runs `iters` iterations on `threads` threads, stores the longest per-thread CPU time in
 * *max_cpu and returns a value derived from its results (kept in probe_sink). */
typedef double (*probe_body)(long iters, int threads, void *ctx, double *max_cpu);

/* Calibrate iters so one call of body lasts >= min_seconds, then return the best of reps
 * wall-clock work/second rates (and the best CPU-time rate in *cpu_rate), where work_per_iter is
 * the work (FLOP or bytes) one iteration does on all threads together. */
static double probe_best_rate(probe_body body, void *ctx, int threads, double work_per_iter,
                              double min_seconds, int reps, double *cpu_rate) {
    long iters = 1;
    double t = 0.0, cpu = 0.0;
    for (;;) {
        double t0 = omp_get_wtime();
        probe_sink = body(iters, threads, ctx, &cpu);
        t = omp_get_wtime() - t0;
        if (t >= min_seconds || iters > (1L << 40))
            break;
        iters = t > 1e-4 ? (long)(iters * 1.2 * min_seconds / t) + 1 : iters * 8;
    }
    double best = work_per_iter * (double)iters / t;
    double best_cpu = cpu > 0 ? work_per_iter * (double)iters / cpu : 0.0;
    for (int r = 1; r < reps; r++) {
        double t0 = omp_get_wtime();
        probe_sink = body(iters, threads, ctx, &cpu);
        t = omp_get_wtime() - t0;
        double rate = work_per_iter * (double)iters / t;
        double rate_cpu = cpu > 0 ? work_per_iter * (double)iters / cpu : 0.0;
        if (rate > best)
            best = rate;
        if (rate_cpu > best_cpu)
            best_cpu = rate_cpu;
    }
    *cpu_rate = best_cpu > best ? best_cpu : best;
    return best;
}

#ifdef PROBE_DRAM
struct dram_ctx {
    const uint64_t *buf;
    size_t n;
};

/* The [lo, hi) slice (in groups of 4 words) that thread t of `threads` owns: the same slices
 * first-touch the buffer and read it. */
static void dram_slice(size_t n, int t, int threads, size_t *lo, size_t *hi) {
    size_t groups = n / 4;
    *lo = 4 * (groups * (size_t)t / (size_t)threads);
    *hi = 4 * (groups * (size_t)(t + 1) / (size_t)threads);
}

/* One iteration reads the whole buffer once, each thread its own slice, with no barrier between
 * iterations (a thread waiting at a barrier would spin and count CPU time). Integer sums: the loop
 * vectorizes with whatever the baseline ISA has, which is plenty for DRAM rates, and needs no
 * floating-point reassociation. */
static double dram_body(long iters, int threads, void *p, double *max_cpu) {
    const struct dram_ctx *c = p;
    uint64_t total = 0;
    double cpu_max = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total) reduction(max : cpu_max)
    {
        size_t lo, hi;
        dram_slice(c->n, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        double c0 = thread_cpu_seconds();
        for (long it = 0; it < iters; it++) {
            uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
            for (size_t i = lo; i < hi; i += 4) {
                s0 += c->buf[i];
                s1 += c->buf[i + 1];
                s2 += c->buf[i + 2];
                s3 += c->buf[i + 3];
            }
            total += s0 ^ s1 ^ s2 ^ s3;
        }
        cpu_max = thread_cpu_seconds() - c0;
    }
    *max_cpu = cpu_max;
    return (double)total;
}

/* Streaming read bandwidth in GB/s (1e9 bytes/s) over a buffer of `bytes` (choose it much larger
 * than the last-level cache). */
double probe_dram_read_gbs(size_t bytes, int threads, double min_seconds, int reps,
                           double *cpu_gbs) {
    size_t n = bytes / sizeof(uint64_t) / 4 * 4;
    uint64_t *buf = NULL;
    if (n == 0 || posix_memalign((void **)&buf, 4096, n * sizeof(uint64_t)) != 0)
        return -1.0;
    /* First touch by the reading threads, with non-zero data so no zero-page sharing applies. */
#pragma omp parallel num_threads(threads)
    {
        size_t lo, hi;
        dram_slice(n, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        for (size_t i = lo; i < hi; i += 4) {
            buf[i] = i;
            buf[i + 1] = i ^ 0x5555u;
            buf[i + 2] = i + 7;
            buf[i + 3] = ~i;
        }
    }
    struct dram_ctx ctx = {buf, n};
    double cpu = 0.0;
    double rate = probe_best_rate(dram_body, &ctx, threads, (double)(n * sizeof(uint64_t)),
                                  min_seconds, reps, &cpu);
    free(buf);
    *cpu_gbs = cpu / 1e9;
    return rate / 1e9;
}
#endif

#if defined(PROBE_FMA_AVX2) || defined(PROBE_FMA_AVX512)
#include <immintrin.h>

/* Independent FMA chains held in registers: c = c * a + b per chain. With 2 FMA ports and a
 * 4-cycle latency, 8 chains keep both ports busy; 12 (AVX2: 16 ymm registers) and 16 (AVX-512:
 * 32 zmm registers) leave margin. The loop-carried dependences stop the compiler from merging or
 * dropping any FMA (no -ffast-math). */
#ifdef PROBE_FMA_AVX512
#define VEC __m512
#define LANES 16
#define CHAINS 16
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define ADD _mm512_add_ps
#define REDUCE(x) ((double)_mm512_reduce_add_ps(x))
#define PROBE_NAME probe_fma_avx512_gflops
#else
#define VEC __m256
#define LANES 8
#define CHAINS 12
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define ADD _mm256_add_ps
static double reduce256(__m256 x) {
    float f[8];
    _mm256_storeu_ps(f, x);
    return (double)f[0] + f[1] + f[2] + f[3] + f[4] + f[5] + f[6] + f[7];
}
#define REDUCE(x) reduce256(x)
#define PROBE_NAME probe_fma_avx2_gflops
#endif

static double fma_thread(long iters) {
    const VEC a = SET1(0.9999999f), b = SET1(1e-7f);
    VEC c[CHAINS];
    for (int j = 0; j < CHAINS; j++)
        c[j] = SET1(0.5f + 0.01f * (float)j);
    for (long i = 0; i < iters; i++) {
#pragma GCC unroll 16
        for (int j = 0; j < CHAINS; j++)
            c[j] = FMA(c[j], a, b);
    }
    VEC s = c[0];
    for (int j = 1; j < CHAINS; j++)
        s = ADD(s, c[j]);
    return REDUCE(s);
}

static double fma_body(long iters, int threads, void *ctx, double *max_cpu) {
    (void)ctx;
    double total = 0.0, cpu_max = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total) reduction(max : cpu_max)
    {
        double c0 = thread_cpu_seconds();
        total += fma_thread(iters);
        cpu_max = thread_cpu_seconds() - c0;
    }
    *max_cpu = cpu_max;
    return total;
}

/* fp32 FMA peak in GFLOP/s (an FMA counts as 2 FLOP) over `threads` threads. */
double PROBE_NAME(int threads, double min_seconds, int reps, double *cpu_gflops) {
    double flop_per_iter = 2.0 * LANES * CHAINS * threads, cpu = 0.0;
    double rate = probe_best_rate(fma_body, NULL, threads, flop_per_iter, min_seconds, reps, &cpu);
    *cpu_gflops = cpu / 1e9;
    return rate / 1e9;
}
#endif

#ifdef PROBE_AMX
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Linux must grant the process the AMX tile-data state before the first tile instruction, or
 * that instruction kills the process. Returns 0 on success. The grant is process-wide. */
int probe_amx_request(void) {
    return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
}

struct tile_config {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Four independent accumulators (tiles 0-3) fed from two A tiles (4, 5) and two B tiles (6, 7),
 * all 16 rows x 64 bytes: each tdpbf16ps is 16 x 16 fp32 outputs x 32 bf16 products = 16384 FLOP.
 * Operands are tiny normal numbers, so the accumulators stay finite and never denormal. */
static double amx_thread(long iters) {
    struct tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    uint16_t a[16 * 32], b[16 * 32];
    for (int i = 0; i < 16 * 32; i++) {
        a[i] = 0x3800 + (uint16_t)(i & 7); /* about 3e-5 */
        b[i] = 0x3900 + (uint16_t)(i & 3); /* about 1.2e-4 */
    }
    float c[16 * 16];
    _tile_loadconfig(&cfg);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, a, 64);
    _tile_loadd(5, a, 64);
    _tile_loadd(6, b, 64);
    _tile_loadd(7, b, 64);
    for (long i = 0; i < iters; i++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    double s = 0.0;
    _tile_stored(0, c, 64);
    s += c[0];
    _tile_stored(3, c, 64);
    s += c[255];
    _tile_release();
    return s;
}

static double amx_body(long iters, int threads, void *ctx, double *max_cpu) {
    (void)ctx;
    double total = 0.0, cpu_max = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total) reduction(max : cpu_max)
    {
        double c0 = thread_cpu_seconds();
        total += amx_thread(iters);
        cpu_max = thread_cpu_seconds() - c0;
    }
    *max_cpu = cpu_max;
    return total;
}

/* AMX bf16 peak (tdpbf16ps, fp32 accumulate) in GFLOP/s over `threads` threads; -1 when the OS
 * refuses the tile-data permission. */
double probe_amx_bf16_gflops(int threads, double min_seconds, int reps, double *cpu_gflops) {
    if (probe_amx_request() != 0)
        return -1.0;
    double flop_per_iter = 4.0 * 16 * 16 * 32 * 2 * threads, cpu = 0.0;
    double rate = probe_best_rate(amx_body, NULL, threads, flop_per_iter, min_seconds, reps, &cpu);
    *cpu_gflops = cpu / 1e9;
    return rate / 1e9;
}
#endif
