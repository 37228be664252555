"""Placeholder entry point; replaced by the control plane issue."""

import click


@click.command()
def main() -> None:
    """Ferry control plane (arrives with the control plane issue)."""
