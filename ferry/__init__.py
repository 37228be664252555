"""Ferry's shared library: what both programs, ``agent`` and ``control``, build on.

Layers, each importing only the ones above it:

- ``ferry.core``: records, name and size rules, compression sets, the plan; no I/O.
- ``ferry.security``: certificates, TLS, and who may call what.
- ``ferry.cluster``: etcd, the keyspace and the cluster view.
- ``ferry.localcluster``: ``deploy/local-cluster``, hosts on one machine (core, security).

``agent`` and ``control`` import ``ferry``; ``ferry`` imports neither, and
``control`` never imports ``agent`` (``tests/unit/test_layers.py``).
"""
