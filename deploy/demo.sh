#!/usr/bin/env bash
# The Ferry demo: two hosts on this machine move a PostgreSQL database.
#
#   deploy/demo.sh            docker run on host1, then the same docker run on host2
#   deploy/demo.sh --swarm    a Docker Swarm service; draining its node moves it
#
# Installs what it needs (deploy/install.sh), builds the PostgreSQL image
# from Debian packages (cached), brings up a two-host local cluster (network
# namespaces, each with its own ZFS pool, agent and dockerd; etcd and
# ferry-control beside them), runs PostgreSQL on host1 with its data on a
# Ferry volume while a writer inserts rows, moves the volume to host2
# (pre-copy while the database runs), stops the container on host1, starts
# the same container on host2, checks every committed row, prints the
# pause, and cleans everything up. With --swarm the dockerds form a swarm,
# PostgreSQL runs as a service, host1 is drained, Swarm restarts the task on
# host2 where Ferry's plugin moves the volume before the Mount returns; then
# host2 is drained and the task returns to host1, which holds the copy it
# left. After each drain the demo checks every committed row and prints the
# reschedule time (drain command to the first query answered). Run as root
# on Debian or Ubuntu.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FERRY_VENV:-/opt/ferry/venv}"
name="${FERRY_DEMO_CLUSTER:-demo}"
swarm=false
case "${1:-}" in
    "") ;;
    --swarm) swarm=true ;;
    *) echo "demo.sh: unknown argument '$1'; use no argument or --swarm" >&2; exit 2 ;;
esac

"$repo/deploy/install.sh"
python="$venv/bin/python"

cleanup() {
    echo "== cleaning up"
    "$python" "$repo/deploy/local-cluster" down --name "$name" >/dev/null 2>&1 || true
}
trap cleanup EXIT

cd "$repo"
if "$swarm"; then
    echo "== bringing up hosts host1 and host2 with their dockerds in one Docker Swarm"
    cluster_file="$("$python" "$repo/deploy/local-cluster" up --name "$name" --hosts 2 --swarm)"
    echo "== cluster described in $cluster_file"
    "$python" -m tests.support.swarm "$cluster_file"
else
    echo "== bringing up hosts host1 and host2 (netns, ZFS pools, agents, dockerds, etcd, control)"
    cluster_file="$("$python" "$repo/deploy/local-cluster" up --name "$name" --hosts 2 --docker)"
    echo "== cluster described in $cluster_file"
    "$python" -m tests.support.migration "$cluster_file"
fi
