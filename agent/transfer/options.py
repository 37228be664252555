"""gRPC settings shared by both ends of a transfer.

Keepalive pings detect a cut link within seconds on both ends; the receiver
then cancels the call, which cuts the data connection, so it never sits
forever on a half-received stream.
"""

from __future__ import annotations

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

SERVER_OPTIONS: list[tuple[str, int]] = [
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 4_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 4_000),
]
