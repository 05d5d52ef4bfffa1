/* fa_bwd__scalar.c: the backward kernel (fa_bwd_impl.h) with float32 accumulation in plain C (no SIMD flags): the fallback and the oracle for the SIMD builds.
 * Register tile: 4 rows x 4 vectors; blocks of FA_BWD_BLOCK_ROWS query rows x
 * FA_BWD_BLOCK_KEYS keys, so one item's packed K/V, Q/dO and S/dP blocks stay in L2 for d <= 256. */
#include "fa_bwd_params.h"
#define FA_MR 4
#define FA_NR 4

#define FA_ACC float
#define FA_ACC_IS_DOUBLE 0
#define FA_VBYTES 4
#define FA_NAME(x) fa_bwd_f32__scalar_##x
#include "fa_bwd_impl.h"
