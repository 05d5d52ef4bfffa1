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
#include <stdio.h>
#include <string.h>

#include "../fa_aux.h"
#include "../fa_kernels.h"
#include "../fa_params.h"
#include "../fa_bwd_params.h"
#include "../fa_workspace.h"

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

/* ---- options shared by fwd and bwd ------------------------------------------------------------ */

/* The keywords fwd and bwd both take, parsed straight into one struct so that each of their
 * checks below exists once. Objects start as None and scalars at the Python API's defaults. */
typedef struct {
    double scale, softcap, dropout_p, mask_fill;
    int anchor_br, invalid_line_zero;
    unsigned long long seed, offset;
    PyObject *left, *right, *alibi, *cu_q, *cu_k, *pse, *mask, *sink, *prefix;
} attn_args;

static void attn_args_init(attn_args *c)
{
    memset(c, 0, sizeof *c);
    c->mask_fill = -INFINITY;
    c->anchor_br = 1;
    c->left = c->right = c->alibi = c->cu_q = c->cu_k = Py_None;
    c->pse = c->mask = c->sink = c->prefix = Py_None;
}

/* One rank-4 tensor argument of fwd or bwd: its name, whether its shape is k's (else q's), and
 * whether the kernel writes it. */
typedef struct {
    const char *name;
    int like_k, output;
} tensor_spec;

/* The n rank-4 tensors of a call, q, k and v at positions qi, qi + 1 and qi + 2: all of q's float
 * dtype, element strides with the last dim contiguous, outputs writable, each of q's or k's
 * shape, and a head geometry the kernels support. Fills p's dtype, sizes and q/k/v views; a[i]
 * and st[i] receive tensor i and its element strides for the caller's own views. */
static int attn_tensors(PyObject *const *ob, const tensor_spec *spec, int n, int qi,
                        fa_fwd_params *p, PyArrayObject **a, int64_t (*st)[4])
{
    int err;
    for (int i = 0; i < n; i++) {
        a[i] = as_array(ob[i], spec[i].name, 4, 0, &err);
        if (err)
            return -1;
    }
    fa_dtype t;
    if (dtype_of(a[qi], &t) < 0) {
        PyErr_SetString(PyExc_TypeError, "q: expected dtype float32, float16, bfloat16 or float64");
        return -1;
    }
    for (int i = 0; i < n; i++) {
        fa_dtype u;
        if (dtype_of(a[i], &u) < 0 || u != t) {
            PyErr_Format(PyExc_TypeError, "%s: expected dtype %s (the dtype of q)", spec[i].name,
                         dtype_name(t));
            return -1;
        }
    }
    for (int i = 0; i < n; i++)
        if (spec[i].output && writable(a[i], spec[i].name) < 0)
            return -1;
    for (int i = 0; i < n; i++)
        if (elem_strides(a[i], spec[i].name, 1, st[i]) < 0)
            return -1;
    npy_intp *qs = PyArray_DIMS(a[qi]), *ks = PyArray_DIMS(a[qi + 1]);
    for (int i = 0; i < n; i++) {
        /* Equal shapes are what lets the kernels address every tensor with q's or k's sizes. */
        if (memcmp(PyArray_DIMS(a[i]), spec[i].like_k ? ks : qs, 4 * sizeof(npy_intp)) != 0) {
            PyErr_Format(PyExc_ValueError, "%s: must have the shape of %s", spec[i].name,
                         spec[i].like_k ? "k" : "q");
            return -1;
        }
    }
    p->dtype = t;
    p->d = qs[3];
    p->h = qs[2];
    p->hk = ks[2];
    if (ks[3] != p->d) {
        PyErr_Format(PyExc_ValueError, "k: head dim %zd differs from q's %lld", ks[3], (long long)p->d);
        return -1;
    }
    if (p->d < 1 || p->d > 512) {
        PyErr_Format(PyExc_ValueError, "q: head dim must be in [1, 512], got %lld", (long long)p->d);
        return -1;
    }
    if (p->hk < 1 || p->h % p->hk != 0) {
        PyErr_Format(PyExc_ValueError, "k: %lld kv heads must divide the %lld query heads",
                     (long long)p->hk, (long long)p->h);
        return -1;
    }
    p->q = (fa_view){PyArray_DATA(a[qi]), st[qi][0], st[qi][1], st[qi][2]};
    p->k = (fa_view){PyArray_DATA(a[qi + 1]), st[qi + 1][0], st[qi + 1][1], st[qi + 1][2]};
    p->v = (fa_view){PyArray_DATA(a[qi + 2]), st[qi + 2][0], st[qi + 2][1], st[qi + 2][2]};
    return 0;
}

