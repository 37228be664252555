#!/usr/bin/env bash
# Make the Vagrant cluster's CA and certificates on this machine (run by the
# Vagrantfile's trigger before up/provision/reload). Idempotent: an existing CA
# or certificate is kept, so running it again changes nothing.
#
#   certs.sh DIR CONTROL_IP NODE=IP [NODE=IP...]
#
# Writes DIR/ca.crt, ca.key, control.{crt,key}, NODE.{crt,key}, admin.{crt,key},
# etcd-NODE.{crt,key} (the etcd member certificate, used where NODE runs etcd)
# and root.{crt,key} (etcd's administrator, for ferry-etcd-bootstrap).
# `ferryctl ca issue-cluster` (ferry.security.ca.issue_cluster, the one way every
# cluster's set is made) does the work. ferryctl comes from FERRYCTL, else from PATH.
set -euo pipefail

if [ "$#" -lt 3 ]; then
    echo "usage: certs.sh DIR CONTROL_IP NODE=IP [NODE=IP...]" >&2
    exit 2
fi
dir="$1"
control_ip="$2"
shift 2

ferryctl="${FERRYCTL:-$(command -v ferryctl || true)}"
if [ -z "$ferryctl" ] || [ ! -x "$ferryctl" ]; then
    echo "certs.sh: ferryctl not found. Install Ferry on this machine (pip install -e . in a" \
        "virtualenv, or sudo deploy/install.sh) and put ferryctl on PATH or set FERRYCTL=/path/to/ferryctl" >&2
    exit 1
fi

flags=(--control "$control_ip" --user admin)
for entry in "$@"; do
    flags+=(--node "$entry" --etcd "etcd-${entry%%=*}=${entry#*=},127.0.0.1")
done
mkdir -p "$dir"
"$ferryctl" ca issue-cluster --dir "$dir" "${flags[@]}"
