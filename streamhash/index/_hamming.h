/* Native Hamming kernels for streamhash.index.hamming (exact top-k and range search).
 *
 * Codes are rows of W little-endian words of `wb` bytes: 64-bit words (wb = 8), or one 32-bit word
 * (wb = 4, W = 1) for codes of at most 32 bits, which halves the bytes a scan reads and lets one
 * AVX-512 instruction count 16 rows instead of 8. The Python side zero-pads widths that are not a
 * multiple of the word, so padding bits never differ. Rows are in insertion order; a row may be dead
 * (tombstoned) until the Python side compacts.
 *
 * Top-k is a streaming counting select. Distances are bounded by d, so per query we keep a
 * histogram of accepted candidates and a limit `lim`: the k-th smallest distance seen so far.
 * A row is accepted only if it can still enter the top-k (distance < lim, or == lim while fewer
 * than k are held); rows arrive in row order, so among equal distances the earlier row always
 * wins, which is exactly the insertion-order tie-break. After a few thousand rows almost nothing
 * passes, so the hot loop is load, xor, popcount, compare. The final answer is emitted by a
 * counting sort over the held candidates (stable, so ties stay in row order).
 *
 * Portability: the hot loops are compiled for several targets (AVX-512 VPOPCNTDQ, POPCNT,
 * baseline x86-64 / other architectures) and picked at run time with __builtin_cpu_supports, so
 * the module never executes an instruction the CPU lacks. The GIL is released while scanning.
 *
 * The extension is one module built from four files (setup.py lists them): _hamming_scan.c (the
 * top-k state, the scalar and POPCNT scans, the run-time pick and the driver), _hamming_avx512.c
 * (the AVX-512 scans), _hamming_mih.c (the multi-index probe) and _hamming.c (the Python bindings).
 * This header holds what they share. Functions called across files are hidden, so a call is a
 * direct call inside the module, as it was when the kernel was one file; the hot path (topk_thr,
 * topk_push) is inline here, so every scan loop compiles to the same code it did then.
 */
#ifndef STREAMHASH_HAMMING_H
#define STREAMHASH_HAMMING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SH_X86 1
#include <immintrin.h>
#endif

#define SH_HIDDEN __attribute__((visibility("hidden")))

/* ------------------------------------------------------------------ per-query top-k state */
typedef struct {
    int64_t *rows;
    uint16_t *dist;
    int64_t len, cap;
    int64_t *hist;  /* d+1 buckets, counts of held candidates with dist <= lim */
    int lim;        /* k-th smallest distance held (d while fewer than k are held) */
    int64_t held;   /* candidates with dist <= lim */
    int64_t k;
    int radius;     /* accept only distances < radius; range search is top-"infinity" under a radius */
    int oom;
} topk_t;

/* Exclusive bound on distances that can still enter the result. */
static inline int topk_thr(const topk_t *t) {
    int thr = t->held < t->k ? t->lim + 1 : t->lim;
    return thr < t->radius ? thr : t->radius;
}

SH_HIDDEN int topk_init(topk_t *t, int d, int64_t k, int radius);
SH_HIDDEN void topk_free(topk_t *t);
/* Drop candidates that fell above lim; grow when ties at lim keep the buffer full. */
SH_HIDDEN void topk_make_room(topk_t *t);
/* Counting sort of the held candidates into out_d/out_r (at most k slots); returns how many were written.
 * With `ids`, out_r gets ids[row] rather than the row: the caller spares a numpy pass per search. */
SH_HIDDEN int64_t topk_emit(topk_t *t, int32_t *out_d, int64_t *out_r, int64_t *off, const int64_t *ids);

static inline void topk_push(topk_t *t, int64_t row, int dist, const uint8_t *dead) {
    if (dist >= topk_thr(t) || (dead && dead[row])) return;
    if (t->len == t->cap) {
        topk_make_room(t);
        if (t->len == t->cap) return; /* out of memory: reported by the caller */
    }
    t->rows[t->len] = row;
    t->dist[t->len++] = (uint16_t)dist;
    t->hist[dist]++;
    t->held++;
    /* Lower lim while the candidates strictly below it already fill k slots. */
    while (t->held - t->hist[t->lim] >= t->k) {
        t->held -= t->hist[t->lim];
        t->hist[t->lim] = 0;
        t->lim--;
    }
}

/* ------------------------------------------------------------------ scan loops */
/* Each scan pushes rows [r0, r1) of `codes` against one query `q` into its top-k state; codes and q
 * are in the scan's word width (uint64_t for the wide scans, uint32_t for the narrow ones). */
typedef void (*scan_fn)(const void *codes, int64_t r0, int64_t r1, int W, const void *q, topk_t *t,
                        const uint8_t *dead);

/* The widest scan the process may run: 0 generic, 1 popcnt, 2 AVX-512 (the default). Set by
 * limit_kernel, so the narrower scans can be tested and compared on a CPU that would pick a wider one. */
SH_HIDDEN extern int max_level;

/* The scan for rows of W words of wb bytes (wb = 4 only with W = 1: checked by the bindings). */
SH_HIDDEN scan_fn pick_scan(int W, int wb, const char **name);
/* Scan rows [r0, r1) for nq queries into their states (which must be initialised); nonzero when a
 * state ran out of memory. Runs without the GIL. */
SH_HIDDEN int scan_all(const void *C, int64_t r0, int64_t r1, int W, int wb, const void *Q, Py_ssize_t nq,
                       const uint8_t *dead, int64_t block, topk_t *st);
SH_HIDDEN topk_t *states_new(Py_ssize_t nq, int d, int64_t k, int radius);
SH_HIDDEN void states_free(topk_t *st, Py_ssize_t nq);

#ifdef SH_X86
SH_HIDDEN void scan_popcnt(const void *codes, int64_t r0, int64_t r1, int W, const void *q, topk_t *t,
                           const uint8_t *dead);
SH_HIDDEN void scan_avx512(const void *codes, int64_t r0, int64_t r1, int W, const void *q, topk_t *t,
                           const uint8_t *dead);
SH_HIDDEN void scan32_avx512(const void *codes, int64_t r0, int64_t r1, int W, const void *q, topk_t *t,
                             const uint8_t *dead);
#endif

/* The multi-index probe's binding (_hamming_mih.c). */
SH_HIDDEN PyObject *py_mih_range(PyObject *self, PyObject *args);

#endif
