/* LoRA's rank-R gradients in one pass over the rows, for kernels/native.py (built with -DR=<rank>):

       dA += (dy B)^T x      (R x in)        dB^T += (x A^T)^T dy      (R x out)

   Row blocks of NB rows are read once from memory: their dh = dy B and h = x A^T (NB x R) go into registers and
   the stack, then both rank-R updates read the same block again from cache. eager PyTorch runs these as four
   separate skinny matmuls, each reading a whole activation from memory for R multiply-adds per element.
   Each thread sums its share of the blocks into its own slice of `work` (zeroed by the caller), which the caller
   adds up: no atomics, and the result does not depend on timing. Where x is a LayerNorm's output, the kernel
   recomputes each block of it from the LayerNorm's kept input and statistics on the way (`prologue`), so the whole
   activation is never written again. (A GELU's output is not: erf per element cost more than the separate pass.) */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#ifndef R
#define R 8
#endif
#define NB 16 /* rows per block */
#define W 16  /* floats per wide vector */

typedef float vr __attribute__((vector_size(R * sizeof(float)), aligned(4)));
typedef float vw __attribute__((vector_size(W * sizeof(float)), aligned(4)));

static inline vr load_r(const float *p) { vr v; memcpy(&v, p, sizeof v); return v; }
static inline vw load_w(const float *p) { vw v; memcpy(&v, p, sizeof v); return v; }
static inline void store_w(float *p, vw v) { memcpy(p, &v, sizeof v); }

/* out[i][0:R] = sum_c rows[i][c] * pt[c][0:R], pt: len x R. One R-wide accumulator per row: no horizontal sums. */
static void dots(int nb, int len, const float *rows, long ld, const float *pt, float *out) {
    if (nb == NB) {
        vr acc[NB] = {0};
        for (int c = 0; c < len; c++) {
            vr p = load_r(pt + (long)c * R);
            for (int i = 0; i < NB; i++) acc[i] += rows[i * ld + c] * p;
        }
        memcpy(out, acc, sizeof acc);
        return;
    }
    for (int i = 0; i < nb; i++) {
        vr acc = {0};
        for (int c = 0; c < len; c++) acc += rows[i * ld + c] * load_r(pt + (long)c * R);
        memcpy(out + i * R, &acc, sizeof acc);
    }
}

/* acc[k][c] += sum_i coef[i][k] * rows[i][c] for acc: R x len, W columns at a time (R independent sums) */
static void update(int nb, int len, const float *coef, const float *rows, long ld, float *acc) {
    int c = 0;
    for (; c + W <= len; c += W) {
        vw a[R];
        for (int k = 0; k < R; k++) a[k] = load_w(acc + (long)k * len + c);
        for (int i = 0; i < nb; i++) {
            vw x = load_w(rows + i * ld + c);
            for (int k = 0; k < R; k++) a[k] += coef[i * R + k] * x;
        }
        for (int k = 0; k < R; k++) store_w(acc + (long)k * len + c, a[k]);
    }
    for (; c < len; c++)
        for (int i = 0; i < nb; i++)
            for (int k = 0; k < R; k++) acc[(long)k * len + c] += coef[i * R + k] * rows[i * ld + c];
}

/* x's producer, recomputed per block into a scratch that stays in cache instead of a whole activation */
enum { AS_IS = 0, LAYER_NORM = 1 };

/* out[i][c] = LayerNorm of src[i][c]: mean[i] and rstd[i], then w[c] and bias[c] where given */
static void prologue(int nb, int len, const float *src, long ld, const float *mean, const float *rstd,
                     const float *w, const float *bias, float *out) {
    for (int i = 0; i < nb; i++) {
        const float *s = src + i * ld;
        float *o = out + (long)i * len;
        float m = mean[i], r = rstd[i];
        for (int c = 0; c < len; c++) {
            float v = (s[c] - m) * r; /* (x - mean) first, as the producer: exact under a large common offset */
            if (w) v *= w[c];
            if (bias) v += bias[c];
            o[c] = v;
        }
    }
}

/* dy: n x out (row stride ldy), x: n x in (row stride ldx; kind LAYER_NORM: the LayerNorm's input, with mean and
   rstd per row, w and bias per column or NULL), at: in x R (A transposed), b: out x R. work: threads x R x (in + out)
   floats, zeroed; thread t adds its rows' dA (first R x in) and dB^T (next R x out), unscaled. Returns the number of
   threads that ran, or -1 where a scratch could not be allocated. */
int lowrank_grads(int n, int in, int out, const float *dy, long ldy, const float *x, long ldx, const float *at,
                  const float *b, float *work, int threads, int kind, const float *mean, const float *rstd,
                  const float *w, const float *bias) {
    int blocks = (n + NB - 1) / NB;
    if (threads > blocks) threads = blocks > 0 ? blocks : 1;
    int ran = 1, failed = 0;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        if (t == 0) ran = nt;
        int b0 = (int)((long)blocks * t / nt), b1 = (int)((long)blocks * (t + 1) / nt);
        float *da = work + (long)t * R * (in + out), *dbt = da + (long)R * in;
        float dh[NB * R], h[NB * R];
        float *scratch = kind == AS_IS ? NULL : malloc(sizeof(float) * NB * (size_t)in);
        if (kind != AS_IS && !scratch) {
#pragma omp atomic write
            failed = 1;
            b1 = b0;
        }
        for (int blk = b0; blk < b1; blk++) {
            long i0 = (long)blk * NB;
            int nb = n - i0 < NB ? (int)(n - i0) : NB;
            const float *dyb = dy + i0 * ldy, *xb = x + i0 * ldx;
            long lx = ldx;
            if (kind != AS_IS) {
                prologue(nb, in, xb, ldx, mean + i0, rstd + i0, w, bias, scratch);
                xb = scratch;
                lx = in;
            }
            dots(nb, out, dyb, ldy, b, dh);
            dots(nb, in, xb, lx, at, h);
            update(nb, in, dh, xb, lx, da);
            update(nb, out, h, dyb, ldy, dbt);
        }
        free(scratch);
    }
    return failed ? -1 : ran;
}
