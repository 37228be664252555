#!/usr/bin/env bash
# Idempotent host set-up for Ferry on Debian or Ubuntu, run as root.
#
#   deploy/install.sh          a node: ZFS, etcd, Docker, Ferry in a virtualenv
#   deploy/install.sh --dev    the same, plus the test and lint tools
#
# ZFS: kernel OpenZFS userland (and python3-pyzfs, so the libzfs_core backend
# is used) when the zfs kernel module is loaded, zfs-fuse otherwise.
# Environment: FERRY_VENV (default /opt/ferry/venv); FERRY_ZFS=kernel or fuse
# instead of that detection (a chroot of a kernel-ZFS image runs the build
# machine's kernel, so it cannot see the module it is installing for);
# FERRY_INSTALL_LOG (default /var/log/ferry/install.log).
# It prints one line per step; apt's and pip's output goes to that log, whose
# last lines it prints when a step fails.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FERRY_VENV:-/opt/ferry/venv}"
# shellcheck source=steps.sh source-path=SCRIPTDIR
source "$repo/deploy/steps.sh"
dev=0
for arg in "$@"; do
    case "$arg" in
        --dev) dev=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument '$arg' (use --dev or nothing)" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (it installs system packages)" >&2
    exit 1
fi

missing_packages() {
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || printf '%s\n' "$pkg"
    done
}

apt_install() {
    local -a todo
    mapfile -t todo < <(missing_packages "$@")
    [ "${#todo[@]}" -eq 0 ] && return 0
    echo "installing ${todo[*]}"
    apt-get update -q
    # No recommends: docker.io's and vagrant's recommends would remove fuse, which zfs-fuse needs.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${todo[@]}"
}

make_venv() {
    mkdir -p "$(dirname "$venv")"
    if [ "$kernel_zfs" -eq 1 ]; then
        # python3-pyzfs lives in the system site-packages.
        python3 -m venv --system-site-packages "$venv"
    else
        python3 -m venv "$venv"
    fi
}

install_ferry() {
    "$venv/bin/python" -m pip install --upgrade pip
    # Editable: the venv runs this checkout, so an update of the checkout is the update of
    # Ferry, and a plain install never shadows a development one with a stale copy.
    if [ "$dev" -eq 1 ]; then
        "$venv/bin/python" -m pip install -e "${repo}[dev]"
    else
        "$venv/bin/python" -m pip install -e "$repo"
    fi
}

case "${FERRY_ZFS:-}" in
    kernel) kernel_zfs=1 ;;
    fuse) kernel_zfs=0 ;;
    "") if [ -e /sys/module/zfs ]; then kernel_zfs=1; else kernel_zfs=0; fi ;;
    *) echo "install.sh: FERRY_ZFS=$FERRY_ZFS: use kernel, fuse or leave it unset" >&2; exit 2 ;;
esac

packages=(ca-certificates iproute2 etcd-server docker.io python3 python3-venv python3-pip util-linux)
if [ "$kernel_zfs" -eq 1 ]; then
    packages+=(zfsutils-linux python3-pyzfs)
else
    packages+=(zfs-fuse fuse)
fi
if [ "$dev" -eq 1 ]; then
    # ruby: the tests load vagrant/ferry_cluster.rb.
    packages+=(shellcheck ruby)
fi
install_log="${FERRY_INSTALL_LOG:-/var/log/ferry/install.log}"
steps_open install "$install_log"
step "system packages" apt_install "${packages[@]}"
if [ "$kernel_zfs" -eq 0 ]; then
    step "zfs-fuse daemon" "$repo/deploy/zfs-fuse-up.sh"
fi
if [ ! -x "$venv/bin/python" ]; then
    step "virtualenv $venv" make_venv
fi
step "ferry and its Python packages$( [ "$dev" -eq 1 ] && echo ", test and lint tools" )" install_ferry
for tool in ferryctl ferry-control ferry-agent ferry-etcd-bootstrap; do
    ln -sf "$venv/bin/$tool" "/usr/local/bin/$tool"
done
printf 'install: ferry installed in %s (%s); log: %s\n' "$venv" \
    "$( [ "$kernel_zfs" -eq 1 ] && echo "kernel OpenZFS" || echo "zfs-fuse" )" "$install_log" >&2
