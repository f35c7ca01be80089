"""A small test PKI made with pyca/cryptography: a CA, server and client certificates."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issuer:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def new_ca(name: str) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return Issuer(key, cert)


def issue(
    ca: Issuer,
    common_name: str | None,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(names))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    alt: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return key, builder.sign(ca.key, hashes.SHA256())


@dataclass(frozen=True)
class Credentials:
    cert: str
    key: str


@dataclass(frozen=True)
class Pki:
    ca: str
    server: Credentials
    client_a: Credentials
    client_b: Credentials
    stranger: Credentials  # issued by the trusted CA, mapped to no SAE
    rogue: Credentials  # SAE A's and B's names, from a CA the service does not trust


def write(
    directory: Path, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> Credentials:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Credentials(str(cert_path), str(key_path))


def write_ca(directory: Path, ca: Issuer) -> str:
    """The CA's certificate written as ``ca.crt`` in ``directory``; its path."""
    path = directory / "ca.crt"
    path.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def write_server(directory: Path, ca: Issuer, name: str, common_name: str) -> Credentials:
    """A server certificate for localhost and 127.0.0.1, written as ``name``.crt and .key."""
    key, cert = issue(
        ca, common_name, dns=["localhost"], ips=["127.0.0.1"], usage=ExtendedKeyUsageOID.SERVER_AUTH
    )
    return write(directory, name, key, cert)


def make_pki(directory: Path) -> Pki:
    ca, other_ca = new_ca("qkdd test CA"), new_ca("some other CA")
    return Pki(
        ca=write_ca(directory, ca),
        server=write_server(directory, ca, "server", "qkdd api"),
        client_a=write(directory, "client-a", *issue(ca, "client-a", dns=["app-a.example"])),
        client_b=write(directory, "client-b", *issue(ca, "app-b")),
        stranger=write(directory, "stranger", *issue(ca, "stranger", dns=["x.example"])),
        rogue=write(directory, "rogue", *issue(other_ca, "app-b", dns=["app-a.example"])),
    )
