#!/usr/bin/env bash
# Start the zfs-fuse daemon if it is not running, and wait until it answers.
# Kernel OpenZFS needs no daemon; this is only for the zfs-fuse fallback.
set -euo pipefail
pidfile=/var/run/zfs-fuse.pid

if [ -e /sys/module/zfs ]; then
    exit 0
fi
if ! zpool list >/dev/null 2>&1; then
    if ! pgrep -x zfs-fuse >/dev/null; then
        [ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
        mkdir -p /var/run/zfs /var/lock/zfs
        # A daemon that was killed leaves its pidfile, and zfs-fuse then exits 1 silently.
        rm -f "$pidfile"
        zfs-fuse --pidfile "$pidfile" --no-kstat-mount
    fi
    for _ in $(seq 1 50); do
        zpool list >/dev/null 2>&1 && break
        sleep 0.2
    done
fi
if ! zpool list >/dev/null 2>&1; then
    echo "zfs-fuse-up: zfs-fuse did not answer 'zpool list' after 10 s; see syslog or run 'zfs-fuse -n' to read its error" >&2
    exit 1
fi