/* The scalar options: score definition, band and dropout. */
static int attn_scalars(const attn_args *c, fa_fwd_params *p)
{
    p->scale = c->scale;
    p->softcap = c->softcap;
    p->anchor_br = c->anchor_br;
    p->mask_fill = c->mask_fill;
    p->invalid_line_zero = c->invalid_line_zero;
    /* Written as a negation so that NaN is rejected too. */
    if (!(c->dropout_p >= 0.0 && c->dropout_p < 1.0)) {
        /* PyErr_Format has no float conversion: format the received value here. */
        char got[32];
        snprintf(got, sizeof got, "%g", c->dropout_p);
        PyErr_Format(PyExc_ValueError, "dropout_p: must be in [0, 1), got %s", got);
        return -1;
    }
    p->dropout_p = c->dropout_p;
    p->seed = c->seed;
    p->offset = c->offset;
    p->left = c->left == Py_None ? FA_UNBOUNDED : PyLong_AsLongLong(c->left);
    p->right = c->right == Py_None ? FA_UNBOUNDED : PyLong_AsLongLong(c->right);
    if (PyErr_Occurred())
        return -1;
    /* Saturate band offsets at +-2^62: beyond any real sequence length, so the band is unchanged,
     * while the kernels' i + diag - left arithmetic can no longer overflow. */
    const int64_t lim = (int64_t)1 << 62;
    if (p->left != FA_UNBOUNDED)
        p->left = p->left > lim ? lim : p->left < -lim ? -lim : p->left;
    if (p->right != FA_UNBOUNDED)
        p->right = p->right > lim ? lim : p->right < -lim ? -lim : p->right;
    return 0;
}

/* Batch geometry: p's b, sq, sk and the index arrays (cu_seqlens, seqlen_k, k_start, k_batch_idx,
 * block_table, prefix), each checked so that every logical key of every sequence maps inside k/v
 * (qs, ks: q's and k's dims). bwd passes None for the kvcache-only arrays and sets k_exact: it
 * writes dk/dv over all of k's rows, so its k must be q's batch (1 when packed), where the
 * forward only reads the batches its sequences use. */
