#!/usr/bin/env bash
# Run Vagrant's libvirt cluster on this machine, with nothing reaching any network:
# libvirtd in a network namespace of its own, the local box, TCG.
#
#   vagrant/local-vagrant.sh VAGRANT-ARGS...    e.g. up, status, destroy -f
#   vagrant/local-vagrant.sh --exec COMMAND...  a command in the namespace (the suite)
#   vagrant/local-vagrant.sh --stop             libvirtd ended, the namespace deleted
#
# For a machine whose libvirt runs as a service, with KVM, none of this is
# needed: plain `vagrant up` with the public box (vagrant/README.md).
# Here (a container without systemd, whose /dev/kvm stock guests fail on):
# the namespace NETNS (default ferry-vagrant) is made, virtlogd and libvirtd
# are started in it by hand, so every network libvirt makes (Vagrant's
# management network with its DHCP, the private network 192.168.56.0/24) is a
# bridge inside that namespace with no way out, and qemu's guests run there;
# vagrant/build-box.sh makes and adds the box ferry-local; Vagrant runs in the
# namespace with FERRY_BOX=ferry-local. The cluster's addresses are reachable
# only from the namespace, so the cluster suite runs through --exec.
# --stop refuses while libvirt still has domains (run `destroy -f` first).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
netns="${FERRY_VAGRANT_NETNS:-ferry-vagrant}"
venv="${FERRY_VENV:-/opt/ferry/venv}"
state=/run/ferry-vagrant
LIBVIRT_URI=qemu:///system

log() { printf 'local-vagrant: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (network namespace, libvirtd)"
[ "$#" -gt 0 ] || die "give Vagrant's arguments, --exec COMMAND or --stop (see the top of $0)"

in_netns() { ip netns exec "$netns" "$@"; }
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {
    if pid_alive "$state/libvirtd.pid"; then
        local domains
        domains=$(virsh -c "$LIBVIRT_URI" list --all --name | sed '/^$/d')
        [ -z "$domains" ] || die "libvirt still has domains ($domains): run '$0 destroy -f' first"
    fi
    local daemon
    for daemon in libvirtd virtlogd; do
        if pid_alive "$state/$daemon.pid"; then
            kill "$(cat "$state/$daemon.pid")"
            timeout 30 tail --pid="$(cat "$state/$daemon.pid")" -f /dev/null || die "$daemon did not end"
        fi
        rm -f "$state/$daemon.pid"
    done
    if ip netns list | grep -qw "$netns"; then
        ip netns delete "$netns"
    fi
    log "libvirtd and virtlogd ended, netns $netns deleted"
}

start() {
    mkdir -p "$state"
    if ! ip netns list | grep -qw "$netns"; then
        ip netns add "$netns"
        ip -n "$netns" link set lo up
    fi
    if ! pid_alive "$state/virtlogd.pid"; then
        in_netns virtlogd --daemon --pid-file "$state/virtlogd.pid"
    fi
    if ! pid_alive "$state/libvirtd.pid"; then
        if pgrep -x libvirtd >/dev/null; then
            die "a libvirtd not started by $0 runs here: its networks would not be in netns $netns"
        fi
        in_netns libvirtd --daemon --pid-file "$state/libvirtd.pid"
        timeout 60 bash -c "until virsh -c $LIBVIRT_URI version >/dev/null 2>&1; do sleep 1; done" \
            || die "libvirtd did not answer within 60 s"
        log "libvirtd runs in netns $netns"
    fi
}

case "$1" in
    --stop) stop ;;
    --exec)
        shift
        start
        in_netns "$@"
        ;;
    *)
        start
        "$repo/vagrant/build-box.sh" >/dev/null
        cd "$repo/vagrant"
        in_netns env FERRY_BOX=ferry-local FERRYCTL="$venv/bin/ferryctl" VAGRANT_CHECKPOINT_DISABLE=1 \
            vagrant "$@"
        ;;
esac
