/* test_util.h -- what the C test programs share: thread count, a reproducible random stream,
 * allocation that stops the program when memory runs out, the choice of ISA paths from the
 * command line. Define TU_SEED before including it. */
#ifndef CLIPDECOMP_TEST_UTIL_H
#define CLIPDECOMP_TEST_UTIL_H
#include <stdio.h>
#include <stdlib.h>
#include "cpu.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef TU_SEED
#define TU_SEED 1
#endif

static void set_threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
#else
    (void)n;
#endif
}

/* uniform in [-1, 1) from a small LCG (multiples of 2^-23: exact in float too) */
static unsigned long long g_seed = TU_SEED;
static double tu_uniform(void) {
    g_seed = g_seed * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)((g_seed >> 40) & 0xFFFFFF) / 8388608.0 - 1.0;
}

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}
/* with arguments, only the ISA paths named there (e.g. `test_ops avx512`) */
static inline int wanted(int isa, int argc, char **argv) {
    if (argc < 2) return 1;
    for (int i = 1; i < argc; i++)
        if (cd_cpu_isa_from_str(argv[i]) == isa) return 1;
    return 0;
}
#endif /* CLIPDECOMP_TEST_UTIL_H */
