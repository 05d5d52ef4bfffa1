/* fa_fwd__avx512.c: the forward kernel (fa_fwd_impl.h) built for AVX-512F: 16 float lanes, 4x4-vector register tiles (16 accumulators).
 * Blocks: 64 query rows per work item, 64 keys per block, so a K block (64 x d floats) and the
 * register tiles' panel of V fit in L1 for d <= 128. */
#include "fa_kernels.h"
#define FA_BR FA_FWD_BLOCK_ROWS
#define FA_BC 64
#define FA_MR 4
#define FA_NR 4

#define FA_ACC float
#define FA_ACC_IS_DOUBLE 0
#define FA_VBYTES 64
#define FA_NAME(x) fa_fwd_f32__avx512_##x
#include "fa_fwd_impl.h"
