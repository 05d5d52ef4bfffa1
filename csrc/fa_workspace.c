/* fa_workspace.c: the drivers' buffer cache (see fa_workspace.h). */
#define _GNU_SOURCE /* madvise */
#include "fa_workspace.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

/* A forward and a backward of one training step, plus a spare: a few slots suffice. */
#define SLOTS 4
#define WS_ALIGN ((size_t)2 << 20)

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static void *slot_p[SLOTS];
static size_t slot_cap[SLOTS];
static size_t held;
static int poison;

void *fa_ws_take(size_t bytes, size_t *cap)
{
    void *p = NULL;
    int best = -1;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < SLOTS; i++) /* the smallest cached buffer that fits */
        if (slot_p[i] && slot_cap[i] >= bytes && (best < 0 || slot_cap[i] < slot_cap[best]))
            best = i;
    if (best >= 0) {
        p = slot_p[best];
        *cap = slot_cap[best];
        held -= slot_cap[best];
        slot_p[best] = NULL;
    }
    const int fill = poison;
    pthread_mutex_unlock(&lock);
    if (!p) {
        *cap = (bytes + WS_ALIGN - 1) / WS_ALIGN * WS_ALIGN;
        if (*cap == 0)
            *cap = WS_ALIGN;
        /* 2 MiB alignment lets transparent huge pages back the buffer (fewer faults and TLB
         * misses on first touch). */
        p = aligned_alloc(WS_ALIGN, *cap);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
        if (p)
            madvise(p, *cap, MADV_HUGEPAGE);
#endif
    }
    if (p && fill)
        memset(p, 0xff, bytes);
    return p;
}

void fa_ws_give(void *p, size_t cap)
{
    if (!p)
        return;
    pthread_mutex_lock(&lock);
    if (cap <= FA_WS_CACHE_ONE) {
        /* Make room (a free slot and the byte bound) by dropping cached buffers no bigger than p,
         * smallest first; keep p if that was enough. */
        for (;;) {
            int free_slot = -1, small = -1;
            for (int i = 0; i < SLOTS; i++) {
                if (!slot_p[i] && free_slot < 0)
                    free_slot = i;
                if (slot_p[i] && (small < 0 || slot_cap[i] < slot_cap[small]))
                    small = i;
            }
            if (free_slot >= 0 && held + cap <= FA_WS_CACHE_BYTES) {
                slot_p[free_slot] = p;
                slot_cap[free_slot] = cap;
                held += cap;
                p = NULL;
                break;
            }
            if (small < 0 || slot_cap[small] > cap)
                break;
            free(slot_p[small]);
            held -= slot_cap[small];
            slot_p[small] = NULL;
        }
    }
    pthread_mutex_unlock(&lock);
    free(p);
}

size_t fa_ws_release(void)
{
    size_t n = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < SLOTS; i++) {
        free(slot_p[i]);
        n += slot_p[i] ? slot_cap[i] : 0;
        slot_p[i] = NULL;
    }
    held = 0;
    pthread_mutex_unlock(&lock);
    return n;
}

void fa_ws_set_poison(int on)
{
    pthread_mutex_lock(&lock);
    poison = on;
    pthread_mutex_unlock(&lock);
}

size_t fa_ws_cached(void)
{
    pthread_mutex_lock(&lock);
    size_t n = held;
    pthread_mutex_unlock(&lock);
    return n;
}
