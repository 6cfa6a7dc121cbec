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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SH_X86 1
#include <immintrin.h>
#endif

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

static int topk_init(topk_t *t, int d, int64_t k, int radius) {
    memset(t, 0, sizeof(*t));
    t->k = k;
    t->lim = d;
    t->radius = radius;
    t->cap = k < 512 ? 2 * k + 64 : 1024 + 64; /* grows on demand (ties, range results) */
    t->rows = malloc(t->cap * sizeof(int64_t));
    t->dist = malloc(t->cap * sizeof(uint16_t));
    t->hist = calloc((size_t)d + 1, sizeof(int64_t));
    return t->rows && t->dist && t->hist ? 0 : -1;
}

static void topk_free(topk_t *t) {
    free(t->rows);
    free(t->dist);
    free(t->hist);
}

/* Drop candidates that fell above lim; grow when ties at lim keep the buffer full. */
static void topk_make_room(topk_t *t) {
    int64_t j = 0;
    for (int64_t i = 0; i < t->len; i++) {
        if (t->dist[i] <= t->lim) {
            t->rows[j] = t->rows[i];
            t->dist[j++] = t->dist[i];
        }
    }
    t->len = j;
    if (t->len * 2 > t->cap) {
        int64_t cap = t->cap * 2;
        int64_t *r = realloc(t->rows, cap * sizeof(int64_t));
        if (r) t->rows = r;
        uint16_t *dd = realloc(t->dist, cap * sizeof(uint16_t));
        if (dd) t->dist = dd;
        if (r && dd) t->cap = cap; else t->oom = 1;
    }
}

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

/* Counting sort of the held candidates into out_d/out_r (at most k slots); returns how many were written.
 * With `ids`, out_r gets ids[row] rather than the row: the caller spares a numpy pass per search. */
static int64_t topk_emit(topk_t *t, int32_t *out_d, int64_t *out_r, int64_t *off, const int64_t *ids) {
    int64_t acc = 0;
    for (int v = 0; v <= t->lim; v++) {
        off[v] = acc;
        acc += t->hist[v];
    }
    for (int64_t i = 0; i < t->len; i++) {
        int v = t->dist[i];
        if (v > t->lim) continue;
        int64_t pos = off[v]++;
        if (pos >= t->k) continue; /* a later tie at lim */
        out_d[pos] = v;
        out_r[pos] = ids ? ids[t->rows[i]] : t->rows[i];
    }
    return acc < t->k ? acc : t->k;
}

/* ------------------------------------------------------------------ scan loops */
/* Each scan pushes rows [r0, r1) of `codes` against one query `q` into its top-k state; codes and q
 * are in the scan's word width (uint64_t for the wide scans, uint32_t for the narrow ones). */
typedef void (*scan_fn)(const void *codes, int64_t r0, int64_t r1, int W, const void *q, topk_t *t,
                        const uint8_t *dead);

#define SCALAR_SCAN_BODY                                                        \
    const uint64_t *codes = codes_, *q = q_;                                    \
    int thr = topk_thr(t);                                                      \
    for (int64_t i = r0; i < r1; i++) {                                         \
        const uint64_t *c = codes + i * W;                                      \
        int dist = 0;                                                           \
        for (int w = 0; w < W; w++) dist += __builtin_popcountll(c[w] ^ q[w]);  \
        if (dist < thr) {                                                       \
            topk_push(t, i, dist, dead);                                        \
            thr = topk_thr(t);                                                  \
        }                                                                       \
    }

#define SCALAR_SCAN32_BODY                                                      \
    const uint32_t *codes = codes_, q = *(const uint32_t *)q_;                  \
    (void)W;                                                                    \
    int thr = topk_thr(t);                                                      \
    for (int64_t i = r0; i < r1; i++) {                                         \
        int dist = __builtin_popcount(codes[i] ^ q);                            \
        if (dist < thr) {                                                       \
            topk_push(t, i, dist, dead);                                        \
            thr = topk_thr(t);                                                  \
        }                                                                       \
    }

static void scan_generic(const void *codes_, int64_t r0, int64_t r1, int W, const void *q_, topk_t *t,
                         const uint8_t *dead) {
    SCALAR_SCAN_BODY
}

static void scan32_generic(const void *codes_, int64_t r0, int64_t r1, int W, const void *q_, topk_t *t,
                           const uint8_t *dead) {
    SCALAR_SCAN32_BODY
}

