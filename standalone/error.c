/* SPDX-License-Identifier: GPL-2.0-or-later */
/* The standalone stand-in for QEMU's Error (see include/qapi/error.h). */
#include "qemu/osdep.h"
#include "qapi/error.h"

struct Error {
    char *msg;
};

void error_setg_standalone(Error **errp, const char *fmt, ...)
{
    va_list ap;
    Error *err;

    if (!errp) {
        return;
    }
    assert(!*errp);
    err = g_new0(Error, 1);
    va_start(ap, fmt);
    err->msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    *errp = err;
}

const char *error_get_pretty(const Error *err)
{
    return err->msg;
}

void error_free(Error *err)
{
    if (err) {
        g_free(err->msg);
        g_free(err);
    }
}
