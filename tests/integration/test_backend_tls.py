"""Backends over TLS, against real servers the tests start: Redis (``rediss://``),
NATS (``tls://``, and a server that requires TLS), PostgreSQL (``sslmode``).

Each server has a certificate from a CA made here; a client given that CA
connects and works, one given another CA (or another name) does not connect.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import trio

from prism.backends import registry
from prism.backends.keyvalue import ItemWrite, MatchAll, Stamp
from prism.backends.pubsub import Start, StartKind
from prism.cache.redis import RedisTier
from prism.drivers import nats as natsio
from prism.drivers import pg, resp
from prism.drivers.tls import ClientContexts
from prism.errors import Unavailable
from prism.proto import kv_pb2
from tests.pg import DSN
from tests.throwaway import Certs, nats_tls, postgres_ssl, redis_tls

pytestmark = pytest.mark.services("postgres", "nats")

NATS_URL = "nats://127.0.0.1:4222"  # the suite's plaintext NATS


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs.make(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A CA that signed nothing these servers hold."""
    return Certs.make(tmp_path_factory.mktemp("other")).ca_file


# -- Redis ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rediss_port(certs: Certs) -> Iterator[int]:
    with redis_tls(certs, password="s3cret-redis") as port:
        yield port


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_a_redis_namespace_over_rediss_with_ca_file(
    rediss_port: int, certs: Certs, tmp_path: Path
) -> None:
    options = {
        "url": f"rediss://:s3cret-redis@localhost:{rediss_port}/0",
        "ca_file": certs.ca_file,
        "key_prefix": f"tls-{uuid.uuid4().hex}:",
    }
    kv = registry.create("redis", options, data_dir=tmp_path, namespace="ns")
    await kv.open()
    try:
        await kv.put_items("r", [ItemWrite(b"k", b"over tls")], Stamp(1), now_ms())
        page = await kv.get_items(
            "r", MatchAll(), reverse=False, after=None, limit_items=10, limit_bytes=1 << 20, now_ms=now_ms()
        )
        assert [(i.key, i.value) for i in page.items] == [(b"k", b"over tls")]
    finally:
        await kv.aclose()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_rediss_checks_the_certificate_and_the_host_name(
    rediss_port: int, certs: Certs, other_ca: str, host: str
) -> None:
    address = resp.Address(f"rediss://:s3cret-redis@{host}:{rediss_port}/0")
    conn = await resp.connect(address, timeout_s=5, contexts=ClientContexts(certs.ca_file))
    try:
        assert await conn.call("PING") == b"PONG"
    finally:
        conn.close()

    with pytest.raises(resp.CannotConnect, match="certificate verify failed") as caught:
        await resp.connect(address, timeout_s=5, contexts=ClientContexts(other_ca))
    assert "s3cret" not in str(caught.value)


async def test_rediss_refuses_a_certificate_for_another_name(tmp_path: Path) -> None:
    # A certificate this client's CA signed, but for another host.
    elsewhere = Certs.make(tmp_path / "elsewhere", "cache.example")
    with redis_tls(elsewhere) as port:
        address = resp.Address(f"rediss://127.0.0.1:{port}/0")
        with pytest.raises(resp.CannotConnect, match="certificate verify failed: IP address mismatch"):
            await resp.connect(address, timeout_s=5, contexts=ClientContexts(elsewhere.ca_file))


async def test_a_redis_namespace_whose_ca_file_is_missing_is_unavailable(
    rediss_port: int, tmp_path: Path
) -> None:
    options = {"url": f"rediss://localhost:{rediss_port}/0", "ca_file": str(tmp_path / "nope.pem")}
    kv = registry.create("redis", options, data_dir=tmp_path, namespace="ns")
    with pytest.raises(Unavailable, match=r"redis: cannot connect to localhost:\d+: .*No such file"):
        await kv.open()
    await kv.aclose()


async def test_the_redis_cache_tier_over_rediss(rediss_port: int, certs: Certs) -> None:
    tier = RedisTier(
        "ns",
        url=f"rediss://:s3cret-redis@localhost:{rediss_port}/0",
        key_prefix=f"tls-{uuid.uuid4().hex}:",
        ttl_ms=60_000,
        max_value_bytes=1 << 16,
        ca_file=certs.ca_file,
    )
    reads = 0
    answer = kv_pb2.GetItemsResponse(items=[kv_pb2.Item(key=b"k", value=b"v")])

    async def read() -> kv_pb2.GetItemsResponse:
        nonlocal reads
        reads += 1
        return answer

    try:
        first = await tier.get_items("r", b"request", read)
        second = await tier.get_items("r", b"request", read)
    finally:
        await tier.aclose()
    assert first == second == answer.SerializeToString()
    assert reads == 1  # the second answer came from Redis, over TLS
    assert not tier.suspect


# -- NATS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nats_port(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with nats_tls(certs, tmp_path_factory.mktemp("jetstream")) as port:
        yield port


