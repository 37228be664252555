#!/usr/bin/env bash
# A Ferry cluster of kernel-OpenZFS guests under qemu, the cluster test suite
# against it, then nothing of it left.
#
#   vagrant/vm-cluster.sh [PYTEST-ARGS...]
#
# Default arguments: tests/cluster/test_moves.py tests/cluster/test_replicas.py
# tests/cluster/test_pg_migration.py.
# FERRY_VM_NODES guests (default 3) boot from the image of
# vagrant/build-image.sh under TCG (one CPU each), each with its own pool disk
# and the repository shared read-only. Each provisions itself as a Vagrant
# node does (vagrant/vm-cluster-node.sh runs vagrant/provision.sh, which runs
# deploy/install.sh): etcd on the first three, ferry-control on the first,
# an agent and dockerd (API on port 2375 of the cluster network) on each.
# Network: a network namespace made here holds a bridge, one tap per guest and
# a veth whose other end, in this machine's namespace, has the subnet's .1:
# the suite runs here and reaches the guests; the guests have no route beyond
# the subnet, and no bridge is made in this machine's namespace.
# The cluster description (docs/local-cluster.md; commands reach a node with
# vagrant/vm-ssh.sh, ssh as root) is written to the run directory, FERRY_CLUSTER_FILE
# for pytest.
# The description's time_scale (FERRY_VM_TIME_SCALE, default 10) stretches the
# suite's waits: emulated guests on a shared machine are that much slower.
# FERRY_VM_LEASE_TTL (default 30) is the agents' --lease-ttl, in the description
# too: under emulation an etcd renewal can take longer than the default 10 s
# lease's self-fence allows, and an owner would freeze its volumes.
# On exit, for any reason: qemu killed, the namespace (bridge, taps, veth)
# deleted, the run directory (pool disks, certificates, ssh key) removed, each
# checked and reported. Timings go to stderr ("vm-cluster: ... in N s"), with
# each guest's own provisioning steps and the load average of this machine
# (sampled every 30 s) over boot, provisioning and the suite.
# Environment: FERRY_VM_CACHE (default /var/cache/ferry/vm), FERRY_VM_IMAGE
# (boot this image directory instead of building one), FERRY_VM_NODES (1-9,
# default 3), FERRY_VM_MEMORY_MB (per guest, default 2048), FERRY_VM_POOL_GB
# (default 4), FERRY_VM_READY_TIMEOUT (seconds for the cluster to come up,
# default 3600), FERRY_VM_TIMEOUT (qemu's lifetime, default 7200),
# FERRY_VM_NAME (prefix of the run's namespace and link, default fvc; the
# process id follows), FERRY_VM_NICE (qemu's niceness, default 19: the guests take what the
# machine's other work leaves; 0 on a machine of your own), FERRY_VM_TIME_SCALE,
# FERRY_VENV (this machine's Ferry, default /opt/ferry/venv).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${FERRY_VM_CACHE:-/var/cache/ferry/vm}"
node_count="${FERRY_VM_NODES:-3}"
memory_mb="${FERRY_VM_MEMORY_MB:-2048}"
pool_gb="${FERRY_VM_POOL_GB:-4}"
ready_timeout="${FERRY_VM_READY_TIMEOUT:-3600}"
qemu_timeout="${FERRY_VM_TIMEOUT:-7200}"
qemu_nice="${FERRY_VM_NICE:-19}"
time_scale="${FERRY_VM_TIME_SCALE:-10}"
lease_ttl="${FERRY_VM_LEASE_TTL:-30}"
venv="${FERRY_VENV:-/opt/ferry/venv}"
SUBNET_PREFIX=10.213
ETCD_MEMBERS_MAX=3
POOL=ferry

