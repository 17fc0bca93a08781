/* The peak rate of one core's multiply-add instructions, for benchmarks/bench_peak.py: each
 * function runs `iters` rounds of independent multiply-adds on registers only (no loads), many
 * accumulator chains so that throughput, not latency, bounds them, and returns the seconds.
 * The chains start from different values and their sums are returned through `sink`, so the
 * compiler can neither merge identical chains nor drop them. Built as a shared library and
 * loaded with ctypes; x86-64 only, each function to be called only where the CPU has it.
 *
 *   FLOP per round:  fma_ymm 12 x 8 x 2,  fma_zmm 12 x 16 x 2,  dpbf16_zmm 24 x 32 x 2,
 *                    amx_tdpbf16 4 x (16 x 16 x 32) x 2
 */
#include <immintrin.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

#define X12(m) m(0) m(1) m(2) m(3) m(4) m(5) m(6) m(7) m(8) m(9) m(10) m(11)
#define X24(m) X12(m) m(12) m(13) m(14) m(15) m(16) m(17) m(18) m(19) m(20) m(21) m(22) m(23)

__attribute__((target("avx2,fma"))) double peak_fma_ymm(long iters, float *sink) {
#define Y_INIT(i) __m256 a##i = _mm256_set1_ps(1e-3f * (float)(i + 1));
    X12(Y_INIT)
    const __m256 x = _mm256_set1_ps(0.999f), y = _mm256_set1_ps(1e-6f);
    const double t0 = now();
    for (long n = 0; n < iters; n++) {
#define Y_STEP(i) a##i = _mm256_fmadd_ps(a##i, x, y);
        X12(Y_STEP)
    }
    const double t = now() - t0;
    __m256 s = _mm256_setzero_ps();
#define Y_SUM(i) s = _mm256_add_ps(s, a##i);
    X12(Y_SUM)
    _mm256_storeu_ps(sink, s);
    return t;
}

__attribute__((target("avx512f"))) double peak_fma_zmm(long iters, float *sink) {
#define Z_INIT(i) __m512 a##i = _mm512_set1_ps(1e-3f * (float)(i + 1));
    X12(Z_INIT)
    const __m512 x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(1e-6f);
    const double t0 = now();
    for (long n = 0; n < iters; n++) {
#define Z_STEP(i) a##i = _mm512_fmadd_ps(a##i, x, y);
        X12(Z_STEP)
    }
    const double t = now() - t0;
    __m512 s = _mm512_setzero_ps();
#define Z_SUM(i) s = _mm512_add_ps(s, a##i);
    X12(Z_SUM)
    _mm512_storeu_ps(sink, s);
    return t;
}

/* 24 chains: vdpbf16ps has a longer latency than vfmadd on some cores */
__attribute__((target("avx512f,avx512bf16"))) double peak_dpbf16_zmm(long iters, float *sink) {
#define B_INIT(i) __m512 a##i = _mm512_set1_ps(1e-3f * (float)(i + 1));
    X24(B_INIT)
    /* bf16 pairs (0.99609375, 0.5) and (2^-10, 2^-11) */
    const __m512bh x = (__m512bh)_mm512_set1_epi32(0x3F003F7F);
    const __m512bh y = (__m512bh)_mm512_set1_epi32(0x3A003A80);
    const double t0 = now();
    for (long n = 0; n < iters; n++) {
#define B_STEP(i) a##i = _mm512_dpbf16_ps(a##i, x, y);
        X24(B_STEP)
    }
    const double t = now() - t0;
    __m512 s = _mm512_setzero_ps();
#define B_SUM(i) s = _mm512_add_ps(s, a##i);
    X24(B_SUM)
    _mm512_storeu_ps(sink, s);
    return t;
}

typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_cfg;

static const amx_cfg cfg_16x64 = {
    .palette = 1,
    .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {16, 16, 16, 16, 16, 16, 16, 16},
};

/* 1 where this process may use the AMX tile data (asks the kernel once), else 0 */
int amx_permit(void) {
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
}

/* four C tiles, two A and two B tiles loaded once from `ab` (4 KiB of bf16 data, 64-byte
 * aligned), the 2 x 2 products of the GEMM kernel without its loads */
__attribute__((target("amx-tile,amx-bf16"))) double peak_amx_tdpbf16(long iters,
                                                                      const void *ab,
                                                                      float *sink) {
    _tile_loadconfig(&cfg_16x64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, (const char *)ab, 64);
    _tile_loadd(5, (const char *)ab + 1024, 64);
    _tile_loadd(6, (const char *)ab + 2048, 64);
    _tile_loadd(7, (const char *)ab + 3072, 64);
    const double t0 = now();
    for (long n = 0; n < iters; n++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    const double t = now() - t0;
    _tile_stored(0, sink, 64);   /* sink: 256 floats */
    _tile_release();
    return t;
}
