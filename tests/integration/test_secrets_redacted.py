"""No backend password or token reaches a log line, the admin API or an error of a real ``prism serve``.

The server is configured with a secret in every place a backend takes one:
a PostgreSQL DSN in key=value form and in URI form, a Redis namespace's and
a Redis cache tier's URL, a NATS URL's token; then made to fail with them (a
backend that goes away, one that cannot be reached, a cache tier whose
Redis refuses the password). Every line the supervisor, the workers and the
admin process wrote, the admin API's answers and the statuses clients got
are searched for the secrets.
"""

from __future__ import annotations

import getpass
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from prism.proto import kv_pb2, kv_pb2_grpc, pubsub_pb2, pubsub_pb2_grpc
from tests.integration.conftest import PrismProcess, free_port
from tests.pg import DSN
from tests.rd import RUN_PREFIX
from tests.throwaway import Certs, redis_tls

pytestmark = pytest.mark.services("postgres", "redis", "nats")

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SECRETS = ("S3CRET-PG-KV", "S3CRET-PG-TS", "S3CRET-REDIS", "S3CRET-RKV", "S3CRET-NATS", "S3CRET-PG-GONE")


def uri_dsn(password: str) -> str:
    """The suite's database as a URI whose userinfo carries ``password`` (ignored: trust authentication)."""
    params = conninfo_to_dict(DSN)
    user = params.get("user") or getpass.getuser()
    host, port = params.get("host") or "127.0.0.1", params.get("port") or "5432"
    return f"postgresql://{user}:{password}@{host}:{port}/{params['dbname']}"


def config(admin_port: int, stream: str, table: str, redis: tuple[int, str], *, broken: bool = False) -> str:
    redis_port, ca_file = redis
    text = f"""
admin_listen = "127.0.0.1:{admin_port}"
workers = 1

[[namespaces]]
name = "rkv"
backend = "redis"
options = {{ url = "rediss://:S3CRET-RKV@localhost:{redis_port}/0", ca_file = "{ca_file}" }}

[[namespaces]]
name = "ledger_{table}"
backend = "postgres"
options = {{ dsn = "{make_conninfo(DSN, password="S3CRET-PG-KV")}" }}

[[namespaces]]
name = "events_{table}"
abstraction = "timeseries"
backend = "postgres"
options = {{ dsn = "{uri_dsn("S3CRET-PG-TS")}" }}

[[namespaces]]
name = "cached"
backend = "sqlite"
cache = {{ tier = "redis", url = "redis://:S3CRET-REDIS@127.0.0.1:6379/0", key_prefix = "{RUN_PREFIX}" }}

[[namespaces]]
name = "bus"
abstraction = "pubsub"
backend = "nats"
options = {{ url = "nats://S3CRET-NATS@127.0.0.1:4222", stream = "{stream}" }}
"""
    if broken:  # nothing listens on that port
        gone = f"postgresql://someone:S3CRET-PG-GONE@127.0.0.1:{free_port()}/nowhere"
        text += f'\n[[namespaces]]\nname = "gone"\nbackend = "postgres"\noptions = {{ dsn = "{gone}" }}\n'
    return text


def admin_get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        body: bytes = response.read()
        return body


def drop_stream(stream: str) -> None:
    script = (
        "import trio\n"
        "from prism.drivers import nats\n"
        "async def main():\n"
        "    nc = await nats.connect('nats://127.0.0.1:4222', timeout_s=5)\n"
        f"    await nc.request('$JS.API.STREAM.DELETE.{stream}', timeout_s=5)\n"
        "    nc.close()\n"
        "trio.run(main)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)


def test_no_secret_in_logs_admin_output_or_errors(tmp_path: Path) -> None:
    admin_port, stream, table = free_port(), f"T{uuid.uuid4().hex}", f"t{uuid.uuid4().hex[:10]}"
    certs = Certs.make(tmp_path / "certs")
    details: list[str] = []
    with ExitStack() as stack:  # undone in reverse: the server, then Redis, then the stream
        stack.callback(drop_stream, stream)
        redis_server = ExitStack()
        stack.callback(redis_server.close)
        redis = (redis_server.enter_context(redis_tls(certs, password="S3CRET-RKV")), certs.ca_file)
        server = PrismProcess(
            tmp_path / "data", config(admin_port, stream, table, redis), extra_args=["--log-level", "debug"]
        )
        stack.callback(server.stop)
        server.start()
        with grpc.insecure_channel(server.endpoint) as channel:
            kv = kv_pb2_grpc.KeyValueStub(channel)
            for namespace in (f"ledger_{table}", "rkv"):
                item = kv_pb2.Item(key=b"k", value=b"v")
                kv.PutItems(kv_pb2.PutItemsRequest(namespace=namespace, id="r", items=[item]), timeout=5)
            kv.GetItems(kv_pb2.GetItemsRequest(namespace="cached", id="r"), timeout=5)  # the tier refuses
            publish = pubsub_pb2.PublishRequest(namespace="bus", topic="t", payload=b"x")
            pubsub_pb2_grpc.PubSubStub(channel).Publish(publish, timeout=5)

            # The Redis namespace's server goes away: its callers get its driver's errors.
            redis_server.close()
            for _ in range(2):
                with pytest.raises(grpc.RpcError) as caught:
                    kv.GetItems(kv_pb2.GetItemsRequest(namespace="rkv", id="r"), timeout=5)
                details.append(f"{caught.value.code().name}: {caught.value.details()}")  # type: ignore[attr-defined]

        # A namespace whose backend cannot be reached, added by a reload: its worker logs why.
        (tmp_path / "data.toml").write_text(config(admin_port, stream, table, redis, broken=True))
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        with grpc.insecure_channel(server.endpoint) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 15
            while True:  # until the worker has tried to open it (and failed)
                try:
                    if (
                        health.Check(health_pb2.HealthCheckRequest(service="gone"), timeout=5).status
                        == NOT_SERVING
                    ):
                        break
                except grpc.RpcError:
                    pass  # unknown until the reload reaches the worker
                assert time.monotonic() < deadline, "the reload was not applied"
                time.sleep(0.1)
        page = admin_get(admin_port, "/v1/namespaces")
        metrics = admin_get(admin_port, "/metrics")

    logs = server.stderr or ""
    # The secrets had every chance to show up: each failure was logged or answered.
    assert "namespace gone: cannot open backend postgres: postgres: cannot connect" in logs
    assert "Redis cache tier unusable" in logs
    assert [d.split(":")[0] for d in details] == ["UNAVAILABLE", "UNAVAILABLE"]
    assert all("redis: " in d for d in details)
    assert b'"url":"redis://:***@127.0.0.1:6379/0"' in page  # shown, masked
    for secret in SECRETS:
        assert secret not in logs
        assert secret.encode() not in page
        assert secret.encode() not in metrics
        assert not any(secret in d for d in details)


def test_a_config_error_with_a_password_never_shows_it(tmp_path: Path) -> None:
    cfg = tmp_path / "prism.toml"
    cfg.write_text(
        '[[namespaces]]\nname = "x"\nbackend = "postgres"\n'
        'options = { dsn = "postgresql://prism:p%zzS3CRET@db/app" }\n'  # libpq quotes the bad token
    )

    done = subprocess.run(
        [sys.executable, "-m", "prism.cli", "serve", "--config", str(cfg), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("prism: config error: namespaces[0].options.dsn: is invalid: ")
    assert "S3CRET" not in line
