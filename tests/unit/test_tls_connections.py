"""TLS on the gRPC port, in one process: the accept path over real loopback
sockets (the ClientHello is peeked from the kernel), Python ssl clients, a
real h2 client over them.

What a client sees: a call served over TLS and mTLS; a connection ended,
before any HTTP/2 byte, for a missing, unknown or expired client certificate,
plaintext bytes, a client that did not select ALPN h2, or a handshake that
never comes (on trio's fake clock); TLS sent to a plaintext port ended too;
and after each, the next client served. A connection whose ClientHello asks
for another tenant's name is handed, untouched, to that tenant's worker.
"""

from __future__ import annotations

import logging
import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
import trio
import trustme
from grpc_health.v1 import health_pb2

from prism.api import health
from prism.config.security import TlsConfig
from prism.router.handoff import TenantHandoff, serve_handoffs
from prism.router.table import Routes, WorkerEntry
from prism.rpc.handshake import DRAIN_HANDSHAKE_GRACE_S, HELLO_LIMIT_BYTES
from prism.rpc.listen import serve_listeners
from prism.rpc.methods import MethodTable
from prism.rpc.server import ServerSettings
from prism.security.section import SecuritySection
from tests.certs import client_cert, client_context, server_files

from .h2client import GOAWAY, PING_FRAME, H2Client, frame, frame_types
from .test_clienthello import extension, hello_body, python_hello, records, sni

CHECK = "/grpc.health.v1.Health/Check"
SERVING = health_pb2.HealthCheckResponse.SERVING


def request() -> bytes:
    return frame(health_pb2.HealthCheckRequest().SerializeToString())


def settings_for(tls: TlsConfig | None) -> ServerSettings:
    methods = MethodTable()
    methods.add_service(health.SERVICE, health.Health(health.HealthState()))
    settings = ServerSettings(methods)
    settings.security.apply(SecuritySection(1, tls))
    return settings


@asynccontextmanager
async def server(tls: TlsConfig | None) -> AsyncIterator[tuple[int, ServerSettings]]:
    """serve_listeners on a loopback port: (port, the server's settings)."""
    settings = settings_for(tls)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_listeners, listeners, settings)
        yield port, settings
        nursery.cancel_scope.cancel()


async def tls_client(port: int, context: ssl.SSLContext, server_hostname: str = "prism.test") -> H2Client:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    client = H2Client(trio.SSLStream(tcp, context, server_hostname=server_hostname))
    await client.start()  # the handshake, then the HTTP/2 preface
    return client


async def served(client: H2Client) -> None:
    with trio.fail_after(5):
        response = await client.call(CHECK, request())
    assert response.status == 0
    assert health_pb2.HealthCheckResponse.FromString(response.messages()[0]).status == SERVING


