"""Every way `prism serve` can fail to start is one stderr line naming the
field or path, and a non-zero exit code: 2 when the config (or what it
names) cannot work here, 1 when trying again later may (a port in use)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import free_port, tmpfs

CONFIG = '[[namespaces]]\nname = "default"\nbackend = "sqlite"\n'
# Root ignores file modes and binds any port: these capabilities dropped, it does not.
AS_UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-net_bind_service", "--"]


def serve(
    tmp_path: Path,
    *flags: str,
    config: str = CONFIG,
    prefix: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``prism serve`` that is expected to fail at once; its result."""
    cfg = tmp_path / "prism.toml"
    if not cfg.exists():
        cfg.write_text(config)
    defaults = {
        "--config": str(cfg),
        "--listen": f"127.0.0.1:{free_port()}",
        "--data-dir": str(tmp_path / "data"),
    }
    args = list(flags)
    for flag, value in defaults.items():
        if flag not in args:
            args += [flag, value]
    env_admin = f'admin_listen = "127.0.0.1:{free_port()}"\n'
    if "admin_listen" not in cfg.read_text():
        cfg.write_text(env_admin + cfg.read_text())
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "prism.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def one_line(r: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.endswith("\n"), r.stderr
    assert "Traceback" not in r.stderr
    for word in words:
        assert word in r.stderr, (word, r.stderr)
    return r.stderr


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_config_file_missing(tmp_path: Path) -> None:
    r = serve(tmp_path, "--config", str(tmp_path / "nope.toml"))
    one_line(r, 2, "nope.toml", "No such file")


def test_config_file_unreadable(tmp_path: Path) -> None:
    (tmp_path / "prism.toml").write_text(CONFIG)
    (tmp_path / "prism.toml").chmod(0)
    one_line(serve(tmp_path, prefix=_setpriv()), 2, "prism.toml: cannot read", "Permission denied")


def test_config_file_unparsable(tmp_path: Path) -> None:
    (tmp_path / "prism.toml").write_text("listen = [\n")
    one_line(serve(tmp_path), 2, "prism.toml", "invalid TOML")


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:99999"])
def test_listen_unparsable(tmp_path: Path, address: str) -> None:
    one_line(serve(tmp_path, "--listen", address), 2, "listen:")


def test_listen_in_use_names_the_field_and_address(tmp_path: Path) -> None:
    with taken_port() as port:
        r = serve(tmp_path, "--listen", f"127.0.0.1:{port}")
    one_line(r, 1, f"listen: cannot listen on 127.0.0.1:{port}", "in use")


def test_admin_listen_in_use_names_the_field(tmp_path: Path) -> None:
    with taken_port() as port:
        r = serve(tmp_path, config=f'admin_listen = "127.0.0.1:{port}"\n' + CONFIG)
    one_line(r, 1, f"admin_listen: cannot listen on 127.0.0.1:{port}", "in use")


def test_listen_on_an_address_not_on_this_machine(tmp_path: Path) -> None:
    one_line(serve(tmp_path, "--listen", "192.0.2.1:8980"), 2, "listen: cannot listen on 192.0.2.1:8980")


def test_listen_on_a_host_that_does_not_resolve(tmp_path: Path) -> None:
    r = serve(tmp_path, "--listen", "nowhere.invalid:8980")
    one_line(r, 2, "listen: cannot listen on nowhere.invalid:8980")


def _setpriv() -> list[str]:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot drop root's capabilities")
    return AS_UNPRIVILEGED


def test_listen_on_a_privileged_port_without_permission(tmp_path: Path) -> None:
    r = serve(tmp_path, "--listen", "127.0.0.1:81", prefix=_setpriv())
    one_line(r, 2, "listen: cannot listen on 127.0.0.1:81", "Permission denied")


def test_data_dir_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    one_line(serve(tmp_path, "--data-dir", str(tmp_path / "file")), 2, "data_dir:", "is not a directory")


def test_data_dir_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    r = serve(tmp_path, "--data-dir", str(tmp_path / "file" / "data"))
    one_line(r, 2, f"data_dir: cannot use {tmp_path / 'file' / 'data'}", "Not a directory")


def test_data_dir_without_permission(tmp_path: Path) -> None:
    (tmp_path / "locked").mkdir(mode=0o500)
    r = serve(tmp_path, "--data-dir", str(tmp_path / "locked" / "data"), prefix=_setpriv())
    one_line(r, 2, f"data_dir: cannot use {tmp_path / 'locked' / 'data'}", "Permission denied")
    r = serve(tmp_path, "--data-dir", str(tmp_path / "locked"), prefix=_setpriv())
    one_line(r, 2, f"data_dir: cannot use {tmp_path / 'locked'}:", "Permission denied")


def test_runtime_directory_unusable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    r = serve(tmp_path, env={"RUNTIME_DIRECTORY": str(tmp_path / "file")})
    one_line(r, 2, f"RUNTIME_DIRECTORY: {tmp_path / 'file'} is not a directory")


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    yield from tmpfs(tmp_path / "ro", "size=1m,ro")


def test_data_dir_on_a_read_only_file_system(tmp_path: Path, read_only_dir: Path) -> None:
    r = serve(tmp_path, "--data-dir", str(read_only_dir))
    one_line(r, 2, f"data_dir: cannot use {read_only_dir}:", "Read-only file system")
    r = serve(tmp_path, "--data-dir", str(read_only_dir / "data"))
    one_line(r, 2, f"data_dir: cannot use {read_only_dir / 'data'}:", "Read-only file system")


def test_tls_files_missing(tmp_path: Path) -> None:
    config = f'[tls]\ncert_file = "{tmp_path}/none.pem"\nkey_file = "{tmp_path}/none.key"\n' + CONFIG
    one_line(serve(tmp_path, config=config), 2, "tls: cannot load")


def test_tls_files_unreadable(tmp_path: Path) -> None:
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("not PEM\n")
        (tmp_path / name).chmod(0)
    config = f'[tls]\ncert_file = "{tmp_path}/cert.pem"\nkey_file = "{tmp_path}/key.pem"\n' + CONFIG
    one_line(serve(tmp_path, config=config, prefix=_setpriv()), 2, "tls: cannot load", "Permission denied")


def test_a_namespace_file_that_cannot_be_created_halts_with_one_line(
    tmp_path: Path, read_only_dir: Path
) -> None:
    db = read_only_dir / "x.sqlite3"
    config = (
        f'workers = 1\n[[namespaces]]\nname = "default"\nbackend = "sqlite"\noptions = {{ path = "{db}" }}\n'
    )
    r = serve(tmp_path, config=config)
    assert r.returncode == 3, r.stderr
    # Structured log lines (JSON) go to stderr as well; the failure is one plain line.
    plain = [line for line in r.stderr.splitlines() if not line.startswith("{")]
    expected = f"prism: worker 0 of tenant 'default' cannot boot: [Errno 30] Read-only file system: '{db}'"
    assert plain == [expected], r.stderr
