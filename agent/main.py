"""ferry-agent: the per-host Ferry agent."""

import click


@click.command()
def main() -> None:
    """Run the Ferry agent on this host (arrives with the agent issue)."""
    click.echo("ferry-agent: not runnable yet; see the issue 'Agent: convergence, gRPC transfer'")
