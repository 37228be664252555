"""The pure core: values and rules with no I/O, imported by every other layer."""
