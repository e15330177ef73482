"""The gRPC port's TLS context, a certificate's principal, and rotation in a worker."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from prism.config import ServerConfig
from prism.config.security import TlsConfig
from prism.errors import ConfigError
from prism.security.runtime import Security
from prism.security.section import SecuritySection
from prism.security.tls import peer_principal, server_context
from prism.workers.preflight import check_deployable


def tls_files(tmp_path: Path, ca: trustme.CA, *, client_ca: trustme.CA | None = None) -> TlsConfig:
    cert = ca.issue_cert("prism.test")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    client_ca_file = ""
    if client_ca is not None:
        client_ca.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
        client_ca_file = str(tmp_path / "clients.pem")
    return TlsConfig(str(tmp_path / "server.pem"), str(tmp_path / "server.key"), client_ca_file)


def test_server_context_offers_h2_only_and_honours_min_version(tmp_path: Path) -> None:
    tls = tls_files(tmp_path, trustme.CA())
    context = server_context(TlsConfig(tls.cert_file, tls.key_file, min_version="TLSv1.3"))
    assert context.minimum_version is ssl.TLSVersion.TLSv1_3
    assert context.verify_mode is ssl.CERT_NONE  # no client CA: no client certificate asked
    mtls = server_context(tls_files(tmp_path, trustme.CA(), client_ca=trustme.CA()))
    assert mtls.verify_mode is ssl.CERT_REQUIRED


def test_a_file_that_does_not_load_stops_start_up_with_one_line(tmp_path: Path) -> None:
    tls = tls_files(tmp_path, trustme.CA())
    (tmp_path / "server.key").write_text("not a key\n")
    with pytest.raises(ConfigError) as info:
        check_deployable(ServerConfig(tls=tls))
    assert str(info.value).startswith("tls: cannot load the certificate, key or client CA: ")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"^tls: cannot load"):
        check_deployable(ServerConfig(tls=TlsConfig(str(tmp_path / "missing.pem"), tls.key_file)))


def test_principal_is_the_first_uri_san_else_the_common_name() -> None:
    spiffe = {
        "subject": ((("commonName", "payments"),),),
        "subjectAltName": (("DNS", "payments.corp"), ("URI", "spiffe://corp/svc/payments"), ("URI", "x:y")),
    }
    assert peer_principal(spiffe) == "spiffe://corp/svc/payments"
    assert (
        peer_principal({"subject": ((("organizationName", "corp"),), (("commonName", "alice"),))}) == "alice"
    )
    assert peer_principal({"subject": ((("organizationName", "corp"),),)}) is None
    assert peer_principal(None) is None


def test_rotation_rebuilds_once_per_serial_and_keeps_the_old_context_on_a_bad_file(tmp_path: Path) -> None:
    tls = tls_files(tmp_path, trustme.CA())
    security = Security()
    security.apply(SecuritySection(1, tls))
    first = security.tls
    assert first is not None
    security.apply(SecuritySection(1, tls))  # same serial: nothing re-read
    assert security.tls is first
    security.apply(SecuritySection(2, tls))  # a reload: the files are read again
    assert security.tls is not None and security.tls is not first
    second = security.tls
    (tmp_path / "server.pem").write_text("half-written\n")
    security.apply(SecuritySection(3, tls))
    assert security.tls is second  # the new file does not load: the previous context stays
    assert security.section.serial == 3
    security.apply(SecuritySection(4, None))  # [tls] removed: plaintext
    assert security.tls is None
