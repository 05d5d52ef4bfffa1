/* fa_fwd64__avx512.c: the forward kernel (fa_fwd_impl.h) with float64 accumulation for float64
 * inputs, built for AVX-512F: 16 float lanes, 4x4-vector register tiles (16 accumulators). */
#include "fa_kernels.h"
#define FA_BR FA_FWD_BLOCK_ROWS
#define FA_BC 64
#define FA_MR 4
#define FA_NR 4

#define FA_ACC double
#define FA_ACC_IS_DOUBLE 1
#define FA_VBYTES 64
#define FA_NAME(x) fa_fwd_f64__avx512_##x
#include "fa_fwd_impl.h"
