"""A mosquitto with a password file, a plain and a TLS listener, and certificates made with ``cryptography``:
a test CA, a broker certificate it signed (valid or expired) and a CA nobody used."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coordinator.broker import find_mosquitto, free_port
from coordinator.mosquitto import run_as_user

USER, PASSWORD = "board", "s3cret-pw"


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def make_ca(out: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name)).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (out / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def make_server_cert(out: Path, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], expired: bool) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    start, end = (now - dt.timedelta(days=60), now - dt.timedelta(days=1)) if expired else (now - dt.timedelta(days=1),
                                                                                              now + dt.timedelta(days=30))  # fmt: skip
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca[1].subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end).add_extension(san, critical=False)
        .sign(ca[0], hashes.SHA256())
    )  # fmt: skip
    (out / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "server.key").write_bytes(_pem_key(key))


@dataclass
class SecureBroker:
    process: subprocess.Popen[bytes]
    plain_port: int
    tls_port: int
    ca: Path  # the CA that signed the broker's certificate
    other_ca: Path  # a CA that signed nothing here

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def start_secure_broker(workdir: Path, expired: bool = False) -> SecureBroker:
    exe = find_mosquitto()
    assert exe is not None
    ca = make_ca(workdir, "test-ca")
    make_ca(workdir, "other-ca")
    make_server_cert(workdir, ca, expired)
    passwords = workdir / "passwords"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), USER, PASSWORD], check=True, capture_output=True)
    plain, tls = free_port(), free_port()
    (workdir / "mosquitto.conf").write_text(
        f"allow_anonymous false\npassword_file {passwords}\nlog_dest stderr\n"
        f"listener {plain} 127.0.0.1\n"
        f"listener {tls} 127.0.0.1\ncafile {workdir / 'test-ca.crt'}\ncertfile {workdir / 'server.crt'}\n"
        f"keyfile {workdir / 'server.key'}\n" + (f"user {user}\n" if (user := run_as_user()) else "")
    )
    with (workdir / "mosquitto.log").open("wb") as log:
        process = subprocess.Popen([str(exe), "-c", str(workdir / "mosquitto.conf")], stdout=log, stderr=log)
    broker = SecureBroker(process, plain, tls, workdir / "test-ca.crt", workdir / "other-ca.crt")
    for _ in range(100):
        if _listening(tls) or process.poll() is not None:
            break
        time.sleep(0.05)
    if process.poll() is not None:
        raise RuntimeError("mosquitto did not start: " + (workdir / "mosquitto.log").read_text())
    return broker


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
