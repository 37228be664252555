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
# FERRY_INSTALL_LOG (default /var/log/ferry/install.log); FERRY_BIN_DIR (where
# the commands are linked, default /usr/local/bin).
# It prints one line per step; apt's and pip's output goes to that log, whose
# last lines it prints when a step fails. A second run does only what changed:
# apt only for missing packages, pip only when the checkout, the extras or
# pyproject.toml differ from what the last run installed (recorded in the venv).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FERRY_VENV:-/opt/ferry/venv}"
bin_dir="${FERRY_BIN_DIR:-/usr/local/bin}"
# shellcheck source=steps.sh source-path=SCRIPTDIR
source "$repo/deploy/steps.sh"
dev=0
for arg in "$@"; do
    case "$arg" in
        --dev) dev=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument '$arg' (use --dev or nothing)" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (it installs system packages)" >&2
    exit 1
fi

# One dpkg-query for all of them: each run reads dpkg's whole database.
missing_packages() {
    local installed pkg
    installed=$(dpkg-query -W -f='${Package} ${Status}\n' "$@" 2>/dev/null || true)
    for pkg in "$@"; do
        grep -qx "$pkg install ok installed" <<<"$installed" || printf '%s\n' "$pkg"
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

# What install_ferry installs: this checkout, the extras and pyproject.toml (dependencies,
# entry points). When the venv holds the same, pip has nothing to do; its resolver and the
# editable build still take minutes on a slow host (an emulated guest), so it is skipped.
installed_stamp="$venv/.ferry-installed"
install_key() {
    printf 'checkout %s\ndev %s\npyproject.toml %s\n' "$repo" "$dev" \
        "$(sha256sum <"$repo/pyproject.toml" | cut -d' ' -f1)"
}

install_ferry() {
    rm -f "$installed_stamp"
    "$venv/bin/python" -m pip install --upgrade pip
    # Editable: the venv runs this checkout, so an update of the checkout is the update of
    # Ferry, and a plain install never shadows a development one with a stale copy.
    if [ "$dev" -eq 1 ]; then
        "$venv/bin/python" -m pip install -e "${repo}[dev]"
    else
        "$venv/bin/python" -m pip install -e "$repo"
    fi
    install_key >"$installed_stamp"
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
# A kernel with AppArmor on (Debian's and Ubuntu's are): dockerd starts no container
# without apparmor_parser, which loads its docker-default profile.
if [ "$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null)" = Y ]; then
    packages+=(apparmor)
fi
if [ "$dev" -eq 1 ]; then
    # ruby: the tests load vagrant/ferry_cluster.rb; curl: the cluster tests call the
    # plugin socket on each host with it.
    packages+=(shellcheck ruby curl)
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
what="ferry and its Python packages"
if [ "$dev" -eq 1 ]; then
    what+=", test and lint tools"
fi
if [ -f "$installed_stamp" ] && [ "$(cat "$installed_stamp")" = "$(install_key)" ]; then
    printf 'install: %s: installed from this checkout already, pyproject.toml unchanged\n' "$what" >&2
else
    step "$what" install_ferry
fi
mkdir -p "$bin_dir"
for tool in ferryctl ferry-control ferry-agent ferry-etcd-bootstrap; do
    ln -sf "$venv/bin/$tool" "$bin_dir/$tool"
done
printf 'install: ferry installed in %s (%s); log: %s\n' "$venv" \
    "$( [ "$kernel_zfs" -eq 1 ] && echo "kernel OpenZFS" || echo "zfs-fuse" )" "$install_log" >&2
