/* fa_bwd__avx2.c: the backward kernel (fa_bwd_impl.h) with float32 accumulation for AVX2 + FMA: 8 float lanes.
 * Register tile: 4 rows x 3 vectors (12 accumulators, 3 B vectors and a broadcast: the 16 ymm
 * registers; 1.06-1.14x over 4 x 2, NOTES.md); blocks of FA_BWD_BLOCK_ROWS query rows x
 * FA_BWD_BLOCK_KEYS keys, so one item's packed K/V, Q/dO and S/dP blocks stay in L2 for d <= 256. */
#include "fa_bwd_params.h"
#define FA_MR 4
#define FA_NR 3

#define FA_ACC float
#define FA_ACC_IS_DOUBLE 0
#define FA_VBYTES 32
#define FA_NAME(x) fa_bwd_f32__avx2_##x
#include "fa_bwd_impl.h"