static int attn_geometry(fa_fwd_params *p, const attn_args *c, PyObject *oseqk, PyObject *okstart,
                         PyObject *okbidx, PyObject *obt, const npy_intp *qs, const npy_intp *ks,
                         int k_exact)
{
    int err;
    int varlen = c->cu_q != Py_None;
    if (varlen) {
        PyArrayObject *cq = as_array(c->cu_q, "cu_seqlens_q", 1, 0, &err);
        if (err)
            return -1;
        p->b = PyArray_DIM(cq, 0) - 1;
        if (p->b < 0 || qs[0] != 1 || (k_exact && ks[0] != 1)) {
            PyErr_SetString(PyExc_ValueError,
                            k_exact ? "cu_seqlens_q: needs at least one entry and q, k of batch 1"
                                    : "cu_seqlens_q: needs at least one entry and q of batch 1");
            return -1;
        }
        if (index_array(c->cu_q, "cu_seqlens_q", p->b + 1, &p->cu_q) < 0 ||
            check_cu(p->cu_q, "cu_seqlens_q", p->b, qs[1]) < 0)
            return -1;
        p->sq = 0;
        for (int64_t i = 0; i < p->b; i++)
            if (p->cu_q[i + 1] - p->cu_q[i] > p->sq)
                p->sq = p->cu_q[i + 1] - p->cu_q[i];
    } else {
        p->b = qs[0];
        p->sq = qs[1];
    }
    if (index_array(c->cu_k, "cu_seqlens_k", p->b + 1, &p->cu_k) < 0)
        return -1;
    if (p->cu_k && !varlen) {
        PyErr_SetString(PyExc_ValueError, "cu_seqlens_k: given without cu_seqlens_q");
        return -1;
    }
    if (varlen && !p->cu_k && obt == Py_None && oseqk == Py_None) {
        PyErr_SetString(PyExc_ValueError, "cu_seqlens_k: required with cu_seqlens_q");
        return -1;
    }
    if (index_array(oseqk, "seqlen_k", p->b, &p->seqlen_k) < 0 ||
        index_array(okstart, "k_start", p->b, &p->k_start) < 0 ||
        index_array(okbidx, "k_batch_idx", p->b, &p->k_batch_idx) < 0 ||
        index_array(c->prefix, "prefix", p->b, &p->prefix) < 0)
        return -1;

    PyArrayObject *bt = as_array(obt, "block_table", 2, 1, &err);
    if (err)
        return -1;
    if (bt) {
        if (check_dtype(bt, "block_table", NPY_INT64) < 0)
            return -1;
        if (!PyArray_IS_C_CONTIGUOUS(bt) || PyArray_DIM(bt, 0) != p->b) {
            PyErr_Format(PyExc_ValueError, "block_table: expected a contiguous (%lld, max_blocks) array",
                         (long long)p->b);
            return -1;
        }
        if (p->cu_k || p->k_batch_idx) {
            PyErr_SetString(PyExc_ValueError, "block_table: cannot be combined with cu_seqlens_k or cache_batch_idx");
            return -1;
        }
        p->block_table = (const int64_t *)PyArray_DATA(bt);
        p->bt_stride = PyArray_DIM(bt, 1);
        p->page = ks[1];
        int64_t nblk = ks[0];
        for (int64_t i = 0; i < p->b * p->bt_stride; i++) {
            if (p->block_table[i] < 0 || p->block_table[i] >= nblk) {
                PyErr_Format(PyExc_ValueError, "block_table: entry %lld out of range [0, %lld)",
                             (long long)p->block_table[i], (long long)nblk);
                return -1;
            }
        }
        /* k may be a zero-stride view with a huge page: keep the key capacity an int64. */
        if (p->page > 0 && p->bt_stride > INT64_MAX / p->page) {
            PyErr_Format(PyExc_ValueError, "block_table: %lld blocks of %lld keys overflow int64",
                         (long long)p->bt_stride, (long long)p->page);
            return -1;
        }
        p->sk = p->bt_stride * p->page;
    } else {
        p->sk = p->cu_k ? 0 : ks[1];
    }
    int64_t kcap_rows = bt ? p->bt_stride * p->page : ks[1];
    if (p->cu_k && check_cu(p->cu_k, "cu_seqlens_k", p->b, ks[1]) < 0)
        return -1;
    /* Batch i reads k's batch i here; with no sequence (b = 0) the forward reads none. */
    if (!varlen && !bt && !p->k_batch_idx && ks[0] != qs[0] && (k_exact || p->b > 0)) {
        PyErr_Format(PyExc_ValueError, "k: batch %zd differs from q's %zd", ks[0], qs[0]);
        return -1;
    }
    int64_t max_sk = 0;
    for (int64_t i = 0; i < p->b; i++) {
        if (p->k_batch_idx && (p->k_batch_idx[i] < 0 || p->k_batch_idx[i] >= ks[0])) {
            PyErr_Format(PyExc_ValueError, "cache_batch_idx: entry %lld out of range [0, %zd)",
                         (long long)p->k_batch_idx[i], ks[0]);
            return -1;
        }
        if (p->seqlen_k && p->seqlen_k[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "seqlen_k: entries must be >= 0");
            return -1;
        }
        if (p->k_start && p->k_start[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "k_start: entries must be >= 0");
            return -1;
        }
        /* Sequence i uses physical key rows [row0 + k_start, row0 + k_start + sk), as fa_seq_of
         * computes them. k_start and seqlen_k come unchecked from the caller: their sum is formed
         * in unsigned arithmetic, where two int64 values >= 0 cannot wrap, so a huge entry cannot
         * overflow past the check (fa_seq_of's signed sum would). row0 <= limit always. */
        int64_t row0 = p->cu_k ? p->cu_k[i] : 0;
        int64_t sk = p->seqlen_k ? p->seqlen_k[i] : p->cu_k ? p->cu_k[i + 1] - row0 : p->sk;
        uint64_t need = (uint64_t)(p->k_start ? p->k_start[i] : 0) + (uint64_t)sk;
        int64_t limit = p->cu_k ? p->cu_k[i + 1] : kcap_rows;
        if (p->cu_k && p->seqlen_k)
            limit = ks[1];
        if (need > (uint64_t)(limit - row0)) {
            uint64_t end = need > UINT64_MAX - (uint64_t)row0 ? UINT64_MAX : (uint64_t)row0 + need;
            PyErr_Format(PyExc_ValueError,
                         "k: sequence %lld needs key rows up to %llu but only %lld exist", (long long)i,
                         (unsigned long long)end, (long long)limit);
            return -1;
        }
        if (sk > max_sk)
            max_sk = sk;
    }
    if (p->cu_k || p->seqlen_k || bt)
        p->sk = max_sk;
    return 0;
}

