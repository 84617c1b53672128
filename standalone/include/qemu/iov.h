/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Minimal stand-in for QEMU's "qemu/iov.h" (iov_to_buf()) for the
 * standalone build of the nas-dedup core.
 */
#ifndef NAS_DEDUP_STANDALONE_IOV_H
#define NAS_DEDUP_STANDALONE_IOV_H

static inline size_t iov_to_buf(const struct iovec *iov,
                                const unsigned int iov_cnt, size_t offset,
                                void *buf, size_t bytes)
{
    size_t done = 0;
    unsigned int i;

    for (i = 0; i < iov_cnt && done < bytes; i++) {
        if (offset >= iov[i].iov_len) {
            offset -= iov[i].iov_len;
            continue;
        }
        size_t n = MIN(bytes - done, iov[i].iov_len - offset);

        memcpy((uint8_t *)buf + done, (uint8_t *)iov[i].iov_base + offset, n);
        done += n;
        offset = 0;
    }
    return done;
}

#endif
