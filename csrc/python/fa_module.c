/* fa_module.c: the one CPython binding of flash_attn_c (module flash_attn_c._C).
 *
 * The Python layer resolves defaults and layouts and allocates outputs; this file re-checks
 * everything the C kernels rely on for memory safety (ranks, dtypes, shapes, strides, index
 * arrays), converts byte strides to element strides, fills an fa_fwd_params, and runs the driver
 * with the GIL released. Every check happens before any work or write.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <math.h>
#include <string.h>

#include "../fa_aux.h"
#include "../fa_kernels.h"
#include "../fa_params.h"
#include "../fa_seq.h"
#include "../fa_bwd_params.h"

static PyArray_Descr *bf16_descr = NULL; /* ml_dtypes.bfloat16, registered at import */

/* ---- argument helpers ------------------------------------------------------------------------ */

static int dtype_of(PyArrayObject *a, fa_dtype *t)
{
    int num = PyArray_TYPE(a);
    if (num == NPY_FLOAT32)
        *t = FA_F32;
    else if (num == NPY_FLOAT64)
        *t = FA_F64;
    else if (num == NPY_FLOAT16)
        *t = FA_F16;
    else if (bf16_descr && PyArray_DESCR(a)->type_num == bf16_descr->type_num)
        *t = FA_BF16;
    else
        return -1;
    return 0;
}

static const char *dtype_name(fa_dtype t)
{
    static const char *n[] = {"float32", "float16", "bfloat16", "float64"};
    return n[t];
}

/* Returns a borrowed ndarray or NULL (with TypeError) when obj is not one of rank ndim. NULL obj
 * or None gives NULL without error when optional. */
static PyArrayObject *as_array(PyObject *obj, const char *name, int ndim, int optional, int *err)
{
    *err = 0;
    if (obj == NULL || obj == Py_None) {
        if (!optional) {
            PyErr_Format(PyExc_TypeError, "%s: required", name);
            *err = 1;
        }
        return NULL;
    }
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a numpy.ndarray, got %s", name,
                     Py_TYPE(obj)->tp_name);
        *err = 1;
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: expected %d dims, got %d", name, ndim,
                     PyArray_NDIM(a));
        *err = 1;
        return NULL;
    }
    return a;
}

/* Element strides of a, requiring every byte stride to be a multiple of the item size and, when
 * last_contig, the last dim to be contiguous (size-1 dims may have any stride). */
static int elem_strides(PyArrayObject *a, const char *name, int last_contig, int64_t *out)
{
    int nd = PyArray_NDIM(a);
    npy_intp isz = PyArray_ITEMSIZE(a);
    for (int i = 0; i < nd; i++) {
        npy_intp st = PyArray_STRIDE(a, i);
        if (st % isz != 0) {
            PyErr_Format(PyExc_ValueError, "%s: stride %zd of dim %d is not a multiple of the item size %zd",
                         name, (Py_ssize_t)st, i, (Py_ssize_t)isz);
            return -1;
        }
        out[i] = st / isz;
    }
    /* An empty array has no element to address (NumPy reports all-zero strides for it). */
    if (last_contig && nd > 0 && PyArray_SIZE(a) > 0 && PyArray_DIM(a, nd - 1) > 1 &&
        out[nd - 1] != 1) {
        PyErr_Format(PyExc_ValueError, "%s: the last dimension must be contiguous", name);
        return -1;
    }
    return 0;
}

static int writable(PyArrayObject *a, const char *name)
{
    if (!PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s: must be a writable array", name);
        return -1;
    }
    return 0;
}

static int check_dtype(PyArrayObject *a, const char *name, int npy_type)
{
    if (PyArray_TYPE(a) != npy_type) {
        PyErr_Format(PyExc_TypeError, "%s: expected dtype %s", name,
                     npy_type == NPY_INT64 ? "int64" : npy_type == NPY_FLOAT32 ? "float32" : "uint8");
        return -1;
    }
    return 0;
}

/* A contiguous 1-D int64 array of length n (or NULL when absent). */
static int index_array(PyObject *obj, const char *name, int64_t n, const int64_t **out)
{
    int err;
    *out = NULL;
    PyArrayObject *a = as_array(obj, name, 1, 1, &err);
    if (err)
        return -1;
    if (!a)
        return 0;
    if (check_dtype(a, name, NPY_INT64) < 0)
        return -1;
    if (!PyArray_IS_C_CONTIGUOUS(a) || PyArray_DIM(a, 0) != n) {
        PyErr_Format(PyExc_ValueError, "%s: expected a contiguous array of length %lld", name,
                     (long long)n);
        return -1;
    }
    *out = (const int64_t *)PyArray_DATA(a);
    return 0;
}

static int check_cu(const int64_t *cu, const char *name, int64_t b, int64_t rows)
{
    if (cu[0] != 0) {
        PyErr_Format(PyExc_ValueError, "%s: must start at 0, got %lld", name, (long long)cu[0]);
        return -1;
    }
    for (int64_t i = 0; i < b; i++) {
        if (cu[i + 1] < cu[i]) {
            PyErr_Format(PyExc_ValueError, "%s: must be non-decreasing (entry %lld)", name,
                         (long long)(i + 1));
            return -1;
        }
    }
    if (cu[b] > rows) {
        PyErr_Format(PyExc_ValueError, "%s: last entry %lld exceeds the %lld rows of the packed tensor",
                     name, (long long)cu[b], (long long)rows);
        return -1;
    }
    return 0;
}

static int status_to_error(fa_status st)
{
    switch (st) {
    case FA_OK:
        return 0;
    case FA_ERR_NOMEM:
        PyErr_NoMemory();
        return -1;
    case FA_ERR_ISA:
        PyErr_SetString(PyExc_RuntimeError, "no kernel for this dtype on the selected ISA");
        return -1;
    default:
        PyErr_SetString(PyExc_RuntimeError, "flash_attn_c kernel rejected its parameters");
        return -1;
    }
}

/* A 4-D (batch, head, row, col) auxiliary tensor (pse or mask) with its element strides. Rows and
 * cols must cover every (sequence row, key) the kernel may index. */
static int aux4(PyObject *obj, const char *name, int64_t b, int64_t h, int64_t rows, int64_t cols,
                PyArrayObject **arr, int64_t *st)
{
    int err;
    *arr = as_array(obj, name, 4, 1, &err);
    if (err)
        return -1;
    if (!*arr)
        return 0;
    npy_intp *sh = PyArray_DIMS(*arr);
    if (sh[0] != b || sh[1] != h || sh[2] < rows || sh[3] < cols) {
        PyErr_Format(PyExc_ValueError,
                     "%s: expected (broadcast) shape (%lld, %lld, >=%lld, >=%lld), got (%zd, %zd, %zd, %zd)",
                     name, (long long)b, (long long)h, (long long)rows, (long long)cols, sh[0], sh[1],
                     sh[2], sh[3]);
        return -1;
    }
    return elem_strides(*arr, name, 0, st);
}