/* A 3-D statistics array (lse, rowmax, rowsum) of shape (n0, h, n2) in the accumulator dtype,
 * writable when the kernel writes it. */
static int stat_array(PyArrayObject *a, const char *name, int64_t n0, int64_t h, int64_t n2,
                      fa_dtype t, int output, int64_t *st)
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
    if (output && writable(a, name) < 0)
        return -1;
    return elem_strides(a, name, 0, st);
}

/* Softmax statistics as the kernels address them: lse and/or the NPU's rowmax with rowsum. */
typedef struct {
    void *lse, *rowmax, *rowsum;
    int64_t lse_st[3], stat_st[3];
} attn_stats;

/* The forward writes either form or both, each optional (output set); the backward reads exactly
 * one. Shape (b, h, sq), or (1, h, total_q) when packed (rows = q's dim 1). */
static int attn_statistics(PyObject *olse, PyObject *ormax, PyObject *orsum, const fa_fwd_params *p,
                           int64_t rows, int output, attn_stats *s)
{
    int err;
    memset(s, 0, sizeof *s);
    PyArrayObject *lse = as_array(olse, "lse", 3, 1, &err);
    if (err)
        return -1;
    PyArrayObject *rmax = as_array(ormax, "rowmax", 3, 1, &err);
    if (err)
        return -1;
    PyArrayObject *rsum = as_array(orsum, "rowsum", 3, 1, &err);
    if (err)
        return -1;
    if ((rmax == NULL) != (rsum == NULL)) {
        PyErr_SetString(PyExc_ValueError, output ? "rowmax and rowsum: give both or neither"
                                                 : "softmax statistics: give lse, or both rowmax and rowsum");
        return -1;
    }
    if (!output && (lse != NULL) == (rmax != NULL)) {
        PyErr_SetString(PyExc_ValueError, "softmax statistics: give lse, or both rowmax and rowsum");
        return -1;
    }
    int64_t n0 = p->cu_q ? 1 : p->b, n2 = p->cu_q ? rows : p->sq;
    if (lse) {
        if (stat_array(lse, "lse", n0, p->h, n2, p->dtype, output, s->lse_st) < 0)
            return -1;
        s->lse = PyArray_DATA(lse);
    }
    if (rmax) {
        int64_t st2[3];
        if (stat_array(rmax, "rowmax", n0, p->h, n2, p->dtype, output, s->stat_st) < 0 ||
            stat_array(rsum, "rowsum", n0, p->h, n2, p->dtype, output, st2) < 0)
            return -1;
        /* The kernels address both with one set of strides. */
        if (memcmp(s->stat_st, st2, sizeof st2) != 0) {
            PyErr_SetString(PyExc_ValueError, "rowmax and rowsum: must have the same strides");
            return -1;
        }
        s->rowmax = PyArray_DATA(rmax);
        s->rowsum = PyArray_DATA(rsum);
    }
    return 0;
}

/* Score terms: alibi slopes, sink logits, pse bias and explicit mask. pse and mask have one batch
 * when packed and must cover every (row, key) of the longest sequence. */
