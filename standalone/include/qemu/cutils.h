/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Minimal stand-in for QEMU's "qemu/cutils.h" (buffer_is_zero()) for the
 * standalone build of the nas-dedup core.
 */
#ifndef NAS_DEDUP_STANDALONE_CUTILS_H
#define NAS_DEDUP_STANDALONE_CUTILS_H

static inline bool buffer_is_zero(const void *buf, size_t len)
{
    const uint8_t *p = buf;
    size_t i;

    for (i = 0; i < len; i++) {
        if (p[i]) {
            return false;
        }
    }
    return true;
}

#endif
