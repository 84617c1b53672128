/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Minimal stand-in for QEMU's "qemu/memalign.h" (qemu_memalign(),
 * qemu_vfree()) for the standalone build of the nas-dedup core.
 */
#ifndef QEMU_MEMALIGN_H
#define QEMU_MEMALIGN_H

#include <stdlib.h>

static inline void *qemu_memalign(size_t alignment, size_t size)
{
    void *p;

    if (posix_memalign(&p, alignment, size ? size : alignment)) {
        abort();
    }
    return p;
}

static inline void qemu_vfree(void *ptr)
{
    free(ptr);
}

#endif
