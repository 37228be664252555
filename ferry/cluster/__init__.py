"""The cluster-state adapter: the only code that knows etcd and its key strings."""
