#!/usr/bin/env bash
# Build the kernel-OpenZFS guest image from Debian packages; cached by a key of its inputs.
#
#   vagrant/build-image.sh [--cache DIR]
#
# Prints the image directory, DIR/image-<key> (DIR defaults to
# /var/cache/ferry/vm), which holds rootfs.ext4 (the root filesystem, label
# ferry-root), vmlinuz and initrd.img (the guest's Debian kernel and
# initramfs) and packages.txt (the Debian package versions it was built from).
#
# Two layers, each cached by the key of its own inputs, so that a change to
# Ferry's install does not rebuild zfs.ko:
#   base  (DIR/base-<key>.tar): mmdebstrap of bookworm `main contrib` with the
#         kernel, its headers and zfs-dkms, whose DKMS build makes zfs.ko for
#         the guest's kernel (~6 minutes, most of it compiling). Key: this
#         script's commands (comment lines do not count) and the versions
#         Debian offers today for PACKAGES.
#   image: the base plus the repository's own deploy/install.sh --dev (what a
#         real node runs), which installs Ferry's venv editable from
#         /vagrant, where a provisioned guest has the repository (a Vagrant
#         node's synced folder, a node of vm-cluster.sh's copy), so that
#         install.sh run again there by provision.sh has nothing to do; and
#         vagrant/vm-init.sh as /usr/local/sbin/ferry-vm-init (a test guest's
#         PID 1, which mounts the repository at /srv/ferry and runs it from
#         there); then mkfs.ext4 -d makes the image without mounting anything.
#         Key: the base key, install.sh, steps.sh, pyproject.toml, vm-init.sh.
# A layer of an older key is removed once its replacement is complete.
# The contrib component is given only to the chroot and to a private apt
# directory, never to this machine's apt. Runs under nice/ionice.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
script="$repo/vagrant/build-image.sh"
cache=/var/cache/ferry/vm
while [ "$#" -gt 0 ]; do
    case "$1" in
        --cache) cache="$2"; shift 2 ;;
        -h|--help) sed -n '2,29p' "$script"; exit 0 ;;
        *) echo "build-image.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

MIRROR=http://deb.debian.org/debian
SECURITY_MIRROR=http://deb.debian.org/debian-security
SUITE=bookworm
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# Where a test guest mounts the repository (9p, vagrant/vm-init.sh).
GUEST_REPO=/srv/ferry
IMAGE_SPARE_BYTES=$((3 << 30))
BASE_TIMEOUT=3600
INSTALL_TIMEOUT=1800
# apparmor: Debian's kernel enables AppArmor, and dockerd then starts no container
# without apparmor_parser (it loads its docker-default profile with it).
PACKAGES=(
    linux-image-amd64 linux-headers-amd64 dkms zfs-dkms zfsutils-linux python3-pyzfs
    systemd-sysv udev kmod initramfs-tools e2fsprogs iproute2 procps ca-certificates
    python3 python3-venv python3-pip apparmor
)

