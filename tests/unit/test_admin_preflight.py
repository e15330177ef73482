"""The admin port's token file and certificate, checked before serving: one line naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from prism.config import ServerConfig
from prism.config.security import AdminConfig, AdminTlsConfig
from prism.errors import ConfigError
from prism.workers.preflight import MAX_ADMIN_TOKEN_BYTES, check_deployable, read_admin_token


def one_line_error(config: ServerConfig) -> str:
    with pytest.raises(ConfigError) as caught:
        check_deployable(config)
    text = str(caught.value)
    assert "\n" not in text
    return text


def test_the_token_is_the_file_without_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "admin.token"
    path.write_bytes(b"  abc-DEF_123.~+/xyz==\n")

    assert read_admin_token(str(path)) == b"abc-DEF_123.~+/xyz=="
    check_deployable(ServerConfig(admin_token_file=str(path)))


def test_a_missing_token_file_stops_start_up(tmp_path: Path) -> None:
    missing = tmp_path / "nope.token"

    text = one_line_error(ServerConfig(admin_token_file=str(missing)))

    assert text == f"admin_token_file: cannot read {missing}: No such file or directory"


def test_a_token_file_that_is_a_directory_stops_start_up(tmp_path: Path) -> None:
    text = one_line_error(ServerConfig(admin_token_file=str(tmp_path)))

    assert text.startswith(f"admin_token_file: cannot read {tmp_path}: ")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "is empty"),
        (b" \n\n", "is empty"),
        (b"two words", "does not hold one bearer token"),
        (b"line1\nline2\n", "does not hold one bearer token"),
        (b"t\xc3\xb6ken", "does not hold one bearer token"),
        (b"a" * (MAX_ADMIN_TOKEN_BYTES + 1), f"is over {MAX_ADMIN_TOKEN_BYTES} bytes"),
    ],
)
def test_a_token_file_without_one_token_stops_start_up(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "admin.token"
    path.write_bytes(content)

    text = one_line_error(ServerConfig(admin_token_file=str(path)))

    assert text.startswith(f"admin_token_file: {path} {reason}")
    assert "two words" not in text and "line1" not in text  # a secret, however malformed


def admin_tls(tmp_path: Path) -> AdminTlsConfig:
    cert = trustme.CA().issue_cert("admin.prism.test")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "admin.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "admin.key"))
    return AdminTlsConfig(str(tmp_path / "admin.pem"), str(tmp_path / "admin.key"))


def test_admin_tls_files_that_load_pass(tmp_path: Path) -> None:
    check_deployable(ServerConfig(admin=AdminConfig(tls=admin_tls(tmp_path))))


def test_admin_tls_files_that_do_not_load_stop_start_up(tmp_path: Path) -> None:
    tls = admin_tls(tmp_path)
    (tmp_path / "admin.key").write_text("not a key\n")

    text = one_line_error(ServerConfig(admin=AdminConfig(tls=tls)))

    assert text.startswith("admin.tls: cannot load the certificate or key: ")
    missing = AdminTlsConfig(str(tmp_path / "missing.pem"), tls.key_file)
    assert one_line_error(ServerConfig(admin=AdminConfig(tls=missing))).startswith("admin.tls: cannot load")
