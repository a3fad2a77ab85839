"""``snake-coordinator provision``: the click command (the work is in coordinator/provision.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from edge_agent.exitcodes import exit_guard

log = logging.getLogger("coordinator")


def _ids(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@click.command("provision")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Directory for the CA, broker config, and every participant's credentials (keep it private).",
)
@click.option("--agents", default="", help="Comma-separated agent ids to provision (existing ones are kept).")
@click.option("--revoke", default="", help="Comma-separated agent ids to revoke (CRL + removed from every trust dir).")
@click.option(
    "--hosts",
    default="localhost,127.0.0.1",
    show_default=True,
    help="Broker host names / IP addresses for its certificate; the first goes into the agents' URL.",
)
@click.option("--port", default=8883, show_default=True, help="The broker's TLS port.")
@click.option("--bind", default="", help="Listener address (default: every interface).")
@click.option("--days", default=365, show_default=True, help="Validity of new certificates.")
@click.option("--data", default="fashion-mnist", show_default=True, help="Data set written into each agent.toml.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def provision_command(out: Path, agents: str, revoke: str, hosts: str, port: int, bind: str, days: int, data: str,
                      as_json: bool) -> None:  # fmt: skip
    """Make (or extend) a secure trial: CA, TLS certificates, ACL, signing keys, agent configs.

    Start the broker with `mosquitto -c OUT/broker/mosquitto.conf`, each agent with
    `snake-agent run --config OUT/agents/ID/agent.toml`, the coordinator with `--provisioned OUT/coordinator`.
    After --revoke, restart mosquitto (it reads the CRL at start)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from coordinator.provision import ProvisionSpec, provision

    with exit_guard(log):
        spec = ProvisionSpec(out, _ids(agents), _ids(hosts) or ("localhost",), port, bind, days, data, _ids(revoke))
        done = provision(spec)
        if as_json:
            click.echo(json.dumps({"added": done.added, "kept": done.kept, "revoked": done.revoked,
                                   "broker": done.broker_url, "dir": str(out.resolve())}))  # fmt: skip
            return
        click.echo(f"added {', '.join(done.added) or '-'}; kept {', '.join(done.kept) or '-'}; "
                   f"revoked {', '.join(done.revoked) or '-'}")  # fmt: skip
        click.echo(f"broker:      mosquitto -c {out}/broker/mosquitto.conf   (agents connect to {done.broker_url})")
        click.echo(f"agent ID:    snake-agent run --config {out}/agents/ID/agent.toml")
        click.echo(f"coordinator: snake-coordinator run TRIAL --provisioned {out}/coordinator")


def provisioned_broker(home: Path) -> str:
    """The broker URL in ``DIR/coordinator/coordinator.toml``."""
    import tomllib

    from coordinator.errors import ConfigError

    try:
        url = tomllib.loads((home / "coordinator.toml").read_text()).get("broker")
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{home}/coordinator.toml: {exc}; is {home} a provisioned coordinator directory?") from None
    if not isinstance(url, str):
        raise ConfigError(f"{home}/coordinator.toml names no broker")
    return url