#ifdef SH_X86
__attribute__((target("popcnt"))) static void scan_popcnt(const void *codes_, int64_t r0, int64_t r1, int W,
                                                          const void *q_, topk_t *t, const uint8_t *dead) {
    SCALAR_SCAN_BODY
}

__attribute__((target("popcnt"))) static void scan32_popcnt(const void *codes_, int64_t r0, int64_t r1, int W,
                                                            const void *q_, topk_t *t, const uint8_t *dead) {
    SCALAR_SCAN32_BODY
}

#define AVX512 __attribute__((target("popcnt,avx512f,avx512vpopcntdq"), always_inline)) static inline

/* Distances of 8 consecutive rows starting at `c` (row-major, W words each), one per lane. */
AVX512 __m512i dist8(const uint64_t *c, const int W, const __m512i vq) {
    if (W == 1) return _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(c), vq));
    const __m512i ev = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    const __m512i od = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
#define PC(j) _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(c + 8 * (j)), vq))
#define PAIR(a, b) _mm512_add_epi64(_mm512_permutex2var_epi64(a, ev, b), _mm512_permutex2var_epi64(a, od, b))
    if (W == 2) return PAIR(PC(0), PC(1));
    /* W == 4: two rounds of adding neighbouring lanes. */
    return PAIR(PAIR(PC(0), PC(1)), PAIR(PC(2), PC(3)));
#undef PC
#undef PAIR
}

AVX512 void scan_avx512_w(const uint64_t *codes, int64_t r0, int64_t r1, const int W, const uint64_t *q,
                          topk_t *t, const uint8_t *dead) {
    /* The query repeated across lanes: W divides 8, so lane j holds word j % W. */
    uint64_t qq[8];
    for (int j = 0; j < 8; j++) qq[j] = q[j % W];
    const __m512i vq = _mm512_loadu_si512(qq);
    int64_t i = r0;
    for (; i + 32 <= r1; i += 32) {
        const __m512i thr = _mm512_set1_epi64(topk_thr(t));
        const uint64_t *c = codes + i * W;
        __m512i d0 = dist8(c, W, vq), d1 = dist8(c + 8 * W, W, vq);
        __m512i d2 = dist8(c + 16 * W, W, vq), d3 = dist8(c + 24 * W, W, vq);
        /* One compare for the 32 rows: the common case once the top-k has warmed up is that none passes. */
        if (!_mm512_cmplt_epu64_mask(_mm512_min_epu64(_mm512_min_epu64(d0, d1), _mm512_min_epu64(d2, d3)), thr))
            continue;
        uint32_t m = (uint32_t)_mm512_cmplt_epi64_mask(d0, thr) | (uint32_t)_mm512_cmplt_epi64_mask(d1, thr) << 8 |
                     (uint32_t)_mm512_cmplt_epi64_mask(d2, thr) << 16 | (uint32_t)_mm512_cmplt_epi64_mask(d3, thr) << 24;
        uint64_t dd[32];
        _mm512_storeu_si512(dd, d0);
        _mm512_storeu_si512(dd + 8, d1);
        _mm512_storeu_si512(dd + 16, d2);
        _mm512_storeu_si512(dd + 24, d3);
        while (m) {
            int j = __builtin_ctz(m);
            m &= m - 1;
            topk_push(t, i + j, (int)dd[j], dead); /* re-checks against the (maybe lower) limit */
        }
    }
    for (; i < r1; i++) {
        int dist = 0;
        for (int w = 0; w < W; w++) dist += (int)_mm_popcnt_u64(codes[i * W + w] ^ q[w]);
        topk_push(t, i, dist, dead);
    }
}

__attribute__((target("popcnt,avx512f,avx512vpopcntdq"))) static void scan_avx512(const void *codes_, int64_t r0,
                                                                           int64_t r1, int W, const void *q_,
                                                                           topk_t *t, const uint8_t *dead) {
    const uint64_t *codes = codes_, *q = q_;
    switch (W) {
    case 1: scan_avx512_w(codes, r0, r1, 1, q, t, dead); break;
    case 2: scan_avx512_w(codes, r0, r1, 2, q, t, dead); break;
    case 4: scan_avx512_w(codes, r0, r1, 4, q, t, dead); break;
    default: scan_popcnt(codes, r0, r1, W, q, t, dead);
    }
}

