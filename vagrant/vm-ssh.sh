#!/usr/bin/env bash
# Run a command as root on a node of vagrant/vm-cluster.sh: the run prefix of the
# cluster description that script writes.
#
#   vagrant/vm-ssh.sh SSH-CONFIG NODE ARGV...
#
# ssh hands the remote shell one string: each word is quoted here (printf %q,
# for the guest's bash), so words with spaces (sh -c SCRIPT) arrive as they
# left. The command runs in the node's copy of the repository (/vagrant), as a
# local cluster's commands run in the checkout: `python -m tests.support.writer`
# finds the tests there.
set -euo pipefail
[ "$#" -ge 3 ] || { echo "usage: vm-ssh.sh SSH-CONFIG NODE ARGV..." >&2; exit 2; }
config="$1" node="$2"
shift 2
exec ssh -F "$config" "$node" -- "cd /vagrant && $(printf '%q ' "$@")"
