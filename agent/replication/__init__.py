"""The move protocol, both halves, behind three ports (``agent.replication.ports``)."""
