"""The gRPC keepalive options of the Flow are keys gRPC reads: a quiet call outlives the client's pings with them,
and is cut by the server (GOAWAY ``too_many_pings``) without them.

A plain ``grpc.aio`` server whose one method answers after ten seconds of silence, and a client channel asked to ping
every 200 ms (as the gateway's do every 10 s, scaled down; gRPC sends about one a second) and to keep pinging
without data. With gRPC's server defaults the third ping is refused and the call fails after about 3 s; with :func:`cliptuner.serve.flows.keepalive_options` at the
client's interval, it returns.
"""

import asyncio

import grpc
import pytest

from cliptuner.serve.flows import KEEPALIVE_MS, keepalive_options

PING_MS = 200
QUIET_S = 10.0  # gRPC spaces the pings to about one a second: ten of them, the cut comes after three
METHOD = "/cliptuner.test.Quiet/Wait"


async def quiet_call(server_options: list) -> tuple[bool, str]:
    """One call that the server answers after QUIET_S of silence; (answered, status details)."""

    async def wait(request: bytes, context) -> bytes:
        await asyncio.sleep(QUIET_S)
        return b"done"

    handler = grpc.method_handlers_generic_handler(
        "cliptuner.test.Quiet", {"Wait": grpc.unary_unary_rpc_method_handler(wait)}
    )
    server = grpc.aio.server(options=server_options)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    _, channel_options = keepalive_options(PING_MS)
    options = [
        *channel_options.items(),
        ("grpc.keepalive_timeout_ms", 4999),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            call = channel.unary_unary(METHOD)
            try:
                return await call(b"", timeout=QUIET_S + 30) == b"done", ""
            except grpc.aio.AioRpcError as error:
                return False, f"{error.code().name}: {error.details()}"
    finally:
        await server.stop(None)


def test_without_the_servers_keepalive_options_a_quiet_call_is_cut():
    answered, details = asyncio.run(quiet_call([]))
    assert not answered and "UNAVAILABLE" in details, details


def test_with_the_servers_keepalive_options_a_quiet_call_outlives_the_pings():
    server_options, _ = keepalive_options(PING_MS)
    answered, details = asyncio.run(quiet_call(list(server_options.items())))
    assert answered, details


@pytest.mark.parametrize("ms", [KEEPALIVE_MS, 1000, 3])
def test_the_server_accepts_pings_twice_as_often_as_the_channel_sends_them(ms):
    server, channel = keepalive_options(ms)
    assert server["grpc.http2.min_ping_interval_without_data_ms"] == max(1, ms // 2)
    assert channel["grpc.keepalive_time_ms"] == ms and channel["grpc.http2.max_pings_without_data"] == 0
