/* fa_bwd__avx512.c: the backward kernel (fa_bwd_impl.h) with float32 accumulation for AVX-512F: 16 float lanes.
 * Register tile: 8 rows x 2 vectors; blocks of FA_BWD_BLOCK_ROWS query rows x
 * FA_BWD_BLOCK_KEYS keys, so one item's packed K/V, Q/dO and S/dP blocks stay in L2 for d <= 256. */
#include "fa_bwd_params.h"
#define FA_MR 8
#define FA_NR 2

#define FA_ACC float
#define FA_ACC_IS_DOUBLE 0
#define FA_VBYTES 64
#define FA_NAME(x) fa_bwd_f32__avx512_##x
#include "fa_bwd_impl.h"
