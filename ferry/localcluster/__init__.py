"""Ferry hosts on one machine: the package behind ``deploy/local-cluster``.

Each host is a network namespace on a bridge with its own ZFS pool (a sparse
file), agent, certificates and optionally its own dockerd; etcd and
ferry-control run beside them in the root namespace. One module a job:

- ``description``: the cluster description file (typed; load and save), the
  only thing the cluster test suite reads.
- ``layout``: every name, address and path, derived from the cluster name.
- ``commands``: running outside commands (each with a timeout) and waiting.
- ``network``: the bridge, veths and namespaces; the reachability check.
- ``storage``: the hosts' pools and the state dir's mounts.
- ``processes``: finding, starting and stopping the cluster's processes.
- ``certificates``: the cluster's CA and certificates (``ferryctl ca issue-cluster``).
- ``services``: etcd and ferry-control in the root namespace, an agent per host.
- ``dockerd``: a dockerd per host, and the Swarm across them.
- ``cluster``: ``up``, ``down``, ``status``, ``load-image`` and ``process``.
- ``cli``: the command line.

It runs the Ferry programs as subprocesses and imports only ``ferry.core`` and
``ferry.security`` (``tests/unit/test_layers.py``).
"""
