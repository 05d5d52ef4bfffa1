/* fa_fwd__avx2.c: the forward kernel (fa_fwd_impl.h) built for AVX2 + FMA (+F16C): 8 float lanes.
 * Register tiles of 4 rows x 3 vectors: 12 accumulators, 3 B vectors and a broadcast fill the 16
 * ymm registers (4 x 2 left the two FMA ports short of independent chains: 4 x 3 measured
 * 1.07x, NOTES.md). Blocks: 256 query rows per work item (FA_FWD_F32_AVX2_ROWS), 96 keys per
 * block (whole 24-key tiles; 1.02-1.05x over 64): a 24-key column of K^T (d x 24) stays in L1
 * across the item's row tiles, the item's Q, S and O in L2 for d <= 128. */
#include "fa_kernels.h"
#define FA_BR FA_FWD_F32_AVX2_ROWS
#define FA_BC 96
#define FA_MR 4
#define FA_NR 3

#define FA_ACC float
#define FA_ACC_IS_DOUBLE 0
#define FA_VBYTES 32
#define FA_NAME(x) fa_fwd_f32__avx2_##x
#include "fa_fwd_impl.h"
