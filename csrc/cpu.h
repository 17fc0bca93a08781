/* cpu.h -- which instruction-set path the kernels take.
 *
 * The core is built once for any x86-64 (no -march=native): the SIMD kernels carry their own
 * target attributes and are chosen here at run time, from cpuid and from what the operating
 * system saves on a context switch (xgetbv). The choice is made at first use; the environment
 * variable CLIPDECOMP_ISA (avx512 | avx2 | generic) forces a path, and cd_set_isa() (declared in
 * clipdecomp.h) changes it for tests. A path the CPU cannot run is never chosen.
 * On other architectures only the portable C path exists.
 */
#ifndef CLIPDECOMP_CPU_H
#define CLIPDECOMP_CPU_H

enum {
    CD_ISA_GENERIC = 0,   /* portable C, auto-vectorised by the compiler for the baseline ISA */
    CD_ISA_AVX2 = 1,      /* AVX2 + FMA, 256-bit */
    CD_ISA_AVX512 = 2     /* AVX-512F, 512-bit */
};

/* the best path this CPU and operating system can run (CD_ISA_*) */
int cd_cpu_best_isa(void);
/* 1 if the CPU and operating system can run path `isa`, else 0 */
int cd_cpu_has_isa(int isa);
/* 1 if bf16 dot products (AVX512_BF16) can run now: the CPU and operating system have them and
 * the path in use is avx512 (so CLIPDECOMP_ISA=avx2 turns them off too), else 0 */
int cd_cpu_has_bf16(void);
/* 1 if the bf16 products can run on AMX tiles (AMX-BF16 and AMX-TILE, their state enabled by
 * the operating system, permission granted) on top of cd_cpu_has_bf16(), else 0 */
int cd_cpu_can_amx(void);
/* 1 if the bf16 products use AMX now: cd_cpu_can_amx() and not turned off (environment variable
 * CLIPDECOMP_AMX=0 at first use, or cd_cpu_set_amx(0)) */
int cd_cpu_has_amx(void);
/* turn the AMX kernel on (1) or off (0); 0, or -1 (nothing changes) when it cannot run here */
int cd_cpu_set_amx(int on);
/* the kernel of CD_GEMM_BF16 products now: "amx", "avx512bf16" (vdpbf16ps) or "none" */
const char *cd_bf16_kernel_name(void);
/* the path in use now (CD_ISA_*): chosen at first call, CLIPDECOMP_ISA honoured */
int cd_cpu_isa(void);
/* use path `isa` from now on; 0, or -1 (and nothing changes) when the CPU cannot run it */
int cd_cpu_set_isa(int isa);
/* "avx512", "avx2", "generic"; NULL for a number that is no path */
const char *cd_cpu_isa_str(int isa);
/* the CD_ISA_* number of a name ("avx512", "avx2", "generic"), or -1 */
int cd_cpu_isa_from_str(const char *name);

/* install (once) the handler that marks a forked child; call before any OpenMP region */
void cd_fork_guard(void);
/* note that OpenMP regions may run from now on (called before each one is planned) */
void cd_mark_omp_used(void);
/* 1 in a process forked (after cd_fork_guard) from one that had called cd_mark_omp_used:
 * its OpenMP regions must use one thread */
int cd_forked_child(void);

/* The profile: wall time per kind of operation, summed over the calls made outside any parallel
 * region (the forward's top level), and the thread time of the bf16 conversions of activations.
 * Off unless the environment variable CLIPDECOMP_PROFILE=1 is set at first use or
 * cd_profile_enable(1) is called; benchmarks/bench_profile.py reads it. */
enum {
    CD_PROF_GEMM_F32 = 0,   /* cd_matmul on float32 (and bf16-emulated) weights */
    CD_PROF_GEMM_BF16,      /* cd_matmul on bf16 weights (conversion of A included) */
    CD_PROF_PACK_BF16,      /* the bf16 conversion of A inside it, thread-seconds */
    CD_PROF_ATTENTION,      /* attention_forward */
    CD_PROF_LAYERNORM,      /* layernorm_forward */
    CD_PROF_ACT,            /* GELU, QuickGELU, GELU-tanh */
    CD_PROF_ELEMWISE,       /* patches, embeddings, residual additions */
    CD_PROF_COUNT
};
void cd_profile_enable(int on);
/* seconds of each kind into out[0 .. n) (n <= CD_PROF_COUNT); returns CD_PROF_COUNT */
int cd_profile_read(double *out, int n);
void cd_profile_reset(void);
/* start of a timed call: a time stamp, or -1 when off or inside a parallel region */
double cd_prof_begin(void);
/* add the time since t0 (from cd_prof_begin; nothing when t0 < 0) to kind `what` */
void cd_prof_end(int what, double t0);
/* add `seconds` to kind `what` from any thread (when on) */
void cd_prof_add(int what, double seconds);
int cd_prof_on(void);
double cd_prof_now(void);

#endif /* CLIPDECOMP_CPU_H */
