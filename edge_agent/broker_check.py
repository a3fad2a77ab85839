"""The broker part of ``snake-agent check``: address, TLS, credentials and permissions, one step at a time,
so a failure names its layer: nothing listens (TCP), the certificate or port is wrong (TLS handshake, with
the standard library's own verification message), the broker refuses the user (CONNACK), or it refuses the
agent's inbox subscription (ACL). The MQTT step goes through the agent's own link (:mod:`edge_agent.mqtt`)
with a clean session under ``snake-agent-<id>-check``.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from edge_agent.checks import Check
from edge_agent.config import AgentConfig
from edge_agent.errors import EdgeAgentError
from edge_agent.mqtt import BrokerUrl, MqttLink
from edge_agent.protocol import topics
from edge_agent.tls import TlsFiles
from edge_agent.tls import context as tls_context

TIMEOUT_S = 5.0


def check_broker(config: AgentConfig) -> list[Check]:
    from edge_agent.service import broker_url  # the run command's own URL and credential handling

    try:
        url = broker_url(config)
    except EdgeAgentError as exc:
        return [Check("broker", False, str(exc), "fix --broker, --username or --password-file")]
    reason = _tcp(url)
    if reason is not None:
        return [Check("broker", False, f"{url}: {reason}",
                      "start the broker (systemctl start mosquitto) or fix the host and port in --broker; "
                      "check the firewall")]  # fmt: skip
    if url.tls:
        tls = _tls(url, _tls_files(config))
        if not tls.ok:
            return [tls]
    return [*([tls] if url.tls else []), _mqtt(url, config)]


def _tcp(url: BrokerUrl) -> str | None:
    try:
        with socket.create_connection((url.host, url.port), timeout=TIMEOUT_S):
            return None
    except OSError as exc:
        return f"nothing answers on {url.host}:{url.port} ({exc.strerror or exc})"


def _tls_files(config: AgentConfig) -> TlsFiles | None:
    """The CA, client certificate and key the agent would use (``run``'s own TLS settings)."""
    return TlsFiles.from_fields(config.tls_ca, config.tls_cert, config.tls_key)


def _tls(url: BrokerUrl, files: TlsFiles | None) -> Check:
    ca = files.ca if files is not None else None
    trust = f"CA {ca}" if ca else "the system's CAs"
    try:
        context = tls_context(files)  # the run command's own context (edge_agent.tls)
    except (OSError, ssl.SSLError, EdgeAgentError) as exc:
        return Check("tls", False, f"cannot load the TLS files: {exc}", "check --tls-ca, --tls-cert, --tls-key")
    try:
        with socket.create_connection((url.host, url.port), timeout=TIMEOUT_S) as raw:
            with context.wrap_socket(raw, server_hostname=url.host) as tls:
                version, cert = tls.version(), tls.getpeercert() or {}
    except ssl.SSLCertVerificationError as exc:
        return Check("tls", False, f"{url}: the broker's certificate fails verification against {trust}: "
                     f"{exc.verify_message}", _verify_fix(exc.verify_message or "", ca))  # fmt: skip
    except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
        return Check("tls", False, f"{url}: no TLS handshake ({exc}): the port speaks plain MQTT, not TLS?",
                     "use mqtt:// for a plain port, or the broker's TLS port (usually 8883) with mqtts://")  # fmt: skip
    expires = cert.get("notAfter", "?")
    return Check("tls", True, f"{version}, certificate verified against {trust}, valid until {expires}")


def _verify_fix(message: str, ca: Path | None) -> str:
    if "expired" in message:
        return "the broker's certificate has expired: issue a new one (and check this board's clock)"
    if "not yet valid" in message:
        return "this board's clock is behind the certificate: enable time sync (timedatectl set-ntp true)"
    if "hostname" in message or "IP address mismatch" in message:
        return "connect to the name the certificate was issued for, or reissue it with this host in its SAN"
    return "pass the CA that signed the broker's certificate (--tls-ca ca.crt)" if ca is None else \
        f"{ca} did not sign the broker's certificate: pass the broker's CA"  # fmt: skip


def _mqtt(url: BrokerUrl, config: AgentConfig) -> Check:
    try:
        link = MqttLink(url, f"snake-agent-{config.agent_id}-check", [topics.agent_inbox(config.agent_id)],
                        clean_session=True, tls_files=_tls_files(config))  # fmt: skip
        link.start(timeout=TIMEOUT_S)
    except EdgeAgentError as exc:
        return Check("broker", False, str(exc), _refusal_fix(str(exc), url))
    link.stop()
    user = f"user {url.username!r}" if url.username else "no user name"
    return Check("broker", True, f"{url}: connected with {user}, subscribed to {topics.agent_inbox(config.agent_id)}")


def _refusal_fix(message: str, url: BrokerUrl) -> str:
    if "user name or password" in message or "Not authorized" in message:
        return "check --username and the password file (or $SNAKE_MQTT_PASSWORD) against the broker's password file"
    if "subscription" in message:
        return "the broker's ACL must let this user read snake/v1/agents/<agent-id>/inbox and write its status"
    if ("no CONNACK" in message or "speaks TLS" in message) and not url.tls:
        return "the port may expect TLS: use mqtts://host:port (and --tls-ca), or the broker's plain port"
    return "check the broker's log for why it dropped the connection"
