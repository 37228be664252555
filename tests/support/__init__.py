"""Helpers the test suites share: real pools, daemons and hosts, always cleaned up."""
