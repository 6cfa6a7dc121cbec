/* The top-k state, the scalar and POPCNT scans, the run-time pick of a scan and the driver that
 * blocks several queries over the rows (see _hamming.h for the design). */
#include "_hamming.h"

/* ------------------------------------------------------------------ per-query top-k state */
int topk_init(topk_t *t, int d, int64_t k, int radius) {
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

void topk_free(topk_t *t) {
    free(t->rows);
    free(t->dist);
    free(t->hist);
}

void topk_make_room(topk_t *t) {
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

int64_t topk_emit(topk_t *t, int32_t *out_d, int64_t *out_r, int64_t *off, const int64_t *ids) {
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

/* ------------------------------------------------------------------ scalar and POPCNT scans */
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
__attribute__((target("popcnt"))) void scan_popcnt(const void *codes_, int64_t r0, int64_t r1, int W,
                                                   const void *q_, topk_t *t, const uint8_t *dead) {
    SCALAR_SCAN_BODY
}

__attribute__((target("popcnt"))) static void scan32_popcnt(const void *codes_, int64_t r0, int64_t r1, int W,
                                                            const void *q_, topk_t *t, const uint8_t *dead) {
    SCALAR_SCAN32_BODY
}
#endif

/* ------------------------------------------------------------------ run-time pick */
int max_level = 2;

scan_fn pick_scan(int W, int wb, const char **name) {
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
int scan_all(const void *C, int64_t r0, int64_t r1, int W, int wb, const void *Q, Py_ssize_t nq,
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

topk_t *states_new(Py_ssize_t nq, int d, int64_t k, int radius) {
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

void states_free(topk_t *st, Py_ssize_t nq) {
    if (!st) return;
    for (Py_ssize_t j = 0; j < nq; j++) topk_free(&st[j]);
    free(st);
}

