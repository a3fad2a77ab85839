"""``snake-agent``: run an edge agent. Thin: parse, build config, call the service."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from edge_agent import profile
from edge_agent.agent_file import AgentFileError, option_keys, read_agent_file
from edge_agent.backends import installed
from edge_agent.config import AgentConfig
from edge_agent.exitcodes import ExitCode, exit_guard
from edge_agent.protocol.topics import check_id

log = logging.getLogger("edge_agent")
_F = TypeVar("_F", bound=Callable[..., Any])


def setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr, level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("edge_agent.mqtt.paho").setLevel(logging.WARNING)


def _part(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not K/N (e.g. 0/4)") from None
    if not 0 <= index < count:
        raise click.BadParameter(f"K must be in 0..N-1, got {text!r}")
    return index, count


def _agent_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return check_id(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _file_keys(command: click.Command) -> dict[str, str]:
    """Config-file key -> parameter name, for every long option of ``command`` but ``--config``."""
    names = {}
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "config":
            long = next((opt for opt in param.opts if opt.startswith("--")), None)
            if long is not None and param.name is not None:
                names[long] = param.name
    return option_keys(names)


def _read_config(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """Eager: the file's settings become the command's defaults, so environment and flags override them."""
    if value is None:
        return None
    keys = _file_keys(ctx.command)
    try:
        settings = read_agent_file(value, keys)
    except AgentFileError as exc:
        click.echo(f"Error: {exc}", err=True)
        ctx.exit(ExitCode.CONFIG)
    ctx.default_map = {**(ctx.default_map or {}), **{keys[key]: v for key, v in settings.items()}}
    return value


def config_option(command: _F) -> _F:
    """``--config FILE``: settings from a TOML file (keys: the long option names, ``_`` for ``-``)."""
    return click.option(
        "--config",
        type=click.Path(path_type=Path, dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_read_config,
        help="Agent config file (TOML; keys are the option names with _ for -). "
        "Environment variables and flags override it.",
    )(command)


def tls_options(command: _F) -> _F:
    """``--tls-ca/--tls-cert/--tls-key`` (an mqtts:// broker) and ``--signing-key/--trust-dir`` (signed messages)."""
    path = click.Path(path_type=Path, dir_okay=False)
    options = [
        click.option("--tls-ca", type=path, default=None, help="CA certificate the broker's certificate must chain to."),
        click.option("--tls-cert", type=path, default=None, help="This agent's client certificate (PEM)."),
        click.option("--tls-key", type=path, default=None, help="The client certificate's private key (mode 0600)."),
        click.option("--signing-key", type=path, default=None,
                     help="Ed25519 key to sign this agent's messages with (needs --trust-dir)."),
        click.option("--trust-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
                     help="Directory of NAME.pub keys: only messages they sign are accepted (needs --signing-key)."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Snake Learning edge agent: trains its assigned layers and passes the model on."""


AGENT_OPTIONS: list[Callable[[Any], Any]] = [
    click.option(
        "--broker",
        envvar="SNAKE_BROKER",
        required=True,
        help="MQTT broker URL, e.g. mqtt://10.0.0.2:1883 (env SNAKE_BROKER).",
    ),
    click.option(
        "--agent-id",
        envvar="SNAKE_AGENT_ID",
        required=True,
        callback=_agent_id,
        help="Unique id of this agent (env SNAKE_AGENT_ID).",
    ),
    click.option("--data", "data_spec", required=True, help="Data set: fashion-mnist[:DIR], cifar10:DIR or npz:FILE."),
    click.option(
        "--partition",
        default=None,
        help="Take a share of the training set: iid, dirichlet:ALPHA or by-source (needs --part).",
    ),
    click.option("--part", default="0/1", show_default=True, help="Which share K of N shares, as K/N."),
    click.option("--seed", default=0, show_default=True, help="Partition and shuffling seed (same on every agent)."),
    click.option("--samples", default=0, show_default=True, help="Cap on local training samples (0 = all)."),
    click.option("--val-fraction", default=0.1, show_default=True, help="Local validation split when partitioning."),
    click.option(
        "--cache-dir",
        type=click.Path(path_type=Path),
        default=Path.home() / ".cache" / "snakelearn",
        show_default=True,
        help="Where artifact bundles are cached by hash.",
    ),
    click.option(
        "--backend",
        type=click.Choice(["auto", "ort", "portable"]),
        default="auto",
        show_default=True,
        help="Trainer backend.",
    ),
    click.option("--threads", default=0, show_default=True, help="Training threads (0 = runtime default)."),
    click.option(
        "--memory-budget-mb",
        default=0,
        show_default=True,
        help="Memory this agent may use in all, reported to the planner (0 = physical memory or the cgroup limit).",
    ),
    click.option(
        "--calibrate/--no-calibrate",
        default=True,
        show_default=True,
        help="Measure this machine's speed at start (about a second) so the planner can balance hops.",
    ),
    click.option(
        "--map-large-allocations/--no-map-large-allocations",
        default=True,
        show_default=True,
        help="Give each allocation of 1 MiB or more its own mapping (glibc): lower peak memory "
        "(VGG-11 hop: ~10-20 %), slower training steps (~10-20 %).",
    ),
    click.option(
        "--connect-timeout",
        "connect_timeout_s",
        default=30.0,
        show_default=True,
        help="Seconds to wait for the broker before giving up.",
    ),
    click.option(
        "--username", envvar="SNAKE_MQTT_USERNAME", default=None, help="Broker user name when the URL has none."
    ),
    click.option(
        "--password-file",
        envvar="SNAKE_MQTT_PASSWORD_FILE",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help="File holding the broker password (mode 0600; env SNAKE_MQTT_PASSWORD_FILE). Or set $SNAKE_MQTT_PASSWORD.",
    ),
    click.option(
        "--log-level",
        envvar="SNAKE_LOG_LEVEL",
        default="info",
        show_default=True,
        type=click.Choice(["debug", "info", "warning", "error"]),
        help="Log level (logs go to stderr).",
    ),
]


def agent_options(command: _F) -> _F:
    """The agent's settings, shared by ``run``, ``check`` and ``install-service`` (and their config file)."""
    for option in reversed(AGENT_OPTIONS[-1:]):  # --log-level last, after the TLS and signing options
        command = option(command)
    command = tls_options(command)
    for option in reversed(AGENT_OPTIONS[:-1]):
        command = option(command)
    return config_option(command)


@main.command()
@agent_options
def run(data_spec: str, part: str, log_level: str, **opts: object) -> None:
    """Join the broker and serve trials until the coordinator says to exit."""
    setup_logging(log_level)
    from edge_agent.localdata import load_local
    from edge_agent.service import AgentService

    with exit_guard(log):
        config = agent_config(data_spec, part, opts)
        data = load_local(config)
        reason = AgentService(config, data).run()
    log.info("agent exits: %s", reason)


def agent_config(data_spec: str, part: str, opts: dict[str, object]) -> AgentConfig:
    return AgentConfig(data=data_spec, part=_part(part), **opts)  # type: ignore[arg-type]


@main.command()
@agent_options
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON on stdout.")
def check(data_spec: str, part: str, log_level: str, as_json: bool, **opts: object) -> None:
    """Check this machine without training: backend, data, memory, disk, clock, broker (same options as run).

    Prints one line per check (a fix under each failure) and exits 1 if any check failed."""
    setup_logging("error" if log_level == "info" else log_level)
    from edge_agent.broker_check import check_broker
    from edge_agent.checks import run_checks

    results = run_checks(agent_config(data_spec, part, opts), check_broker)
    if as_json:
        click.echo(json.dumps({"ok": all(c.ok for c in results), "checks": [c.as_dict() for c in results]}, indent=2))
    else:
        for c in results:
            click.echo(f"{'PASS' if c.ok else 'FAIL'}  {c.name:8} {c.detail}")
            if not c.ok:
                click.echo(f"      {'fix:':8} {c.fix}")
    if not all(c.ok for c in results):
        sys.exit(ExitCode.FAILED)


@main.command("install-service")
@agent_options
@click.option("--name", default="snake-agent", show_default=True, help="Unit name (NAME.service).")
@click.option("--user", "user_unit", is_flag=True, help="A user unit (~/.config/systemd/user) running as you.")
@click.option("--service-user", default="snake", show_default=True, help="The dedicated user of a system unit.")
@click.option("--config-dir", type=click.Path(path_type=Path, file_okay=False), help="Where agent.toml goes.")
@click.option("--unit-dir", type=click.Path(path_type=Path, file_okay=False), help="Where the unit goes.")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.pass_context
def install_service(ctx: click.Context, /, name: str, user_unit: bool, service_user: str, config_dir: Path | None,
                    unit_dir: Path | None, force: bool, **_: object) -> None:  # fmt: skip
    """Write a systemd unit and agent.toml from these options (same as run); print how to enable it."""
    setup_logging("warning")
    from edge_agent.install import Layout, agent_command, local_systemd_version, next_steps, write_service
    from edge_agent.service_unit import UnitSpec, default_memory_max_mb

    with exit_guard(log):
        layout = Layout.for_scope(name, user_unit, config_dir, unit_dir)
        settings = _given_settings(ctx)
        settings.setdefault("cache_dir", str(layout.working_dir / "cache"))
        budget = int(ctx.params["memory_budget_mb"])
        spec = UnitSpec(agent_command(), layout.config_path, layout.env_path, layout.working_dir,
                        default_memory_max_mb(profile.memory_mb(), budget), str(ctx.params["agent_id"]),
                        None if user_unit else service_user, local_systemd_version())  # fmt: skip
        for path in write_service(layout, spec, settings, force):
            click.echo(f"wrote {path}")
        click.echo(f"MemoryMax={spec.memory_max_mb}M (the agent reports it as its memory budget)\nnext:")
        click.echo(next_steps(layout, spec, name, settings.get("password_file")))


def _given_settings(ctx: click.Context) -> dict[str, object]:
    """The agent options set by file, environment or flag (not defaults), by config-file key."""
    keys = {param: key for key, param in _file_keys(ctx.command).items() if param in _agent_param_names()}
    out: dict[str, object] = {}
    for param, key in keys.items():
        source = ctx.get_parameter_source(param)
        if source is not None and source != click.core.ParameterSource.DEFAULT and ctx.params[param] is not None:
            value = ctx.params[param]
            out[key] = str(value) if isinstance(value, Path) else value
    return out


def _agent_param_names() -> set[str]:
    probe = agent_options(click.Command("probe", callback=lambda **_: None))
    return {p.name for p in probe.params if p.name and p.name != "config"}


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(as_json: bool) -> None:
    """Show this machine's profile, installed backends and versions."""
    from edge_agent.calibrate import measure_gflops

    facts = {
        **profile.machine(),
        "memory_budget_mb": profile.memory_budget_mb(),
        "gflops": measure_gflops(),
        "backends": installed(),
        "versions": profile.versions(),
    }
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    for key, value in facts.items():
        click.echo(f"{key:17} {value}")


if __name__ == "__main__":
    main()