async def refused(
    port: int, context: ssl.SSLContext, server_hostname: str = "prism.test", *, cancel: bool = False
) -> None:
    """The server ends the connection and no HTTP/2 byte ever comes."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, context, server_hostname=server_hostname)
    with trio.fail_after(5):
        try:
            await tls.do_handshake()
            # With TLS 1.3 the client's side of the handshake ends before the
            # server has judged its certificate: the refusal comes after.
            data = await tls.receive_some()
        except trio.BrokenResourceError:
            data = b""
    assert data == b""
    await trio.aclose_forcefully(tls)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def files(tmp_path: Path) -> Path:
    return tmp_path


def tls_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("tls:")]


def no_warnings(caplog: pytest.LogCaptureFixture) -> None:
    loud = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, loud
    assert not any(r.exc_info for r in caplog.records)


async def test_a_tls_call_is_served_and_its_connection_knows_the_peer(ca: trustme.CA, files: Path) -> None:
    async with server(server_files(files, ca)) as (port, settings):
        client = await tls_client(port, client_context(ca))
        await served(client)
        assert client.stream.selected_alpn_protocol() == "h2"  # type: ignore[attr-defined]
        [conn] = settings.connections
        local = client.stream.transport_stream.socket.getsockname()  # type: ignore[attr-defined]
        assert conn.peer == f"127.0.0.1:{local[1]}"
        assert conn.peer_principal is None  # no client CA: no client certificate asked for
        await client.stream.aclose()


async def test_an_mtls_connection_carries_its_client_certificates_principal(
    ca: trustme.CA, files: Path
) -> None:
    clients = trustme.CA()
    async with server(server_files(files, ca, client_ca=clients)) as (port, settings):
        client = await tls_client(port, client_context(ca, client_cert(clients, "alice")))
        await served(client)
        [conn] = settings.connections
        assert conn.peer_principal == "alice"
        await client.stream.aclose()


async def test_a_plaintext_connection_has_a_peer_and_no_principal() -> None:
    async with server(None) as (port, settings):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        client = H2Client(tcp)
        await client.start()
        await served(client)
        [conn] = settings.connections
        assert conn.peer == f"127.0.0.1:{tcp.socket.getsockname()[1]}"
        assert conn.peer_principal is None
        await tcp.aclose()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no client certificate", "peer did not return a certificate"),
        ("a certificate from another CA", "certificate verify failed"),
        ("an expired certificate", "certificate has expired"),
        ("ALPN http/1.1 only", "did not select ALPN h2"),
        ("no ALPN", "did not select ALPN h2"),
    ],
)
async def test_a_refused_handshake_ends_that_connection_alone(
    ca: trustme.CA, files: Path, caplog: pytest.LogCaptureFixture, case: str, reason: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="prism")
    clients = trustme.CA()
    good = client_context(ca, client_cert(clients, "alice"))
    bad = {
        "no client certificate": client_context(ca),
        "a certificate from another CA": client_context(ca, client_cert(trustme.CA(), "alice")),
        "an expired certificate": client_context(ca, client_cert(clients, "alice", expired=True)),
        "ALPN http/1.1 only": client_context(ca, client_cert(clients, "alice"), alpn=("http/1.1",)),
        "no ALPN": client_context(ca, client_cert(clients, "alice"), alpn=()),
    }[case]
    async with server(server_files(files, ca, client_ca=clients)) as (port, settings):
        waiting = await tls_client(port, good)  # a connection that was there before
        await refused(port, bad)
        [line] = tls_lines(caplog)
        assert line.startswith("tls: ") and reason in line and "127.0.0.1:" in line
        no_warnings(caplog)
        await served(waiting)
        await served(await tls_client(port, good))
        assert len(settings.connections) == 2


async def test_a_client_below_min_version_is_refused(
    ca: trustme.CA, files: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="prism")
    tls = msgspec.structs.replace(server_files(files, ca), min_version="TLSv1.3")
    async with server(tls) as (port, _):
        old = client_context(ca)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        await refused(port, old)
        [line] = tls_lines(caplog)
        assert "failed" in line and "unsupported protocol" in line
        no_warnings(caplog)
        await served(await tls_client(port, client_context(ca)))


async def test_plaintext_bytes_to_the_tls_port_end_that_connection(
    ca: trustme.CA, files: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="prism")
    async with server(server_files(files, ca)) as (port, _):
        plain = await trio.open_tcp_stream("127.0.0.1", port)
        client = H2Client(plain)
        await client.start()  # the HTTP/2 client preface and SETTINGS, in the clear
        with trio.fail_after(5):
            assert await plain.receive_some() == b""
        [line] = tls_lines(caplog)
        assert line.startswith("tls: handshake with 127.0.0.1:") and "failed" in line
        no_warnings(caplog)
        await served(await tls_client(port, client_context(ca)))


async def test_tls_to_the_plaintext_port_ends_that_connection(
    ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="prism")
    async with server(None) as (port, settings):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        tls = trio.SSLStream(tcp, client_context(ca), server_hostname="prism.test")
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await tls.do_handshake()  # the server's HTTP/2 SETTINGS is no ServerHello
        await trio.aclose_forcefully(tls)
        no_warnings(caplog)
        plain = await trio.open_tcp_stream("127.0.0.1", port)
        client = H2Client(plain)
        await client.start()
        await served(client)
        with trio.fail_after(5):
            while len(settings.connections) > 1:  # the TLS one is gone
                await trio.sleep(0.01)
        await plain.aclose()


async def test_a_handshake_that_never_comes_is_closed_at_the_timeout_it_was_accepted_under(
    ca: trustme.CA, files: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    caplog.set_level(logging.DEBUG, logger="prism")
    tls = server_files(files, ca, handshake_timeout_s=5)
    async with server(tls) as (port, settings):
        start = trio.current_time()
        silent = await trio.open_tcp_stream("127.0.0.1", port)
        half = await trio.open_tcp_stream("127.0.0.1", port)
        await half.send_all(python_hello("payments.prism.test")[:100])  # half a ClientHello, then nothing
        await trio.sleep(0.1)  # both accepted
        # A reload with a longer timeout: connections already accepted keep theirs.
        settings.security.apply(SecuritySection(2, msgspec.structs.replace(tls, handshake_timeout_s=100)))
        # Meanwhile another client is served at once.
        await served(await tls_client(port, client_context(ca)))
        assert trio.current_time() - start < 1
        with trio.fail_after(60):
            assert await silent.receive_some() == b""
            assert await half.receive_some() == b""
        assert trio.current_time() - start == pytest.approx(5, abs=0.2)
        assert sorted(tls_lines(caplog)) == sorted(
            f"tls: no handshake from 127.0.0.1:{client.socket.getsockname()[1]} within 5s: closed"
            for client in (silent, half)
        )
        no_warnings(caplog)


# -- SNI hand-off --------------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ptls", dir="/tmp"))  # a Unix socket path must be short
    yield path
    shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def two_tenants(
    tls: TlsConfig, sock_dir: Path
) -> AsyncIterator[tuple[int, ServerSettings, ServerSettings]]:
    """A worker of tenant ``default`` accepting on a port, and a worker of
    ``payments`` that takes hand-offs: (port, default's settings, payments')."""
    payments = settings_for(tls)
    address = str(sock_dir / "payments.sock")
    routes = Routes(
        generation=1,
        namespaces={},
        workers={7: WorkerEntry(7, "payments", 0, "", address, serving=True)},
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_handoffs, address, payments)
        async with server(tls) as (port, default):
            default.handoff = TenantHandoff("default", lambda: routes)
            yield port, default, payments
        nursery.cancel_scope.cancel()


class SplitFirstWrite(trio.abc.Stream):
    """A TCP stream whose first write goes out in two segments, a pause apart:
    a ClientHello that comes in pieces."""

    def __init__(self, inner: trio.SocketStream, at: int) -> None:
        self.inner = inner
        self.at = at

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.at:
            at, self.at = self.at, 0
            await self.inner.send_all(data[:at])
            await trio.sleep(0.05)
            data = data[at:]
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_client_hello_naming_another_tenant_hands_the_connection_over(
    ca: trustme.CA, files: Path, sock_dir: Path
) -> None:
    async with two_tenants(server_files(files, ca), sock_dir) as (port, default, payments):
        handed = await tls_client(port, client_context(ca), "payments.prism.test")
        await served(handed)
        assert len(payments.connections) == 1 and not default.connections

        # A ClientHello in two TCP segments is waited for, then handed over too.
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        split = H2Client(
            trio.SSLStream(
                SplitFirstWrite(tcp, 100), client_context(ca), server_hostname="payments.prism.test"
            )
        )
        await split.start()
        await served(split)
        assert len(payments.connections) == 2 and not default.connections

        # This tenant's own name, an unknown tenant's, none (an IP address
        # sends no SNI): served where they landed.
        stayed = []
        for name in ("default.prism.test", "nobody.prism.test", "prism.test", "127.0.0.1"):
            stayed.append(await tls_client(port, client_context(ca), name))
            await served(stayed[-1])
        assert len(payments.connections) == 2 and len(default.connections) == 4


async def test_a_client_hello_that_cannot_be_read_is_not_handed_over(
    ca: trustme.CA, files: Path, sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="prism")
    async with two_tenants(server_files(files, ca), sock_dir) as (port, default, payments):
        # Larger than the server reads ahead for a name: handshaken here (and
        # refused, being no real ClientHello).
        padding = extension(21, bytes(HELLO_LIMIT_BYTES))
        big = records(hello_body([sni((0, b"payments.prism.test")), padding]), [16000])
        # Cut short and closed: the server does not wait for the rest.
        cut = python_hello("payments.prism.test")[:100]
        for data in (big, cut):
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            await tcp.send_all(data)
            if data is cut:
                await tcp.send_eof()
            with trio.fail_after(5):
                assert await tcp.receive_some() == b""
            await tcp.aclose()
        assert not payments.connections and not default.connections
        assert len([line for line in tls_lines(caplog) if "failed" in line]) == 2
        no_warnings(caplog)


async def test_a_worker_whose_certificate_does_not_load_refuses_tls_rather_than_serve_plaintext(
    files: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tls = server_files(files, trustme.CA())
    Path(tls.key_file).write_text("not a key\n")
    async with server(tls) as (port, _):
        assert [r.getMessage().split(":")[:2] for r in caplog.records if r.levelno == logging.ERROR] == [
            ["tls", " refusing TLS connections, no certificate loads"]
        ]
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        client = H2Client(tcp)
        await client.start()
        with trio.fail_after(5):
            assert await tcp.receive_some() == b""  # no plaintext HTTP/2 either
        tcp2 = await trio.open_tcp_stream("127.0.0.1", port)
        tls_stream = trio.SSLStream(tcp2, ssl.create_default_context(), server_hostname="prism.test")
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await tls_stream.do_handshake()
        await trio.aclose_forcefully(tls_stream)
        await tcp.aclose()


async def test_a_tls_connection_whose_tenant_cannot_take_it_is_served_here(
    ca: trustme.CA, files: Path, sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    routes = Routes(
        generation=1,
        namespaces={},
        workers={
            7: WorkerEntry(7, "payments", 0, "", str(sock_dir / "gone.sock"), serving=True),
            8: WorkerEntry(8, "ledger", 0, "", str(sock_dir / "booting.sock"), serving=False),
        },
    )
    async with server(server_files(files, ca)) as (port, default):
        default.handoff = TenantHandoff("default", lambda: routes)
        clients = [
            await tls_client(port, client_context(ca), f"{t}.prism.test") for t in ("payments", "ledger")
        ]
        for client in clients:
            await served(client)
        assert len(default.connections) == 2
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.startswith("hand-off to worker 7 failed (")
    assert warning.endswith("); serving here")


async def test_a_drain_does_not_wait_for_a_handshake_that_never_comes(
    ca: trustme.CA, files: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    caplog.set_level(logging.DEBUG, logger="prism")
    settings = settings_for(server_files(files, ca, handshake_timeout_s=60))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_listeners, listeners, settings)
        silent = await trio.open_tcp_stream("127.0.0.1", port)
        await trio.sleep(0.1)  # accepted
        start = trio.current_time()
        settings.start_drain()
    # serve_listeners has returned: every connection task has ended.
    assert trio.current_time() - start == pytest.approx(DRAIN_HANDSHAKE_GRACE_S, abs=0.1)
    assert await silent.receive_some() == b""
    assert tls_lines(caplog) == [
        f"tls: no handshake from 127.0.0.1:{silent.socket.getsockname()[1]} before the drain: closed"
    ]


async def test_a_drained_tls_connection_reads_what_the_client_sent_after_the_goaway_and_is_not_reset(
    ca: trustme.CA, files: Path
) -> None:
    """As over plaintext (test_connection_opening): the server reads on after
    the drain's GOAWAY until the client ends, so what the client sent before
    it read the GOAWAY does not make the kernel reset the connection."""
    async with server(server_files(files, ca)) as (port, settings):
        client = await tls_client(port, client_context(ca))
        await served(client)
        settings.start_drain()
        received = b""
        with trio.fail_after(5):
            while GOAWAY not in frame_types(received):
                received += await client.stream.receive_some()
        for _ in range(3):  # a reset comes back within a round trip: the next send fails
            await client.stream.send_all(PING_FRAME * 100)
            await trio.sleep(0.05)
        ended = trio.current_time()
        await client.stream.aclose()
        with trio.fail_after(5):
            while settings.connections or settings.accepted:
                await trio.sleep(0.01)
        assert trio.current_time() - ended < 0.5  # well before the grace (1 s)