/* 32-bit codes, 16 rows a vector: half the bytes and half the popcounts of the 64-bit words. */
__attribute__((target("popcnt,avx512f,avx512vpopcntdq"))) static void scan32_avx512(const void *codes_, int64_t r0,
                                                                             int64_t r1, int W, const void *q_,
                                                                             topk_t *t, const uint8_t *dead) {
    const uint32_t *codes = codes_, q = *(const uint32_t *)q_;
    (void)W;
    const __m512i vq = _mm512_set1_epi32((int)q);
    int64_t i = r0;
    for (; i + 64 <= r1; i += 64) {
        const __m512i thr = _mm512_set1_epi32(topk_thr(t));
        const uint32_t *c = codes + i;
#define D16(j) _mm512_popcnt_epi32(_mm512_xor_si512(_mm512_loadu_si512(c + 16 * (j)), vq))
        __m512i d0 = D16(0), d1 = D16(1), d2 = D16(2), d3 = D16(3);
#undef D16
        if (!_mm512_cmplt_epu32_mask(_mm512_min_epu32(_mm512_min_epu32(d0, d1), _mm512_min_epu32(d2, d3)), thr))
            continue;
        uint64_t m = (uint64_t)_mm512_cmplt_epu32_mask(d0, thr) | (uint64_t)_mm512_cmplt_epu32_mask(d1, thr) << 16 |
                     (uint64_t)_mm512_cmplt_epu32_mask(d2, thr) << 32 | (uint64_t)_mm512_cmplt_epu32_mask(d3, thr) << 48;
        uint32_t dd[64];
        _mm512_storeu_si512(dd, d0);
        _mm512_storeu_si512(dd + 16, d1);
        _mm512_storeu_si512(dd + 32, d2);
        _mm512_storeu_si512(dd + 48, d3);
        while (m) {
            int j = __builtin_ctzll(m);
            m &= m - 1;
            topk_push(t, i + j, (int)dd[j], dead); /* re-checks against the (maybe lower) limit */
        }
    }
    for (; i < r1; i++) topk_push(t, i, (int)_mm_popcnt_u32(codes[i] ^ q), dead);
}
#endif

/* The widest scan the process may run: 0 generic, 1 popcnt, 2 AVX-512 (the default). Set by
 * limit_kernel, so the narrower scans can be tested and compared on a CPU that would pick a wider one. */
static int max_level = 2;

/* The scan for rows of W words of wb bytes (wb = 4 only with W = 1: checked by the bindings). */
static scan_fn pick_scan(int W, int wb, const char **name) {
#ifdef SH_X86
    __builtin_cpu_init();
    if (max_level >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq") &&
        (wb == 4 || W == 1 || W == 2 || W == 4)) {
        *name = wb == 4 ? "avx512-vpopcntdq-32" : "avx512-vpopcntdq";
        return wb == 4 ? scan32_avx512 : scan_avx512;
    }
    if (max_level >= 1 && __builtin_cpu_supports("popcnt")) {
        *name = wb == 4 ? "popcnt-32" : "popcnt";
        return wb == 4 ? scan32_popcnt : scan_popcnt;
    }
#endif
    *name = wb == 4 ? "generic-32" : "generic";
    return wb == 4 ? scan32_generic : scan_generic;
}

/* ------------------------------------------------------------------ driver */
/* Scan rows [r0, r1) for nq queries into their states (which must be initialised). With several
 * queries, block over the database so one block stays in cache while every query scans it.
 * Runs without the GIL. Returns nonzero when a state ran out of memory. */
static int scan_all(const void *C, int64_t r0, int64_t r1, int W, int wb, const void *Q, Py_ssize_t nq,
                    const uint8_t *dead, int64_t block, topk_t *st) {
    const char *name;
    scan_fn scan = pick_scan(W, wb, &name);
    int64_t step = nq > 1 ? block : (r1 - r0);
    for (int64_t b0 = r0; b0 < r1; b0 += step) {
        int64_t b1 = b0 + step < r1 ? b0 + step : r1;
        for (Py_ssize_t j = 0; j < nq; j++) scan(C, b0, b1, W, (const char *)Q + j * W * wb, &st[j], dead);
    }
    int err = 0;
    for (Py_ssize_t j = 0; j < nq; j++) err |= st[j].oom;
    return err;
}

