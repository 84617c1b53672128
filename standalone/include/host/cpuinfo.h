/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Minimal stand-in for QEMU's "host/cpuinfo.h" (x86) for the standalone
 * build of the nas-dedup core: only the AVX2 bit, from the compiler's own
 * CPU detection.  Inside QEMU the real header and util/cpuinfo-i386.c are
 * used.
 */
#ifndef NAS_DEDUP_STANDALONE_CPUINFO_H
#define NAS_DEDUP_STANDALONE_CPUINFO_H

#define CPUINFO_AVX2    (1u << 0)

static inline unsigned nas_dedup_standalone_cpuinfo(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") ? CPUINFO_AVX2 : 0;
}
#define cpuinfo (nas_dedup_standalone_cpuinfo())

#endif
