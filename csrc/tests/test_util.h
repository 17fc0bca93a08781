/* test_util.h -- what the C test programs share: thread count, a reproducible random stream,
 * allocation that stops the program when memory runs out. Define TU_SEED before including it. */
#ifndef CLIPDECOMP_TEST_UTIL_H
#define CLIPDECOMP_TEST_UTIL_H
#include <stdio.h>
#include <stdlib.h>
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
#endif /* CLIPDECOMP_TEST_UTIL_H */
