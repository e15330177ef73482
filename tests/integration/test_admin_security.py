"""The admin port of a real ``prism serve``: the token, HTTPS, what a reload does, bad files at start-up."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trustme

from tests.integration.conftest import DEFAULT_CONFIG, PrismProcess, free_port


def fetch(url: str, context: ssl.SSLContext, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=5, context=context
        ) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def wait_for_admin(url: str, context: ssl.SSLContext, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if fetch(url + "/healthz", context)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, "the admin port did not answer"
        time.sleep(0.05)


def admin_files(tmp_path: Path) -> tuple[trustme.CA, str]:
    """A CA, and the [admin.tls] section of a certificate it signed for 127.0.0.1."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "admin.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "admin.key"))
    return ca, f'[admin.tls]\ncert_file = "{tmp_path / "admin.pem"}"\nkey_file = "{tmp_path / "admin.key"}"\n'


def test_the_token_guards_v1_over_https_and_changes_only_at_restart(tmp_path: Path) -> None:
    ca, tls_section = admin_files(tmp_path)
    (tmp_path / "first.token").write_text("first-t0ken\n")
    (tmp_path / "second.token").write_text("second-t0ken\n")
    port = free_port()
    head = f'admin_listen = "127.0.0.1:{port}"\n'
    config = head + f'admin_token_file = "{tmp_path / "first.token"}"\n' + DEFAULT_CONFIG + tls_section
    server = PrismProcess(tmp_path / "data", config)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    base = f"https://127.0.0.1:{port}"
    server.start()
    try:
        wait_for_admin(base, client)
        assert fetch(base + "/v1/namespaces", client)[0] == 401
        status, body = fetch(base + "/v1/namespaces", client, "first-t0ken")
        assert status == 200
        generation = json.loads(body)["generation"]

        # A reload naming another token file: applied to the rest, not to the admin port.
        changed = head + f'admin_token_file = "{tmp_path / "second.token"}"\n' + DEFAULT_CONFIG + tls_section
        (tmp_path / "data.toml").write_text(changed)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while (
            json.loads(fetch(base + "/v1/namespaces", client, "first-t0ken")[1])["generation"] == generation
        ):
            assert time.monotonic() < deadline, "the reload was not applied"
            time.sleep(0.05)

        assert fetch(base + "/v1/namespaces", client, "first-t0ken")[0] == 200
        assert fetch(base + "/v1/namespaces", client, "second-t0ken")[0] == 401
    finally:
        server.stop()
    assert server.stderr is not None
    assert "reload: admin_token_file changes only at restart" in server.stderr
    assert "t0ken" not in server.stderr


def serve_once(tmp_path: Path, config: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "prism.toml").write_text(config)
    return subprocess.run(
        [sys.executable, "-m", "prism.cli", "serve", "--config", str(tmp_path / "prism.toml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("problem", ["missing", "directory", "empty"])
def test_a_token_file_that_does_not_load_stops_start_up_with_one_line(tmp_path: Path, problem: str) -> None:
    path = tmp_path / "admin.token"
    if problem == "directory":
        path.mkdir()
    elif problem == "empty":
        path.write_text("\n")
    config = f'admin_listen = "127.0.0.1:{free_port()}"\nadmin_token_file = "{path}"\n'

    done = serve_once(tmp_path, config)

    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith(
        f"prism: config error: admin_token_file: {'cannot read ' if problem != 'empty' else ''}"
    )
    assert str(path) in line


def test_admin_tls_files_that_do_not_load_stop_start_up_with_one_line(tmp_path: Path) -> None:
    _, tls_section = admin_files(tmp_path)
    (tmp_path / "admin.key").write_text("not a key\n")

    done = serve_once(tmp_path, f'admin_listen = "127.0.0.1:{free_port()}"\n{tls_section}')

    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("prism: config error: admin.tls: cannot load the certificate or key: ")


def test_apply_over_https_finds_the_admin_port_and_token_in_the_file(tmp_path: Path) -> None:
    """``prism apply`` with neither --admin nor --token-file: the file's admin_listen, [admin.tls]
    (so HTTPS, checked with --tls-ca) and admin_token_file say where to go and what to send."""
    ca, tls_section = admin_files(tmp_path)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "admin.token").write_text("apply-t0ken\n")
    port = free_port()
    head = f'admin_listen = "127.0.0.1:{port}"\nadmin_token_file = "{tmp_path / "admin.token"}"\n'
    server = PrismProcess(tmp_path / "data", head + DEFAULT_CONFIG + tls_section)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    base = f"https://127.0.0.1:{port}"
    new = tmp_path / "new.toml"
    new.write_text(head + DEFAULT_CONFIG + '[[namespaces]]\nname = "added"\n' + tls_section)
    server.start()
    try:
        wait_for_admin(base, client)
        apply = [
            sys.executable,
            "-m",
            "prism.cli",
            "apply",
            str(new),
            "--yes",
            "--tls-ca",
            str(tmp_path / "ca.pem"),
        ]
        done = subprocess.run(apply, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "  + namespace added: keyvalue on sqlite, tenant default" in done.stdout.splitlines()
        status, body = fetch(base + "/v1/namespaces", client, "apply-t0ken")
        assert status == 200
        assert "added" in {ns["name"] for ns in json.loads(body)["namespaces"]}
        assert (tmp_path / "data.toml").read_text() == new.read_text()
    finally:
        server.stop()
    assert "t0ken" not in done.stdout + done.stderr + (server.stderr or "")
