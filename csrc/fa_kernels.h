/* fa_kernels.h: the per-ISA kernel entry points and the dispatch table that selects among them.
 *
 * Naming follows "what__how": fa_fwd_f32__avx512 is the forward kernel with float32 accumulation
 * (for f32/f16/bf16 inputs) in the AVX-512 build; the f64 variants serve float64 inputs.
 */
#ifndef FA_KERNELS_H
#define FA_KERNELS_H

#include <stddef.h>
#include "fa_params.h"

/* Query rows per forward work item, shared by every build so the driver can split work. */
#define FA_FWD_BLOCK_ROWS 64
/* Query rows per work item of the AVX-512 float32 kernel: four 64-row sub-blocks share each K/V
 * block fetched, which quarters the K/V traffic per flop. */
#define FA_FWD_F32_AVX512_ROWS 256
/* Query rows per work item of the AVX2 float32 forward (fa_fwd__avx2.c): each K/V block brought
 * from L3 serves 256 rows (1.03-1.06x over 128, which was 1.04x over 64; NOTES.md). */
#define FA_FWD_F32_AVX2_ROWS 256
/* Query rows per work item of the decode kernel (fa_decode__avx512.c): calls whose sequences have
 * at most this many queries (decoding, GQA-folded decoding, short speculative steps). */
#define FA_DECODE_ROWS 16

/* Computes one work item: up to the kernel's block_rows query rows starting at q0 of (batch bi,
 * head h). packed is the kernel's own copy of this (batch, kv head)'s K and V made by `pack`, or
 * NULL (no pack function, or the driver chose not to pack): the kernel then reads K/V in place.
 * buf is scratch of scratch_bytes(p) bytes, 64-byte aligned. */
typedef fa_status (*fa_fwd_item_fn)(const fa_fwd_params *p, int64_t bi, int64_t h, int64_t q0,
                                    const void *packed, void *buf);
typedef size_t (*fa_scratch_fn)(const fa_fwd_params *p);
/* Optional K/V packing, once per (batch, kv head) and shared by every query block and every
 * query head of the GQA group: bytes for a sequence of sk keys, and the packing itself. */
typedef size_t (*fa_pack_bytes_fn)(const fa_fwd_params *p, int64_t sk);
typedef void (*fa_pack_fn)(const fa_fwd_params *p, int64_t bi, int64_t hk, void *dst);

typedef struct {
    fa_fwd_item_fn item;
    fa_scratch_fn scratch_bytes;
    int block_rows;
    fa_pack_bytes_fn pack_bytes; /* NULL: no packing */
    fa_pack_fn pack;
    /* 1: one item covers every head of its query rows (the driver passes h = 0), so the kernel
     * can walk the kv heads of each key together, reading K/V rows in memory order. */
    int all_heads;
} fa_fwd_kernel;

typedef struct {
    const char *name;
    fa_fwd_kernel fwd_f32;  /* f32 inputs, and f16/bf16 where fwd_bf16 is empty */
    fa_fwd_kernel fwd_f64;  /* f64 inputs */
    fa_fwd_kernel fwd_bf16; /* bf16 and f16 inputs (AMX, f16 split into bf16 hi + lo); empty:
                               fwd_f32 serves them */
    fa_fwd_kernel fwd_decode; /* few query rows, f32/f16/bf16 (fa_driver.c decides); may be empty */
} fa_isa_table;

#define FA_DECLARE_ISA(isa)                                                                        \
    fa_status fa_fwd_f32__##isa##_item(const fa_fwd_params *, int64_t, int64_t, int64_t,           \
                                       const void *, void *);                                     \
    size_t fa_fwd_f32__##isa##_scratch(const fa_fwd_params *);                                    \
    fa_status fa_fwd_f64__##isa##_item(const fa_fwd_params *, int64_t, int64_t, int64_t,           \
                                       const void *, void *);                                     \
    size_t fa_fwd_f64__##isa##_scratch(const fa_fwd_params *);

/* The K/V packing of a kernel (fa_fwd_impl.h's builds and the AVX-512 float32 kernel). */
#define FA_DECLARE_PACK(name)                                                                      \
    size_t name##_pack_bytes(const fa_fwd_params *, int64_t);                                      \
    void name##_pack(const fa_fwd_params *, int64_t, int64_t, void *);

FA_DECLARE_ISA(scalar)
FA_DECLARE_ISA(avx2)
FA_DECLARE_ISA(avx512)
FA_DECLARE_PACK(fa_fwd_f32__scalar)
FA_DECLARE_PACK(fa_fwd_f64__scalar)
FA_DECLARE_PACK(fa_fwd_f32__avx2)
FA_DECLARE_PACK(fa_fwd_f64__avx2)
FA_DECLARE_PACK(fa_fwd_f32__avx512)
FA_DECLARE_PACK(fa_fwd_f64__avx512)
fa_status fa_fwd_bf16__amx_item(const fa_fwd_params *, int64_t, int64_t, int64_t, const void *,
                                void *);
size_t fa_fwd_bf16__amx_scratch(const fa_fwd_params *);
size_t fa_fwd_bf16__amx_pack_bytes(const fa_fwd_params *, int64_t);
void fa_fwd_bf16__amx_pack(const fa_fwd_params *, int64_t, int64_t, void *);
fa_status fa_decode__avx512_item(const fa_fwd_params *, int64_t, int64_t, int64_t, const void *,
                                 void *);
size_t fa_decode__avx512_scratch(const fa_fwd_params *);

/* ---- dispatch (fa_dispatch.c) ---- */
typedef enum { FA_ISA_SCALAR = 0, FA_ISA_AVX2 = 1, FA_ISA_AVX512 = 2, FA_ISA_AMX = 3, FA_ISA_COUNT } fa_isa;

/* Which ISAs this CPU and OS support (bit i = fa_isa i). */
unsigned fa_isa_supported(void);
/* Which ISAs this build compiled kernels for. */
unsigned fa_isa_compiled(void);
const char *fa_isa_name(fa_isa isa);
/* Select the kernel family; returns 0 on success, -1 if unsupported by CPU/OS/build. */
int fa_isa_select(fa_isa isa);
fa_isa fa_isa_selected(void);
const fa_isa_table *fa_isa_current(void);

/* ---- driver (fa_driver.c) ---- */
void fa_set_num_threads(int n);
int fa_get_num_threads(void);
fa_status fa_fwd(const fa_fwd_params *p);

#endif
