"""Certificates and keys for a secure pflower deployment (TLS + SuperNode authentication).

- a CA (``ca.crt``, ``ca.key``) that signs the SuperLink's server certificate;
- the SuperLink's certificate (``server.pem``, ``server.key``), valid for every name and
  address SuperNodes and the ``flwr`` CLI use to reach it (its subject alternative names);
- one key pair per SuperNode (``node-<i>.key``, ``node-<i>.pub``): ECDSA on NIST P-384 in
  OpenSSH format, what ``flower-supernode --auth-supernode-private-key`` loads and
  ``flwr supernode register`` accepts in Flower 1.41.

Existing files are kept (a second ``make`` adds what is missing only), so a restarted
deployment keeps its CA and every SuperNode keeps its registered identity.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


def private_dir(path: Path) -> Path:
    """``path`` as a directory of this user's only (0700), made if missing.

    An existing one must be a real directory (not a symlink) owned by this user: in a shared
    place such as /tmp another local user could otherwise have made it first and planted keys
    or symlinks there, which a later ``make`` would keep or write through.
    """
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{path} is not a directory of its own (a symlink or a file): remove it")
    if info.st_uid != os.geteuid():
        raise PermissionError(f"{path} belongs to uid {info.st_uid}, not to this user: remove it or pick "
                              "another directory")
    if stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o700)
    return path


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a fresh temporary file beside it, renamed over ``path``.

    The temporary name is random and created exclusively (``O_EXCL``, never through a planted
    file or symlink), and the rename replaces a symlink at ``path`` instead of following it.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write ``data``; private keys are readable by their owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, data, 0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pflower"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _certificate(subject: x509.Name, issuer: x509.Name, public_key, signer, ca: bool,
                 san: x509.SubjectAlternativeName | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san is not None:
        builder = (builder.add_extension(san, critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return builder.sign(signer, hashes.SHA256())


def make_ca(pki: Path) -> None:
    """``ca.crt`` and ``ca.key`` unless they exist."""
    if (pki / "ca.crt").exists() and (pki / "ca.key").exists():
        return
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _certificate(_name("pflower CA"), _name("pflower CA"), key.public_key(), key, ca=True)
    _write(pki / "ca.key", _pem_key(key), private=True)
    _write(pki / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), private=False)


def server_names(pki: Path) -> set[str]:
    """The names and addresses ``server.pem`` is valid for (empty if there is none)."""
    path = pki / "server.pem"
    if not path.exists():
        return set()
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    addresses = {str(n) for n in san.get_values_for_type(x509.IPAddress)}
    return addresses | set(san.get_values_for_type(x509.DNSName))


def make_server_cert(pki: Path, names: list[str]) -> None:
    """``server.pem``/``server.key`` signed by the CA, valid for ``names`` (remade if a name
    is missing from the existing certificate)."""
    if set(names) <= server_names(pki):
        return
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _certificate(_name(names[0]), ca_cert.subject, key.public_key(), ca_key, ca=False,
                        san=_san(names))
    _write(pki / "server.key", _pem_key(key), private=True)
    _write(pki / "server.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)


def make_node_key(pki: Path, name: str) -> tuple[Path, Path]:
    """``<name>.key`` (OpenSSH private key) and ``<name>.pub`` unless they exist."""
    private, public = pki / f"{name}.key", pki / f"{name}.pub"
    if not (private.exists() and public.exists()):
        key = ec.generate_private_key(ec.SECP384R1())
        _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()), private=True)
        _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n",
               private=False)
    return private, public


def make_all(pki: Path, names: list[str], nodes: int) -> None:
    """The CA, the server certificate for ``names`` and keys ``node-0`` .. ``node-<nodes-1>``."""
    make_ca(pki)
    make_server_cert(pki, names)
    for i in range(nodes):
        make_node_key(pki, f"node-{i}")
