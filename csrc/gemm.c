/* gemm.c -- the matrix products of the core: naive references, weight packing, and the
 * cache-blocked, register-tiled drivers that run the per-instruction-set block kernels.
 *
 * Shapes: out (M, OC) = inp (M, K) @ W^T + bias, W (OC, K) as in nn.Linear.
 *
 * Blocking (BLIS style). The weight is packed once into K-major panels of 16 output columns
 * (gemm_kernels.h), so one panel slice (kc, 16) is contiguous. cd_matmul then cuts C into jobs
 * of (MC rows, NCP panels); for each depth slice kc of a job it packs the rows of inp into
 * MR-row K-major panels (MC x kc: stays in L2) and runs the block kernel, which walks the
 * panels (each (kc, 16) slice stays in L1) and, inside, the row tiles (MR x 16 accumulators
 * in registers). Jobs are shared among the OpenMP threads; inside an enclosing parallel region
 * everything runs on the calling thread.
 *
 * cd_sgemm_nt / cd_sgemm_nn pack B (32 columns x kc) onto the stack and read A in place.
 */
#include "gemm.h"
#include "gemm_kernels.h"
#include "cpu.h"

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ------------------------------------------------------------------------------------------ */
/* naive references                                                                           */

void cd_matmul_naive(float *out, const float *inp, const float *weight, const float *bias,
                     int M, int K, int OC, int accumulate) {
    #pragma omp parallel for schedule(static) if (M > 1)
    for (int m = 0; m < M; m++) {
        const float *x = inp + (size_t)m * K;
        for (int o = 0; o < OC; o++) {
            const float *w = weight + (size_t)o * K;
            float s = bias ? bias[o] : 0.0f;
            for (int k = 0; k < K; k++) s += x[k] * w[k];
            float *y = out + (size_t)m * OC + o;
            *y = accumulate ? *y + s : s;
        }
    }
}

void cd_sgemm_nt_naive(int M, int N, int K, float alpha, const float *A, int lda,
                       const float *B, int ldb, float *C, int ldc, int accumulate) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++) s += A[(size_t)i * lda + k] * B[(size_t)j * ldb + k];
            float *c = C + (size_t)i * ldc + j;
            *c = accumulate ? *c + alpha * s : alpha * s;
        }
}

