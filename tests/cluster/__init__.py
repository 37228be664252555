"""Cluster tests: several hosts (netns here, Vagrant nodes there) from one description file."""
