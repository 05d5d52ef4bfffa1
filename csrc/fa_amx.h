/* fa_amx.h: the tile configuration shared by the AMX kernels (fa_fwd_bf16__amx.c,
 * fa_bwd_bf16__amx.c). Included only by translation units compiled with -mamx-tile.
 *
 * Both kernels use palette 1 with all eight tiles at their largest shape, 16 rows x 64 bytes
 * (16 x 16 fp32 C tiles, 16 x 32 bf16 A tiles, 16 VNNI pair rows of B), and configure once per
 * work item: the configuration is per thread and another kernel may have changed it since. The
 * permission to use the tile state (arch_prctl) is requested once per process in fa_dispatch.c.
 */
#ifndef FA_AMX_H
#define FA_AMX_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline void fa_amx_configure(void)
{
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.colsb[t] = 64;
        c.rows[t] = 16;
    }
    _tile_loadconfig(&c);
}

/* The 2x2 C-tile step both kernels use: C tiles 0-3 (+)= A tiles 4-5 x B tiles 6-7 (each A tile
 * feeds two products, each B tile two). Tile numbers must be compile-time constants, hence fixed
 * registers and always-inline helpers. */
static inline __attribute__((always_inline)) void fa_amx_zero2x2(void)
{
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
}

static inline __attribute__((always_inline)) void fa_amx_dp2x2(void)
{
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
}

#endif