void cd_sgemm_nn_naive(int M, int N, int K, float alpha, const float *A, int lda,
                       const float *B, int ldb, float *C, int ldc, int accumulate) {
    for (int i = 0; i < M; i++) {
        float *c = C + (size_t)i * ldc;
        if (!accumulate) for (int j = 0; j < N; j++) c[j] = 0.0f;
        for (int k = 0; k < K; k++) {
            float a = alpha * A[(size_t)i * lda + k];
            const float *b = B + (size_t)k * ldb;
            for (int j = 0; j < N; j++) c[j] += a * b[j];
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* the portable block kernel: a 4 x 16 tile the compiler vectorises for the baseline ISA      */

#define MRG CD_GEMM_MR_GENERIC

static inline void tile_generic(int mr, int kc, const float *a, ptrdiff_t rsa, ptrdiff_t csa,
                                const float *b, float *c, const float *bias, int nv,
                                const cd_gemm_block *blk) {
    float acc[MRG][CD_GEMM_NR];
    memset(acc, 0, sizeof(acc));
    for (int k = 0; k < kc; k++) {
        const float *bk = b + (size_t)k * CD_GEMM_NR;
        for (int r = 0; r < mr; r++) {
            const float x = a[r * rsa + k * csa];
            for (int j = 0; j < CD_GEMM_NR; j++) acc[r][j] += x * bk[j];
        }
    }
    for (int r = 0; r < mr; r++) {
        float *cr = c + r * blk->ldc;
        for (int j = 0; j < nv; j++) {
            float v = blk->alpha * acc[r][j] + (bias ? bias[j] : 0.0f);
            cr[j] = blk->load_c ? cr[j] + v : v;
        }
    }
}

void cd_gemm_block_generic(const cd_gemm_block *blk) {
    for (int j0 = 0, p = 0; j0 < blk->nc; j0 += CD_GEMM_NR, p++) {
        const float *b = blk->b + p * blk->psb;
        const float *bias = blk->bias ? blk->bias + j0 : NULL;
        const int nv = blk->nc - j0 < CD_GEMM_NR ? blk->nc - j0 : CD_GEMM_NR;
        for (int i0 = 0, t = 0; i0 < blk->mc; i0 += MRG, t++) {
            const float *a = blk->a + t * blk->pa;
            float *c = blk->c + i0 * blk->ldc + j0;
            const int mr = blk->mc - i0 < MRG ? blk->mc - i0 : MRG;
            /* constant row counts let the compiler keep the tile in registers */
            switch (mr) {
            case 4: tile_generic(4, blk->kc, a, blk->rsa, blk->csa, b, c, bias, nv, blk); break;
            case 3: tile_generic(3, blk->kc, a, blk->rsa, blk->csa, b, c, bias, nv, blk); break;
            case 2: tile_generic(2, blk->kc, a, blk->rsa, blk->csa, b, c, bias, nv, blk); break;
            default: tile_generic(1, blk->kc, a, blk->rsa, blk->csa, b, c, bias, nv, blk); break;
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* dispatch and blocking parameters                                                           */

typedef void (*block_fn)(const cd_gemm_block *blk);

typedef struct {
    block_fn fn;
    int mr;        /* row tile of the micro-kernel */
    int mc;        /* rows of a matmul job (multiple of mr): mc x kc floats of A stay in L2 */
    int kc;        /* largest depth slice: a (kc, 16) panel slice stays in L1 */
    int ncp;       /* panels (16 columns each) of a matmul job */
} gemm_path;

static gemm_path path_for(int isa) {
    gemm_path p = {cd_gemm_block_generic, CD_GEMM_MR_GENERIC, 64, 256, 16};
#if defined(__x86_64__) || defined(_M_X64)
    if (isa == CD_ISA_AVX512) {
        p.fn = cd_gemm_block_avx512; p.mr = CD_GEMM_MR_AVX512; p.mc = 96; p.kc = 256; p.ncp = 16;
    } else if (isa == CD_ISA_AVX2) {
        p.fn = cd_gemm_block_avx2; p.mr = CD_GEMM_MR_AVX2; p.mc = 72; p.kc = 256; p.ncp = 16;
    }
#else
    (void)isa;
#endif
    return p;
}

/* threads to use for `jobs` jobs worth `flops` in all: 1 inside a parallel region */
static int gemm_threads(int jobs, double flops) {
#ifdef _OPENMP
    if (omp_in_parallel() || jobs < 2 || flops < 2e6) return 1;
    int nt = omp_get_max_threads();
    return nt < jobs ? nt : jobs;
#else
    (void)jobs; (void)flops;
    return 1;
#endif
}

/* K split into slices of at most kcmax, as equal as possible */
static int depth_slice(int K, int kcmax) {
    int nk = (K + kcmax - 1) / kcmax;
    return (K + nk - 1) / nk;
}

/* ------------------------------------------------------------------------------------------ */
/* packing                                                                                    */

void cd_gemm_pack_t16_generic(float *panel, const float *src, ptrdiff_t ld, int nv, int kc) {
    if (nv < CD_GEMM_NR) memset(panel, 0, (size_t)kc * CD_GEMM_NR * sizeof(float));
    for (int j = 0; j < nv; j++) {
        const float *row = src + j * ld;
        for (int k = 0; k < kc; k++) panel[(size_t)k * CD_GEMM_NR + j] = row[k];
    }
}

typedef void (*pack_fn)(float *panel, const float *src, ptrdiff_t ld, int nv, int kc);

static pack_fn pack_for(int isa) {
#if defined(__x86_64__) || defined(_M_X64)
    if (isa >= CD_ISA_AVX2) return cd_gemm_pack_t16_avx2;   /* AVX-512 CPUs have AVX2 */
#else
    (void)isa;
#endif
    return cd_gemm_pack_t16_generic;
}

int cd_gemm_pack(cd_gemm_weight *pw, const float *weight, int OC, int K) {
    if (!pw) return -1;
    memset(pw, 0, sizeof(*pw));
    if (!weight || OC <= 0 || K <= 0) return -1;
    const size_t np = ((size_t)OC + CD_GEMM_NR - 1) / CD_GEMM_NR;   /* panels */
    const size_t per_panel = (size_t)K * CD_GEMM_NR;                  /* floats per panel */
    if (per_panel / CD_GEMM_NR != (size_t)K || np > SIZE_MAX / per_panel) return -1;
    const size_t n = np * per_panel;
    /* the kernels index with ptrdiff_t: stay below PTRDIFF_MAX bytes */
    if (n > ((size_t)PTRDIFF_MAX - 63) / sizeof(float)) return -1;
    const size_t bytes = (n * sizeof(float) + 63) / 64 * 64;   /* aligned_alloc wants a multiple */
    float *dst = (float *)aligned_alloc(64, bytes);
    if (!dst) return -1;
    /* slice s, panel p: (k, j) at dst[256*16*np*s + ks*16*p + (k - 256 s)*16 + j]
     *                                = weight[16 p + j, k], zero past OC (gemm_kernels.h) */
    const int isa = cd_cpu_isa();
    const pack_fn pack = pack_for(isa);
    for (int k0 = 0; k0 < K; k0 += CD_GEMM_KS) {
        const int ks = K - k0 < CD_GEMM_KS ? K - k0 : CD_GEMM_KS;
        float *slice = dst + (size_t)k0 * CD_GEMM_NR * np;
        for (size_t p = 0; p < np; p++) {
            const int j0 = (int)p * CD_GEMM_NR;
            const int nv = OC - j0 < CD_GEMM_NR ? OC - j0 : CD_GEMM_NR;
            pack(slice + p * (size_t)ks * CD_GEMM_NR, weight + (size_t)j0 * K + k0, K, nv, ks);
        }
    }
    pw->OC = OC; pw->K = K; pw->packed = dst; pw->packed_len = n;
    pw->isa = isa;
    pw->panel = CD_GEMM_NR;
    pw->slice = CD_GEMM_KS;
    return 0;
}

void cd_gemm_weight_free(cd_gemm_weight *pw) {
    if (!pw) return;
    free(pw->packed);
    memset(pw, 0, sizeof(*pw));
}

/* rows [0, mc) x depth [0, kc) of a (row stride lda) into mr-row K-major panels:
 * dst[t * mr * kc + k * mr + r] = a[(t * mr + r) * lda + k], zero rows past mc */
static void pack_rows(float *dst, const float *a, size_t lda, int mc, int kc, int mr) {
    for (int i0 = 0; i0 < mc; i0 += mr) {
        const int rows = mc - i0 < mr ? mc - i0 : mr;
        float *d = dst + (size_t)i0 * kc;
        for (int r = 0; r < rows; r++) {
            const float *src = a + (size_t)(i0 + r) * lda;
            for (int k = 0; k < kc; k++) d[(size_t)k * mr + r] = src[k];
        }
        for (int r = rows; r < mr; r++)
            for (int k = 0; k < kc; k++) d[(size_t)k * mr + r] = 0.0f;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* out (M, OC) = inp (M, K) @ W^T + bias                                                      */

/* rows [i0, i1) x panels [p0, p1) of out, on the calling thread; abuf: mc x kc floats or NULL */
static void matmul_part(const gemm_path *P, float *out, const float *inp,
                        const cd_gemm_weight *w, const float *bias, int accumulate,
                        int i0, int i1, int p0, int p1, float *abuf) {
    const int K = w->K, OC = w->OC;
    const size_t np = ((size_t)OC + CD_GEMM_NR - 1) / CD_GEMM_NR;
    const int kcb = P->kc < CD_GEMM_KS ? P->kc : CD_GEMM_KS;
    const int j0 = p0 * CD_GEMM_NR;
    const int j1 = p1 * CD_GEMM_NR < OC ? p1 * CD_GEMM_NR : OC;
    if (i0 >= i1 || j0 >= j1) return;
    for (int ib = i0; ib < i1; ib += P->mc) {
        const int mc = i1 - ib < P->mc ? i1 - ib : P->mc;
        const float *arows = inp + (size_t)ib * K;
        for (int s0 = 0; s0 < K; s0 += CD_GEMM_KS) {          /* slices of the packed weight */
            const int ks = K - s0 < CD_GEMM_KS ? K - s0 : CD_GEMM_KS;
            const float *slice = w->packed + (size_t)s0 * CD_GEMM_NR * np;
            for (int k0 = s0; k0 < s0 + ks; k0 += kcb) {      /* the kernel's depth blocks */
                const int kc = s0 + ks - k0 < kcb ? s0 + ks - k0 : kcb;
                cd_gemm_block blk;
                blk.mc = mc; blk.nc = j1 - j0; blk.kc = kc;
                if (abuf) {
                    pack_rows(abuf, arows + k0, (size_t)K, mc, kc, P->mr);
                    blk.a = abuf; blk.pa = (ptrdiff_t)P->mr * kc; blk.rsa = 1; blk.csa = P->mr;
                } else {   /* no scratch: read inp in place (slower, same sums) */
                    blk.a = arows + k0; blk.pa = (ptrdiff_t)P->mr * K; blk.rsa = K; blk.csa = 1;
                }
                blk.b = slice + (size_t)p0 * ks * CD_GEMM_NR + (size_t)(k0 - s0) * CD_GEMM_NR;
                blk.psb = (ptrdiff_t)ks * CD_GEMM_NR;
                blk.c = out + (size_t)ib * OC + j0; blk.ldc = OC;
                blk.bias = (bias && k0 == 0) ? bias + j0 : NULL;
                blk.alpha = 1.0f;
                blk.load_c = accumulate || k0 > 0;
                P->fn(&blk);
            }
        }
    }
}

void cd_matmul(float *out, const float *inp, const cd_gemm_weight *w, const float *bias,
               int M, int accumulate) {
    if (!out || !inp || !w || !w->packed || M <= 0) return;
    if (w->panel != CD_GEMM_NR || w->slice != CD_GEMM_KS) return;   /* not from cd_gemm_pack */
    /* every path reads the same panel layout, whatever path was active at pack time */
    const gemm_path P = path_for(cd_cpu_isa());
    const int np = (w->OC + CD_GEMM_NR - 1) / CD_GEMM_NR;
    const int mt = (M + P.mr - 1) / P.mr;                      /* row tiles */
    const int nt = gemm_threads(mt * np, 2.0 * M * (double)w->K * w->OC);
    /* a grid of tm x tn threads over (row tiles, panels): rows when there are enough of them
     * (each thread then packs only its own rows), else columns */
    int tm = 1;
    for (int d = nt; d >= 1; d--)
        if (nt % d == 0 && mt >= 8 * d) { tm = d; break; }
    int tn = nt / tm;
    if (tn > np) tn = np;
    const int nthr = tm * tn;
    const int kcb = P.kc < CD_GEMM_KS ? P.kc : CD_GEMM_KS;
    const size_t abytes = ((size_t)P.mc * kcb * sizeof(float) + 63) / 64 * 64;
    #pragma omp parallel num_threads(nthr) if (nthr > 1)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        if (t < nthr) {
            const int ti = t / tn, tj = t % tn;
            /* contiguous, near-equal shares of row tiles and of panels */
            const int i0 = (int)((long long)mt * ti / tm) * P.mr;
            const int i1 = (int)((long long)mt * (ti + 1) / tm) * P.mr;
            const int p0 = (int)((long long)np * tj / tn), p1 = (int)((long long)np * (tj + 1) / tn);
            float *abuf = (float *)aligned_alloc(64, abytes);
            matmul_part(&P, out, inp, w, bias, accumulate, i0, i1 < M ? i1 : M, p0, p1, abuf);
            free(abuf);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* C (M, N) (+)= alpha * A (M, K) @ op(B) on strided operands                                 */

#define SG_KC 256              /* depth slice of a packed B block */
#define SG_NP 2                /* panels (16 columns) per packed B block: 32 columns */

/* B block for columns [j0, j0 + nc) and depth [k0, k0 + kc) into SG_NP panels (kc, 16),
 * zero past nc. trans: B is (N, K) (the "nt" product), else (K, N). */
static void pack_b_block(pack_fn pack, float *dst, const float *B, int ldb, int trans, int j0,
                         int nc, int k0, int kc) {
    for (int q = 0; q < SG_NP; q++) {
        float *panel = dst + (size_t)q * kc * CD_GEMM_NR;
        const int jq = q * CD_GEMM_NR;
        const int nv = nc - jq < 0 ? 0 : (nc - jq < CD_GEMM_NR ? nc - jq : CD_GEMM_NR);
        if (nv <= 0) break;   /* the kernels read no panel without columns */
        if (trans) {
            pack(panel, B + (size_t)(j0 + jq) * ldb + k0, ldb, nv, kc);
            continue;
        }
        if (nv < CD_GEMM_NR) memset(panel, 0, (size_t)kc * CD_GEMM_NR * sizeof(float));
        for (int k = 0; k < kc; k++)
            memcpy(panel + k * CD_GEMM_NR, B + (size_t)(k0 + k) * ldb + j0 + jq,
                   (size_t)nv * sizeof(float));
    }
}

static void sgemm_driver(int trans, int M, int N, int K, float alpha, const float *A, int lda,
                         const float *B, int ldb, float *C, int ldc, int accumulate) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {   /* an empty sum: C = alpha * 0 [+ C] */
        if (!accumulate)
            for (int i = 0; i < M; i++) memset(C + (size_t)i * ldc, 0, (size_t)N * sizeof(float));
        return;
    }
    const int isa = cd_cpu_isa();
    const gemm_path P = path_for(isa);
    const pack_fn pk = pack_for(isa);
    const int cols = SG_NP * CD_GEMM_NR;
    const int nb = (N + cols - 1) / cols;
    const double flops = 2.0 * M * (double)N * K;
    /* rows per job: all of them, unless the threads need more jobs than column blocks */
    int mch = M;
    int nt = gemm_threads(nb * ((M + P.mr - 1) / P.mr), flops);
    if (nt > 1) {
        const int want = 4 * nt;                         /* jobs, for an even share */
        int mb = (want + nb - 1) / nb;
        mch = (M + mb - 1) / mb;
        mch = (mch + P.mr - 1) / P.mr * P.mr;
    }
    const int mb = (M + mch - 1) / mch;
    const int jobs = nb * mb;
    if (nt > jobs) nt = jobs;
    const int kcb = depth_slice(K, SG_KC);
    #pragma omp parallel for num_threads(nt) if (nt > 1) schedule(dynamic, 1)
    for (int job = 0; job < jobs; job++) {
        _Alignas(64) float bp[SG_NP * SG_KC * CD_GEMM_NR];
        const int jb = job % nb, ib = job / nb;
        const int j0 = jb * cols, i0 = ib * mch;
        const int nc = N - j0 < cols ? N - j0 : cols;
        const int mc = M - i0 < mch ? M - i0 : mch;
        for (int k0 = 0; k0 < K; k0 += kcb) {
            const int kc = K - k0 < kcb ? K - k0 : kcb;
            pack_b_block(pk, bp, B, ldb, trans, j0, nc, k0, kc);
            cd_gemm_block blk;
            blk.mc = mc; blk.nc = nc; blk.kc = kc;
            blk.a = A + (size_t)i0 * lda + k0;
            blk.pa = (ptrdiff_t)P.mr * lda; blk.rsa = lda; blk.csa = 1;
            blk.b = bp; blk.psb = (ptrdiff_t)kc * CD_GEMM_NR;
            blk.c = C + (size_t)i0 * ldc + j0; blk.ldc = ldc;
            blk.bias = NULL;
            blk.alpha = alpha;
            blk.load_c = accumulate || k0 > 0;
            P.fn(&blk);
        }
    }
}

void cd_sgemm_nt(int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float *C, int ldc, int accumulate) {
    sgemm_driver(1, M, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
}

void cd_sgemm_nn(int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float *C, int ldc, int accumulate) {
    sgemm_driver(0, M, N, K, alpha, A, lda, B, ldb, C, ldc, accumulate);
}
