"""Forwarding over TLS to a real rsyslogd (its ossl stream driver), the collector's
certificate checked against the configured CA file and name."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from signerd.client import Client
from signerd.testing import wait_until

from ..conftest import unique
from ..support.rsyslog import Rsyslog, wait_for
from .conftest import forwarded, forwarding_daemon, settled_lines, sign_many

pytestmark = pytest.mark.timeout(180)


def self_signed(directory: Path, name: str = "collector.test") -> tuple[Path, Path]:
    """A certificate for ``name`` and 127.0.0.1 that is its own CA, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "collector.crt", directory / "collector.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file


def test_records_arrive_over_tls(tmp_path: Path) -> None:
    """With tls = true the records reach an rsyslogd that speaks only TLS, in order, once."""
    cert, key_file = self_signed(tmp_path / "pki")
    key = f"{unique('tls')}/k"
    with Rsyslog(tmp_path / "collector", tls=(cert, key_file)) as collector:
        tls: dict[str, Any] = {
            "tls": True,
            "tls_ca_file": str(cert),
            "tls_server_name": "collector.test",
        }
        with forwarding_daemon(tmp_path / "d", collector, **tls) as d:
            with Client(d.socket_path) as c:
                c.create_key(key)
            sign_many(d, key, 20)
            want = settled_lines(d)
            wait_for(collector, sum(len(v) for v in want.values()))
        assert dict(forwarded(collector)) == want


def test_a_collector_with_another_name_gets_nothing(tmp_path: Path) -> None:
    """A collector whose certificate does not match tls_server_name is not sent a record:
    the handshake fails and the forwarder logs the collector as down."""
    cert, key_file = self_signed(tmp_path / "pki", name="other.test")
    key = f"{unique('tls')}/k"
    with Rsyslog(tmp_path / "collector", tls=(cert, key_file)) as collector:
        tls: dict[str, Any] = {
            "tls": True,
            "tls_ca_file": str(cert),
            "tls_server_name": "collector.test",
        }
        with forwarding_daemon(tmp_path / "d", collector, **tls) as d:
            with Client(d.socket_path) as c:
                c.create_key(key)
            sign_many(d, key, 5)
            wait_until(
                lambda: "signerd.forwarding_collector_down" in d.log_text(),
                timeout=30,
                what="the refused connection",
            )
        assert collector.messages() == []


def test_this_hosts_certificate_is_shown_to_a_collector_that_asks(tmp_path: Path) -> None:
    """Over TCP in TLS, tls_cert_file/tls_key_file are shown to a collector that takes
    only senders named signer.test: records arrive; without them nothing does."""
    cert, key_file = self_signed(tmp_path / "pki")
    sender_cert, sender_key = self_signed(tmp_path / "pki-sender", name="signer.test")
    key = f"{unique('tls')}/k"
    tls: dict[str, Any] = {
        "tls": True,
        "tls_ca_file": str(cert),
        "tls_server_name": "collector.test",
    }
    peer = (sender_cert, "signer.test")
    with Rsyslog(tmp_path / "collector", tls=(cert, key_file), peer=peer) as collector:
        with forwarding_daemon(tmp_path / "anonymous", collector, **tls) as d:
            with Client(d.socket_path) as c:
                c.create_key(key)
            sign_many(d, key, 3)
            wait_until(
                lambda: (
                    "signerd.forwarding_connection_lost" in d.log_text()
                    or "signerd.forwarding_collector_down" in d.log_text()
                ),
                timeout=30,
                what="the collector turning the sender away",
            )
        assert collector.messages() == []
        tls |= {"tls_cert_file": str(sender_cert), "tls_key_file": str(sender_key)}
        with forwarding_daemon(tmp_path / "d", collector, **tls) as d:
            assert sign_many(d, key, 10) == 10  # the key made through the first daemon
            want = settled_lines(d)
            wait_for(collector, sum(len(v) for v in want.values()))
        assert dict(forwarded(collector)) == want
