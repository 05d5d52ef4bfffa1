/* fa_workspace.h: the drivers' large per-call buffers, kept between calls.
 *
 * The forward's packed K/V and the backward's workspace are tens of MiB, needed for one call
 * each. Fresh from the allocator on every call they are fresh pages every time, and the kernel
 * clears each page on first touch: 2-5% of a training step here (perf: clear_page_erms 3.8% of a
 * bf16 forward, 4.5% of a bf16 step, 1.6% of a float32 step). Handing them back to a small cache
 * instead lets the next call reuse warm, already-mapped pages.
 * The cache holds at most FA_WS_CACHE_BYTES in all, and no single buffer above FA_WS_CACHE_ONE
 * (bigger ones are freed at once, so a rare huge call does not pin its memory);
 * fa_ws_release frees everything it holds. A taken buffer's contents are undefined (another
 * call's data): callers initialise what they read. Thread-safe. */
#ifndef FA_WORKSPACE_H
#define FA_WORKSPACE_H

#include <stddef.h>

#define FA_WS_CACHE_BYTES ((size_t)192 << 20)
#define FA_WS_CACHE_ONE ((size_t)128 << 20)

/* A buffer of at least `bytes`, 2 MiB aligned (huge pages advised); *cap receives its capacity,
 * to pass back to fa_ws_give. NULL when out of memory. */
void *fa_ws_take(size_t bytes, size_t *cap);
/* Returns a buffer from fa_ws_take (NULL is ignored) to the cache, or frees it. */
void fa_ws_give(void *p, size_t cap);
/* Frees every cached buffer; returns the bytes freed. */
size_t fa_ws_release(void);
/* Testing: when on, every taken buffer is filled with 0xff bytes (NaN as floats), so a kernel
 * that reads workspace it never wrote fails its checks instead of seeing zeros or old data. */
void fa_ws_set_poison(int on);
/* Bytes the cache holds now. */
size_t fa_ws_cached(void);

#endif
