/* fa_dispatch.c: choose the kernel family once per process.
 *
 * Support is CPUID (the instructions exist) plus XGETBV (the OS saves the registers they use);
 * AMX additionally needs the Linux permission request for the tile-data state, without which the
 * first tile instruction raises SIGILL. The Python layer calls fa_isa_select() at import, honouring
 * FLASH_ATTN_C_ISA.
 */
#define _GNU_SOURCE /* syscall() for the AMX permission request */
#include "fa_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define FA_X86 1
#else
#define FA_X86 0
#endif

#if FA_X86 && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#endif

static const fa_isa_table tables[FA_ISA_COUNT] = {
    [FA_ISA_SCALAR] = {"scalar",
                       {fa_fwd_f32__scalar_item, fa_fwd_f32__scalar_scratch, FA_FWD_BLOCK_ROWS,
                        fa_fwd_f32__scalar_pack_bytes, fa_fwd_f32__scalar_pack},
                       {fa_fwd_f64__scalar_item, fa_fwd_f64__scalar_scratch, FA_FWD_BLOCK_ROWS,
                        fa_fwd_f64__scalar_pack_bytes, fa_fwd_f64__scalar_pack}},
    [FA_ISA_AVX2] = {"avx2",
                     {fa_fwd_f32__avx2_item, fa_fwd_f32__avx2_scratch, FA_FWD_F32_AVX2_ROWS,
                      fa_fwd_f32__avx2_pack_bytes, fa_fwd_f32__avx2_pack},
                     {fa_fwd_f64__avx2_item, fa_fwd_f64__avx2_scratch, FA_FWD_BLOCK_ROWS,
                      fa_fwd_f64__avx2_pack_bytes, fa_fwd_f64__avx2_pack}},
    [FA_ISA_AVX512] = {"avx512",
                       {fa_fwd_f32__avx512_item, fa_fwd_f32__avx512_scratch, FA_FWD_F32_AVX512_ROWS,
                        fa_fwd_f32__avx512_pack_bytes, fa_fwd_f32__avx512_pack},
                       {fa_fwd_f64__avx512_item, fa_fwd_f64__avx512_scratch, FA_FWD_BLOCK_ROWS,
                        fa_fwd_f64__avx512_pack_bytes, fa_fwd_f64__avx512_pack},
                       .fwd_decode = {fa_decode__avx512_item, fa_decode__avx512_scratch,
                                      FA_DECODE_ROWS, .all_heads = 1}},
    /* AMX: bf16 and f16 inputs on the tile unit; f32/f64 on the AVX-512 kernels. */
    [FA_ISA_AMX] = {"amx",
                    {fa_fwd_f32__avx512_item, fa_fwd_f32__avx512_scratch, FA_FWD_F32_AVX512_ROWS,
                     fa_fwd_f32__avx512_pack_bytes, fa_fwd_f32__avx512_pack},
                    {fa_fwd_f64__avx512_item, fa_fwd_f64__avx512_scratch, FA_FWD_BLOCK_ROWS,
                     fa_fwd_f64__avx512_pack_bytes, fa_fwd_f64__avx512_pack},
                    {fa_fwd_bf16__amx_item, fa_fwd_bf16__amx_scratch, FA_FWD_F32_AVX512_ROWS,
                     fa_fwd_bf16__amx_pack_bytes, fa_fwd_bf16__amx_pack},
                    {fa_decode__avx512_item, fa_decode__avx512_scratch, FA_DECODE_ROWS,
                     .all_heads = 1}},
};

static fa_isa selected = FA_ISA_SCALAR;

#if FA_X86
static unsigned long long xgetbv0(void)
{
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}
#endif

static int amx_permission(void)
{
#if FA_X86 && defined(__linux__)
    unsigned long bitmask = 0;
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0)
        return 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &bitmask) != 0)
        return 0;
    return (bitmask & (1ul << XFEATURE_XTILEDATA)) != 0;
#else
    return 0;
#endif
}

unsigned fa_isa_supported(void)
{
    static int done = 0;
    static unsigned mask = 0;
    if (done)
        return mask;
    mask = 1u << FA_ISA_SCALAR;
#if FA_X86
    unsigned a, b, c, d;
    if (__get_cpuid(1, &a, &b, &c, &d)) {
        int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
        unsigned long long xcr0 = osxsave ? xgetbv0() : 0;
        int ymm_os = (xcr0 & 0x6) == 0x6;
        int zmm_os = (xcr0 & 0xe6) == 0xe6;
        int amx_os = (xcr0 & 0x60000) == 0x60000;
        if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
            int avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1;
            int avx512vl = (b >> 31) & 1, avx512dq = (b >> 17) & 1;
            int amx_bf16 = (d >> 22) & 1, amx_tile = (d >> 24) & 1;
            if (avx && avx2 && fma && f16c && ymm_os)
                mask |= 1u << FA_ISA_AVX2;
            if ((mask & (1u << FA_ISA_AVX2)) && avx512f && avx512bw && avx512vl && zmm_os)
                mask |= 1u << FA_ISA_AVX512;
            /* The AMX kernel also converts P to bf16 with AVX512-BF16 (leaf 7.1 EAX bit 5) and
             * splits its exponents with vreduceps (AVX512-DQ). */
            unsigned a1 = 0, b1, c1, d1;
            int avx512bf16 = __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) && ((a1 >> 5) & 1);
            if ((mask & (1u << FA_ISA_AVX512)) && avx512dq && amx_bf16 && amx_tile && avx512bf16 &&
                amx_os && amx_permission())
                mask |= 1u << FA_ISA_AMX;
        }
    }
#endif
    done = 1;
    return mask;
}

unsigned fa_isa_compiled(void)
{
    unsigned m = 0;
    for (int i = 0; i < FA_ISA_COUNT; i++)
        if (tables[i].fwd_f32.item)
            m |= 1u << i;
    return m;
}

const char *fa_isa_name(fa_isa isa)
{
    return isa >= 0 && isa < FA_ISA_COUNT ? tables[isa].name : "?";
}

int fa_isa_select(fa_isa isa)
{
    if (isa < 0 || isa >= FA_ISA_COUNT)
        return -1;
    if (!((fa_isa_supported() & fa_isa_compiled()) >> isa & 1))
        return -1;
    selected = isa;
    return 0;
}

fa_isa fa_isa_selected(void) { return selected; }

const fa_isa_table *fa_isa_current(void) { return &tables[selected]; }
