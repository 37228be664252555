"""gRPC settings shared by both ends of a transfer.

Streams travel as large messages: per-message overhead in Python gRPC is
what limits throughput, so chunks are big and the message limit is raised to
match. Keepalive pings detect a cut link within seconds on both ends, so a
receiver never sits forever on a half-received stream.
"""

from __future__ import annotations

CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 16 << 20

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
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
