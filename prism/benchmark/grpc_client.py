"""The grpcio side of a benchmark: channels (plaintext or TLS), seeding one
item, and fetching the answer every call under load must repeat."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from prism.benchmark.procstat import ServerFailed
from prism.proto import kv_pb2

GET_ITEMS = "/prism.kv.v1.KeyValue/GetItems"
PUT_ITEMS = "/prism.kv.v1.KeyValue/PutItems"


def channel_options(authority: str | None) -> list[tuple[str, str]]:
    """grpcio channel options that send ``:authority`` = ``authority`` (None: the target)."""
    return [("grpc.default_authority", authority)] if authority else []


@dataclass(frozen=True)
class GrpcAccess:
    """TLS and credentials for a grpcio client: the CA that signed the
    server's certificate, the name that certificate is for, and the metadata
    every call carries (``authorization: Bearer ...``)."""

    ca_pem: bytes
    server_name: str
    metadata: tuple[tuple[str, str], ...] = ()


def open_channel(target: str, authority: str | None, access: GrpcAccess | None = None) -> grpc.Channel:
    """A grpcio channel to ``target``: plaintext, or TLS as ``access`` says."""
    options = channel_options(authority)
    if access is None:
        return grpc.insecure_channel(target, options=options)
    options.append(("grpc.ssl_target_name_override", access.server_name))
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(access.ca_pem), options=options)


def seed(
    target: str,
    namespace: str,
    record_id: str,
    key: bytes,
    value: bytes,
    authority: str | None = None,
    access: GrpcAccess | None = None,
) -> None:
    """Write one item with a grpcio ``PutItems``."""
    item = kv_pb2.Item(key=key, value=value)
    request = kv_pb2.PutItemsRequest(namespace=namespace, id=record_id, items=[item]).SerializeToString()
    with open_channel(target, authority, access) as channel:
        channel.unary_unary(PUT_ITEMS)(request, timeout=10, metadata=access.metadata if access else ())


def fetch_checked_answer(
    target: str,
    request: bytes,
    expected: list[tuple[bytes, bytes]],
    authority: str | None = None,
    access: GrpcAccess | None = None,
) -> bytes:
    """The raw GetItems answer, after checking it holds exactly the ``expected`` items.

    Raw bytes, because the benchmark checks every answer under load by
    length, and that length must be the server's own encoding.
    """
    with open_channel(target, authority, access) as channel:
        raw: bytes = channel.unary_unary(GET_ITEMS)(
            request, timeout=10, metadata=access.metadata if access else ()
        )
    items = [(item.key, item.value) for item in kv_pb2.GetItemsResponse.FromString(raw).items]
    if items != expected:
        shown = [(key, f"<{len(value)} bytes>") for key, value in expected]
        raise ServerFailed(f"GetItems answered {items!r}, expected {shown}")
    return raw
