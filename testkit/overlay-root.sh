#!/bin/sh
# Runs a command chrooted into a copy-on-write view of this machine's root file system, so that a
# test can install a Debian package with dpkg (maintainer scripts and all) without changing the
# machine: every write lands in STATE/upper, which later runs with the same STATE see again.
#
#   unshare --mount --propagation private -- overlay-root.sh [--sandbox] STATE SHARE -- CMD ARGS...
#
# Must run in a mount namespace of its own (unshare --mount): its mounts go when the namespace's
# last process ends, and the host never sees them. The chroot gets the host's /proc, /sys and /dev,
# a fresh /run (no /run/systemd/system: maintainer scripts then start no service) and a fresh /tmp,
# and SHARE (a directory of the test's, e.g. under the host's /tmp) at the same path.
#
# --sandbox also applies the part of ringlb.service's file-system sandbox that needs no systemd:
# ProtectSystem=strict (the whole tree read-only), ProtectHome=yes (empty, read-only /home, /root
# and /run/user) and PrivateTmp=yes (the fresh /tmp and /var/tmp).
#
# CMD runs by exec, so the process the caller started becomes CMD itself (its pid, its signals).
set -eu

sandbox=no
if [ "${1:-}" = --sandbox ]; then sandbox=yes; shift; fi
if [ $# -lt 4 ] || [ "$3" != -- ]; then
    echo "usage: overlay-root.sh [--sandbox] STATE SHARE -- CMD ARGS..." >&2
    exit 2
fi
state=$1 share=$2
shift 3

root=$state/root
mkdir -p "$state/upper" "$state/work" "$root"
# lowerdir=/ is the root file system alone, without the mounts on it (/proc, /tmp if separate...).
mount -t overlay overlay -o "lowerdir=/,upperdir=$state/upper,workdir=$state/work" "$root"
if [ "$sandbox" = yes ]; then
    mount -o remount,ro "$root"
fi
for fs in proc sys dev; do
    mount --rbind "/$fs" "$root/$fs"
done
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
if [ "$sandbox" = yes ]; then
    mount -t tmpfs -o mode=1777 tmpfs "$root/var/tmp"
    for home in /home /root; do
        mount -t tmpfs -o ro,mode=0755 tmpfs "$root$home"
    done
fi
mkdir -p "$root$share"
mount --bind "$share" "$root$share"
exec chroot "$root" "$@"
