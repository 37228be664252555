#!/usr/bin/env bash
# Package the guest image of vagrant/build-image.sh as a libvirt Vagrant box
# and add it to Vagrant as "ferry-local" (what FERRY_BOX=ferry-local boots).
#
#   vagrant/build-box.sh [--cache DIR]
#
# The box: box.img (the image's root filesystem as qcow2, with Vagrant's
# insecure public key for the user vagrant, which Vagrant replaces at the first
# `up`), metadata.json and a Vagrantfile that boots the image's kernel and
# initrd directly (the root filesystem has no boot loader) under qemu's
# software emulation, with systemd-networkd for DHCP. libvirt's qemu reads the
# kernel and initrd from /var/lib/libvirt/boot. Cached in DIR (default
# /var/cache/ferry/vm) by the image's key: a second run only checks.
# FERRY_VM_IMAGE names an image directory to package instead (no cache check).
# Prints the box file's path.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache=/var/cache/ferry/vm
BOX_NAME=ferry-local
BOOT_DIR=/var/lib/libvirt/boot
while [ "$#" -gt 0 ]; do
    case "$1" in
        --cache) cache="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "build-box.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

log() { printf 'build-box: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (the image build needs it)"
for tool in vagrant qemu-img debugfs; do
    command -v "$tool" >/dev/null \
        || die "no $tool: apt-get install --no-install-recommends vagrant vagrant-libvirt qemu-utils e2fsprogs"
done
insecure_key=$(find /usr/share/rubygems-integration/all/gems /opt/vagrant/embedded/gems \
    -path '*/vagrant-*/keys/vagrant.pub' -print -quit 2>/dev/null || true)
[ -n "$insecure_key" ] || die "Vagrant's keys/vagrant.pub not found (is Vagrant installed from Debian or HashiCorp?)"

image="${FERRY_VM_IMAGE:-}"
if [ -z "$image" ]; then
    image=$("$repo/vagrant/build-image.sh" --cache "$cache")
fi
key="${image##*/image-}"
box_dir="$cache/box-$key"
box="$box_dir/$BOX_NAME.box"
kernel="$BOOT_DIR/$BOX_NAME-$key-vmlinuz"
initrd="$BOOT_DIR/$BOX_NAME-$key-initrd.img"

mkdir -p "$BOOT_DIR"
install -m 0644 "$image/vmlinuz" "$kernel"
install -m 0644 "$image/initrd.img" "$initrd"
if [ ! -f "$box" ]; then
    started=$(date +%s)
    work=$(mktemp -d "$cache/.box.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    cp --sparse=always "$image/rootfs.ext4" "$work/rootfs.ext4"
    uid=$(debugfs -R 'cat /etc/passwd' "$work/rootfs.ext4" 2>/dev/null | awk -F: '$1 == "vagrant" {print $3 ":" $4}')
    [ -n "$uid" ] || die "the image has no user vagrant (build-image.sh makes it)"
    keys=/home/vagrant/.ssh/authorized_keys
    debugfs -w -f - "$work/rootfs.ext4" >/dev/null <<EOF
write $insecure_key $keys
sif $keys uid ${uid%%:*}
sif $keys gid ${uid#*:}
sif $keys mode 0100600
EOF
    qemu-img convert -O qcow2 "$work/rootfs.ext4" "$work/box.img"
    size_gb=$(( ($(stat -c %s "$work/rootfs.ext4") + (1 << 30) - 1) >> 30 ))
    printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %s}\n' "$size_gb" >"$work/metadata.json"
    cat >"$work/Vagrantfile" <<EOF
# The ferry-local box (vagrant/build-box.sh): kernel OpenZFS, Ferry's packages, under TCG.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.driver = "qemu"
    libvirt.cpu_mode = "custom"
    libvirt.cpu_model = "qemu64"
    libvirt.kernel = "$kernel"
    libvirt.initrd = "$initrd"
    libvirt.cmd_line = "root=LABEL=ferry-root rw console=ttyS0 systemd.wants=systemd-networkd.service"
  end
end
EOF
    tar -C "$work" -cf "$work/$BOX_NAME.box" metadata.json Vagrantfile box.img
    mkdir -p "$box_dir"
    mv "$work/$BOX_NAME.box" "$box"
    for old in "$cache"/box-* "$BOOT_DIR/$BOX_NAME"-*; do
        [ "$old" = "$box_dir" ] || [ "$old" = "$kernel" ] || [ "$old" = "$initrd" ] || rm -rf "$old"
    done
    log "built $box in $(( $(date +%s) - started )) s"
fi
if [ ! -e "$box_dir/.added" ] || ! vagrant box list 2>/dev/null | grep -q "^$BOX_NAME "; then
    VAGRANT_CHECKPOINT_DISABLE=1 vagrant box add --force --name "$BOX_NAME" "$box" >&2
    touch "$box_dir/.added"
fi
printf '%s\n' "$box"
