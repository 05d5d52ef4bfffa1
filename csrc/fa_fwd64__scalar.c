/* fa_fwd64__scalar.c: the forward kernel (fa_fwd_impl.h) with float64 accumulation for float64
 * inputs, built for plain C, no SIMD flags: the fallback and the oracle the SIMD builds are checked against. */
#include "fa_kernels.h"
#define FA_BR FA_FWD_BLOCK_ROWS
#define FA_BC 64
#define FA_MR 4
#define FA_NR 4

#define FA_ACC double
#define FA_ACC_IS_DOUBLE 1
#define FA_VBYTES 8
#define FA_NAME(x) fa_fwd_f64__scalar_##x
#include "fa_fwd_impl.h"
