#!/usr/bin/env bash
# First boot of one node of vagrant/vm-cluster.sh, inside the guest: run by
# systemd as the kernel command line's systemd.run= job, from the repository
# shared read-only at /srv/ferry.
#
# Reads the node's settings from the 9p share "seed" (node.env, the ssh key
# that may log in as root, the node's certificates), gives the NIC with the seed's MAC its address (the guest has no
# route beyond the cluster's subnet), starts sshd, copies the repository to
# /vagrant as Vagrant's rsync would, and provisions the node with
# vagrant/provision.sh, the same script a Vagrant node runs (deploy/install.sh,
# pool, certificates, units). The guest has no network beyond the cluster, so
# pip works from the image's wheels only (PIP_NO_INDEX; /etc/pip.conf finds them). Writes
# /run/ferry-node-ready when done; its output goes to the serial console.
set -euo pipefail
exec >/dev/console 2>&1

log() { printf 'vm-cluster-node: %s\n' "$*"; }
log "started $(cut -d' ' -f1 /proc/uptime) s after the kernel"

mkdir -p /srv/seed
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro seed /srv/seed
# shellcheck source=/dev/null  # written by vm-cluster.sh for this node
. /srv/seed/node.env
: "${NODE:?}" "${ADDRESS:?}" "${PREFIX_LENGTH:?}" "${MAC:?}" "${NODES:?}" "${ETCD_MEMBERS:?}" "${LEASE_TTL:?}"

hostname "$NODE"
echo "$NODE" >/etc/hostname
IFS=',' read -r -a entries <<<"$NODES"
for entry in "${entries[@]}"; do
    printf '%s %s\n' "${entry#*=}" "${entry%%=*}" >>/etc/hosts
done

nic=""
for dev in /sys/class/net/*; do
    [ "$(cat "$dev/address")" = "$MAC" ] && nic="${dev##*/}"
done
[ -n "$nic" ] || { log "no NIC with MAC $MAC"; exit 1; }
ip link set lo up
ip addr add "$ADDRESS/$PREFIX_LENGTH" dev "$nic"
ip link set "$nic" up
log "$NODE: $ADDRESS/$PREFIX_LENGTH on $nic"

install -d -m 0700 /root/.ssh
install -m 0600 /srv/seed/authorized_keys /root/.ssh/authorized_keys
systemctl start ssh.service
log "sshd started"

started=$(date +%s)
timeout 120 modprobe zfs
log "zfs module loaded in $(( $(date +%s) - started )) s"
step_started=$(date +%s)
mkdir -p /vagrant
tar -C /srv/ferry --exclude=./.git --exclude=__pycache__ --exclude='*.egg-info' \
    --exclude=./vagrant/.vagrant --exclude=./vagrant/.certs -cf - . | tar -C /vagrant -xf -
log "repository copied to /vagrant in $(( $(date +%s) - step_started )) s"
PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    bash /vagrant/vagrant/provision.sh --node "$NODE" --nodes "$NODES" \
    --etcd-members "$ETCD_MEMBERS" --zfs kernel --repo /vagrant --pki /srv/seed/pki \
    --lease-ttl "$LEASE_TTL"
touch /run/ferry-node-ready
log "provisioned in $(( $(date +%s) - started )) s"