static topk_t *states_new(Py_ssize_t nq, int d, int64_t k, int radius) {
    topk_t *st = calloc(nq ? nq : 1, sizeof(topk_t));
    if (!st) return NULL;
    for (Py_ssize_t j = 0; j < nq; j++) {
        if (topk_init(&st[j], d, k, radius)) {
            for (Py_ssize_t i = 0; i <= j; i++) topk_free(&st[i]);
            free(st);
            return NULL;
        }
    }
    return st;
}

static void states_free(topk_t *st, Py_ssize_t nq) {
    if (!st) return;
    for (Py_ssize_t j = 0; j < nq; j++) topk_free(&st[j]);
    free(st);
}

/* ------------------------------------------------------------------ Python bindings */
typedef struct {
    Py_buffer codes, queries, dead;
    int have_dead;
} common_args;

static void common_release(common_args *a) {
    PyBuffer_Release(&a->codes);
    PyBuffer_Release(&a->queries);
    if (a->have_dead) PyBuffer_Release(&a->dead);
}

/* Validate the buffers shared by search and range_search; on error release them and return -1. */
static int common_check(common_args *a, PyObject *dead_obj, Py_ssize_t r1, int W, int wb, int d, Py_ssize_t nq) {
    a->have_dead = 0;
    if (dead_obj != Py_None) {
        if (PyObject_GetBuffer(dead_obj, &a->dead, PyBUF_SIMPLE) < 0) goto fail;
        a->have_dead = 1;
    }
    if (W < 1 || d < 1 || d > 65535 || r1 < 0 || nq < 0 || !(wb == 8 || (wb == 4 && W == 1 && d <= 32))) {
        PyErr_SetString(PyExc_ValueError, "bad arguments");
        goto fail;
    }
    if (a->codes.len < r1 * W * wb || a->queries.len < nq * W * wb || (a->have_dead && a->dead.len < r1)) {
        PyErr_SetString(PyExc_ValueError, "codes, queries or dead buffer too small");
        goto fail;
    }
    return 0;
fail:
    common_release(a);
    return -1;
}

/* search(codes, r0, r1, W, wb, d, queries, nq, k, dead_or_None, out_D, out_rows, block_rows, ids_or_None)
 * Top-k over rows [r0, r1) into out_D (nq*k int32) and out_rows (nq*k int64), padded with INT32_MAX / -1
 * past the live rows. With ids (int64, one per row), out_rows holds ids[row] instead of rows. */
