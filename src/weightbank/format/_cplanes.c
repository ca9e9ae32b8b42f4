/* Byte-plane split and merge in one pass per chunk, outside the GIL.
 *
 * The compiled twin of weightbank.format.planes.split / merge: the same bytes,
 * bit for bit (tests/format/test_cplanes.py checks it against the numpy path
 * for every word size, rotated or not). Words are read and written in the
 * machine's byte order with memcpy, exactly as numpy's views do, so unaligned
 * buffers are fine. Float words are rotated left by one bit before splitting
 * (and right after merging): byte p of rotl(w, 1) goes to plane p.
 *
 * Only the buffer protocol is used (no numpy C API), so the module builds
 * against any numpy and needs nothing but a C compiler and Python's headers.
 * If it cannot be built, weightbank falls back to numpy (same bytes, slower).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define SPLIT_LOOP(T, K, ROT)                                                    \
    for (Py_ssize_t i = 0; i < n; i++) {                                         \
        T w;                                                                     \
        memcpy(&w, src + (size_t)i * K, K);                                      \
        if (ROT) w = (T)((w << 1) | (w >> (8 * K - 1)));                         \
        for (int p = 0; p < K; p++) dst[(size_t)p * n + i] = (uint8_t)(w >> (8 * p)); \
    }

#define MERGE_LOOP(T, K, ROT)                                                    \
    for (Py_ssize_t i = 0; i < n; i++) {                                         \
        T w = 0;                                                                 \
        for (int p = K - 1; p >= 0; p--) w = (T)((w << 8) | planes[p][i]);       \
        if (ROT) w = (T)((w >> 1) | (w << (8 * K - 1)));                         \
        memcpy(out + (size_t)i * K, &w, K);                                      \
    }

static void split_words(const uint8_t *restrict src, uint8_t *restrict dst, Py_ssize_t n, int k, int rot) {
    switch (k * 2 + (rot != 0)) {
    case 4: SPLIT_LOOP(uint16_t, 2, 0) break;
    case 5: SPLIT_LOOP(uint16_t, 2, 1) break;
    case 8: SPLIT_LOOP(uint32_t, 4, 0) break;
    case 9: SPLIT_LOOP(uint32_t, 4, 1) break;
    case 16: SPLIT_LOOP(uint64_t, 8, 0) break;
    case 17: SPLIT_LOOP(uint64_t, 8, 1) break;
    }
}

static void merge_words(const uint8_t *const *planes, uint8_t *restrict out, Py_ssize_t n, int k, int rot) {
    switch (k * 2 + (rot != 0)) {
    case 4: MERGE_LOOP(uint16_t, 2, 0) break;
    case 5: MERGE_LOOP(uint16_t, 2, 1) break;
    case 8: MERGE_LOOP(uint32_t, 4, 0) break;
    case 9: MERGE_LOOP(uint32_t, 4, 1) break;
    case 16: MERGE_LOOP(uint64_t, 8, 0) break;
    case 17: MERGE_LOOP(uint64_t, 8, 1) break;
    }
}

static int check_itemsize(int k) {
    if (k == 2 || k == 4 || k == 8) return 0;
    PyErr_Format(PyExc_ValueError, "itemsize must be 2, 4 or 8, not %d", k);
    return -1;
}

/* Whether two byte ranges share memory (the loops take their buffers as restrict). */
static int overlap(const void *a, Py_ssize_t alen, const void *b, Py_ssize_t blen) {
    const uint8_t *x = (const uint8_t *)a, *y = (const uint8_t *)b;
    return alen > 0 && blen > 0 && x < y + blen && y < x + alen;
}

/* split(src, dst, itemsize, rotate): dst (itemsize * words bytes) gets plane p at p * words. */
static PyObject *cplanes_split(PyObject *self, PyObject *args) {
    Py_buffer src, dst;
    int k, rot;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*ip", &src, &dst, &k, &rot)) return NULL;
    PyObject *result = NULL;
    if (check_itemsize(k) < 0) goto done;
    if (overlap(src.buf, src.len, dst.buf, dst.len)) {
        PyErr_SetString(PyExc_ValueError, "split: source and planes overlap");
        goto done;
    }
    if (src.len % k != 0 || dst.len != src.len) {
        PyErr_Format(PyExc_ValueError, "split: %zd source bytes into %zd plane bytes (itemsize %d)",
                     src.len, dst.len, k);
        goto done;
    }
    {
        Py_ssize_t n = src.len / k;
        const uint8_t *s = (const uint8_t *)src.buf;
        uint8_t *d = (uint8_t *)dst.buf;
        Py_BEGIN_ALLOW_THREADS
        split_words(s, d, n, k, rot);
        Py_END_ALLOW_THREADS
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

/* merge(planes, out, rotate): planes is a sequence of itemsize buffers of len(out) / itemsize bytes. */
static PyObject *cplanes_merge(PyObject *self, PyObject *args) {
    PyObject *seq_obj;
    Py_buffer out;
    int rot;
    (void)self;
    if (!PyArg_ParseTuple(args, "Ow*p", &seq_obj, &out, &rot)) return NULL;
    Py_buffer views[8];
    const uint8_t *rows[8];
    int held = 0;
    PyObject *result = NULL;
    PyObject *seq = PySequence_Fast(seq_obj, "merge: planes must be a sequence of buffers");
    if (seq == NULL) goto done;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(seq);
    if (k > 8) {
        PyErr_Format(PyExc_ValueError, "merge: %zd planes (at most 8)", k);
        goto done;
    }
    if (check_itemsize((int)k) < 0) goto done;
    if (out.len % k != 0) {
        PyErr_Format(PyExc_ValueError, "merge: %zd output bytes are not whole %zd-byte words", out.len, k);
        goto done;
    }
    Py_ssize_t n = out.len / k;
    for (Py_ssize_t p = 0; p < k; p++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, p), &views[p], PyBUF_C_CONTIGUOUS) < 0) goto done;
        held++;
        if (views[p].len != n) {
            PyErr_Format(PyExc_ValueError, "merge: plane %zd has %zd bytes, expected %zd", p, views[p].len, n);
            goto done;
        }
        if (overlap(views[p].buf, n, out.buf, out.len)) {
            PyErr_Format(PyExc_ValueError, "merge: plane %zd overlaps the output", p);
            goto done;
        }
        rows[p] = (const uint8_t *)views[p].buf;
    }
    {
        uint8_t *o = (uint8_t *)out.buf;
        Py_BEGIN_ALLOW_THREADS
        merge_words(rows, o, n, (int)k, rot);
        Py_END_ALLOW_THREADS
    }
    result = Py_None;
    Py_INCREF(result);
done:
    for (int p = 0; p < held; p++) PyBuffer_Release(&views[p]);
    Py_XDECREF(seq);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"split", cplanes_split, METH_VARARGS, "split(src, dst, itemsize, rotate): byte planes of src into dst."},
    {"merge", cplanes_merge, METH_VARARGS, "merge(planes, out, rotate): words of the planes into out."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cplanes", "Byte-plane split and merge, compiled (see planes.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cplanes(void) { return PyModule_Create(&module); }