log() { printf 'build-image: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (the chroot is built as root)"
for tool in mmdebstrap mkfs.ext4 apt-get unshare; do
    command -v "$tool" >/dev/null || die "no $tool: vagrant/vm-test.sh installs mmdebstrap; e2fsprogs and util-linux give the rest"
done
[ -r "$KEYRING" ] || die "no $KEYRING: apt-get install debian-archive-keyring"

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

sources() {
    printf 'deb [signed-by=%s] %s %s main contrib\n' "$KEYRING" "$MIRROR" "$SUITE"
    printf 'deb [signed-by=%s] %s %s-updates main contrib\n' "$KEYRING" "$MIRROR" "$SUITE"
    printf 'deb [signed-by=%s] %s %s-security main contrib\n' "$KEYRING" "$SECURITY_MIRROR" "$SUITE"
}

# The guest's package versions, from a private apt directory (this machine's
# apt configuration and package state are neither used nor changed).
candidate_versions() {
    local apt_dir="$cache/apt"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
    sources >"$apt_dir/sources.list"
    : >"$apt_dir/status"
    local -a opts=(
        -o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::State::status=$apt_dir/status"
        -o "Dir::Cache=$apt_dir" -o Dir::Etc::Preferences=/dev/null
        -o Dir::Etc::PreferencesParts=/dev/null
    )
    timeout 600 apt-get "${opts[@]}" -qq update >&2 \
        || die "apt-get update of the guest's sources failed (is $MIRROR reachable?)"
    local pkg version
    for pkg in "${PACKAGES[@]}"; do
        version=$(apt-cache "${opts[@]}" policy "$pkg" | awk '/Candidate:/ {print $2}')
        if [ -z "$version" ] || [ "$version" = "(none)" ]; then
            die "Debian $SUITE offers no $pkg"
        fi
        printf '%s=%s\n' "$pkg" "$version"
    done
}

hash_of() { sha256sum | cut -c1-16; }

# Keep only the newest of a layer: remove DIR/<prefix><other key><suffix>.
remove_older() {
    local prefix="$1" keep="$2" old
    for old in "$cache/$prefix"*; do
        [ "$old" = "$keep" ] || rm -rf "$old"
    done
}

work=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

versions=$(candidate_versions)
base_key=$( { sed -n '/^# --- image layer/q;p' "$script" | grep -v '^[[:space:]]*#'; printf '%s\n' "$versions"; } | hash_of)
base="$cache/base-$base_key.tar"
if [ -f "$base" ]; then
    log "cached base $base"
else
    started=$(date +%s)
    log "building base $base_key (mmdebstrap with the DKMS build of zfs.ko: ~6 minutes unloaded)"
    sources >"$work/sources.list"
    include=$(IFS=,; printf '%s' "${PACKAGES[*]}")
    # shellcheck disable=SC2016  # "$1" is the chroot, expanded by mmdebstrap's hook shell
    nice -n 19 ionice -c 3 timeout "$BASE_TIMEOUT" mmdebstrap \
        --variant=apt --include="$include" --aptopt='Acquire::Retries "3"' \
        --customize-hook='ls "$1"/lib/modules/*/updates/dkms/zfs.ko* >/dev/null || { echo "DKMS built no zfs.ko (see the zfs-dkms output above)" >&2; exit 1; }' \
        --customize-hook='chroot "$1" apt-get clean' \
        --customize-hook='echo ferry-vm >"$1/etc/hostname"' \
        --customize-hook='printf "LABEL=ferry-root / ext4 errors=remount-ro 0 1\n" >"$1/etc/fstab"' \
        "$SUITE" "$work/base.tar" "$work/sources.list" >&2 \
        || die "mmdebstrap failed (its output is above)"
    mv "$work/base.tar" "$base"
    remove_older base- "$base"
    log "built base $base_key in $(( $(date +%s) - started )) s"
fi

# --- image layer: the base, Ferry installed by deploy/install.sh from where a provisioned
# guest has the repository (INSTALL_REPO), the test guest's init,
# and what a guest reached over ssh needs (vm-cluster.sh's nodes, the Vagrant box of
# build-box.sh): sshd, sudo, rsync, a user vagrant (the host keys are the image's, the
# same in every guest), the wheels pip builds Ferry with (install.sh runs again there
# without an index) and a DHCP config for systemd-networkd. (Documented here, not at the
# top: the commands above this line are the base's key.)
INSTALL_REPO=/vagrant
image_key=$(
    {
        printf '%s\n' "$base_key"
        sed -n '/^# --- image layer/,$p' "$script"
        cat "$repo/deploy/install.sh" "$repo/deploy/steps.sh" "$repo/pyproject.toml" \
            "$repo/vagrant/vm-init.sh"
    } | hash_of
)
image="$cache/image-$image_key"
if [ -f "$image/rootfs.ext4" ] && [ -f "$image/vmlinuz" ] && [ -f "$image/initrd.img" ]; then
    log "cached image $image"
    printf '%s\n' "$image"
    exit 0
fi

started=$(date +%s)
log "building image $image_key on base $base_key (deploy/install.sh --dev in the chroot)"
rootfs="$work/rootfs"
mkdir -p "$rootfs"
tar -C "$rootfs" --numeric-owner --xattrs --xattrs-include='*' -xpf "$base"
mkdir -p "$rootfs$INSTALL_REPO" "$rootfs$GUEST_REPO" "$rootfs/srv/out"
# What install.sh needs to install Ferry editable; a provisioned guest puts the repository here again.
tar -C "$repo" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' -cf - . \
    | tar -C "$rootfs$INSTALL_REPO" -xf -
# No service starts in the chroot (docker.io's and etcd-server's postinst would try).
printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
chmod 0755 "$rootfs/usr/sbin/policy-rc.d"
cp -L /etc/resolv.conf "$rootfs/etc/resolv.conf"
# The chroot downloads with this machine's trust (a proxy's CA, say) but not
# its environment (pip settings naming this machine's paths): a clean
# environment, and this machine's CA bundle on the chroot's /tmp for pip.
ca_bundle="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
[ -r "$ca_bundle" ] || die "no CA bundle at $ca_bundle (set PIP_CERT to the one pip should trust)"
build_requires=$(python3 -c 'import sys, tomllib; print(" ".join(tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"]))' "$repo/pyproject.toml")
# A private mount namespace: /proc, /sys, /dev and /tmp of the chroot vanish with it.
# shellcheck disable=SC2016  # the inner script expands its own arguments
nice -n 19 ionice -c 3 timeout "$INSTALL_TIMEOUT" unshare --mount --propagation private -- bash -euc '
    root="$1"
    mount -t proc proc "$root/proc"
    mount --rbind /sys "$root/sys"
    mount --rbind /dev "$root/dev"
    mount -t tmpfs tmpfs "$root/tmp"
    cp "$3" "$root/tmp/build-ca.crt"
    chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root FERRY_ZFS=kernel DEBIAN_FRONTEND=noninteractive PIP_CERT=/tmp/build-ca.crt \
        PIP_DISABLE_PIP_VERSION_CHECK=1 bash "$2/deploy/install.sh" --dev
    # The wheels pip builds Ferry with (the build-system of pyproject.toml), so that
    # deploy/install.sh runs again in a guest without an index (PIP_NO_INDEX=1).
    chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root PIP_CERT=/tmp/build-ca.crt \
        PIP_DISABLE_PIP_VERSION_CHECK=1 /opt/ferry/venv/bin/python -m pip download -q \
        --only-binary=:all: -d /var/cache/ferry/wheels $4  # $4: the requirements, split
    printf "[global]\nfind-links = /var/cache/ferry/wheels\n" >"$root/etc/pip.conf"
    # What a guest reached over ssh needs (a node of vagrant/vm-cluster.sh, a
    # Vagrant box): sshd, sudo, rsync (synced folders), the user a box logs in as.
    chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends openssh-server sudo rsync
    chroot "$root" useradd --create-home --shell /bin/bash vagrant
    install -d -m 0700 "$root/home/vagrant/.ssh"
    chroot "$root" chown vagrant:vagrant /home/vagrant/.ssh
    printf "vagrant ALL=(ALL) NOPASSWD: ALL\n" >"$root/etc/sudoers.d/vagrant"
    chmod 0440 "$root/etc/sudoers.d/vagrant"
    chroot "$root" apt-get clean
'  build-image "$rootfs" "$INSTALL_REPO" "$ca_bundle" "$build_requires" >&2 \
    || die "deploy/install.sh --dev or the ssh packages in the chroot failed (what they printed is above)"
rm -rf "${rootfs:?}$INSTALL_REPO" "$rootfs/usr/sbin/policy-rc.d" "$rootfs/etc/resolv.conf"
mkdir -p "$rootfs$INSTALL_REPO"
install -m 0755 "$repo/vagrant/vm-init.sh" "$rootfs/usr/local/sbin/ferry-vm-init"
# DHCP on every wired NIC, for a guest booted with systemd-networkd wanted (the
# Vagrant box's kernel command line); a node of vm-cluster.sh sets its address itself.
printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n' >"$rootfs/etc/systemd/network/80-ferry-dhcp.network"

kernel=$(find "$rootfs/boot" -name 'vmlinuz-*' | sort | tail -n 1)
[ -n "$kernel" ] || die "the base has no kernel in /boot"
version=${kernel##*/vmlinuz-}
[ -f "$rootfs/boot/initrd.img-$version" ] || die "no initrd for kernel $version"
mkdir -p "$work/image"
cp "$kernel" "$work/image/vmlinuz"
cp "$rootfs/boot/initrd.img-$version" "$work/image/initrd.img"
printf '%s\n' "$versions" >"$work/image/packages.txt"
used=$(du -sb "$rootfs" | cut -f1)
size_mb=$(( (used + IMAGE_SPARE_BYTES) >> 20 ))
nice -n 19 timeout 600 mkfs.ext4 -q -L ferry-root -d "$rootfs" "$work/image/rootfs.ext4" "${size_mb}M" >&2 \
    || die "mkfs.ext4 of the root filesystem failed"
mv "$work/image" "$image"
remove_older image- "$image"
log "built image $image_key in $(( $(date +%s) - started )) s (kernel $version)"
printf '%s\n' "$image"
