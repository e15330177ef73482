"""What ``prism serve`` creates is private (data dir and runtime dir 0700, the page-token key 0600);
what a user made is left alone, with one warning line when it is open to others."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from prism.api.pagetoken import load_or_create_key
from prism.config import ServerConfig
from prism.config.security import AdminConfig, AdminTlsConfig, TlsConfig
from prism.server import permission_warnings, prepare_runtime


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)  # prepare_runtime sets it
    old = os.umask(0o022)  # the usual umask: what would leave new directories 0755
    try:
        yield
    finally:
        os.umask(old)


def test_a_new_data_dir_runtime_dir_and_key_are_private(tmp_path: Path) -> None:
    data = tmp_path / "srv" / "data"
    config = ServerConfig(data_dir=str(data))

    assert permission_warnings(config) == []
    runtime = prepare_runtime(config)
    load_or_create_key(data)

    assert mode(data) == 0o700
    assert mode(data.parent) == 0o755  # only what is Prism's own is made private
    assert runtime == (data / "run").absolute() and mode(runtime) == 0o700
    assert mode(data / "page-token.key") == 0o600


def test_a_worker_creating_the_data_dir_makes_it_private_too(tmp_path: Path) -> None:
    load_or_create_key(tmp_path / "data")
    assert mode(tmp_path / "data") == 0o700


def test_an_open_data_dir_is_left_alone_with_one_warning(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    load_or_create_key(data)

    warnings = permission_warnings(ServerConfig(data_dir=str(data)))

    assert warnings == [
        f"data_dir {data} is open to group or others (mode 0755); left as it is, "
        f"but `chmod 700 {data}` keeps what it holds to the service's user"
    ]
    assert mode(data) == 0o755  # not changed behind the user's back
    assert mode(data / "page-token.key") == 0o600


def test_an_open_runtime_dir_and_key_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    (data / "run").mkdir(parents=True, mode=0o700)
    data.chmod(0o700)
    (data / "run").chmod(0o750)
    load_or_create_key(data)
    (data / "page-token.key").chmod(0o640)
    config = ServerConfig(data_dir=str(data))

    assert permission_warnings(config) == [
        f"{data / 'page-token.key'} is open to group or others: `chmod 600 {data / 'page-token.key'}` "
        "(it signs page tokens)"
    ]
    with caplog.at_level("WARNING", logger="prism.server"):
        prepare_runtime(config)
    assert [r.getMessage() for r in caplog.records] == [
        f"the runtime directory {data / 'run'} is open to group or others (mode 0750); left as it is, "
        f"but `chmod 700 {data / 'run'}` keeps what it holds to the service's user"
    ]


def test_key_and_token_files_anyone_can_read_are_warned_about(tmp_path: Path) -> None:
    files = {}
    for name, file_mode in (("tls.key", 0o644), ("admin.key", 0o640), ("admin.token", 0o604)):
        files[name] = tmp_path / name
        files[name].write_text("x")
        files[name].chmod(file_mode)
    config = ServerConfig(
        data_dir=str(tmp_path / "data"),
        tls=TlsConfig(str(tmp_path / "tls.pem"), str(files["tls.key"])),
        admin=AdminConfig(tls=AdminTlsConfig(str(tmp_path / "admin.pem"), str(files["admin.key"]))),
        admin_token_file=str(files["admin.token"]),
    )

    assert permission_warnings(config) == [
        f"tls.key_file {files['tls.key']} is readable by any user (mode 0644): "
        f"`chmod o-r {files['tls.key']}`",
        # admin.key is 0640: readable by its group only (root:prism), as deploy/systemd installs it
        f"admin_token_file {files['admin.token']} is readable by any user (mode 0604): "
        f"`chmod o-r {files['admin.token']}`",
    ]


def test_workers_racing_to_create_the_token_key_all_get_the_first_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prism.api import pagetoken

    first = b"k" * 32
    make = pagetoken.secrets.token_bytes

    def another_worker_first(n: int) -> bytes:
        (tmp_path / "page-token.key").write_bytes(first)  # between our look and our write
        return make(n)

    monkeypatch.setattr(pagetoken.secrets, "token_bytes", another_worker_first)

    assert load_or_create_key(tmp_path) == first
    assert (tmp_path / "page-token.key").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page-token.key"]  # no temporary file left
