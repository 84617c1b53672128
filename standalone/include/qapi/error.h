/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Minimal stand-in for QEMU's "qapi/error.h" for the standalone build of
 * the nas-dedup core (standalone/error.c): an Error carries a message.
 * Inside QEMU the real one is used.
 */
#ifndef NAS_DEDUP_STANDALONE_QAPI_ERROR_H
#define NAS_DEDUP_STANDALONE_QAPI_ERROR_H

typedef struct Error Error;

void error_setg_standalone(Error **errp, const char *fmt, ...)
    G_GNUC_PRINTF(2, 3);
#define error_setg(errp, ...) error_setg_standalone(errp, __VA_ARGS__)
const char *error_get_pretty(const Error *err);
void error_free(Error *err);

G_DEFINE_AUTOPTR_CLEANUP_FUNC(Error, error_free)

#endif
