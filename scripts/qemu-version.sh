# SPDX-License-Identifier: GPL-2.0-or-later
# Sourced by the build scripts: the pinned upstream QEMU we build against.
# Debian's source package (deb-src trixie), "+ds" = Debian-repacked upstream.
QEMU_DEB_VERSION="1:10.0.13+ds-0+deb13u1"
QEMU_UPSTREAM_VERSION="10.0.13"
QEMU_ORIG_TARBALL="qemu_10.0.13+ds.orig.tar.xz"
QEMU_ORIG_SHA256="6a0888e806c2ffc0c5f0733e974f9aea55491950d3c47c98669c8b236dde59ae"
# The fallback accepts any 10.0.x if the pin has left the archive.
QEMU_SERIES_PREFIX="10.0."
