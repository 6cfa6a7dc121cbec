/* The multi-index probe behind streamhash.index.memhash (see _hamming.h for the flat scans it reuses). */
#include "_hamming.h"

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
PyObject *py_mih_range(PyObject *self, PyObject *args) {
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
