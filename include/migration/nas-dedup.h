/*
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * dedup-nas: the interface between its two halves, and to the rest of QEMU
 *
 * The stream side (migration/nas-dedup*.c: the index, the wire records,
 * sending and loading) and the storage side (hw/nas-dedup/: the observer
 * of guest device I/O, which talks to drives, not to the stream) meet here.
 * See docs/devel/nas-dedup.rst.
 */
#ifndef INCLUDE_MIGRATION_NAS_DEDUP_H
#define INCLUDE_MIGRATION_NAS_DEDUP_H

#include "migration/nas-dedup-hash.h"
#include "migration/nas-dedup-index.h"

/* Stream side (migration/nas-dedup.c), for the storage side. */

/* True while the dedup-nas capability is on: index what the guest moves. */
bool nas_dedup_tracking(void);
/* The index, created on first use; call within an RCU read section. */
NasDedupIndex *nas_dedup_index_get(void);
/* The index if it exists, without creating it; same rules. */
NasDedupIndex *nas_dedup_index_peek(void);

/* Storage side (hw/nas-dedup/track.c), for the stream side. */

/* Once, at start-up (migration_object_init()). */
void nas_dedup_track_init(void);
/*
 * The identity (attached device's id or QOM path) and size of tracked drive
 * number @drive, as the index knows it.  False if there is no such drive.
 */
bool nas_dedup_drive_info(uint16_t drive, char **id, uint64_t *size);
/*
 * False once drive number @drive lost its medium or was detached: its index
 * entries are stale.  Lock-free.
 */
bool nas_dedup_drive_live(uint16_t drive);

#endif