@pytest.mark.parametrize("scheme", ["tls", "nats"])  # nats://: the server's INFO requires TLS
async def test_nats_upgrades_to_tls_after_info(nats_port: int, certs: Certs, scheme: str) -> None:
    nc = await natsio.connect(
        f"{scheme}://localhost:{nats_port}", timeout_s=5, contexts=ClientContexts(certs.ca_file)
    )
    try:
        assert nc.tls
        box = await nc.subscribe("prism.tls.test")
        await nc.publish("prism.tls.test", b"over tls")
        with trio.fail_after(5):
            msg = await nc.next_msg(box)
        assert msg.data == b"over tls"
    finally:
        nc.close()


async def test_nats_over_tls_checks_the_certificate(nats_port: int, other_ca: str) -> None:
    with pytest.raises(natsio.CannotConnect, match="certificate verify failed"):
        await natsio.connect(f"tls://localhost:{nats_port}", timeout_s=5, contexts=ClientContexts(other_ca))


async def test_a_tls_url_never_falls_back_to_plaintext() -> None:
    with pytest.raises(natsio.CannotConnect, match=r"does not offer TLS \(the URL asks for tls://\)"):
        await natsio.connect(NATS_URL.replace("nats://", "tls://"), timeout_s=5)


async def test_a_plaintext_server_stays_plaintext_for_a_nats_url() -> None:
    nc = await natsio.connect(NATS_URL, timeout_s=5)
    try:
        assert not nc.tls
    finally:
        nc.close()


async def test_a_nats_namespace_over_tls_with_ca_file(nats_port: int, certs: Certs, tmp_path: Path) -> None:
    options = {
        "url": f"tls://localhost:{nats_port}",
        "ca_file": certs.ca_file,
        "stream": f"T{uuid.uuid4().hex}",
        "ack_wait_ms": 1000,
    }
    ps = registry.create_pubsub("nats", options, data_dir=tmp_path, namespace="ns")
    await ps.open()
    try:
        first = await ps.publish("topic", b"one", {}, "")
        async with ps.subscribe("topic", "g", Start(StartKind.EARLIEST)) as sub:
            with trio.fail_after(5):
                message = await sub.receive()
        assert (message.sequence, message.payload) == (first, b"one")
    finally:
        await ps.drop()  # type: ignore[attr-defined]
        await ps.aclose()


# -- PostgreSQL -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_ssl() -> Iterator[tuple[int, Certs]]:
    with postgres_ssl() as server:
        yield server


SSL_IN_USE = b"SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


@pytest.mark.parametrize("sslmode", ["require", "verify-ca", "verify-full"])
async def test_sslmode_in_the_dsn_gives_a_tls_connection(pg_ssl: tuple[int, Certs], sslmode: str) -> None:
    port, certs = pg_ssl
    dsn = f"postgresql://postgres:s3cret-pg@localhost:{port}/postgres?sslmode={sslmode}&sslrootcert={certs.ca_file}"
    conn = await pg.connect(dsn, timeout_s=10)
    try:
        assert await conn.execute(SSL_IN_USE) == [(True,)]
    finally:
        conn.close()


async def test_a_postgres_namespace_over_tls(pg_ssl: tuple[int, Certs], tmp_path: Path) -> None:
    port, certs = pg_ssl
    dsn = (
        f"host=localhost port={port} dbname=postgres user=postgres "
        f"sslmode=verify-full sslrootcert={certs.ca_file}"
    )
    kv = registry.create("postgres", {"dsn": dsn}, data_dir=tmp_path, namespace=f"tls_{uuid.uuid4().hex[:8]}")
    await kv.open()
    try:
        await kv.put_items("r", [ItemWrite(b"k", b"over tls")], Stamp(1), now_ms())
        page = await kv.get_items(
            "r", MatchAll(), reverse=False, after=None, limit_items=10, limit_bytes=1 << 20, now_ms=now_ms()
        )
        assert [(i.key, i.value) for i in page.items] == [(b"k", b"over tls")]
    finally:
        await kv.aclose()


async def test_verify_full_refuses_a_server_its_ca_did_not_sign(
    pg_ssl: tuple[int, Certs], other_ca: str
) -> None:
    port, _ = pg_ssl
    dsn = f"postgresql://postgres:s3cret-pg@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={other_ca}"
    with pytest.raises(pg.PgError, match="certificate verify failed") as caught:
        await pg.connect(dsn, timeout_s=10)
    assert caught.value.sqlstate is None  # a connection failure: UNAVAILABLE for clients
    assert "s3cret" not in str(caught.value)


async def test_require_refuses_a_server_without_ssl() -> None:
    dsn = psycopg.conninfo.make_conninfo(DSN, sslmode="require")  # the suite's cluster has no SSL
    with pytest.raises(pg.PgError, match="server does not support SSL"):
        await pg.connect(dsn, timeout_s=10)
