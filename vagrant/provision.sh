#!/usr/bin/env bash
# Provision one Vagrant node as a Ferry host (run as root by the Vagrantfile).
#
#   provision.sh --node NAME --nodes NAME=IP[,NAME=IP...] --etcd-members N
#                [--zfs kernel|fuse] [--repo DIR] [--pki DIR] [--disk DEV]
#                [--lease-ttl SECONDS]
#                [--dry-run --root DIR]
#
# Steps: the zfs kernel module (DKMS, --zfs kernel), the repository's
# deploy/install.sh (packages, Ferry's venv), the pool "ferry" on the second
# disk, certificates into /etc/ferry/pki, /etc/ferry/*.env from deploy/config
# and deploy/etcd, then the systemd units. The first N nodes of --nodes run
# etcd (client and peer mutual TLS), the first one runs ferry-control and
# ferry-etcd-bootstrap (etcd users and roles for control and every node, then
# auth on). --lease-ttl sets the agents' FERRY_LEASE_TTL (the same on every node;
# raise it on guests too slow to renew their etcd lease in time). Run it again at any time: every step
# checks first.
#
# --dry-run prints the commands that change the system instead of running
# them, and writes files under --root (a throwaway directory) instead of /.
set -euo pipefail

POOL=ferry
POOL_MOUNTPOINT=/var/lib/ferry/pool
POOL_DISK_SERIAL_LINK=/dev/disk/by-id/virtio-ferry-pool
AGENT_PORT=7480
CONTROL_PORT=7070
DOCKER_TCP_PORT=2375

node="" nodes="" etcd_members="" zfs=kernel repo=/vagrant pki="" disk="" lease_ttl="" dry_run=0 root=""

log() { printf 'provision %s: %s\n' "${node:-?}" "$*" >&2; }
die() { log "$*"; exit 1; }

while [ "$#" -gt 0 ]; do
    case "$1" in
        --node) node="$2"; shift 2 ;;
        --nodes) nodes="$2"; shift 2 ;;
        --etcd-members) etcd_members="$2"; shift 2 ;;
        --zfs) zfs="$2"; shift 2 ;;
        --repo) repo="$2"; shift 2 ;;
        --pki) pki="$2"; shift 2 ;;
        --disk) disk="$2"; shift 2 ;;
        --lease-ttl) lease_ttl="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --root) root="$2"; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
if [ -z "$node" ] || [ -z "$nodes" ] || [ -z "$etcd_members" ]; then
    die "give --node, --nodes and --etcd-members (see --help)"
fi
case "$zfs" in kernel|fuse) ;; *) die "--zfs $zfs: use kernel or fuse" ;; esac
if [ "$dry_run" -eq 1 ] && [ -z "$root" ]; then
    die "--dry-run needs --root DIR for the files it writes"
