/* cpu.c -- CPU feature detection and the choice of instruction-set path (see cpu.h), and the
 * fork guard of the OpenMP regions. */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE   /* syscall() */
#include "cpu.h"
#include "clipdecomp.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define CD_X86 1
#include <cpuid.h>
#endif

/* the path in use and the best the CPU has; -1: not known yet. Threads that race on first
 * use compute and store the same values. */
#if defined(__STDC_NO_ATOMICS__)
static volatile int g_isa = -1, g_best = -1, g_bf16 = -1, g_amx = -1, g_amx_on = -1;
static int load_int(volatile int *p) { return *p; }
static void store_int(volatile int *p, int v) { *p = v; }
#else
#include <stdatomic.h>
static atomic_int g_isa = -1, g_best = -1, g_bf16 = -1, g_amx = -1, g_amx_on = -1;
static int load_int(atomic_int *p) { return atomic_load_explicit(p, memory_order_acquire); }
static void store_int(atomic_int *p, int v) { atomic_store_explicit(p, v, memory_order_release); }
#endif

#ifdef CD_X86
/* XCR0: which register states the operating system saves and restores */
static unsigned long long read_xcr0(void) {
    unsigned int lo, hi;
    __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

/* AVX512_BF16: cpuid leaf 7, sub-leaf 1, eax bit 5 (the AVX-512 state checks are detect_best's) */
static int detect_bf16(void) {
#ifdef CD_AVX512_EMULATE   /* tests only: the bf16 kernel built on portable stand-ins */
    return 1;
#endif
    unsigned int a, b, c, d;
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    if (a < 1) return 0;                     /* no sub-leaf 1 */
    __cpuid_count(7, 1, a, b, c, d);
    return (a >> 5) & 1;
}

/* AMX tiles with bf16 products: cpuid leaf 7 edx bits 22 (AMX-BF16) and 24 (AMX-TILE), the
 * tile state saved by the operating system (XCR0 bits 17, 18), and, on Linux, the permission to
 * use the tile data state, asked once for the process (arch_prctl ARCH_REQ_XCOMP_PERM; refused,
 * e.g., where a thread's alternate signal stack is too small for it: then no AMX) */
static int detect_amx(void) {
#if defined(CD_AVX512_EMULATE) || !defined(__linux__)
    return 0;
#else
    unsigned int a, b, c, d;
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return 0;   /* OSXSAVE */
    __cpuid_count(7, 0, a, b, c, d);
    if (!((d >> 22) & 1) || !((d >> 24) & 1)) return 0;
    if ((read_xcr0() & 0x60000ull) != 0x60000ull) return 0;
    long rc = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */);
    return rc == 0;
#endif
}

static int detect_best(void) {
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return CD_ISA_GENERIC;
    int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
    if (!(osxsave && avx)) return CD_ISA_GENERIC;
    unsigned long long xcr0 = read_xcr0();
    if ((xcr0 & 0x6) != 0x6) return CD_ISA_GENERIC;        /* SSE + AVX (YMM) state */
    if (__get_cpuid_max(0, NULL) < 7) return CD_ISA_GENERIC;
    __cpuid_count(7, 0, a, b, c, d);
    int avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1;
    if (!(avx2 && fma)) return CD_ISA_GENERIC;
    /* opmask, upper halves of ZMM0-15, ZMM16-31 */
    if (avx512f && (xcr0 & 0xE6) == 0xE6) return CD_ISA_AVX512;
#ifdef CD_AVX512_EMULATE   /* tests only: gemm_avx512.c built on portable stand-ins */
    return CD_ISA_AVX512;
#endif
    return CD_ISA_AVX2;
}
#else
static int detect_best(void) { return CD_ISA_GENERIC; }
static int detect_bf16(void) { return 0; }
static int detect_amx(void) { return 0; }
#endif

int cd_cpu_best_isa(void) {
    int best = load_int(&g_best);
    if (best < 0) {
        best = detect_best();
        store_int(&g_best, best);
    }
    return best;
}

int cd_cpu_has_bf16(void) {
    if (cd_cpu_isa() != CD_ISA_AVX512) return 0;
    int v = load_int(&g_bf16);
    if (v < 0) {
        v = detect_bf16();
        store_int(&g_bf16, v);
    }
    return v;
}

int cd_cpu_can_amx(void) {
    if (!cd_cpu_has_bf16()) return 0;
    int v = load_int(&g_amx);
    if (v < 0) {
        v = detect_amx();
        store_int(&g_amx, v);
    }
    return v;
}

int cd_cpu_has_amx(void) {
    if (!cd_cpu_can_amx()) return 0;
    int on = load_int(&g_amx_on);
    if (on < 0) {
        const char *e = getenv("CLIPDECOMP_AMX");
        on = !(e && strcmp(e, "0") == 0);
        store_int(&g_amx_on, on);
    }
    return on;
}