log() { printf 'vm-cluster: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
since() { echo $(( $(date +%s) - $1 )); }

[ "$(id -u)" -eq 0 ] || die "run as root (network namespace, taps, the image build)"
[[ "$node_count" =~ ^[1-9]$ ]] || die "FERRY_VM_NODES=$node_count: give 1 to 9"
[[ "$lease_ttl" =~ ^[0-9]+$ ]] || die "FERRY_VM_LEASE_TTL=$lease_ttl: give whole seconds (5 to 600)"
[[ "$time_scale" =~ ^[1-9][0-9]*(\.[0-9]+)?$ ]] || die "FERRY_VM_TIME_SCALE=$time_scale: give a number of at least 1"
for tool in qemu-system-x86_64 ip ssh ssh-keygen; do
    command -v "$tool" >/dev/null \
        || die "no $tool: apt-get install --no-install-recommends qemu-system-x86 iproute2 openssh-client"
done
[ -x "$venv/bin/ferryctl" ] || die "no $venv/bin/ferryctl: install Ferry here (deploy/install.sh --dev) or set FERRY_VENV"
if [ "$#" -eq 0 ]; then
    set -- tests/cluster/test_moves.py tests/cluster/test_replicas.py tests/cluster/test_pg_migration.py
fi

all_started=$(date +%s)
image="${FERRY_VM_IMAGE:-}"
if [ -z "$image" ]; then
    image=$("$repo/vagrant/build-image.sh" --cache "$cache")
fi
log "image ready in $(since "$all_started") s: $image"

run=$(mktemp -d /var/tmp/ferry-vm-cluster.XXXXXX)
tag="${FERRY_VM_NAME:-fvc}$$"
netns="$tag"
veth="$tag"
made_netns=0 made_veth=0
qemu_pids=()
sampler_pid=""
# shellcheck disable=SC2317  # runs from the EXIT trap
cleanup() {
    local status=$? pid left=()
    # Its sleep killed, the sampler's loop ends.
    [ -z "$sampler_pid" ] || pkill -P "$sampler_pid" sleep 2>/dev/null || true
    for pid in "${qemu_pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${qemu_pids[@]}"; do
        wait "$pid" 2>/dev/null || true
        ! kill -0 "$pid" 2>/dev/null || left+=("qemu $pid")
    done
    for sock in "$run"/ssh/*.sock; do
        [ -S "$sock" ] && ssh -S "$sock" -O exit dummy 2>/dev/null
    done
    [ "$made_netns" -eq 0 ] || ip netns delete "$netns" 2>/dev/null || true
    [ "$made_veth" -eq 0 ] || ip link delete "$veth" 2>/dev/null || true
    rm -rf "$run"
    [ "$made_netns" -eq 0 ] || [ ! -e "/run/netns/$netns" ] || left+=("netns $netns")
    [ "$made_veth" -eq 0 ] || ! ip link show "$veth" >/dev/null 2>&1 || left+=("link $veth")
    [ ! -e "$run" ] || left+=("$run")
    if [ "${#left[@]}" -eq 0 ]; then
        log "torn down: ${#qemu_pids[@]} qemu processes ended, netns $netns and link $veth deleted, $run removed"
    else
        log "teardown left ${left[*]}: remove them by hand"
        status=1
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# This machine's load average (1 min) every 30 s, as "EPOCH LOAD" lines.
while sleep 30; do
    printf '%s %s\n' "$(date +%s)" "$(cut -d' ' -f1 /proc/loadavg)" >>"$run/loadavg"
done &
sampler_pid=$!
# The samples from $1 to now (epoch seconds): min, median, max.
load_since() {
    awk -v from="$1" '$1 >= from {print $2}' "$run/loadavg" 2>/dev/null | sort -n | awk '
        {v[NR] = $1}
        END {if (NR) printf "load average %s to %s, median %s (%d samples)", v[1], v[NR], v[int((NR + 1) / 2)], NR
             else printf "load average %s", "not sampled (under 30 s)"}'
}

# A /24 that no address or route here uses yet.
used=$(ip -o -4 addr show; ip -4 route show)
subnet=""
for ((k = $$ % 250, step = 0; step < 250; step++, k = (k + 1) % 250)); do
    if ! grep -q "$SUBNET_PREFIX\.$k\." <<<"$used"; then
        subnet="$SUBNET_PREFIX.$k"
        break
    fi
done
[ -n "$subnet" ] || die "every $SUBNET_PREFIX.x.0/24 is in use here"

names=() addresses=() macs=()
for ((i = 1; i <= node_count; i++)); do
    names+=("node$i")
    addresses+=("$subnet.$((10 + i))")
    macs+=("52:54:00:fe:$(printf '%02x' $(( $$ % 256 ))):$(printf '%02x' "$i")")
done
entries=()
for i in "${!names[@]}"; do
    entries+=("${names[$i]}=${addresses[$i]}")
done
nodes_arg=$(IFS=,; printf '%s' "${entries[*]}")
etcd_members=$(( node_count < ETCD_MEMBERS_MAX ? node_count : ETCD_MEMBERS_MAX ))

# Names of this run only: another run's namespace or link of the same name is left alone.
[ ! -e "/run/netns/$netns" ] || die "a network namespace $netns exists already (another run's?)"
! ip link show "$veth" >/dev/null 2>&1 || die "a link $veth exists already (another run's?)"
ip netns add "$netns"
made_netns=1
ip -n "$netns" link set lo up
ip -n "$netns" link add br0 type bridge
ip -n "$netns" link set br0 up
ip link add "$veth" type veth peer name uplink netns "$netns"
made_veth=1
ip -n "$netns" link set uplink master br0 up
ip addr add "$subnet.1/24" dev "$veth"
ip link set "$veth" up
for i in "${!names[@]}"; do
    ip -n "$netns" tuntap add "tap$i" mode tap
    ip -n "$netns" link set "tap$i" master br0 up
done
log "network: netns $netns (bridge br0, taps), $subnet.1/24 on $veth here, guests ${addresses[*]}"

# Certificates, as the Vagrantfile's trigger makes them.
FERRYCTL="$venv/bin/ferryctl" "$repo/vagrant/certs.sh" "$run/pki" "${addresses[0]}" "${entries[@]}" >/dev/null

mkdir -p "$run/ssh"
ssh-keygen -q -t ed25519 -N '' -C "vm-cluster $tag" -f "$run/ssh/id"
{
    for i in "${!names[@]}"; do
        printf 'Host %s\n  HostName %s\n' "${names[$i]}" "${addresses[$i]}"
    done
    printf 'Host *\n  User root\n  IdentityFile %s\n  IdentitiesOnly yes\n' "$run/ssh/id"
    printf '  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n'
    printf '  BatchMode yes\n  ConnectTimeout 120\n  ServerAliveInterval 15\n'
    printf '  ControlMaster auto\n  ControlPath %s/%%h.sock\n  ControlPersist 900\n' "$run/ssh"
} >"$run/ssh/config"
# shellcheck disable=SC2317  # run by wait_for
ssh_to() { ssh -F "$run/ssh/config" "$@"; }

boot_started=$(date +%s)
for i in "${!names[@]}"; do
    name="${names[$i]}"
    seed="$run/seed/$name"
    mkdir -p "$seed/pki"
    find "$run/pki" -maxdepth 1 -type f ! -name ca.key -exec cp {} "$seed/pki/" \;
    cp "$run/ssh/id.pub" "$seed/authorized_keys"
    printf 'NODE=%s\nADDRESS=%s\nPREFIX_LENGTH=24\nMAC=%s\nNODES=%s\nETCD_MEMBERS=%s\nLEASE_TTL=%s\n' \
        "$name" "${addresses[$i]}" "${macs[$i]}" "$nodes_arg" "$etcd_members" "$lease_ttl" >"$seed/node.env"
    truncate -s "${pool_gb}G" "$run/$name-pool.img"
    # TMPDIR: where qemu keeps the root disk's copy-on-write snapshot (deleted with $run).
    TMPDIR="$run" ip netns exec "$netns" nice -n "$qemu_nice" \
        timeout --kill-after=10 "$qemu_timeout" qemu-system-x86_64 \
        -accel tcg -smp 1 -m "$memory_mb" -no-reboot \
        -display none -monitor none -serial "file:$run/$name.console" \
        -nic "tap,ifname=tap$i,script=no,downscript=no,model=virtio-net-pci,mac=${macs[$i]}" \
        -kernel "$image/vmlinuz" -initrd "$image/initrd.img" \
        -append "root=LABEL=ferry-root rw console=ttyS0 panic=1 quiet \
systemd.run=\"/bin/mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro repo /srv/ferry\" \
systemd.run=\"/bin/bash /srv/ferry/vagrant/vm-cluster-node.sh\" \
systemd.run_success_action=none systemd.run_failure_action=none" \
        -drive "file=$image/rootfs.ext4,format=raw,if=virtio,snapshot=on" \
        -drive "file=$run/$name-pool.img,format=raw,if=none,id=pool" \
        -device virtio-blk-pci,drive=pool,serial=ferry-pool \
        -virtfs "local,path=$repo,mount_tag=repo,security_model=none,readonly=on" \
        -virtfs "local,path=$seed,mount_tag=seed,security_model=none,readonly=on" \
        </dev/null &
    qemu_pids+=("$!")
done
log "booting ${names[*]} (TCG, 1 CPU and ${memory_mb} MB each, pool disks of ${pool_gb} GB, nice $qemu_nice)"

# Each node answers ssh, then finishes provisioning; a guest that died stops the wait.
deadline=$(( $(date +%s) + ready_timeout ))
wait_for() {
    local what="$1"
    shift
    until "$@" >/dev/null 2>&1; do
        for pid in "${qemu_pids[@]}"; do
            kill -0 "$pid" 2>/dev/null || die "a guest's qemu ended while waiting for $what (consoles in $run/*.console: $(tail -n 20 "$run"/*.console))"
        done
        [ "$(date +%s)" -lt "$deadline" ] || die "$what: not within ${ready_timeout} s; last console lines: $(tail -n 20 "$run"/*.console)"
        sleep 5
    done
}
for name in "${names[@]}"; do
    wait_for "ssh to $name" ssh_to "$name" true
    log "$name answers ssh $(since "$boot_started") s after qemu started"
done
for name in "${names[@]}"; do
    wait_for "$name provisioned" ssh_to "$name" test -e /run/ferry-node-ready
    log "$name provisioned $(since "$boot_started") s after qemu started; its steps:"
    grep -a -E '^(vm-cluster-node|provision [^:]*|install): ' "$run/$name.console" | tr -d '\r' \
        | sed "s/^/    /" >&2 || true
done
provisioned_at=$(date +%s)
log "every node provisioned; qemu start to here: $(load_since "$boot_started")"

description="$run/cluster.yaml"
(cd "$repo" && "$venv/bin/python" - "$description" "$run/pki" "$repo/vagrant/vm-ssh.sh" "$run/ssh/config" \
    "$POOL" "$etcd_members" "$nodes_arg" "$time_scale" "$lease_ttl" <<'PY'
"""The qemu cluster's description (docs/local-cluster.md), written with Ferry's own type."""
import sys
from pathlib import Path

from ferry.localcluster.description import ClusterDescription, HostDescription, TlsDescription

path, pki, vm_ssh, ssh_config, pool, etcd_members, nodes, time_scale, lease_ttl = sys.argv[1:10]
hosts = [entry.split("=", 1) for entry in nodes.split(",")]
tls = Path(pki)
ClusterDescription(
    name="vm-cluster",
    kind="vm",
    hosts=tuple(
        HostDescription(
            name=name,
            address=address,
            run_prefix=(vm_ssh, ssh_config, name),
            pool=pool,
            agent_address=f"{address}:7480",
            plugin_socket="/run/docker/plugins/ferry.sock",
            mount_root="/var/lib/ferry/mnt",
            docker_host=f"tcp://{address}:2375",
            logs={"agent": None, "docker": None},
        )
        for name, address in hosts
    ),
    time_scale=float(time_scale),
    lease_ttl=int(lease_ttl),
    etcd_endpoints=tuple(f"{address}:2379" for _, address in hosts[: int(etcd_members)]),
    control_address=f"{hosts[0][1]}:7070",
    tls=TlsDescription(
        dir=tls,
        ca=tls / "ca.crt",
        user_cert=tls / "admin.crt",
        user_key=tls / "admin.key",
        etcd_root_cert=tls / "root.crt",
        etcd_root_key=tls / "root.key",
    ),
).save(Path(path))
PY
)

ferryctl_env=(env FERRY_CONTROL="${addresses[0]}:7070" FERRY_TLS_CA="$run/pki/ca.crt"
    FERRY_TLS_CERT="$run/pki/admin.crt" FERRY_TLS_KEY="$run/pki/admin.key")
# shellcheck disable=SC2317  # run by wait_for
all_nodes_live() {
    "${ferryctl_env[@]}" timeout 60 "$venv/bin/ferryctl" node list -o json \
        | "$venv/bin/python" -c 'import json, sys; sys.exit(len(json.load(sys.stdin)) < int(sys.argv[1]))' "$node_count"
}
wait_for "every agent live at ferry-control" all_nodes_live
for i in "${!names[@]}"; do
    wait_for "dockerd on ${names[$i]}" timeout 60 docker -H "tcp://${addresses[$i]}:2375" version
done
log "cluster up (agents live, every dockerd answers) in $(since "$boot_started") s from qemu start," \
    "$(since "$provisioned_at") s after the last node was provisioned ($(since "$all_started") s in all)"
# How much slower than here a guest runs, for choosing FERRY_VM_TIME_SCALE.
speed_report() {
    local loop here guest
    loop='import time; t = time.perf_counter(); sum(range(3_000_000)); print(time.perf_counter() - t)'
    here=$("$venv/bin/python" -c "$loop") && guest=$(ssh_to "${names[0]}" /opt/ferry/venv/bin/python -c "'$loop'") \
        || return 0
    log "a Python loop of $(printf '%.2f' "$here") s here takes $(printf '%.2f' "$guest") s in ${names[0]}:" \
        "$(awk -v g="$guest" -v h="$here" 'BEGIN {printf "%.0f", g / h}') times as long (time_scale $time_scale)"
}
speed_report

tests_started=$(date +%s)
set +e
(cd "$repo" && FERRY_CLUSTER_FILE="$description" "$venv/bin/python" -m pytest -p no:cacheprovider -rs "$@")
tests_status=$?
set -e
log "cluster suite ran $(since "$tests_started") s (exit status $tests_status), $(load_since "$tests_started"): $*"
log "in all: qemu start to cluster up $(( tests_started - boot_started )) s, suite $(since "$tests_started") s;" \
    "$(load_since "$boot_started")"
exit "$tests_status"