fi
if [ "$dry_run" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root"
fi

# Commands that change the system; printed instead under --dry-run.
run() {
    if [ "$dry_run" -eq 1 ]; then
        printf 'dry-run: %s\n' "$*"
    else
        "$@"
    fi
}

# --- the cluster's shape, from --nodes ---------------------------------------
declare -a names=() addresses=()
IFS=',' read -r -a entries <<< "$nodes"
for entry in "${entries[@]}"; do
    [[ "$entry" == *=* ]] || die "--nodes entry '$entry' is not NAME=IP"
    names+=("${entry%%=*}")
    addresses+=("${entry#*=}")
done
if ! [[ "$etcd_members" =~ ^[0-9]+$ ]] || [ "$etcd_members" -lt 1 ] || [ "$etcd_members" -gt "${#names[@]}" ]; then
    die "--etcd-members $etcd_members: give a number from 1 to ${#names[@]}"
fi

index=-1
for i in "${!names[@]}"; do
    [ "${names[$i]}" = "$node" ] && index=$i
done
[ "$index" -ge 0 ] || die "--node $node is not in --nodes $nodes"
address="${addresses[$index]}"
control_address="${addresses[0]}:$CONTROL_PORT"
is_control=0
[ "$index" -eq 0 ] && is_control=1
is_etcd_member=0
[ "$index" -lt "$etcd_members" ] && is_etcd_member=1

etcd_endpoints=""
initial_cluster=""
for ((i = 0; i < etcd_members; i++)); do
    etcd_endpoints+="${etcd_endpoints:+,}${addresses[$i]}:2379"
    initial_cluster+="${initial_cluster:+,}${names[$i]}=https://${addresses[$i]}:2380"
done

# --- files --------------------------------------------------------------------
# Copy a documented template from the repository to $root/DEST.
install_template() {
    local source="$1" dest="$root$2" mode="$3"
    mkdir -p "$(dirname "$dest")"
    install -m "$mode" "$repo/$source" "$dest"
}

# Set KEY=VALUE in an env file: replaces the line "KEY=..." or "#KEY=...".
set_env() {
    local file="$root$1" key="$2" value="$3"
    if grep -q "^#\?$key=" "$file"; then
        sed -i "s|^#\?$key=.*|$key=$value|" "$file"
    else
        printf '%s=%s\n' "$key" "$value" >> "$file"
    fi
}

write_configs() {
    install_template deploy/config/agent.env /etc/ferry/agent.env 0644
    set_env /etc/ferry/agent.env FERRY_NODE "$node"
    set_env /etc/ferry/agent.env FERRY_ETCD "$etcd_endpoints"
    set_env /etc/ferry/agent.env FERRY_CONTROL "$control_address"
    set_env /etc/ferry/agent.env FERRY_POOL "$POOL"
    set_env /etc/ferry/agent.env FERRY_LISTEN "$address:$AGENT_PORT"
    set_env /etc/ferry/agent.env FERRY_ADVERTISE "$address:$AGENT_PORT"
    if [ -n "$lease_ttl" ]; then
        set_env /etc/ferry/agent.env FERRY_LEASE_TTL "$lease_ttl"
    fi
    if [ "$is_control" -eq 1 ]; then
        install_template deploy/config/control.env /etc/ferry/control.env 0644
        set_env /etc/ferry/control.env FERRY_ETCD "$etcd_endpoints"
        set_env /etc/ferry/control.env FERRY_LISTEN "$control_address"
    fi
    if [ "$is_etcd_member" -eq 1 ]; then
        install_template deploy/etcd/etcd.env /etc/ferry/etcd.env 0644
        set_env /etc/ferry/etcd.env ETCD_NAME "$node"
        set_env /etc/ferry/etcd.env ETCD_LISTEN_CLIENT_URLS "https://$address:2379,https://127.0.0.1:2379"
        set_env /etc/ferry/etcd.env ETCD_ADVERTISE_CLIENT_URLS "https://$address:2379"
        set_env /etc/ferry/etcd.env ETCD_LISTEN_PEER_URLS "https://$address:2380"
        set_env /etc/ferry/etcd.env ETCD_INITIAL_ADVERTISE_PEER_URLS "https://$address:2380"
        set_env /etc/ferry/etcd.env ETCD_INITIAL_CLUSTER "$initial_cluster"
    fi
    if [ "$is_control" -eq 1 ]; then
        install_template deploy/config/etcd-bootstrap.env /etc/ferry/etcd-bootstrap.env 0644
        set_env /etc/ferry/etcd-bootstrap.env FERRY_ETCD "$etcd_endpoints"
        set_env /etc/ferry/etcd-bootstrap.env FERRY_NODE "${names[*]}"
    fi
}

# Certificates from the CA made on the host machine (vagrant/certs.sh).
install_certificates() {
    local dest="$root/etc/ferry/pki"
    [ -n "$pki" ] || die "give --pki DIR (the certificates made by vagrant/certs.sh)"
    for file in ca.crt "$node.crt" "$node.key"; do
        [ -r "$pki/$file" ] || die "$pki/$file is missing: run 'vagrant provision $node' (its trigger runs certs.sh)"
    done
    install -d -m 0755 "$dest"
    install -m 0644 "$pki/ca.crt" "$dest/ca.crt"
    install -m 0644 "$pki/$node.crt" "$dest/node.crt"
    install -m 0600 "$pki/$node.key" "$dest/node.key"
    if [ "$is_control" -eq 1 ]; then
        install -m 0644 "$pki/control.crt" "$dest/control.crt"
        install -m 0600 "$pki/control.key" "$dest/control.key"
        install -m 0644 "$pki/root.crt" "$dest/root.crt"
        install -m 0600 "$pki/root.key" "$dest/root.key"
    fi
    if [ "$is_etcd_member" -eq 1 ]; then
        install -m 0644 "$pki/etcd-$node.crt" "$dest/etcd.crt"
        install -m 0600 "$pki/etcd-$node.key" "$dest/etcd.key"
        # etcd runs as the etcd user (Debian's etcd-server creates it).
        run chown etcd "$dest/etcd.key"
    fi
}

install_units() {
    local units="$root/etc/systemd/system"
    install -d "$units/docker.service.d"
    install -m 0644 "$repo"/deploy/systemd/ferry-*.service "$units/"
    install -m 0644 "$repo/deploy/systemd/docker.service.d/ferry.conf" "$units/docker.service.d/ferry.conf"
    # Test cluster only: Docker's API on the private network, no TLS, so the
    # cluster suite drives each node's Docker from the host machine
    # (docker_host in vagrant/cluster.yaml). Never do this on a shared network.
    printf '[Service]\nEnvironment="DOCKER_OPTS=-H tcp://%s:%s"\n' "$address" "$DOCKER_TCP_PORT" \
        > "$units/docker.service.d/vagrant-tcp.conf"
}

# --- system -------------------------------------------------------------------
# Debian's zfs-dkms (contrib) builds the module for the running kernel;
# deploy/install.sh then sees /sys/module/zfs and installs the OpenZFS
# userland and python3-pyzfs.
load_kernel_zfs() {
    if [ -e /sys/module/zfs ]; then
        return 0
    fi
    # An image that has zfs.ko for its kernel (vagrant/build-image.sh's) needs no build.
    if [ "$dry_run" -eq 0 ] && modinfo zfs >/dev/null 2>&1; then
        log "loading the zfs kernel module built for this kernel"
        modprobe zfs
        echo zfs > /etc/modules-load.d/zfs.conf
        return 0
    fi
    log "building the zfs kernel module with DKMS (several minutes)"
    if [ "$dry_run" -eq 0 ]; then
        local codename
        codename="$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release)"
        printf 'deb http://deb.debian.org/debian %s contrib\n' "$codename" > /etc/apt/sources.list.d/contrib.list
    fi
    run apt-get -o DPkg::Lock::Timeout=600 update -qq
    run env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
        --no-install-recommends "linux-headers-$(uname -r)" zfs-dkms
    run modprobe zfs
    if [ "$dry_run" -eq 0 ]; then
        echo zfs > /etc/modules-load.d/zfs.conf
    fi
}

# The second disk: by serial on libvirt, else the only whole disk without
# partitions or a filesystem.
find_pool_disk() {
    if [ -n "$disk" ]; then
        echo "$disk"
        return 0
    fi
    if [ -e "$POOL_DISK_SERIAL_LINK" ]; then
        echo "$POOL_DISK_SERIAL_LINK"
        return 0
    fi
    local -a empty=()
    local name type
    while read -r name type; do
        [ "$type" = disk ] || continue
        [ "$(lsblk -nro NAME "$name" | wc -l)" -eq 1 ] || continue
        [ -z "$(blkid -p -o value -s TYPE "$name" 2>/dev/null)" ] || continue
        empty+=("$name")
    done < <(lsblk -dpnro NAME,TYPE)
    if [ "${#empty[@]}" -ne 1 ]; then
        die "expected one empty disk for pool $POOL, found ${#empty[@]} (${empty[*]:-none}); pass --disk DEV"
    fi
    echo "${empty[0]}"
}

create_pool() {
    if [ "$dry_run" -eq 0 ] && zpool list -H -o name "$POOL" >/dev/null 2>&1; then
        log "pool $POOL exists"
        return 0
    fi
    local device
    device="$(find_pool_disk)"
    log "creating pool $POOL on $device"
    run zpool create -f -m "$POOL_MOUNTPOINT" "$POOL" "$device"
}

start_services() {
    run systemctl daemon-reload
    # Debian's etcd.service (localhost only, started by the package) would hold port 2379.
    run systemctl disable --now etcd.service
    # --no-block: etcd's first member, control and the agents wait for quorum,
    # which forms only once the next nodes are provisioned.
    if [ "$is_etcd_member" -eq 1 ]; then
        run systemctl enable --now --no-block ferry-etcd.service
    fi
    if [ "$is_control" -eq 1 ]; then
        run systemctl enable --now --no-block ferry-etcd-bootstrap.service
        run systemctl enable --now --no-block ferry-control.service
    fi
    run systemctl enable --now --no-block ferry-agent.service
    run systemctl restart --no-block docker.service
}

# A step and its time on one line: on an emulated guest they take seconds to many minutes.
timed() {
    local what="$1" started=$SECONDS
    shift
    "$@"
    log "$what: $((SECONDS - started)) s"
}

log "role: etcd=$is_etcd_member control=$is_control zfs=$zfs address=$address"
if [ "$zfs" = kernel ]; then
    timed "zfs kernel module" load_kernel_zfs
fi
timed "deploy/install.sh --dev" run bash "$repo/deploy/install.sh" --dev
timed "pool $POOL" create_pool
install_certificates
write_configs
install_units
timed "units enabled and started" start_services
log "done: agent $address:$AGENT_PORT, control $control_address, etcd $etcd_endpoints"
