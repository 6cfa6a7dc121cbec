/* The Python bindings of the native Hamming kernels: argument checks, the GIL released around the
 * scans, results into the caller's buffers. The design is in _hamming.h. */
#include "_hamming.h"

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