int cd_cpu_set_amx(int on) {
    if (on && !cd_cpu_can_amx()) return -1;
    store_int(&g_amx_on, on ? 1 : 0);
    return 0;
}

const char *cd_bf16_kernel_name(void) {
    if (cd_cpu_has_amx()) return "amx";
    if (cd_cpu_has_bf16()) return "avx512bf16";
    return "none";
}

int cd_cpu_has_isa(int isa) {
    return isa >= CD_ISA_GENERIC && isa <= cd_cpu_best_isa();
}

const char *cd_cpu_isa_str(int isa) {
    switch (isa) {
    case CD_ISA_GENERIC: return "generic";
    case CD_ISA_AVX2: return "avx2";
    case CD_ISA_AVX512: return "avx512";
    default: return NULL;
    }
}

int cd_cpu_isa_from_str(const char *name) {
    if (!name) return -1;
    for (int i = CD_ISA_GENERIC; i <= CD_ISA_AVX512; i++)
        if (strcmp(name, cd_cpu_isa_str(i)) == 0) return i;
    return -1;
}

int cd_cpu_isa(void) {
    int v = load_int(&g_isa);
    if (v >= 0) return v;
    v = cd_cpu_best_isa();
    /* CLIPDECOMP_ISA forces a path; one the CPU lacks (or an unknown name) falls back to the
     * best path the CPU has below it, so a forced setting can never crash the process */
    int forced = cd_cpu_isa_from_str(getenv("CLIPDECOMP_ISA"));
    if (forced >= 0 && forced < v) v = forced;
    store_int(&g_isa, v);
    return v;
}

int cd_cpu_set_isa(int isa) {
    if (!cd_cpu_has_isa(isa)) return -1;
    store_int(&g_isa, isa);
    return 0;
}

const char *cd_isa_name(void) { return cd_cpu_isa_str(cd_cpu_isa()); }

int cd_set_isa(const char *name) { return cd_cpu_set_isa(cd_cpu_isa_from_str(name)); }

/* fork: libgomp's thread pool does not survive fork(), and a child of a process that has run a
 * parallel region hangs in its next one. In a child forked after the core has computed, every
 * region of the core therefore runs on one thread (same results, one core). */
static atomic_int g_forked = 0, g_used = 0;
static pthread_once_t g_fork_once = PTHREAD_ONCE_INIT;
static void on_fork_child(void) {
    if (load_int(&g_used)) store_int(&g_forked, 1);
}
static void install_fork_guard(void) { pthread_atfork(NULL, NULL, on_fork_child); }

void cd_fork_guard(void) { pthread_once(&g_fork_once, install_fork_guard); }

void cd_mark_omp_used(void) {
    if (!load_int(&g_used)) store_int(&g_used, 1);
}

int cd_forked_child(void) { return load_int(&g_forked); }

/* ------------------------------------------------------------------------------------------ */
/* the profile (cpu.h): nanoseconds per kind, in atomic counters                              */

static atomic_llong g_prof_ns[CD_PROF_COUNT];
static atomic_int g_prof_on = -1;

int cd_prof_on(void) {
    int on = load_int(&g_prof_on);
    if (on < 0) {
        const char *e = getenv("CLIPDECOMP_PROFILE");
        on = e && strcmp(e, "1") == 0;
        store_int(&g_prof_on, on);
    }
    return on;
}

void cd_profile_enable(int on) { store_int(&g_prof_on, on ? 1 : 0); }

double cd_prof_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

double cd_prof_begin(void) {
    if (!cd_prof_on()) return -1.0;
#ifdef _OPENMP
    if (omp_get_level() > 0) return -1.0;
#endif
    return cd_prof_now();
}

void cd_prof_add(int what, double seconds) {
    if (what < 0 || what >= CD_PROF_COUNT || !cd_prof_on()) return;
    atomic_fetch_add_explicit(&g_prof_ns[what], (long long)(seconds * 1e9), memory_order_relaxed);
}

void cd_prof_end(int what, double t0) {
    if (t0 >= 0.0) cd_prof_add(what, cd_prof_now() - t0);
}

int cd_profile_read(double *out, int n) {
    for (int i = 0; i < n && i < CD_PROF_COUNT; i++)
        out[i] = 1e-9 * (double)atomic_load_explicit(&g_prof_ns[i], memory_order_relaxed);
    return CD_PROF_COUNT;
}

void cd_profile_reset(void) {
    for (int i = 0; i < CD_PROF_COUNT; i++)
        atomic_store_explicit(&g_prof_ns[i], 0, memory_order_relaxed);
}
