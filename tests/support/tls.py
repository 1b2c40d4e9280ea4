"""A throwaway certificate authority for the mqtts:// and wss:// tests (pyca/cryptography)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def make_ca(
    directory: Path, name: str
) -> tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
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
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def issue(
    directory: Path,
    name: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    server: bool,
) -> tuple[Path, Path]:
    """A server (localhost, 127.0.0.1) or client certificate and its key (mode 0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    crt = directory / f"{name}.crt"
    keyf = directory / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyf.touch(mode=0o600)
    keyf.chmod(0o600)  # peerd refuses a client key other users can read
    keyf.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return crt, keyf


class TestCA:
    """A CA with a broker certificate, a client certificate it signed, and a second, unrelated
    CA with a client certificate of its own (the wrong one)."""

    __test__ = False

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca, ca_cert, ca_key = make_ca(directory, "peerd-test-ca")
        self.server_crt, self.server_key = issue(directory, "broker", ca_cert, ca_key, server=True)
        self.client_crt, self.client_key = issue(directory, "node", ca_cert, ca_key, server=False)
        self.other_ca, other_cert, other_key = make_ca(directory, "someone-else")
        self.stranger_crt, self.stranger_key = issue(
            directory, "stranger", other_cert, other_key, server=False
        )

    def listener(self, port: int, *, websockets: bool = False, require_cert: bool = True) -> str:
        """Mosquitto configuration lines for a TLS listener on 127.0.0.1:`port`."""
        return (
            f"listener {port} 127.0.0.1\n"
            + ("protocol websockets\n" if websockets else "")
            + f"cafile {self.ca}\ncertfile {self.server_crt}\nkeyfile {self.server_key}\n"
            + ("require_certificate true\n" if require_cert else "")
        )
