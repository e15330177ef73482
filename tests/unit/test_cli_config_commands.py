"""``prism serve --check`` (the config checked as start-up checks it, and nothing served, bound or
created) and what ``prism apply`` refuses before it talks to any server."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from prism import cli


@pytest.fixture(autouse=True)
def _clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("PRISM_CONFIG", "PRISM_LISTEN", "PRISM_DATA_DIR", "PRISM_LOG_LEVEL", "PRISM_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    # None in sys.modules makes any import of the server (and its supervisor) fail loudly.
    monkeypatch.setitem(sys.modules, "prism.server", None)


def check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    path = tmp_path / "prism.toml"
    path.write_text(text)
    code = cli.main(["serve", "--check", "--config", str(path)])
    out = capsys.readouterr()
    return code, out.out, out.err


GOOD = """
data_dir = "{data}"
listen = "127.0.0.1:{port}"
[[tenants]]
name = "web"
workers = 2
namespaces = [{{ name = "a", backend = "sqlite" }}, {{ name = "b", abstraction = "timeseries" }}]
[[tenants]]
name = "jobs"
namespaces = [{{ name = "c", backend = "memory" }}]
"""


def test_a_good_config_exits_0_with_one_line_and_binds_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:  # serve would fail to bind it: --check does not try
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = tmp_path / "data"
        code, out, err = check(tmp_path, GOOD.format(data=data, port=port), capsys)
    assert (code, err) == (0, "")
    assert out == f"config {tmp_path / 'prism.toml'} is valid: 3 namespaces, 2 tenants, 3 workers\n"
    assert not data.exists()


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("workers = -1\n", "prism: config error: workers: -1 must be >= 0 (0: one per CPU) (from {path})"),
        ("wrokers = 2\n", "prism: config error: wrokers: unknown field (from {path})"),
        ("workers = [\n", "prism: config error: {path}: invalid TOML: "),
        (
            '[[tenants]]\nname = "t"\ncpus = [999]\nnamespaces = [{ name = "a" }]\n',
            "prism: config error: tenants[0].cpus: CPU 999 is not available here (allowed: ",
        ),
        (
            'admin_token_file = "/nonexistent/admin.token"\n',
            "prism: config error: admin_token_file: cannot read /nonexistent/admin.token: No such file",
        ),
    ],
    ids=["a value refused", "an unknown field", "not TOML", "a CPU not here", "a token file missing"],
)
def test_a_bad_config_exits_2_with_one_line_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, line: str
) -> None:
    code, out, err = check(tmp_path, text, capsys)
    assert code == 2
    assert out == ""
    [got] = err.splitlines()
    assert got.startswith(line.format(path=tmp_path / "prism.toml")), got


def test_apply_refuses_a_file_the_admin_port_would_refuse_as_too_large(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from prism.admin.config_api import MAX_BODY_BYTES
    from prism.cli.apply import MAX_CONFIG_BYTES

    assert MAX_CONFIG_BYTES == MAX_BODY_BYTES
    path = tmp_path / "big.toml"
    path.write_text("#" * (MAX_BODY_BYTES + 1))
    assert cli.main(["apply", str(path), "--yes", "--admin", "127.0.0.1:1"]) == 2
    assert capsys.readouterr().err == f"prism: {path} is over 1048576 bytes, the most a server takes\n"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["{path}"], "prism: config error: workers: -1 must be >= 0 (0: one per CPU) (from {path})"),
        (["{missing}"], "prism: cannot read {missing}: No such file or directory"),
        (
            ["{good}", "--admin", "ftp://h:1"],
            "prism: --admin 'ftp://h:1': expected HOST:PORT or an http:// or https:// URL",
        ),
        (
            ["{good}", "--token-file", "{missing}"],
            "prism: cannot read --token-file {missing}: No such file or directory",
        ),
    ],
    ids=["an invalid config", "no such file", "not an admin URL", "no such token file"],
)
def test_apply_refuses_before_sending_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], line: str
) -> None:
    bad, good, missing = tmp_path / "bad.toml", tmp_path / "good.toml", tmp_path / "missing.toml"
    bad.write_text("workers = -1\n")
    good.write_text('[[namespaces]]\nname = "a"\n')
    names = {"path": bad, "good": good, "missing": missing}
    assert cli.main(["apply", *(a.format(**names) for a in args), "--yes"]) == 2
    out = capsys.readouterr()
    assert (out.out, out.err) == ("", line.format(**names) + "\n")
