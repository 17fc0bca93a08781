/* avx512_emu.h -- portable stand-ins for the few AVX-512F / AVX512_BF16 intrinsics of
 * gemm_avx512.c.
 *
 * Tests only: building gemm_avx512.c and cpu.c with -DCD_AVX512_EMULATE swaps these in and
 * makes cpu.c report an AVX-512 CPU with AVX512_BF16, so csrc/tests/test_gemm.c runs the
 * AVX-512 paths' logic (tiling, panel pairs, bf16 pairs, masks, edges) on a machine without them. Semantics follow Intel's
 * definitions lane by lane; speed is irrelevant.
 */
#ifndef CLIPDECOMP_AVX512_EMU_H
#define CLIPDECOMP_AVX512_EMU_H
#include <string.h>

typedef struct { float f[16]; } __m512;
typedef unsigned short __mmask16;

static inline __m512 _mm512_setzero_ps(void) { __m512 r; memset(&r, 0, sizeof r); return r; }
static inline __m512 _mm512_set1_ps(float x) {
    __m512 r; for (int i = 0; i < 16; i++) r.f[i] = x; return r;
}
static inline __m512 _mm512_loadu_ps(const void *p) { __m512 r; memcpy(&r, p, sizeof r); return r; }
static inline __m512 _mm512_add_ps(__m512 a, __m512 b) {
    for (int i = 0; i < 16; i++) a.f[i] += b.f[i];
    return a;
}
/* a * b + c, rounded once */
static inline __m512 _mm512_fmadd_ps(__m512 a, __m512 b, __m512 c) {
    for (int i = 0; i < 16; i++) a.f[i] = __builtin_fmaf(a.f[i], b.f[i], c.f[i]);
    return a;
}
/* lanes outside the mask are zero and their memory is not touched */
static inline __m512 _mm512_maskz_loadu_ps(__mmask16 m, const void *p) {
    __m512 r = _mm512_setzero_ps();
    const float *q = (const float *)p;
    for (int i = 0; i < 16; i++) if (m >> i & 1) r.f[i] = q[i];
    return r;
}
static inline void _mm512_mask_storeu_ps(void *p, __mmask16 m, __m512 a) {
    float *q = (float *)p;
    for (int i = 0; i < 16; i++) if (m >> i & 1) q[i] = a.f[i];
}
/* bf16: 32 values of 16 bits; bh_load / bh_set1 stand in for the casts of a 512-bit integer
 * load / broadcast of a 32-bit pair that the real kernel does */
typedef struct { unsigned short h[32]; } __m512bh;
static inline __m512bh bh_load(const void *p) { __m512bh r; memcpy(&r, p, sizeof r); return r; }
static inline __m512bh bh_set1(unsigned int pair) {
    __m512bh r;
    for (int i = 0; i < 16; i++) {
        r.h[2 * i] = (unsigned short)(pair & 0xFFFFu);
        r.h[2 * i + 1] = (unsigned short)(pair >> 16);
    }
    return r;
}
static inline float emu_bf16_f32(unsigned short h) {
    unsigned int u = (unsigned int)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
/* vdpbf16ps, lane j: src + a[2j+1] b[2j+1] + a[2j] b[2j] (products of bf16 values are exact in
 * float32; each addition rounds; the hardware also flushes denormals, which no test relies on) */
static inline __m512 _mm512_dpbf16_ps(__m512 src, __m512bh a, __m512bh b) {
    for (int j = 0; j < 16; j++) {
        src.f[j] = __builtin_fmaf(emu_bf16_f32(a.h[2 * j + 1]), emu_bf16_f32(b.h[2 * j + 1]),
                                  src.f[j]);
        src.f[j] = __builtin_fmaf(emu_bf16_f32(a.h[2 * j]), emu_bf16_f32(b.h[2 * j]), src.f[j]);
    }
    return src;
}
#define _MM_HINT_T0 3
#define _mm_prefetch(p, hint) ((void)(p), (void)(hint))
#endif /* CLIPDECOMP_AVX512_EMU_H */
