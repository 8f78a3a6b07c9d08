"""The mesh's gRPC clients and servers agree on keepalive pings."""

from ragmesh.grpc_client import CHANNEL_OPTIONS
from ragmesh.grpc_server import GRPC_OPTIONS


def test_servers_accept_the_clients_keepalive_pings() -> None:
    # A server refusing them answers GOAWAY too_many_pings and the next call reconnects.
    client, server = dict(CHANNEL_OPTIONS), dict(GRPC_OPTIONS)
    assert client["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.keepalive_permit_without_calls"] == 1
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_recv_ping_interval_without_data_ms"]
    assert server["grpc.http2.max_ping_strikes"] == 0  # BDP probes under load count as strikes too
