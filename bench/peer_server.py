"""The comparison peer: grpcio's ``grpc.aio`` serving the same KeyValue calls.

Run by ``kv_get.py`` in its own process, pinned to the CPU Prism gets, so the
two servers are measured under the same conditions. It keeps items in a
dict, as Prism's memory backend does, so the difference measured is the gRPC
stack and not the storage. Only ``PutItems`` (to seed) and ``GetItems`` (the
call measured) are implemented; the rest answer UNIMPLEMENTED.

    python bench/peer_server.py --listen 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc

from prism.proto import kv_pb2, kv_pb2_grpc

Records = dict[tuple[str, str], dict[bytes, bytes]]


class KeyValuePeer(kv_pb2_grpc.KeyValueServicer):
    """Items per (namespace, id) in a dict; no TTLs, predicates or paging.

    The benchmark reads one whole record, so a handler that answers that
    case with the same bytes as Prism is a fair peer; anything more would
    only add work Prism is not doing either.
    """

    def __init__(self) -> None:
        self._records: Records = {}

    async def PutItems(
        self, request: kv_pb2.PutItemsRequest, context: grpc.aio.ServicerContext
    ) -> kv_pb2.PutItemsResponse:
        """Store the items, replacing values of the same key."""
        items = self._records.setdefault((request.namespace, request.id), {})
        for item in request.items:
            items[item.key] = item.value
        return kv_pb2.PutItemsResponse()

    async def GetItems(
        self, request: kv_pb2.GetItemsRequest, context: grpc.aio.ServicerContext
    ) -> kv_pb2.GetItemsResponse:
        """Answer every item of the record, in key order, as Prism does."""
        items = self._records.get((request.namespace, request.id), {})
        return kv_pb2.GetItemsResponse(
            items=[kv_pb2.Item(key=key, value=items[key]) for key in sorted(items)]
        )


async def serve(listen: str) -> None:
    """Serve until SIGTERM or SIGINT, then stop without a grace period."""
    server = grpc.aio.server()
    kv_pb2_grpc.add_KeyValueServicer_to_server(KeyValuePeer(), server)  # type: ignore[no-untyped-call]
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"peer_server: cannot listen on {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(grace=None)


def main() -> None:
    """Parse ``--listen`` and serve."""
    parser = argparse.ArgumentParser(description="grpc.aio KeyValue peer for the benchmark")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    asyncio.run(serve(parser.parse_args().listen))


if __name__ == "__main__":
    main()