static int attn_score_terms(fa_fwd_params *p, const attn_args *c)
{
    int err;
    PyArrayObject *al = as_array(c->alibi, "alibi_slopes", 2, 1, &err);
    if (err)
        return -1;
    if (al) {
        int64_t st[2];
        if (check_dtype(al, "alibi_slopes", NPY_FLOAT32) < 0 ||
            elem_strides(al, "alibi_slopes", 1, st) < 0)
            return -1;
        if (PyArray_DIM(al, 0) != p->b || PyArray_DIM(al, 1) != p->h) {
            PyErr_Format(PyExc_ValueError, "alibi_slopes: expected (broadcast) shape (%lld, %lld)",
                         (long long)p->b, (long long)p->h);
            return -1;
        }
        p->alibi = (const float *)PyArray_DATA(al);
        p->alibi_sb = st[0];
    }
    PyArrayObject *sk_arr = as_array(c->sink, "sink", 1, 1, &err);
    if (err)
        return -1;
    if (sk_arr) {
        if (check_dtype(sk_arr, "sink", NPY_FLOAT32) < 0)
            return -1;
        if (!PyArray_IS_C_CONTIGUOUS(sk_arr) || PyArray_DIM(sk_arr, 0) != p->h) {
            PyErr_Format(PyExc_ValueError, "sink: expected a contiguous array of length %lld",
                         (long long)p->h);
            return -1;
        }
        p->sink = (const float *)PyArray_DATA(sk_arr);
    }

    int64_t st4[4];
    PyArrayObject *pse_arr, *mask_arr;
    int64_t qb = p->cu_q ? 1 : p->b;
    if (aux4(c->pse, "pse", qb, p->h, p->sq, p->sk, &pse_arr, st4) < 0)
        return -1;
    if (pse_arr) {
        if (dtype_of(pse_arr, &p->pse_dtype) < 0) {
            PyErr_SetString(PyExc_TypeError, "pse: expected a floating dtype");
            return -1;
        }
        p->pse = PyArray_DATA(pse_arr);
        p->pse_sb = st4[0], p->pse_sh = st4[1], p->pse_sr = st4[2], p->pse_sc = st4[3];
    }
    if (aux4(c->mask, "atten_mask", qb, p->h, p->sq, p->sk, &mask_arr, st4) < 0)
        return -1;
    if (mask_arr) {
        if (PyArray_TYPE(mask_arr) != NPY_UINT8 && PyArray_TYPE(mask_arr) != NPY_BOOL) {
            PyErr_SetString(PyExc_TypeError, "atten_mask: expected dtype bool or uint8");
            return -1;
        }
        p->mask = (const uint8_t *)PyArray_DATA(mask_arr);
        p->mask_sb = st4[0], p->mask_sh = st4[1], p->mask_sr = st4[2], p->mask_sc = st4[3];
    }
    return 0;
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
                             "rowmax", "rowsum", "prefix", "pse_after_scale", "num_splits", NULL};
    static const tensor_spec spec[4] = {{"q", 0, 0}, {"k", 1, 0}, {"v", 1, 0}, {"out", 0, 1}};
    PyObject *ob[4], *olse;
    attn_args c;
    attn_args_init(&c);
    int pse_after_scale = 0, num_splits = 0;
    PyObject *oseqk = Py_None, *okstart = Py_None, *okbidx = Py_None, *obt = Py_None,
             *osd = Py_None, *ormax = Py_None, *orsum = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOd|dOOpOOOOOOOdKKOOOdpOOOOpi", kwlist, &ob[0],
                                     &ob[1], &ob[2], &ob[3], &olse, &c.scale, &c.softcap, &c.left,
                                     &c.right, &c.anchor_br, &c.alibi, &c.cu_q, &c.cu_k, &oseqk,
                                     &okstart, &okbidx, &obt, &c.dropout_p, &c.seed, &c.offset,
                                     &osd, &c.pse, &c.mask, &c.mask_fill, &c.invalid_line_zero,
                                     &c.sink, &ormax, &orsum, &c.prefix, &pse_after_scale,
                                     &num_splits))
        return NULL;
    if (num_splits < 0 || num_splits > 128) {
        PyErr_Format(PyExc_ValueError, "num_splits: expected 0 (automatic) to 128, got %d", num_splits);
        return NULL;
    }

    fa_fwd_params p;
    memset(&p, 0, sizeof p);
    PyArrayObject *a[4];
    int64_t st[4][4];
    attn_stats stats;
    if (attn_tensors(ob, spec, 4, 0, &p, a, st) < 0 || attn_scalars(&c, &p) < 0 ||
        attn_geometry(&p, &c, oseqk, okstart, okbidx, obt, PyArray_DIMS(a[0]), PyArray_DIMS(a[1]),
                      0) < 0 ||
        attn_statistics(olse, ormax, orsum, &p, PyArray_DIM(a[0], 1), 1, &stats) < 0 ||
        attn_score_terms(&p, &c) < 0)
        return NULL;
    p.o = PyArray_DATA(a[3]);
    p.o_sb = st[3][0], p.o_sr = st[3][1], p.o_sh = st[3][2];
    p.pse_after_scale = pse_after_scale;
    p.num_splits = num_splits;
    p.lse = stats.lse;
    p.lse_sb = stats.lse_st[0], p.lse_sh = stats.lse_st[1], p.lse_sr = stats.lse_st[2];
    p.rowmax = stats.rowmax;
    p.rowsum = stats.rowsum;
    p.stat_sb = stats.stat_st[0], p.stat_sh = stats.stat_st[1], p.stat_sr = stats.stat_st[2];

    int64_t st4[4];
    PyArrayObject *sd_arr;
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

    fa_status status;
    Py_BEGIN_ALLOW_THREADS
    status = fa_fwd(&p);
    Py_END_ALLOW_THREADS
    if (status_to_error(status) < 0)
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
    fa_combine(t, t, n, po, (const int64_t(*)[3])so, pl, (const int64_t(*)[3])sl3, PyArray_DATA(out),
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


static PyObject *py_bwd(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *kwlist[] = {"dout", "q", "k", "v", "out", "dq", "dk", "dv", "scale", "lse",
                             "rowmax", "rowsum", "softcap", "left", "right", "anchor_br", "alibi",
                             "cu_q", "cu_k", "dropout_p", "seed", "offset", "pse", "mask",
                             "mask_fill", "invalid_line_zero", "sink", "prefix", "dpse", NULL};
    static const tensor_spec spec[8] = {{"dout", 0, 0}, {"q", 0, 0},  {"k", 1, 0},  {"v", 1, 0},
                                        {"out", 0, 0},  {"dq", 0, 1}, {"dk", 1, 1}, {"dv", 1, 1}};
    PyObject *ob[8];
    attn_args c;
    attn_args_init(&c);
    PyObject *olse = Py_None, *ormax = Py_None, *orsum = Py_None, *odpse = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOOOd|OOOdOOpOOOdKKOOdpOOO", kwlist, &ob[0],
                                     &ob[1], &ob[2], &ob[3], &ob[4], &ob[5], &ob[6], &ob[7],
                                     &c.scale, &olse, &ormax, &orsum, &c.softcap, &c.left,
                                     &c.right, &c.anchor_br, &c.alibi, &c.cu_q, &c.cu_k,
                                     &c.dropout_p, &c.seed, &c.offset, &c.pse, &c.mask,
                                     &c.mask_fill, &c.invalid_line_zero, &c.sink, &c.prefix,
                                     &odpse))
        return NULL;

    fa_bwd_params p;
    memset(&p, 0, sizeof p);
    fa_fwd_params *f = &p.f;
    PyArrayObject *a[8];
    int64_t st[8][4];
    attn_stats stats;
    /* No backward through a paged or indexed cache (fa_bwd_params.h): those arrays stay None. */
    if (attn_tensors(ob, spec, 8, 1, f, a, st) < 0 || attn_scalars(&c, f) < 0 ||
        attn_geometry(f, &c, Py_None, Py_None, Py_None, Py_None, PyArray_DIMS(a[1]),
                      PyArray_DIMS(a[2]), 1) < 0 ||
        attn_statistics(olse, ormax, orsum, f, PyArray_DIM(a[1], 1), 0, &stats) < 0 ||
        attn_score_terms(f, &c) < 0)
        return NULL;
    p.dout = (fa_view){PyArray_DATA(a[0]), st[0][0], st[0][1], st[0][2]};
    p.out = (fa_view){PyArray_DATA(a[4]), st[4][0], st[4][1], st[4][2]};
    p.dq = PyArray_DATA(a[5]), p.dq_sb = st[5][0], p.dq_sr = st[5][1], p.dq_sh = st[5][2];
    p.dk = PyArray_DATA(a[6]), p.dk_sb = st[6][0], p.dk_sr = st[6][1], p.dk_sh = st[6][2];
    p.dv = PyArray_DATA(a[7]), p.dv_sb = st[7][0], p.dv_sr = st[7][1], p.dv_sh = st[7][2];
    p.lse = stats.lse;
    p.lse_sb = stats.lse_st[0], p.lse_sh = stats.lse_st[1], p.lse_sr = stats.lse_st[2];
    p.rowmax = stats.rowmax;
    p.rowsum = stats.rowsum;
    p.stat_sb = stats.stat_st[0], p.stat_sh = stats.stat_st[1], p.stat_sr = stats.stat_st[2];

    /* dpse: one row (summed over rows) or a row per query row; a batch per sequence. */
    int err;
    int64_t st4[4];
    PyArrayObject *dpse_arr = as_array(odpse, "dpse", 4, 1, &err);
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
        if (PyArray_TYPE(dpse_arr) != (f->dtype == FA_F64 ? NPY_FLOAT64 : NPY_FLOAT32)) {
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

static PyObject *py_set_bwd_panel_budget(PyObject *self, PyObject *arg)
{
    (void)self;
    unsigned long long n = PyLong_AsUnsignedLongLong(arg);
    if (n == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromSize_t(fa_bwd_set_panel_budget((size_t)n));
}

static PyObject *py_bwd_panel_budget(PyObject *self, PyObject *unused)
{
    (void)self, (void)unused;
    return PyLong_FromSize_t(fa_bwd_panel_budget());
}

static PyObject *py_bwd_last_plan(PyObject *self, PyObject *unused)
{
    (void)self, (void)unused;
    int64_t panels, rows, bytes, chunks;
    fa_bwd_last_plan(&panels, &rows, &bytes, &chunks);
    return Py_BuildValue("{s:L,s:L,s:L,s:L}", "panels", (long long)panels, "panel_rows",
                         (long long)rows, "workspace_bytes", (long long)bytes, "chunks",
                         (long long)chunks);
}

static PyObject *py_bwd_set_procs(PyObject *self, PyObject *args)
{
    (void)self;
    long long n;
    if (!PyArg_ParseTuple(args, "L", &n))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "_bwd_set_procs: n must be >= 0 (0: the machine's count)");
        return NULL;
    }
    return PyLong_FromLongLong((long long)fa_bwd_set_procs((int64_t)n));
}

