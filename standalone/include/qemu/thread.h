/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Stand-in for QEMU's QemuMutex on top of GMutex (standalone core build). */
#ifndef NAS_DEDUP_STANDALONE_THREAD_H
#define NAS_DEDUP_STANDALONE_THREAD_H

typedef struct QemuMutex {
    GMutex m;
} QemuMutex;

static inline void qemu_mutex_init(QemuMutex *mutex)
{
    g_mutex_init(&mutex->m);
}

static inline void qemu_mutex_destroy(QemuMutex *mutex)
{
    g_mutex_clear(&mutex->m);
}

static inline void qemu_mutex_lock(QemuMutex *mutex)
{
    g_mutex_lock(&mutex->m);
}

static inline void qemu_mutex_unlock(QemuMutex *mutex)
{
    g_mutex_unlock(&mutex->m);
}

#endif