/* ---- fwd -------------------------------------------------------------------------------------- */

PyDoc_STRVAR(fwd_doc,
"fwd(q, k, v, out, lse, *, scale, softcap=0, left=None, right=None, anchor_br=True, ...)\n"
"Low-level forward. q/out: (b, sq, h, d) views (varlen: (1, total_q, h, d) with cu_q);\n"
"k/v: (b, sk, hk, d) (paged: (num_blocks, page, hk, d)); lse: (b, h, sq) (varlen (1, h, total_q)).\n"
"Writes out and lse in place. Internal: use the functions of flash_attn_c instead.");

static PyObject *py_fwd(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *kwlist[] = {"q", "k", "v", "out", "lse", "scale", "softcap", "left", "right",
                             "anchor_br", "alibi", "cu_q", "cu_k", "seqlen_k", "k_start",
                             "k_batch_idx", "block_table", "dropout_p", "seed", "offset",
                             "s_dmask", "pse", "mask", "mask_fill", "invalid_line_zero", "sink",
                             "rowmax", "rowsum", "prefix", "pse_after_scale", NULL};
    PyObject *oq, *ok, *ov, *oo, *olse;
    double scale, softcap = 0.0, dropout_p = 0.0, mask_fill = -INFINITY;
    PyObject *oleft = Py_None, *oright = Py_None;
    int anchor_br = 1, invalid_line_zero = 0, pse_after_scale = 0;
    PyObject *oalibi = Py_None, *ocuq = Py_None, *ocuk = Py_None, *oseqk = Py_None,
             *okstart = Py_None, *okbidx = Py_None, *obt = Py_None, *osd = Py_None,
             *opse = Py_None, *omask = Py_None, *osink = Py_None, *ormax = Py_None,
             *orsum = Py_None, *oprefix = Py_None;
    unsigned long long seed = 0, offset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOd|dOOpOOOOOOOdKKOOOdpOOOOp", kwlist, &oq, &ok,
                                     &ov, &oo, &olse, &scale, &softcap, &oleft, &oright,
                                     &anchor_br, &oalibi, &ocuq, &ocuk, &oseqk, &okstart, &okbidx,
                                     &obt, &dropout_p, &seed, &offset, &osd, &opse, &omask,
                                     &mask_fill, &invalid_line_zero, &osink, &ormax, &orsum,
                                     &oprefix, &pse_after_scale))
        return NULL;

    fa_fwd_params p;
    memset(&p, 0, sizeof p);
    int err;
    PyArrayObject *q = as_array(oq, "q", 4, 0, &err);
    if (err) return NULL;
    PyArrayObject *k = as_array(ok, "k", 4, 0, &err);
    if (err) return NULL;
    PyArrayObject *v = as_array(ov, "v", 4, 0, &err);
    if (err) return NULL;
    PyArrayObject *o = as_array(oo, "out", 4, 0, &err);
    if (err) return NULL;
    PyArrayObject *lse = as_array(olse, "lse", 3, 1, &err);
    if (err) return NULL;

    fa_dtype t;
    if (dtype_of(q, &t) < 0) {
        PyErr_SetString(PyExc_TypeError, "q: expected dtype float32, float16, bfloat16 or float64");
        return NULL;
    }
    PyArrayObject *same[] = {k, v, o};
    const char *same_names[] = {"k", "v", "out"};
    for (int i = 0; i < 3; i++) {
        fa_dtype u;
        if (dtype_of(same[i], &u) < 0 || u != t) {
            PyErr_Format(PyExc_TypeError, "%s: expected dtype %s (the dtype of q)", same_names[i],
                         dtype_name(t));
            return NULL;
        }
    }
    if (writable(o, "out") < 0)
        return NULL;
    p.dtype = t;

    int64_t sq_[4], sk_[4], sv_[4], so_[4];
    if (elem_strides(q, "q", 1, sq_) < 0 || elem_strides(k, "k", 1, sk_) < 0 ||
        elem_strides(v, "v", 1, sv_) < 0 || elem_strides(o, "out", 1, so_) < 0)
        return NULL;
    npy_intp *qs = PyArray_DIMS(q), *ks = PyArray_DIMS(k), *vs = PyArray_DIMS(v),
             *os = PyArray_DIMS(o);
    for (int i = 0; i < 4; i++) {
        if (os[i] != qs[i]) {
            PyErr_SetString(PyExc_ValueError, "out: must have the shape of q");
            return NULL;
        }
        if (ks[i] != vs[i]) {
            PyErr_SetString(PyExc_ValueError, "v: must have the shape of k");
            return NULL;
        }
    }
    p.d = qs[3];
    p.h = qs[2];
    p.hk = ks[2];
    if (ks[3] != p.d) {
        PyErr_Format(PyExc_ValueError, "k: head dim %zd differs from q's %lld", ks[3], (long long)p.d);
        return NULL;
    }
    if (p.d < 1 || p.d > 512) {
        PyErr_Format(PyExc_ValueError, "q: head dim must be in [1, 512], got %lld", (long long)p.d);
        return NULL;
    }
    if (p.hk < 1 || p.h % p.hk != 0) {
        PyErr_Format(PyExc_ValueError, "k: %lld kv heads must divide the %lld query heads",
                     (long long)p.hk, (long long)p.h);
        return NULL;
    }
    p.q = (fa_view){PyArray_DATA(q), sq_[0], sq_[1], sq_[2]};
    p.k = (fa_view){PyArray_DATA(k), sk_[0], sk_[1], sk_[2]};
    p.v = (fa_view){PyArray_DATA(v), sv_[0], sv_[1], sv_[2]};
    p.o = PyArray_DATA(o);
    p.o_sb = so_[0], p.o_sr = so_[1], p.o_sh = so_[2];
    p.scale = scale;
    p.softcap = softcap;
    p.anchor_br = anchor_br;
    p.mask_fill = mask_fill;
    p.invalid_line_zero = invalid_line_zero;
    p.pse_after_scale = pse_after_scale;
    if (!(dropout_p >= 0.0 && dropout_p < 1.0)) {
        PyErr_Format(PyExc_ValueError, "dropout_p: must be in [0, 1), got %g", dropout_p);
        return NULL;
    }
    p.dropout_p = dropout_p;
    p.seed = seed;
    p.offset = offset;
    p.left = oleft == Py_None ? FA_UNBOUNDED : PyLong_AsLongLong(oleft);
    p.right = oright == Py_None ? FA_UNBOUNDED : PyLong_AsLongLong(oright);
    if (PyErr_Occurred())
        return NULL;

    /* Batch geometry. */
    int varlen = ocuq != Py_None;
    if (varlen) {
        PyArrayObject *cq = as_array(ocuq, "cu_seqlens_q", 1, 0, &err);
        if (err) return NULL;
        p.b = PyArray_DIM(cq, 0) - 1;
        if (p.b < 0 || qs[0] != 1) {
            PyErr_SetString(PyExc_ValueError, "cu_seqlens_q: needs at least one entry and q of batch 1");
            return NULL;
        }
        if (index_array(ocuq, "cu_seqlens_q", p.b + 1, &p.cu_q) < 0 ||
            check_cu(p.cu_q, "cu_seqlens_q", p.b, qs[1]) < 0)
            return NULL;
        p.sq = 0;
        for (int64_t i = 0; i < p.b; i++)
            if (p.cu_q[i + 1] - p.cu_q[i] > p.sq)
                p.sq = p.cu_q[i + 1] - p.cu_q[i];
    } else {
        p.b = qs[0];
        p.sq = qs[1];
    }
    if (index_array(ocuk, "cu_seqlens_k", p.b + 1, &p.cu_k) < 0)
        return NULL;
    if (p.cu_k && !varlen) {
        PyErr_SetString(PyExc_ValueError, "cu_seqlens_k: given without cu_seqlens_q");
        return NULL;
    }
    if (varlen && !p.cu_k && obt == Py_None && oseqk == Py_None) {
        PyErr_SetString(PyExc_ValueError, "cu_seqlens_k: required with cu_seqlens_q");
        return NULL;
    }
    if (index_array(oseqk, "seqlen_k", p.b, &p.seqlen_k) < 0 ||
        index_array(okstart, "k_start", p.b, &p.k_start) < 0 ||
        index_array(okbidx, "k_batch_idx", p.b, &p.k_batch_idx) < 0 ||
        index_array(oprefix, "prefix", p.b, &p.prefix) < 0)
        return NULL;

    /* Where keys live: every logical key of every sequence must map inside k/v. */
    PyArrayObject *bt = as_array(obt, "block_table", 2, 1, &err);
    if (err)
        return NULL;
    if (bt) {
        if (check_dtype(bt, "block_table", NPY_INT64) < 0)
            return NULL;
        if (!PyArray_IS_C_CONTIGUOUS(bt) || PyArray_DIM(bt, 0) != p.b) {
            PyErr_Format(PyExc_ValueError, "block_table: expected a contiguous (%lld, max_blocks) array",
                         (long long)p.b);
            return NULL;
        }
        if (p.cu_k || p.k_batch_idx) {
            PyErr_SetString(PyExc_ValueError, "block_table: cannot be combined with cu_seqlens_k or cache_batch_idx");
            return NULL;
        }
        p.block_table = (const int64_t *)PyArray_DATA(bt);
        p.bt_stride = PyArray_DIM(bt, 1);
        p.page = ks[1];
        int64_t nblk = ks[0];
        for (int64_t i = 0; i < p.b * p.bt_stride; i++) {
            if (p.block_table[i] < 0 || p.block_table[i] >= nblk) {
                PyErr_Format(PyExc_ValueError, "block_table: entry %lld out of range [0, %lld)",
                             (long long)p.block_table[i], (long long)nblk);
                return NULL;
            }
        }
        p.sk = p.bt_stride * p.page;
    } else {
        p.sk = p.cu_k ? 0 : ks[1];
    }
    int64_t kcap_rows = bt ? p.bt_stride * p.page : ks[1];
    if (p.cu_k && check_cu(p.cu_k, "cu_seqlens_k", p.b, ks[1]) < 0)
        return NULL;
    int64_t max_sk = 0;
    for (int64_t i = 0; i < p.b; i++) {
        if (p.k_batch_idx && (p.k_batch_idx[i] < 0 || p.k_batch_idx[i] >= ks[0])) {
            PyErr_Format(PyExc_ValueError, "cache_batch_idx: entry %lld out of range [0, %zd)",
                         (long long)p.k_batch_idx[i], ks[0]);
            return NULL;
        }
        if (!varlen && !bt && !p.k_batch_idx && ks[0] != qs[0]) {
            PyErr_Format(PyExc_ValueError, "k: batch %zd differs from q's %zd", ks[0], qs[0]);
            return NULL;
        }
        if (p.seqlen_k && p.seqlen_k[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "seqlen_k: entries must be >= 0");
            return NULL;
        }
        if (p.k_start && p.k_start[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "k_start: entries must be >= 0");
            return NULL;
        }
        fa_seq s = fa_seq_of(&p, i);
        int64_t end = s.k_row0 + s.sk; /* one past the last physical key row used */
        int64_t limit = p.cu_k ? p.cu_k[i + 1] : kcap_rows;
        if (p.cu_k && p.seqlen_k)
            limit = ks[1];
        if (end > limit) {
            PyErr_Format(PyExc_ValueError,
                         "k: sequence %lld needs key rows up to %lld but only %lld exist", (long long)i,
                         (long long)end, (long long)limit);
            return NULL;
        }
        if (s.sk > max_sk)
            max_sk = s.sk;
    }
    if (p.cu_k || p.seqlen_k || bt)
        p.sk = max_sk;

    if (lse) {
        PyArrayObject *l = lse;
        npy_intp *ls = PyArray_DIMS(l);
        int64_t want0 = varlen ? 1 : p.b, want2 = varlen ? qs[1] : p.sq;
        if (ls[0] != want0 || ls[1] != p.h || ls[2] != want2) {
            PyErr_Format(PyExc_ValueError, "lse: expected shape (%lld, %lld, %lld)", (long long)want0,
                         (long long)p.h, (long long)want2);
            return NULL;
        }
        if (PyArray_TYPE(l) != (t == FA_F64 ? NPY_FLOAT64 : NPY_FLOAT32)) {
            PyErr_SetString(PyExc_TypeError, "lse: expected float32 (float64 for float64 inputs)");
            return NULL;
        }
        int64_t st[3];
        if (writable(l, "lse") < 0 || elem_strides(l, "lse", 0, st) < 0)
            return NULL;
        p.lse = PyArray_DATA(l);
        p.lse_sb = st[0], p.lse_sh = st[1], p.lse_sr = st[2];
    }
    PyArrayObject *rmax = as_array(ormax, "rowmax", 3, 1, &err);
    if (err) return NULL;
    PyArrayObject *rsum = as_array(orsum, "rowsum", 3, 1, &err);
    if (err) return NULL;
    if ((rmax == NULL) != (rsum == NULL)) {
        PyErr_SetString(PyExc_ValueError, "rowmax and rowsum: give both or neither");
        return NULL;
    }
    if (rmax) {
        int64_t want0 = varlen ? 1 : p.b, want2 = varlen ? qs[1] : p.sq;
        int64_t st[3], st2[3];
        PyArrayObject *pair[] = {rmax, rsum};
        for (int i = 0; i < 2; i++) {
            npy_intp *ls = PyArray_DIMS(pair[i]);
            if (ls[0] != want0 || ls[1] != p.h || ls[2] != want2 ||
                PyArray_TYPE(pair[i]) != (t == FA_F64 ? NPY_FLOAT64 : NPY_FLOAT32)) {
                PyErr_SetString(PyExc_ValueError, "rowmax/rowsum: wrong shape or dtype");
                return NULL;
            }
            if (writable(pair[i], "rowmax/rowsum") < 0)
                return NULL;
        }
        if (elem_strides(rmax, "rowmax", 0, st) < 0 || elem_strides(rsum, "rowsum", 0, st2) < 0)
            return NULL;
        if (memcmp(st, st2, sizeof st) != 0) {
            PyErr_SetString(PyExc_ValueError, "rowmax and rowsum: must have the same strides");
            return NULL;
        }
        p.rowmax = PyArray_DATA(rmax);
        p.rowsum = PyArray_DATA(rsum);
        p.stat_sb = st[0], p.stat_sh = st[1], p.stat_sr = st[2];
    }

    PyArrayObject *al = as_array(oalibi, "alibi_slopes", 2, 1, &err);
    if (err)
        return NULL;
    if (al) {
        int64_t st[2];
        if (check_dtype(al, "alibi_slopes", NPY_FLOAT32) < 0 || elem_strides(al, "alibi_slopes", 1, st) < 0)
            return NULL;
        if (PyArray_DIM(al, 0) != p.b || PyArray_DIM(al, 1) != p.h) {
            PyErr_Format(PyExc_ValueError, "alibi_slopes: expected (broadcast) shape (%lld, %lld)",
                         (long long)p.b, (long long)p.h);
            return NULL;
        }
        p.alibi = (const float *)PyArray_DATA(al);
        p.alibi_sb = st[0];
    }
    PyArrayObject *sk_arr = as_array(osink, "sink", 1, 1, &err);
    if (err)
        return NULL;
    if (sk_arr) {
        if (check_dtype(sk_arr, "sink", NPY_FLOAT32) < 0)
            return NULL;
        if (!PyArray_IS_C_CONTIGUOUS(sk_arr) || PyArray_DIM(sk_arr, 0) != p.h) {
            PyErr_Format(PyExc_ValueError, "sink: expected a contiguous array of length %lld", (long long)p.h);
            return NULL;
        }
        p.sink = (const float *)PyArray_DATA(sk_arr);
    }

    int64_t st4[4];
    PyArrayObject *pse_arr, *mask_arr, *sd_arr;
    int64_t qb = varlen ? 1 : p.b;
    if (aux4(opse, "pse", qb, p.h, p.sq, p.sk, &pse_arr, st4) < 0)
        return NULL;
    if (pse_arr) {
        if (dtype_of(pse_arr, &p.pse_dtype) < 0) {
            PyErr_SetString(PyExc_TypeError, "pse: expected a floating dtype");
            return NULL;
        }
        p.pse = PyArray_DATA(pse_arr);
        p.pse_sb = st4[0], p.pse_sh = st4[1], p.pse_sr = st4[2], p.pse_sc = st4[3];
    }
    if (aux4(omask, "atten_mask", qb, p.h, p.sq, p.sk, &mask_arr, st4) < 0)
        return NULL;
    if (mask_arr) {
        if (PyArray_TYPE(mask_arr) != NPY_UINT8 && PyArray_TYPE(mask_arr) != NPY_BOOL) {
            PyErr_SetString(PyExc_TypeError, "atten_mask: expected dtype bool or uint8");
            return NULL;
        }
        p.mask = (const uint8_t *)PyArray_DATA(mask_arr);
        p.mask_sb = st4[0], p.mask_sh = st4[1], p.mask_sr = st4[2], p.mask_sc = st4[3];
    }
    if (aux4(osd, "s_dmask", p.b, p.h, p.sq, p.sk, &sd_arr, st4) < 0)
        return NULL;
    if (sd_arr) {
        if (check_dtype(sd_arr, "s_dmask", NPY_FLOAT32) < 0 || writable(sd_arr, "s_dmask") < 0)
            return NULL;
        p.s_dmask = (float *)PyArray_DATA(sd_arr);
        p.sd_sb = st4[0], p.sd_sh = st4[1], p.sd_sr = st4[2];
        if (st4[3] != 1) {
            PyErr_SetString(PyExc_ValueError, "s_dmask: the last dimension must be contiguous");
            return NULL;
        }
    }

    fa_status st;
    Py_BEGIN_ALLOW_THREADS
    st = fa_fwd(&p);
    Py_END_ALLOW_THREADS
    if (status_to_error(st) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* ---- rotary and combine ----------------------------------------------------------------------- */

PyDoc_STRVAR(rotary_doc,
"rotary(x, y, cos, sin, pos, interleaved)\n"
"y[b, s, h] = rotary(x[b, s, h]) at positions pos (b, s) int64; x/y (b, s, h, d) views of one\n"
"dtype, cos/sin contiguous (ro_len, half) tables of that dtype. Internal.");

static PyObject *py_rotary(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *ox, *oy, *oc, *os, *op;
    int interleaved;
    if (!PyArg_ParseTuple(args, "OOOOOp", &ox, &oy, &oc, &os, &op, &interleaved))
        return NULL;
    int err;
    PyArrayObject *x = as_array(ox, "x", 4, 0, &err);
    if (err) return NULL;
    PyArrayObject *y = as_array(oy, "y", 4, 0, &err);
    if (err) return NULL;
    PyArrayObject *c = as_array(oc, "rotary_cos", 2, 0, &err);
    if (err) return NULL;
    PyArrayObject *sn = as_array(os, "rotary_sin", 2, 0, &err);
    if (err) return NULL;
    PyArrayObject *pos = as_array(op, "positions", 2, 0, &err);
    if (err) return NULL;
    fa_dtype t, u;
    if (dtype_of(x, &t) < 0 || dtype_of(y, &u) < 0 || u != t || dtype_of(c, &u) < 0 || u != t ||
        dtype_of(sn, &u) < 0 || u != t) {
        PyErr_SetString(PyExc_TypeError, "rotary: x, y, rotary_cos and rotary_sin must share one float dtype");
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(c) || !PyArray_IS_C_CONTIGUOUS(sn) ||
        PyArray_DIM(c, 0) != PyArray_DIM(sn, 0) || PyArray_DIM(c, 1) != PyArray_DIM(sn, 1)) {
        PyErr_SetString(PyExc_ValueError, "rotary_cos/rotary_sin: must be contiguous and of one shape");
        return NULL;
    }
    for (int i = 0; i < 4; i++)
        if (PyArray_DIM(x, i) != PyArray_DIM(y, i)) {
            PyErr_SetString(PyExc_ValueError, "rotary: x and y must have one shape");
            return NULL;
        }
    int64_t b = PyArray_DIM(x, 0), sl = PyArray_DIM(x, 1), h = PyArray_DIM(x, 2), d = PyArray_DIM(x, 3);
    int64_t half = PyArray_DIM(c, 1), ro_len = PyArray_DIM(c, 0);
    if (2 * half > d) {
        PyErr_Format(PyExc_ValueError, "rotary_cos: rotary_dim %lld exceeds the head dim %lld",
                     (long long)(2 * half), (long long)d);
        return NULL;
    }
    if (check_dtype(pos, "positions", NPY_INT64) < 0)
        return NULL;
    if (!PyArray_IS_C_CONTIGUOUS(pos) || PyArray_DIM(pos, 0) != b || PyArray_DIM(pos, 1) != sl) {
        PyErr_SetString(PyExc_ValueError, "positions: expected a contiguous (b, s) array");
        return NULL;
    }
    const int64_t *pp = (const int64_t *)PyArray_DATA(pos);
    for (int64_t i = 0; i < b * sl; i++)
        if (pp[i] < 0 || pp[i] >= ro_len) {
            PyErr_Format(PyExc_ValueError,
                         "rotary_cos: position %lld is outside the %lld rows of the cos/sin tables",
                         (long long)pp[i], (long long)ro_len);
            return NULL;
        }
    int64_t xs[4], ys[4];
    if (elem_strides(x, "x", 1, xs) < 0 || elem_strides(y, "y", 1, ys) < 0 || writable(y, "y") < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    fa_rotary(t, PyArray_DATA(x), xs, PyArray_DATA(y), ys, b, sl, h, d, PyArray_DATA(c),
              PyArray_DATA(sn), half, pp, interleaved);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(combine_doc,
"combine(outs, lses, out, lse)\n"
"Log-sum-exp merge of partial results: outs are (b, s, h, d) views, lses (b, h, s) float32\n"
"(float64 for float64) views; writes out/lse. Internal: see flash_attn_c.combine_partials.");

static PyObject *py_combine(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *oouts, *olses, *oo, *ol;
    if (!PyArg_ParseTuple(args, "OOOO", &oouts, &olses, &oo, &ol))
        return NULL;
    if (!PyTuple_Check(oouts) || !PyTuple_Check(olses) || PyTuple_GET_SIZE(oouts) != PyTuple_GET_SIZE(olses) ||
        PyTuple_GET_SIZE(oouts) < 1 || PyTuple_GET_SIZE(oouts) > 1024) {
        PyErr_SetString(PyExc_ValueError, "combine: outs and lses must be tuples of equal length in [1, 1024]");
        return NULL;
    }
    int n = (int)PyTuple_GET_SIZE(oouts), err;
    PyArrayObject *out = as_array(oo, "out", 4, 0, &err);
    if (err) return NULL;
    PyArrayObject *lse = as_array(ol, "lse", 3, 0, &err);
    if (err) return NULL;
    fa_dtype t;
    if (dtype_of(out, &t) < 0) {
        PyErr_SetString(PyExc_TypeError, "outs: expected float32, float16, bfloat16 or float64");
        return NULL;
    }
    const int lse_type = t == FA_F64 ? NPY_FLOAT64 : NPY_FLOAT32;
    int64_t b = PyArray_DIM(out, 0), sl = PyArray_DIM(out, 1), h = PyArray_DIM(out, 2), d = PyArray_DIM(out, 3);
    if (PyArray_TYPE(lse) != lse_type || PyArray_DIM(lse, 0) != b || PyArray_DIM(lse, 1) != h ||
        PyArray_DIM(lse, 2) != sl) {
        PyErr_SetString(PyExc_ValueError, "lse: wrong shape or dtype for the output");
        return NULL;
    }
    const void *po[1024], *pl[1024];
    int64_t so[1024][3], sl3[1024][3], st[4];
    for (int i = 0; i < n; i++) {
        PyArrayObject *a = as_array(PyTuple_GET_ITEM(oouts, i), "outs[i]", 4, 0, &err);
        if (err) return NULL;
        PyArrayObject *l = as_array(PyTuple_GET_ITEM(olses, i), "lses[i]", 3, 0, &err);
        if (err) return NULL;
        fa_dtype u;
        if (dtype_of(a, &u) < 0 || u != t || PyArray_TYPE(l) != lse_type) {
            PyErr_Format(PyExc_TypeError, "outs[%d]/lses[%d]: dtypes differ from the first partial's", i, i);
            return NULL;
        }
        for (int j = 0; j < 4; j++)
            if (PyArray_DIM(a, j) != PyArray_DIM(out, j)) {
                PyErr_Format(PyExc_ValueError, "outs[%d]: shape differs from outs[0]", i);
                return NULL;
            }
        for (int j = 0; j < 3; j++)
            if (PyArray_DIM(l, j) != PyArray_DIM(lse, j)) {
                PyErr_Format(PyExc_ValueError, "lses[%d]: shape does not match its partial output", i);
                return NULL;
            }
        if (elem_strides(a, "outs[i]", 1, st) < 0)
            return NULL;
        memcpy(so[i], st, sizeof so[i]);
        if (elem_strides(l, "lses[i]", 0, st) < 0)
            return NULL;
        memcpy(sl3[i], st, sizeof sl3[i]);
        po[i] = PyArray_DATA(a);
        pl[i] = PyArray_DATA(l);
    }
    int64_t ost[4], lst[4];
    if (elem_strides(out, "out", 1, ost) < 0 || elem_strides(lse, "lse", 0, lst) < 0 ||
        writable(out, "out") < 0 || writable(lse, "lse") < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    fa_combine(t, n, po, (const int64_t(*)[3])so, pl, (const int64_t(*)[3])sl3, PyArray_DATA(out),
               ost, PyArray_DATA(lse), lst, b, sl, h, d);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- bwd -------------------------------------------------------------------------------------- */

PyDoc_STRVAR(bwd_doc,
"bwd(dout, q, k, v, out, dq, dk, dv, *, scale, lse=None, rowmax=None, rowsum=None, softcap=0,\n"
"    left=None, right=None, anchor_br=True, alibi=None, cu_q=None, cu_k=None, dropout_p=0,\n"
"    seed=0, offset=0, pse=None, mask=None, mask_fill=-inf, invalid_line_zero=False, sink=None,\n"
"    prefix=None, dpse=None)\n"
"Low-level backward. q/dout/out/dq: (b, sq, h, d) views (varlen: (1, total_q, h, d) with cu_q and\n"
"cu_k); k/v/dk/dv: (b, sk, hk, d). Statistics: lse (b, h, sq) or rowmax and rowsum (same shape;\n"
"varlen (1, h, total_q)) in float32 (float64 for float64 inputs). dpse: zero-filled accumulator\n"
"(b, h, sq or 1, sk). Writes dq, dk, dv (and adds into dpse) in place. Internal: use the\n"
"functions of flash_attn_c instead.");

/* A 3-D statistics array (lse, rowmax, rowsum) of shape (n0, h, n2) in the accumulator dtype. */
static int bwd_stat(PyArrayObject *a, const char *name, int64_t n0, int64_t h, int64_t n2,
                    fa_dtype t, int64_t *st)
{
    npy_intp *ls = PyArray_DIMS(a);
    if (ls[0] != n0 || ls[1] != h || ls[2] != n2) {
        PyErr_Format(PyExc_ValueError, "%s: expected shape (%lld, %lld, %lld), got (%zd, %zd, %zd)",
                     name, (long long)n0, (long long)h, (long long)n2, ls[0], ls[1], ls[2]);
        return -1;
    }
    if (PyArray_TYPE(a) != (t == FA_F64 ? NPY_FLOAT64 : NPY_FLOAT32)) {
        PyErr_Format(PyExc_TypeError, "%s: expected float32 (float64 for float64 inputs)", name);
        return -1;
    }
    return elem_strides(a, name, 0, st);
}

static PyObject *py_bwd(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *kwlist[] = {"dout", "q", "k", "v", "out", "dq", "dk", "dv", "scale", "lse",
                             "rowmax", "rowsum", "softcap", "left", "right", "anchor_br", "alibi",
                             "cu_q", "cu_k", "dropout_p", "seed", "offset", "pse", "mask",
                             "mask_fill", "invalid_line_zero", "sink", "prefix", "dpse", NULL};
    PyObject *ob[8];
    double scale, softcap = 0.0, dropout_p = 0.0, mask_fill = -INFINITY;
    PyObject *olse = Py_None, *ormax = Py_None, *orsum = Py_None, *oleft = Py_None,
             *oright = Py_None, *oalibi = Py_None, *ocuq = Py_None, *ocuk = Py_None,
             *opse = Py_None, *omask = Py_None, *osink = Py_None, *oprefix = Py_None,
             *odpse = Py_None;
    int anchor_br = 1, invalid_line_zero = 0;
    unsigned long long seed = 0, offset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOOOd|OOOdOOpOOOdKKOOdpOOO", kwlist, &ob[0],
                                     &ob[1], &ob[2], &ob[3], &ob[4], &ob[5], &ob[6], &ob[7], &scale,
                                     &olse, &ormax, &orsum, &softcap, &oleft, &oright, &anchor_br,
                                     &oalibi, &ocuq, &ocuk, &dropout_p, &seed, &offset, &opse,
                                     &omask, &mask_fill, &invalid_line_zero, &osink, &oprefix,
                                     &odpse))
        return NULL;

    /* dout, q, k, v, out, dq, dk, dv: rank 4, one float dtype, last dim contiguous. */
    static const char *names[8] = {"dout", "q", "k", "v", "out", "dq", "dk", "dv"};
    PyArrayObject *a[8];
    int64_t st[8][4];
    int err;
    for (int i = 0; i < 8; i++) {
        a[i] = as_array(ob[i], names[i], 4, 0, &err);
        if (err)
            return NULL;
    }
    fa_bwd_params p;
    memset(&p, 0, sizeof p);
    fa_fwd_params *f = &p.f;
    fa_dtype t;
    if (dtype_of(a[1], &t) < 0) {
        PyErr_SetString(PyExc_TypeError, "q: expected dtype float32, float16, bfloat16 or float64");
        return NULL;
    }
    for (int i = 0; i < 8; i++) {
        fa_dtype u;
        if (dtype_of(a[i], &u) < 0 || u != t) {
            PyErr_Format(PyExc_TypeError, "%s: expected dtype %s (the dtype of q)", names[i],
                         dtype_name(t));
            return NULL;
        }
        if (elem_strides(a[i], names[i], 1, st[i]) < 0)
            return NULL;
        if (i >= 5 && writable(a[i], names[i]) < 0)
            return NULL;
    }
    npy_intp *qs = PyArray_DIMS(a[1]), *ks = PyArray_DIMS(a[2]);
    for (int i = 0; i < 8; i++) {
        npy_intp *want = (i == 2 || i == 3 || i == 6 || i == 7) ? ks : qs;
        if (memcmp(PyArray_DIMS(a[i]), want, 4 * sizeof(npy_intp)) != 0) {
            PyErr_Format(PyExc_ValueError, "%s: must have the shape of %s", names[i],
                         want == ks ? "k" : "q");
            return NULL;
        }
    }
    f->dtype = t;
    f->d = qs[3];
    f->h = qs[2];
    f->hk = ks[2];
    if (ks[3] != f->d) {
        PyErr_Format(PyExc_ValueError, "k: head dim %zd differs from q's %lld", ks[3], (long long)f->d);
        return NULL;
    }
    if (f->d < 1 || f->d > 512) {
        PyErr_Format(PyExc_ValueError, "q: head dim must be in [1, 512], got %lld", (long long)f->d);
        return NULL;
    }
    if (f->hk < 1 || f->h % f->hk != 0) {
        PyErr_Format(PyExc_ValueError, "k: %lld kv heads must divide the %lld query heads",
                     (long long)f->hk, (long long)f->h);
        return NULL;
    }
    p.dout = (fa_view){PyArray_DATA(a[0]), st[0][0], st[0][1], st[0][2]};
    f->q = (fa_view){PyArray_DATA(a[1]), st[1][0], st[1][1], st[1][2]};
    f->k = (fa_view){PyArray_DATA(a[2]), st[2][0], st[2][1], st[2][2]};
    f->v = (fa_view){PyArray_DATA(a[3]), st[3][0], st[3][1], st[3][2]};
    p.out = (fa_view){PyArray_DATA(a[4]), st[4][0], st[4][1], st[4][2]};
    p.dq = PyArray_DATA(a[5]), p.dq_sb = st[5][0], p.dq_sr = st[5][1], p.dq_sh = st[5][2];
    p.dk = PyArray_DATA(a[6]), p.dk_sb = st[6][0], p.dk_sr = st[6][1], p.dk_sh = st[6][2];
    p.dv = PyArray_DATA(a[7]), p.dv_sb = st[7][0], p.dv_sr = st[7][1], p.dv_sh = st[7][2];
    f->scale = scale;
    f->softcap = softcap;
    f->anchor_br = anchor_br;
    f->mask_fill = mask_fill;
    f->invalid_line_zero = invalid_line_zero;
    if (!(dropout_p >= 0.0 && dropout_p < 1.0)) {
        PyErr_Format(PyExc_ValueError, "dropout_p: must be in [0, 1), got %g", dropout_p);
        return NULL;
    }
    f->dropout_p = dropout_p;
    f->seed = seed;
    f->offset = offset;
    f->left = oleft == Py_None ? FA_UNBOUNDED : PyLong_AsLongLong(oleft);
    f->right = oright == Py_None ? FA_UNBOUNDED : PyLong_AsLongLong(oright);
    if (PyErr_Occurred())
        return NULL;

    /* Batch geometry: fixed length, or varlen with both cu_seqlens (no paged or indexed caches). */
    int varlen = ocuq != Py_None;
    if (varlen) {
        PyArrayObject *cq = as_array(ocuq, "cu_seqlens_q", 1, 0, &err);
        if (err)
            return NULL;
        f->b = PyArray_DIM(cq, 0) - 1;
        if (f->b < 0 || qs[0] != 1 || ks[0] != 1) {
            PyErr_SetString(PyExc_ValueError, "cu_seqlens_q: needs at least one entry and q, k of batch 1");
            return NULL;
        }
        if (index_array(ocuq, "cu_seqlens_q", f->b + 1, &f->cu_q) < 0 ||
            check_cu(f->cu_q, "cu_seqlens_q", f->b, qs[1]) < 0)
            return NULL;
        if (ocuk == Py_None) {
            PyErr_SetString(PyExc_ValueError, "cu_seqlens_k: required with cu_seqlens_q");
            return NULL;
        }
        if (index_array(ocuk, "cu_seqlens_k", f->b + 1, &f->cu_k) < 0 ||
            check_cu(f->cu_k, "cu_seqlens_k", f->b, ks[1]) < 0)
            return NULL;
        f->sq = f->sk = 0;
        for (int64_t i = 0; i < f->b; i++) {
            if (f->cu_q[i + 1] - f->cu_q[i] > f->sq)
                f->sq = f->cu_q[i + 1] - f->cu_q[i];
            if (f->cu_k[i + 1] - f->cu_k[i] > f->sk)
                f->sk = f->cu_k[i + 1] - f->cu_k[i];
        }
    } else {
        if (ocuk != Py_None) {
            PyErr_SetString(PyExc_ValueError, "cu_seqlens_k: given without cu_seqlens_q");
            return NULL;
        }
        if (ks[0] != qs[0]) {
            PyErr_Format(PyExc_ValueError, "k: batch %zd differs from q's %zd", ks[0], qs[0]);
            return NULL;
        }
        f->b = qs[0];
        f->sq = qs[1];
        f->sk = ks[1];
    }
    if (index_array(oprefix, "prefix", f->b, &f->prefix) < 0)
        return NULL;

    /* Softmax statistics: lse, or the NPU's rowmax and rowsum. */
    int64_t s0 = varlen ? 1 : f->b, s2 = varlen ? qs[1] : f->sq, sst[3];
    PyArrayObject *lse = as_array(olse, "lse", 3, 1, &err);
    if (err)
        return NULL;
    PyArrayObject *rmax = as_array(ormax, "rowmax", 3, 1, &err);
    if (err)
        return NULL;
    PyArrayObject *rsum = as_array(orsum, "rowsum", 3, 1, &err);
    if (err)
        return NULL;
    if ((lse != NULL) == (rmax != NULL || rsum != NULL) || (rmax == NULL) != (rsum == NULL)) {
        PyErr_SetString(PyExc_ValueError, "softmax statistics: give lse, or both rowmax and rowsum");
        return NULL;
    }
    if (lse) {
        if (bwd_stat(lse, "lse", s0, f->h, s2, t, sst) < 0)
            return NULL;
        p.lse = PyArray_DATA(lse);
        p.lse_sb = sst[0], p.lse_sh = sst[1], p.lse_sr = sst[2];
    } else {
        int64_t sst2[3];
        if (bwd_stat(rmax, "rowmax", s0, f->h, s2, t, sst) < 0 ||
            bwd_stat(rsum, "rowsum", s0, f->h, s2, t, sst2) < 0)
            return NULL;
        if (memcmp(sst, sst2, sizeof sst) != 0) {
            PyErr_SetString(PyExc_ValueError, "rowmax and rowsum: must have the same strides");
            return NULL;
        }
        p.rowmax = PyArray_DATA(rmax);
        p.rowsum = PyArray_DATA(rsum);
        p.stat_sb = sst[0], p.stat_sh = sst[1], p.stat_sr = sst[2];
    }

    PyArrayObject *al = as_array(oalibi, "alibi_slopes", 2, 1, &err);
    if (err)
        return NULL;
    if (al) {
        int64_t ast[2];
        if (check_dtype(al, "alibi_slopes", NPY_FLOAT32) < 0 ||
            elem_strides(al, "alibi_slopes", 1, ast) < 0)
            return NULL;
        if (PyArray_DIM(al, 0) != f->b || PyArray_DIM(al, 1) != f->h) {
            PyErr_Format(PyExc_ValueError, "alibi_slopes: expected (broadcast) shape (%lld, %lld)",
                         (long long)f->b, (long long)f->h);
            return NULL;
        }
        f->alibi = (const float *)PyArray_DATA(al);
        f->alibi_sb = ast[0];
    }
    PyArrayObject *sk_arr = as_array(osink, "sink", 1, 1, &err);
    if (err)
        return NULL;
    if (sk_arr) {
        if (check_dtype(sk_arr, "sink", NPY_FLOAT32) < 0)
            return NULL;
        if (!PyArray_IS_C_CONTIGUOUS(sk_arr) || PyArray_DIM(sk_arr, 0) != f->h) {
            PyErr_Format(PyExc_ValueError, "sink: expected a contiguous array of length %lld",
                         (long long)f->h);
            return NULL;
        }
        f->sink = (const float *)PyArray_DATA(sk_arr);
    }

    int64_t st4[4];
    PyArrayObject *pse_arr, *mask_arr, *dpse_arr;
    int64_t qb = varlen ? 1 : f->b;
    if (aux4(opse, "pse", qb, f->h, f->sq, f->sk, &pse_arr, st4) < 0)
        return NULL;
    if (pse_arr) {
        if (dtype_of(pse_arr, &f->pse_dtype) < 0) {
            PyErr_SetString(PyExc_TypeError, "pse: expected a floating dtype");
            return NULL;
        }
        f->pse = PyArray_DATA(pse_arr);
        f->pse_sb = st4[0], f->pse_sh = st4[1], f->pse_sr = st4[2], f->pse_sc = st4[3];
    }
    if (aux4(omask, "atten_mask", qb, f->h, f->sq, f->sk, &mask_arr, st4) < 0)
        return NULL;
    if (mask_arr) {
        if (PyArray_TYPE(mask_arr) != NPY_UINT8 && PyArray_TYPE(mask_arr) != NPY_BOOL) {
            PyErr_SetString(PyExc_TypeError, "atten_mask: expected dtype bool or uint8");
            return NULL;
        }
        f->mask = (const uint8_t *)PyArray_DATA(mask_arr);
        f->mask_sb = st4[0], f->mask_sh = st4[1], f->mask_sr = st4[2], f->mask_sc = st4[3];
    }
    /* dpse: one row (summed over rows) or a row per query row; a batch per sequence. */
    dpse_arr = as_array(odpse, "dpse", 4, 1, &err);
    if (err)
        return NULL;
    if (dpse_arr) {
        npy_intp *ds = PyArray_DIMS(dpse_arr);
        int rows_ok = ds[2] == 1 || ds[2] >= f->sq;
        if (ds[0] != f->b || ds[1] != f->h || !rows_ok || ds[3] < f->sk) {
            PyErr_Format(PyExc_ValueError, "dpse: expected shape (%lld, %lld, 1 or >=%lld, >=%lld)",
                         (long long)f->b, (long long)f->h, (long long)f->sq, (long long)f->sk);
            return NULL;
        }
        if (PyArray_TYPE(dpse_arr) != (t == FA_F64 ? NPY_FLOAT64 : NPY_FLOAT32)) {
            PyErr_SetString(PyExc_TypeError, "dpse: expected float32 (float64 for float64 inputs)");
            return NULL;
        }
        if (writable(dpse_arr, "dpse") < 0 || elem_strides(dpse_arr, "dpse", 0, st4) < 0)
            return NULL;
        p.dpse = PyArray_DATA(dpse_arr);
        p.dpse_sb = st4[0], p.dpse_sh = st4[1], p.dpse_sc = st4[3];
        p.dpse_sr = ds[2] == 1 ? 0 : st4[2]; /* a single row receives the sum over rows */
    }

    fa_status status;
    Py_BEGIN_ALLOW_THREADS
    status = fa_bwd(&p);
    Py_END_ALLOW_THREADS
    if (status_to_error(status) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* ---- runtime ---------------------------------------------------------------------------------- */

static PyObject *isa_list(unsigned mask)
{
    PyObject *l = PyList_New(0);
    if (!l)
        return NULL;
    for (int i = 0; i < FA_ISA_COUNT; i++) {
        if (mask >> i & 1) {
            PyObject *s = PyUnicode_FromString(fa_isa_name((fa_isa)i));
            if (!s || PyList_Append(l, s) < 0) {
                Py_XDECREF(s);
                Py_DECREF(l);
                return NULL;
            }
            Py_DECREF(s);
        }
    }
    return l;
}

static PyObject *py_isa_state(PyObject *self, PyObject *unused)
{
    (void)self, (void)unused;
    PyObject *sup = isa_list(fa_isa_supported()), *comp = isa_list(fa_isa_compiled());
    PyObject *r = NULL;
    if (sup && comp)
        r = Py_BuildValue("{s:s,s:O,s:O,s:i}", "isa", fa_isa_name(fa_isa_selected()), "supported",
                          sup, "compiled", comp, "num_threads", fa_get_num_threads());
    Py_XDECREF(sup);
    Py_XDECREF(comp);
    return r;
}

static PyObject *py_select_isa(PyObject *self, PyObject *arg)
{
    (void)self;
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name)
        return NULL;
    for (int i = 0; i < FA_ISA_COUNT; i++) {
        if (strcmp(name, fa_isa_name((fa_isa)i)) == 0) {
            if (fa_isa_select((fa_isa)i) < 0) {
                PyErr_Format(PyExc_ValueError,
                             "FLASH_ATTN_C_ISA=%s: not available here (supported by this CPU and "
                             "built: see cpu_info())",
                             name);
                return NULL;
            }
            Py_RETURN_NONE;
        }
    }
    PyErr_Format(PyExc_ValueError, "FLASH_ATTN_C_ISA: unknown kernel family '%s' (expected scalar, avx2, avx512 or amx)", name);
    return NULL;
}

static PyObject *py_best_isa(PyObject *self, PyObject *unused)
{
    (void)self, (void)unused;
    unsigned m = fa_isa_supported() & fa_isa_compiled();
    int best = 0;
    for (int i = 0; i < FA_ISA_COUNT; i++)
        if (m >> i & 1)
            best = i;
    return PyUnicode_FromString(fa_isa_name((fa_isa)best));
}

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg)
{
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 1 || n > 4096) {
        PyErr_Format(PyExc_ValueError, "num_threads: expected an integer in [1, 4096], got %ld", n);
        return NULL;
    }
    fa_set_num_threads((int)n);
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *unused)
{
    (void)self, (void)unused;
    return PyLong_FromLong(fa_get_num_threads());
}

static PyObject *py_register_bf16(PyObject *self, PyObject *arg)
{
    (void)self;
    PyArray_Descr *d = NULL;
    if (!PyArray_DescrConverter(arg, &d))
        return NULL;
    Py_XSETREF(bf16_descr, d);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fwd", (PyCFunction)(void (*)(void))py_fwd, METH_VARARGS | METH_KEYWORDS, fwd_doc},
    {"rotary", py_rotary, METH_VARARGS, rotary_doc},
    {"combine", py_combine, METH_VARARGS, combine_doc},
    {"bwd", (PyCFunction)(void (*)(void))py_bwd, METH_VARARGS | METH_KEYWORDS, bwd_doc},
    {"isa_state", py_isa_state, METH_NOARGS, "Selected, supported and compiled ISAs."},
    {"select_isa", py_select_isa, METH_O, "Select the kernel family by name."},
    {"best_isa", py_best_isa, METH_NOARGS, "The fastest family this CPU supports and the build has."},
    {"set_num_threads", py_set_num_threads, METH_O, "Threads used by the kernels."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "Threads used by the kernels."},
    {"register_bfloat16", py_register_bf16, METH_O, "Tell the binding which dtype is bfloat16."},
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *m)
{
    (void)m;
    import_array1(-1);
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_C", "flash_attn_c C kernels (internal).", 0, methods, slots,
    NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModuleDef_Init(&moduledef); }