static PyObject *py_release_workspace(PyObject *self, PyObject *unused)
{
    (void)self, (void)unused;
    return PyLong_FromSize_t(fa_ws_release());
}

static PyObject *py_workspace_cached(PyObject *self, PyObject *unused)
{
    (void)self, (void)unused;
    return PyLong_FromSize_t(fa_ws_cached());
}

static PyObject *py_workspace_cycle(PyObject *self, PyObject *arg)
{
    (void)self;
    size_t n = PyLong_AsSize_t(arg), cap = 0;
    if (n == (size_t)-1 && PyErr_Occurred())
        return NULL;
    void *p = fa_ws_take(n, &cap);
    if (!p)
        return PyErr_NoMemory();
    fa_ws_give(p, cap);
    return PyLong_FromSize_t(cap);
}

static PyObject *py_poison_workspace(PyObject *self, PyObject *arg)
{
    (void)self;
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    fa_ws_set_poison(on);
    Py_RETURN_NONE;
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
    {"_set_bwd_panel_budget", py_set_bwd_panel_budget, METH_O,
     "Bytes of backward workspace before query panels; returns the old value (checked in Python)."},
    {"_bwd_panel_budget", py_bwd_panel_budget, METH_NOARGS,
     "Bytes of backward workspace before query panels."},
    {"_bwd_last_plan", py_bwd_last_plan, METH_NOARGS,
     "The last backward's query panels, positions per panel, workspace bytes and key-block chunks "
     "(testing)."},
    {"_bwd_set_procs", py_bwd_set_procs, METH_VARARGS,
     "Set the processor count the backward's chunk rule assumes (0: the machine's); returns the "
     "previous setting (testing and tuning)."},
    {"release_workspace", py_release_workspace, METH_NOARGS,
     "Free the workspace buffers kept between calls; returns the bytes freed."},
    {"workspace_cached", py_workspace_cached, METH_NOARGS, "Bytes of workspace kept between calls."},
    {"_workspace_cycle", py_workspace_cycle, METH_O,
     "Testing: take a workspace buffer of n bytes and give it back; returns its capacity."},
    {"_poison_workspace", py_poison_workspace, METH_O,
     "Testing: fill every workspace buffer with 0xff bytes when taken."},
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
