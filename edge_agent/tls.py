"""TLS for the broker link (stdlib ``ssl``): the client's files, its context, and why a connection failed.

``TlsFiles.from_fields(tls_ca, tls_cert, tls_key)`` takes the ``AgentConfig`` fields of the same names
(also used by ``snake-agent check``); ``context`` builds the ``ssl.SSLContext`` the paho client uses.
When a TLS connection fails, ``diagnose`` opens one probe connection (TLS 1.2, so that the broker's
verdict on our certificate arrives during the handshake) and turns what OpenSSL says into one line
naming the cause and the fix.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import LinkError

PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class TlsFiles:
    ca: Path | None  # None: the system's trusted CAs
    cert: Path | None  # client certificate (required by a provisioned broker)
    key: Path | None

    @staticmethod
    def from_fields(tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None) -> TlsFiles | None:
        """None when no field is set (plain TLS with the system's CAs for an mqtts:// URL)."""
        if tls_ca is None and tls_cert is None and tls_key is None:
            return None
        if (tls_cert is None) != (tls_key is None):
            raise LinkError("give both --tls-cert and --tls-key (a client certificate needs its key)")
        for what, path in (("--tls-ca", tls_ca), ("--tls-cert", tls_cert), ("--tls-key", tls_key)):
            if path is not None and not Path(path).is_file():
                raise LinkError(f"{what} {path}: no such file")
        return TlsFiles(tls_ca, tls_cert, tls_key)


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when its handshake fails: paho drops such a socket unclosed, once per reconnect attempt."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError:
            self.close()
            raise


def context(files: TlsFiles | None, max_tls12: bool = False) -> ssl.SSLContext:
    """A client context that verifies the broker (host name included) and shows our certificate."""
    ctx = ssl.create_default_context(cafile=str(files.ca) if files is not None and files.ca is not None else None)
    ctx.sslsocket_class = _ClosingSSLSocket
    if max_tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if files is not None and files.cert is not None and files.key is not None:
        try:
            ctx.load_cert_chain(str(files.cert), str(files.key))
        except (ssl.SSLError, OSError) as exc:
            raise LinkError(f"cannot use client certificate {files.cert} with key {files.key}: {exc}") from None
    return ctx


def diagnose(host: str, port: int, tls: bool, files: TlsFiles | None) -> str | None:
    """Why a connection to host:port fails at the TLS layer, with the fix; None when TLS is not the cause."""
    try:
        raw = socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S)
    except OSError:
        return None
    with raw:
        if not tls:
            return _plain_to_tls(raw, host, port)
        try:
            with context(files, max_tls12=True).wrap_socket(raw, server_hostname=host) as sock:
                sock.sendall(b"\xc0\x00")  # PINGREQ before CONNECT: the broker closes, which proves it spoke TLS
                sock.recv(1)
        except ssl.SSLCertVerificationError as exc:
            return _server_cert(exc, host, files)
        except ssl.SSLEOFError:
            return _closed_on_hello(host, port)
        except ssl.SSLError as exc:
            return _tls_error(exc, host, port)
        except OSError:
            return _closed_on_hello(host, port)
    return None


def _closed_on_hello(host: str, port: int) -> str | None:
    """The broker hung up on our TLS hello: a plain MQTT listener answers a plain CONNECT with a CONNACK."""
    connect = b"\x10\x13\x00\x04MQTT\x04\x02\x00\x0a\x00\x07snk-tls"
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as sock:
            sock.sendall(connect)
            if sock.recv(1) != b"\x20":
                return None
            sock.sendall(b"\xe0\x00")
    except OSError:
        return None
    return f"port {port} on {host} does not speak TLS: use mqtt://{host}:{port}, or the broker's TLS port (often 8883)"


def _plain_to_tls(raw: socket.socket, host: str, port: int) -> str | None:
    try:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with ctx.wrap_socket(raw, server_hostname=host):
            pass
    except ssl.SSLError as exc:
        if "alert" not in str(exc).lower():
            return None
    except OSError:
        return None
    return f"port {port} on {host} speaks TLS: use an mqtts://{host}:{port} broker URL with --tls-ca (and the client certificate)"


def _server_cert(exc: ssl.SSLCertVerificationError, host: str, files: TlsFiles | None) -> str:
    why = (exc.verify_message or str(exc)).lower()
    ca = files.ca if files is not None and files.ca is not None else "the system's CA store"
    if "expired" in why:
        return "the broker's certificate has expired: re-provision the broker (snake-coordinator provision) and restart mosquitto"
    if "not yet valid" in why:
        return "the broker's certificate is not valid yet: check this machine's clock (date -u)"
    if "hostname" in why or "ip address mismatch" in why:
        return f"the broker's certificate does not name {host!r}: use a host name it names, or provision with --hosts {host},..."
    return (f"the broker's certificate is not trusted by {ca} ({exc.verify_message}): wrong CA file? use the ca.crt "
            "from the same provisioning directory as the broker")  # fmt: skip


def _tls_error(exc: ssl.SSLError, host: str, port: int) -> str | None:
    why = str(exc).lower()
    if "wrong version number" in why or "record layer failure" in why or "packet length too long" in why:
        return (
            f"port {port} on {host} does not speak TLS: use mqtt://{host}:{port}, or the broker's TLS port (often 8883)"
        )
    if "certificate expired" in why:
        return "the broker refused our certificate: it has expired; re-provision this agent (snake-coordinator provision) and copy its directory again"
    if "certificate revoked" in why:
        return (
            "the broker refused our certificate: it was revoked; ask the trial's operator to provision this agent again"
        )
    if "unknown ca" in why or "bad certificate" in why or "certificate unknown" in why:
        return "the broker does not trust our client certificate (issued by another CA?): use the client.crt/client.key provisioned for this broker"
    if "certificate required" in why or "handshake failure" in why:
        return (
            "the broker requires a client certificate: set --tls-cert and --tls-key (or tls_cert/tls_key in agent.toml)"
        )
    return None
