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
# reschedule time (drain command to the first query answered). It ends
# with a summary: rows written and found, the pause, the bytes moved. Run as
# root on Debian or Ubuntu.
#
# One line per step; what the steps print goes to FERRY_DEMO_LOG (default
# /var/log/ferry/demo.log; the install's to /var/log/ferry/install.log),
# whose last lines are printed if a step fails.
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
# shellcheck source=steps.sh source-path=SCRIPTDIR
source "$repo/deploy/steps.sh"
demo_log="${FERRY_DEMO_LOG:-/var/log/ferry/demo.log}"
steps_open demo "$demo_log"

described="$(mktemp)"
cleanup() {
    rm -f "$described"
    step "cleaning up (cluster $name down)" "$python" "$repo/deploy/local-cluster" down --name "$name"
}
trap cleanup EXIT

up() {
    "$python" "$repo/deploy/local-cluster" up --name "$name" --hosts 2 "$@" >"$described"
}

cd "$repo"
if "$swarm"; then
    step "bringing up host1 and host2 with their dockerds in one Docker Swarm" up --swarm
    scenario=tests.support.swarm
else
    step "bringing up host1 and host2 (netns, ZFS pools, agents, dockerds, etcd, control)" up --docker
    scenario=tests.support.migration
fi
cluster_file="$(cat "$described")"
echo "demo: cluster described in $cluster_file" >&2
"$python" -m "$scenario" "$cluster_file"
