#!/usr/bin/env bash
# CI's kernel-OpenZFS job: boot one guest built by vagrant/build-image.sh
# under qemu and run the ZFS layer's tests in it.
#
#   vagrant/vm-test.sh [PYTEST-ARGS...]
#
# Default arguments: tests/integration/test_zfs_*.py (the conformance suite on
# both backends, CLI and libzfs_core, feature detection, and the ZFS layer's
# integration tests).
# The guest runs under TCG (software emulation: this machine's /dev/kvm is
# PVM-style and stock guests fail on it with "failed to set MSR 0x10a"), one
# CPU, no network at all (-nic none). The kernel skips its timer check
# (no_timer_check): at load 20 the emulated timer was too slow for it and the
# guest panicked at boot ("IO-APIC + timer doesn't work"). The repository goes in read-only and
# the results come out through two 9p shares; the root disk is a
# copy-on-write snapshot of the cached image that qemu deletes. pytest's output
# is printed as the guest writes it, then a summary of its junit report.
# Fails when the guest's pytest fails, when anything was skipped (the guest
# has every part, so a skip is a missing part), or when the guest does not
# power off within FERRY_VM_TIMEOUT seconds (default 1800).
# Environment: FERRY_VM_CACHE (image cache, default /var/cache/ferry/vm),
# FERRY_VM_IMAGE (boot this image directory instead of building one),
# FERRY_VM_MEMORY_MB (default 2048).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
timeout_s="${FERRY_VM_TIMEOUT:-1800}"
memory_mb="${FERRY_VM_MEMORY_MB:-2048}"
cache="${FERRY_VM_CACHE:-/var/cache/ferry/vm}"

log() { printf 'vm-test: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (the image build needs it)"
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    timeout 600 apt-get -o DPkg::Lock::Timeout=600 update -qq
    # No recommends: they would remove fuse, which zfs-fuse needs.
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
        --no-install-recommends "${missing[@]}"
fi

if [ "$#" -eq 0 ]; then
    cd "$repo"
    set -- tests/integration/test_zfs_*.py
    cd - >/dev/null
fi

image="${FERRY_VM_IMAGE:-}"
if [ -z "$image" ]; then
    image=$("$repo/vagrant/build-image.sh" --cache "$cache")
fi
out=$(mktemp -d /tmp/vm-test.XXXXXX)
qemu_pid=""
cleanup() {
    if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
    fi
    rm -rf "$out"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
printf '%s\n' "$*" >"$out/args"

started=$(date +%s)
log "booting the guest (image ${image##*/}, TCG, 1 CPU, ${memory_mb} MB, no network): $*"
nice -n 19 timeout --kill-after=10 "$timeout_s" qemu-system-x86_64 \
    -accel tcg -smp 1 -m "$memory_mb" -no-reboot \
    -display none -monitor none -serial stdio -nic none \
    -kernel "$image/vmlinuz" -initrd "$image/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 init=/usr/local/sbin/ferry-vm-init panic=1 quiet no_timer_check" \
    -drive "file=$image/rootfs.ext4,format=raw,if=virtio,snapshot=on" \
    -virtfs "local,path=$repo,mount_tag=repo,security_model=none,readonly=on" \
    -virtfs "local,path=$out,mount_tag=out,security_model=none" \
    </dev/null &
qemu_pid=$!
set +e
wait "$qemu_pid"
qemu_status=$?
set -e
qemu_pid=""
log "guest ran $(( $(date +%s) - started )) s (qemu exit status $qemu_status)"

[ -f "$out/rc" ] || die "the guest did not finish its job (timeout ${timeout_s} s or a crash: its console is above)"
guest_status=$(cat "$out/rc")
[ -f "$out/junit.xml" ] || die "the guest wrote no pytest report (exit status $guest_status; its console is above)"
python3 - "$out/junit.xml" "$guest_status" <<'PY'
"""Summarise the guest's junit report; fail on a failure, an error or a skip."""
import sys
import xml.etree.ElementTree as ET

report, status = sys.argv[1], int(sys.argv[2])
cases = list(ET.parse(report).getroot().iter("testcase"))
outcome = {"failure": [], "error": [], "skipped": []}
for case in cases:
    for kind, names in outcome.items():
        for found in case.findall(kind):
            names.append(f"{case.get('classname')}::{case.get('name')}: {found.get('message', '')}")
passed = len(cases) - sum(len(v) for v in outcome.values())
print(
    f"vm-test: guest pytest: {passed} passed, {len(outcome['failure'])} failed, "
    f"{len(outcome['error'])} errors, {len(outcome['skipped'])} skipped (exit status {status})"
)
for kind, names in outcome.items():
    for name in names:
        print(f"vm-test: {kind}: {name}")
if outcome["skipped"]:
    print("vm-test: the guest has kernel OpenZFS and libzfs_core: a skip there is a missing part")
sys.exit(1 if status != 0 or any(outcome.values()) or not cases else 0)
PY
