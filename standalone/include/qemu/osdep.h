/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Minimal stand-in for QEMU's "qemu/osdep.h" so that the QEMU-independent
 * core of nas-dedup (index, wire records, hashing) builds and is unit-tested
 * from our top-level meson.build without a QEMU tree.  Only what the core
 * uses is defined here; inside QEMU the real header is used.
 */
#ifndef NAS_DEDUP_STANDALONE_OSDEP_H
#define NAS_DEDUP_STANDALONE_OSDEP_H

#include <assert.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <inttypes.h>
#include <sys/uio.h>
#include <glib.h>

#ifndef QEMU_IS_ALIGNED
#define QEMU_IS_ALIGNED(n, m) (((n) % (m)) == 0)
#endif
#ifndef QEMU_ALIGN_DOWN
#define QEMU_ALIGN_DOWN(n, m) ((n) / (m) * (m))
#endif
#ifndef QEMU_ALIGN_UP
#define QEMU_ALIGN_UP(n, m) QEMU_ALIGN_DOWN((n) + (m) - 1, (m))
#endif
#ifndef ARRAY_SIZE
#define ARRAY_SIZE(x) (sizeof(x) / sizeof((x)[0]))
#endif

#ifndef QEMU_BUILD_BUG_ON
#define QEMU_BUILD_BUG_ON(x) _Static_assert(!(x), #x)
#endif

#endif