static PyObject *py_search(PyObject *self, PyObject *args) {
    common_args a;
    Py_buffer od, orow, ids = {0};
    Py_ssize_t r0, r1, nq, block;
    int W, wb, d, k;
    PyObject *dead_obj, *ids_obj;
    if (!PyArg_ParseTuple(args, "y*nniiiy*niOw*w*nO", &a.codes, &r0, &r1, &W, &wb, &d, &a.queries, &nq, &k, &dead_obj,
                          &od, &orow, &block, &ids_obj))
        return NULL;
    if (common_check(&a, dead_obj, r1, W, wb, d, nq) < 0) goto out;
    if (ids_obj != Py_None && PyObject_GetBuffer(ids_obj, &ids, PyBUF_SIMPLE) < 0) {
        common_release(&a);
        goto out;
    }
    if (k < 1 || r0 < 0 || r0 > r1 || od.len < nq * k * 4 || orow.len < nq * k * 8 ||
        (ids.obj && ids.len < r1 * 8)) {
        PyErr_SetString(PyExc_ValueError, "bad k/row range, output buffers or ids too small");
        common_release(&a);
        goto out;
    }
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    topk_t *st = states_new(nq, d, k, d + 1);
    int64_t *off = malloc(((size_t)d + 1) * sizeof(int64_t));
    err = !st || !off || scan_all(a.codes.buf, r0, r1, W, wb, a.queries.buf, nq, a.have_dead ? a.dead.buf : NULL,
                                  block > 0 ? block : 1 << 14, st);
    if (!err)
        for (Py_ssize_t j = 0; j < nq; j++) {
            int32_t *D = (int32_t *)od.buf + j * k;
            int64_t *R = (int64_t *)orow.buf + j * k;
            for (int64_t pos = topk_emit(&st[j], D, R, off, ids.obj ? (const int64_t *)ids.buf : NULL); pos < k; pos++) {
                D[pos] = INT32_MAX; /* padding, as FAISS pads */
                R[pos] = -1;
            }
        }
    states_free(st, nq);
    free(off);
    Py_END_ALLOW_THREADS
    if (err) PyErr_NoMemory();
    common_release(&a);
out:
    PyBuffer_Release(&od);
    PyBuffer_Release(&orow);
    if (ids.obj) PyBuffer_Release(&ids);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

/* range_search(codes, n, W, wb, d, queries, nq, radius, dead_or_None, block_rows)
 *   -> (lims bytearray of nq+1 int64, D bytearray of int32, rows bytearray of int64)
 * Rows at distance < radius, sorted by (distance, row) per query. One pass: a range search is a
 * top-k with k unbounded and the threshold pinned at the radius. */
static PyObject *py_range_search(PyObject *self, PyObject *args) {
    common_args a;
    Py_ssize_t n, nq, block;
    int W, wb, d, radius;
    PyObject *dead_obj, *lims = NULL, *D = NULL, *R = NULL;
    if (!PyArg_ParseTuple(args, "y*niiiy*niOn", &a.codes, &n, &W, &wb, &d, &a.queries, &nq, &radius, &dead_obj, &block))
        return NULL;
    if (common_check(&a, dead_obj, n, W, wb, d, nq) < 0) return NULL;
    if (radius < 1 || radius > d + 1) {
        PyErr_SetString(PyExc_ValueError, "radius must be in [1, d + 1]");
        common_release(&a);
        return NULL;
    }
    topk_t *st = NULL;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    st = states_new(nq, d, INT64_MAX, radius);
    err = !st || scan_all(a.codes.buf, 0, n, W, wb, a.queries.buf, nq, a.have_dead ? a.dead.buf : NULL,
                          block > 0 ? block : 1 << 14, st);
    Py_END_ALLOW_THREADS
    if (err) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t total = 0;
    for (Py_ssize_t j = 0; j < nq; j++) total += st[j].len;
    lims = PyByteArray_FromStringAndSize(NULL, (nq + 1) * 8);
    D = PyByteArray_FromStringAndSize(NULL, total * 4);
    R = PyByteArray_FromStringAndSize(NULL, total * 8);
    int64_t *off = malloc(((size_t)d + 1) * sizeof(int64_t));
    if (!lims || !D || !R || !off) {
        free(off);
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    int64_t *L = (int64_t *)PyByteArray_AS_STRING(lims);
    int32_t *OD = (int32_t *)PyByteArray_AS_STRING(D);
    int64_t *OR = (int64_t *)PyByteArray_AS_STRING(R);
    L[0] = 0;
    for (Py_ssize_t j = 0; j < nq; j++) {
        topk_emit(&st[j], OD + L[j], OR + L[j], off, NULL);
        L[j + 1] = L[j] + st[j].len;
    }
    free(off);
done:
    states_free(st, nq);
    common_release(&a);
    if (PyErr_Occurred()) {
        Py_XDECREF(lims);
        Py_XDECREF(D);
        Py_XDECREF(R);
        return NULL;
    }
    return Py_BuildValue("(NNN)", lims, D, R);
}

/* ------------------------------------------------------------------ multi-index probe (memhash.py)
 * The in-memory multi-index hash tables of streamhash.index.memhash, probed and verified in one call.
 * Table j is a bucket directory over the top tb[j] bits of its tw[j]-bit substring values:
 * rows[dir[dir_off[j] + v]] .. rows[dir[dir_off[j] + v + 1] - 1] hold the rows whose substring has
 * top bits v (absolute positions into rows/vals, sorted by (value, row)); when tb[j] < tw[j] the
 * full values (vals, parallel to rows) are binary-searched inside the bucket. Each probe is the
 * query's substring XOR one flip mask (masks[mask_off[j] .. mask_off[j + 1]]). Every bucket entry
 * is verified against its full code (dead rows skipped), rows [tail0, tail1) not yet in the
 * tables are scanned with the flat kernel, and each query's hits are sorted by (distance, row)
 * with repeats (a row found through several tables) dropped. */
typedef struct {
    uint64_t *a;
    int64_t len, cap;
} vec64;

static int vec_push(vec64 *v, uint64_t x) {
    if (v->len == v->cap) {
        int64_t cap = v->cap ? 2 * v->cap : 1024;
        uint64_t *a = realloc(v->a, cap * sizeof(uint64_t));
        if (!a) return -1;
        v->a = a;
        v->cap = cap;
    }
    v->a[v->len++] = x;
    return 0;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static void sort_u64(uint64_t *a, int64_t n) {
    if (n > 32) {
        qsort(a, n, sizeof(uint64_t), cmp_u64);
        return;
    }
    for (int64_t i = 1; i < n; i++) { /* insertion sort: most queries hold a handful of hits */
        uint64_t x = a[i];
        int64_t j = i - 1;
        for (; j >= 0 && a[j] > x; j--) a[j + 1] = a[j];
        a[j + 1] = x;
    }
}

typedef struct {
    const void *codes; /* rows of W words of wb bytes, as in the flat scans */
    int64_t ncodes;
    int W, wb, d, radius, m;
    const uint8_t *dead;
    const uint64_t *qsub;
    const int32_t *tw, *tb;
    const int64_t *dir, *dir_off;
    const uint32_t *rows;
    const uint64_t *vals;
    int64_t nrows; /* entries in rows (and vals): a directory entry outside [0, nrows] is a caller bug */
    const uint64_t *masks;
    const int64_t *mask_off;
} mih_t;

/* Bucket entries of one query (table-major), verified; pushes dist << 32 | row. -1: out of memory, -2: bad directory. */
__attribute__((always_inline)) static inline int mih_probe_body(const mih_t *t, const uint64_t *q,
                                                                const uint64_t *qs, vec64 *out) {
    const int W = t->W;
    for (int j = 0; j < t->m; j++) {
        const int64_t m0 = t->mask_off[j], m1 = t->mask_off[j + 1];
        if (m1 <= m0) continue;
        const int sh = t->tw[j] - t->tb[j];
        const int64_t *D = t->dir + t->dir_off[j];
        const uint64_t v = qs[j];
        for (int64_t k = m0; k < m1; k++) {
            const uint64_t x = v ^ t->masks[k];
            const uint64_t bk = x >> sh;
            int64_t lo = D[bk], hi = D[bk + 1];
            if (lo < 0 || hi > t->nrows || lo > hi) return -2;
            if (sh) { /* values sorted inside the bucket: [lower_bound(x), upper_bound(x)) */
                int64_t a = lo, b = hi;
                while (a < b) {
                    int64_t mid = a + (b - a) / 2;
                    if (t->vals[mid] < x) a = mid + 1; else b = mid;
                }
                lo = a;
                b = hi;
                while (a < b) {
                    int64_t mid = a + (b - a) / 2;
                    if (t->vals[mid] <= x) a = mid + 1; else b = mid;
                }
                hi = a;
            }
            for (int64_t p = lo; p < hi; p++) {
                const int64_t r = t->rows[p];
                if (r >= t->ncodes || (t->dead && t->dead[r])) continue;
                int dist = 0;
                if (t->wb == 4) {
                    dist = __builtin_popcount(((const uint32_t *)t->codes)[r] ^ *(const uint32_t *)q);
                } else {
                    const uint64_t *c = (const uint64_t *)t->codes + r * W;
                    for (int w = 0; w < W; w++) dist += __builtin_popcountll(c[w] ^ q[w]);
                }
                if (dist < t->radius && vec_push(out, (uint64_t)dist << 32 | (uint64_t)r)) return -1;
            }
        }
    }
    return 0;
}

static int mih_probe_generic(const mih_t *t, const uint64_t *q, const uint64_t *qs, vec64 *out) {
    return mih_probe_body(t, q, qs, out);
}

#ifdef SH_X86
__attribute__((target("popcnt"))) static int mih_probe_popcnt(const mih_t *t, const uint64_t *q, const uint64_t *qs,
                                                              vec64 *out) {
    return mih_probe_body(t, q, qs, out);
}
#endif

/* mih_range(codes, W, wb, d, queries, nq, radius, dead_or_None, qsub, m, tw, tb, dir, dir_off, rows, vals_or_None,
 *           masks, mask_off, tail0, tail1) -> (lims bytearray of nq+1 int64, D bytearray int32, rows bytearray int64)
 * qsub: nq*m uint64 substring values of the queries; tw, tb: m int32; dir_off, mask_off: m+1 int64. */
static PyObject *py_mih_range(PyObject *self, PyObject *args) {
    Py_buffer codes, queries, qsub, tw, tb, dir, dir_off, rows, masks, mask_off, dead, vals;
    PyObject *dead_obj, *vals_obj, *lims = NULL, *Dout = NULL, *Rout = NULL;
    Py_ssize_t nq, tail0, tail1;
    int W, wb, d, radius, m, have_dead = 0, have_vals = 0;
    if (!PyArg_ParseTuple(args, "y*iiiy*niOy*iy*y*y*y*y*Oy*y*nn", &codes, &W, &wb, &d, &queries, &nq, &radius, &dead_obj,
                          &qsub, &m, &tw, &tb, &dir, &dir_off, &rows, &vals_obj, &masks, &mask_off, &tail0, &tail1))
        return NULL;
    Py_buffer *bufs[] = {&codes, &queries, &qsub, &tw, &tb, &dir, &dir_off, &rows, &masks, &mask_off};
    vec64 out = {NULL, 0, 0};
    int64_t *L = NULL;
    if (dead_obj != Py_None) {
        if (PyObject_GetBuffer(dead_obj, &dead, PyBUF_SIMPLE) < 0) goto done;
        have_dead = 1;
    }
    if (vals_obj != Py_None) {
        if (PyObject_GetBuffer(vals_obj, &vals, PyBUF_SIMPLE) < 0) goto done;
        have_vals = 1;
    }
    int64_t ncodes = W > 0 && wb > 0 ? codes.len / (W * wb) : 0;
    if (W < 1 || d < 1 || d > 65535 || !(wb == 8 || (wb == 4 && W == 1 && d <= 32)) || m < 1 || nq < 0 ||
        radius < 1 || radius > d + 1 || tail0 < 0 ||
        tail1 < tail0 || tail1 > ncodes || queries.len < nq * W * wb || qsub.len < nq * m * 8 ||
        tw.len < m * 4 || tb.len < m * 4 || dir_off.len < (m + 1) * 8 || mask_off.len < (m + 1) * 8 ||
        (have_dead && dead.len < ncodes)) {
        PyErr_SetString(PyExc_ValueError, "mih_range: bad arguments");
        goto done;
    }
    mih_t t = {codes.buf, ncodes, W, wb, d, radius, m, have_dead ? dead.buf : NULL, qsub.buf, tw.buf, tb.buf,
               dir.buf, dir_off.buf, rows.buf, have_vals ? vals.buf : NULL, 0, masks.buf, mask_off.buf};
    t.nrows = rows.len / 4;
    if (have_vals && vals.len / 8 < t.nrows) t.nrows = vals.len / 8;
    /* Every index the loop can form stays inside the buffers the caller passed. */
    for (int j = 0; j < m; j++) {
        int w = t.tw[j], b = t.tb[j];
        int64_t nd = b < 63 ? ((int64_t)1 << b) + 1 : 0;
        if (w < 1 || w > 64 || b < 1 || b > w || b > 30 || t.dir_off[j] < 0 ||
            (t.dir_off[j] + nd) * 8 > dir.len || t.mask_off[j] < 0 || t.mask_off[j] > t.mask_off[j + 1] ||
            t.mask_off[j + 1] * 8 > masks.len || (b < w && !have_vals)) {
            PyErr_SetString(PyExc_ValueError, "mih_range: bad table layout");
            goto done;
        }
        for (int64_t k = t.mask_off[j]; k < t.mask_off[j + 1]; k++)
            if (w < 64 && (t.masks[k] >> w)) {
                PyErr_SetString(PyExc_ValueError, "mih_range: flip mask wider than its table");
                goto done;
            }
        for (int64_t i = 0; i < nq; i++)
            if (w < 64 && (t.qsub[i * m + j] >> w)) {
                PyErr_SetString(PyExc_ValueError, "mih_range: substring wider than its table");
                goto done;
            }
    }
    L = malloc((nq + 1) * sizeof(int64_t));
    if (!L) {
        PyErr_NoMemory();
        goto done;
    }
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    int (*probe)(const mih_t *, const uint64_t *, const uint64_t *, vec64 *) = mih_probe_generic;
#ifdef SH_X86
    __builtin_cpu_init();
    if (max_level >= 1 && __builtin_cpu_supports("popcnt")) probe = mih_probe_popcnt;
#endif
    const char *name;
    scan_fn scan = pick_scan(W, wb, &name);
    L[0] = 0;
    for (Py_ssize_t i = 0; i < nq && !err; i++) {
        const uint64_t *q = (const uint64_t *)((const char *)queries.buf + i * W * wb); /* wb = 4: read as uint32 */
        int64_t start = out.len;
        err = probe(&t, q, t.qsub + i * m, &out);
        if (!err && tail1 > tail0) {
            topk_t st;
            err = topk_init(&st, d, INT64_MAX, radius);
            if (!err) {
                scan(t.codes, tail0, tail1, W, q, &st, t.dead);
                err = st.oom;
                for (int64_t h = 0; h < st.len && !err; h++)
                    err = vec_push(&out, (uint64_t)st.dist[h] << 32 | (uint64_t)st.rows[h]);
            }
            topk_free(&st);
        }
        if (err) break;
        sort_u64(out.a + start, out.len - start);
        int64_t u = start;
        for (int64_t h = start; h < out.len; h++)
            if (h == start || out.a[h] != out.a[u - 1]) out.a[u++] = out.a[h];
        out.len = u;
        L[i + 1] = out.len;
    }
    Py_END_ALLOW_THREADS
    if (err) {
        if (err == -2) PyErr_SetString(PyExc_ValueError, "mih_range: bucket directory out of range");
        else PyErr_NoMemory();
        goto done;
    }
    lims = PyByteArray_FromStringAndSize((const char *)L, (nq + 1) * 8);
    Dout = PyByteArray_FromStringAndSize(NULL, out.len * 4);
    Rout = PyByteArray_FromStringAndSize(NULL, out.len * 8);
    if (lims && Dout && Rout) {
        int32_t *OD = (int32_t *)PyByteArray_AS_STRING(Dout);
        int64_t *OR = (int64_t *)PyByteArray_AS_STRING(Rout);
        for (int64_t h = 0; h < out.len; h++) {
            OD[h] = (int32_t)(out.a[h] >> 32);
            OR[h] = (int64_t)(out.a[h] & 0xffffffffu);
        }
    }
done:
    free(out.a);
    free(L);
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) PyBuffer_Release(bufs[i]);
    if (have_dead) PyBuffer_Release(&dead);
    if (have_vals) PyBuffer_Release(&vals);
    if (PyErr_Occurred()) {
        Py_XDECREF(lims);
        Py_XDECREF(Dout);
        Py_XDECREF(Rout);
        return NULL;
    }
    return Py_BuildValue("(NNN)", lims, Dout, Rout);
}

static PyObject *py_kernel_name(PyObject *self, PyObject *args) {
    int W, wb = 8;
    if (!PyArg_ParseTuple(args, "i|i", &W, &wb)) return NULL;
    const char *name;
    pick_scan(W, wb, &name);
    return PyUnicode_FromString(name);
}

static PyObject *py_limit_kernel(PyObject *self, PyObject *args) {
    int level, previous = max_level;
    if (!PyArg_ParseTuple(args, "i", &level)) return NULL;
    if (level < 0 || level > 2) {
        PyErr_SetString(PyExc_ValueError, "kernel level must be 0 (generic), 1 (popcnt) or 2 (avx512)");
        return NULL;
    }
    max_level = level;
    return PyLong_FromLong(previous);
}

static PyMethodDef methods[] = {
    {"search", py_search, METH_VARARGS, "Exact top-k Hamming search over rows [r0, r1)."},
    {"range_search", py_range_search, METH_VARARGS, "Rows at distance < radius, sorted by (distance, row)."},
    {"mih_range", py_mih_range, METH_VARARGS, "Multi-index hash probe + verify: rows at distance < radius, by (distance, row)."},
    {"kernel_name", py_kernel_name, METH_VARARGS, "Which scan loop this CPU uses for W words of wb bytes (default 8)."},
    {"limit_kernel", py_limit_kernel, METH_VARARGS, "Cap the scans at level 0 generic, 1 popcnt, 2 avx512; returns the previous cap."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hamming", "Native Hamming kernels.", -1, methods};

PyMODINIT_FUNC PyInit__hamming(void) { return PyModule_Create(&module); }
