"""``snake-coordinator``: simulate a trial on one machine, or drive agents on a real broker."""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from coordinator.config import OPT_PREFIX, TrialConfig, load_trial
from coordinator.errors import TrialError
from coordinator.provision_cli import provision_command, provisioned_broker
from edge_agent.errors import LinkError
from edge_agent.exitcodes import exit_guard
from edge_agent.mqtt import parse_broker_url

log = logging.getLogger("coordinator")
MODEL_NAMES = ["mlp", "cnn", "vgg11", "gpt"]  # models.MODELS, without importing torch for --help


def model_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--model``: a registry name, or ``opt:PATH`` (a local Hugging Face OPT directory)."""
    if value is None or value in MODEL_NAMES or (value.startswith(OPT_PREFIX) and len(value) > len(OPT_PREFIX)):
        return value
    raise click.BadParameter(f"{value!r} is not one of {', '.join(MODEL_NAMES)} or {OPT_PREFIX}PATH", ctx, param)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr, level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("edge_agent.mqtt.paho").setLevel(logging.WARNING)
    logging.getLogger("amqtt").setLevel(logging.WARNING)
    logging.getLogger("transitions").setLevel(logging.WARNING)


def trial_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Flags that override the trial file."""
    options = [
        click.option("--rounds", type=int, help="Rounds (every agent trains once per round)."),
        click.option(
            "--algorithm",
            type=click.Choice(["snake", "fedavg", "fedprox", "split"]),
            help="snake, or a baseline: fedavg, or split learning (agents train the front, the coordinator the back).",
        ),
        click.option(
            "--split-cut", help="Split learning: the last layer group the agents train (default: the first group)."
        ),
        click.option(
            "--model",
            callback=model_name,
            help="mlp | cnn | vgg11 | gpt | opt:PATH (the last two are language models; opt:PATH fine-tunes "
            "the OPT checkpoint in the local Hugging Face directory PATH, with its tokenizer).",
        ),
        click.option(
            "--dataset", help="fashion-mnist[:DIR] | cifar10:DIR | npz:FILE | austen[:DIR] (text: gpt, opt:PATH)."
        ),
        click.option("--partition", help="iid | dirichlet:ALPHA | by-source (text: whole novels per agent)."),
        click.option(
            "--mode", type=click.Choice(["p2p", "cs"]), help="p2p: agent to agent; cs: every hop via the coordinator."
        ),
        click.option("--epochs", type=int, help="Local epochs per hop."),
        click.option("--lr", type=float, help="Learning rate."),
        click.option("--batch-size", type=int, help="Batch size."),
        click.option("--compression", type=click.Choice(["none", "fp16"]), help="Tensor encoding on the wire."),
        click.option("--eval-every-round", is_flag=True, default=None, help="Test accuracy after every round."),
        click.option(
            "--kd-alpha",
            type=float,
            help="Knowledge distillation weight (0 = off): CE + alpha*T^2*KL(teacher||student).",
        ),
        click.option("--kd-temperature", type=float, help="Distillation temperature T."),
        click.option("--max-steps", type=int, help="Optimizer steps per hop at most (0 = no cap)."),
        click.option("--seq-len", type=int, help="Language models: tokens per sequence."),
        click.option(
            "--base-model",
            help="gpt: auto (pretrain one, cached) | none (random init) | PATH (.safetensors); opt:PATH: only auto.",
        ),
        click.option(
            "--pretrain-steps", type=int, help="gpt: steps of the base model's pretraining (opt:PATH: ignored)."
        ),
        click.option(
            "--label-skew",
            type=click.Choice(["auto", "on", "off"]),
            help="Label-skew methods (KD, logit adjustment, BatchNorm mixing): when histograms are skewed, always, never.",
        ),
        click.option("--seed", type=int, help="Seed for model init, partitions and shuffling."),
        click.option("--out", type=click.Path(path_type=Path), help="Run directory (default runs/NAME-TIME)."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout."),
        click.option(
            "--log-level",
            default="info",
            show_default=True,
            type=click.Choice(["debug", "info", "warning", "error"]),
            help="Log level (stderr).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def build_config(path: Path | None, opts: dict[str, Any]) -> TrialConfig:
    keys = {
        "epochs": "train.epochs",
        "lr": "train.lr",
        "batch_size": "train.batch_size",
        "compression": "transfer.compression",
        "kd_alpha": "train.kd_alpha",
        "kd_temperature": "train.kd_temperature",
        "label_skew": "train.label_skew",
        "split_cut": "train.split_cut",
        "max_steps": "train.max_steps",
        "seq_len": "lm.seq_len",
        "base_model": "lm.base_model",
        "pretrain_steps": "lm.pretrain_steps",
    }
    overrides = {
        keys.get(k, k): opts.pop(k)
        for k in list(opts)
        if k
        in {
            *keys,
            "algorithm",
            "rounds",
            "model",
            "dataset",
            "partition",
            "mode",
            "seed",
            "agents",
            "samples_per_agent",
            "eval_every_round",
        }
    }
    return load_trial(path, overrides)


def finish(summary: dict[str, Any], out: Path, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    click.echo(
        f"trial {summary['trial_id']}: {summary['algorithm']}/{summary['mode']}, {summary['model']} on {summary['dataset']}"
    )
    if "final_perplexity" in summary:
        click.echo(f"  test perplexity {summary['base_perplexity']:.2f} (base) -> {summary['final_perplexity']:.2f}")
        for name, p in summary["per_source"].items():
            click.echo(f"    {name:22} {p['base']:8.2f} -> {p['final']:.2f}")
        for sample in summary.get("samples", []):
            click.echo(f"  base : {sample['base']!r}\n  final: {sample['final']!r}")
    else:
        click.echo(f"  final test accuracy {summary['final_test_accuracy']:.4f}  loss {summary['final_test_loss']:.4f}")
    click.echo(f"  {summary['hops']} hops, {summary['bytes_total'] / 1e6:.1f} MB published, {summary['wall_s']:.1f} s")
    for a in summary["agents"]:
        click.echo(
            f"  {a['agent_id']:10} {a['backend']:8} peak {a['peak_rss_mb']:.0f} MiB  sent {a['bytes_sent'] / 1e6:.1f} MB  hops {a['hops']}"
        )
    click.echo(f"results in {out}/ (summary.json, metrics.jsonl, training.png, final_model.onnx)")


def simulated_labels(config: TrialConfig) -> dict[str, list[int]] | None:
    """The label histograms ``simulate`` agents of ``config`` would report (None when the data set cannot be read)."""
    from coordinator.partitions import label_histograms
    from edge_agent.data import DataError, load_dataset

    try:
        return label_histograms(config, load_dataset(config.dataset))
    except DataError as exc:
        log.warning("no label histograms for the plan: %s", exc)
        return None


def check_broker(url: str) -> None:
    """Fail in a second, not after minutes of export, when nothing listens where the broker should be."""
    broker = parse_broker_url(url)
    try:
        socket.create_connection((broker.host, broker.port), timeout=5.0).close()
    except OSError as exc:
        raise LinkError(f"cannot reach the broker at {broker}: {exc}; is it running and reachable?") from exc


def default_out(config: TrialConfig) -> Path:
    return Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Snake Learning coordinator: plans trials and drives edge agents over MQTT."""


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), help="Trial file (TOML).")
@click.option("--agents", type=int, help="Number of agent processes to start.")
@click.option("--samples-per-agent", type=int, help="Cap each agent's partition (quick runs).")
@click.option("--broker", help="Use this broker (mqtt://host:port) instead of starting one.")
@click.option(
    "--broker-kind",
    type=click.Choice(["auto", "mosquitto", "amqtt"]),
    default="auto",
    show_default=True,
    help="Broker to start: mosquitto if installed, else embedded amqtt.",
)
@click.option("--agent-backends", help="Comma-separated backend per agent, cycled (e.g. ort,ort).")
@click.option("--threads", default=0, show_default=True, help="Training threads per agent (0 = runtime default).")
@click.option(
    "--secure", is_flag=True, help="Provision into the run dir: TLS mosquitto, certificates, signed messages."
)
@trial_options
def simulate(
    config_path: Path | None,
    broker: str | None,
    broker_kind: str,
    agent_backends: str | None,
    threads: int,
    secure: bool,
    out: Path | None,
    as_json: bool,
    log_level: str,
    **opts: Any,
) -> None:
    """Run a whole trial on this machine: a broker, N agent processes and the coordinator."""
    setup_logging(log_level)

    def go() -> None:
        from coordinator.simulate import SimOptions
        from coordinator.simulate import simulate as run_sim

        config = build_config(config_path, opts)
        if broker:
            check_broker(broker)
        if secure and broker:
            raise click.UsageError("--secure starts its own TLS broker; leave out --broker")
        run_dir = out or default_out(config)
        backends = tuple(b.strip() for b in agent_backends.split(",")) if agent_backends else ()
        options = SimOptions(broker, broker_kind, backends, threads, show_progress=sys.stderr.isatty(), secure=secure)
        finish(run_sim(config, run_dir, options), run_dir, as_json)

    with exit_guard(log):
        go()


@main.command()
@click.argument("trial_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--broker", envvar="SNAKE_BROKER", help="Broker URL the agents use (env SNAKE_BROKER).")
@click.option(
    "--provisioned",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="DIR/coordinator of `provision`: TLS with its certificate, signed messages; broker from it.",
)
@click.option(
    "--keep-agents/--stop-agents", default=True, show_default=True, help="Leave agents running for the next trial."
)
@click.option(
    "--resume",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="Carry on the trial in this run directory (its coordinator was stopped or killed); same trial file.",
)
@trial_options
def run(
    trial_file: Path,
    broker: str | None,
    provisioned: Path | None,
    keep_agents: bool,
    resume: Path | None,
    out: Path | None,
    as_json: bool,
    log_level: str,
    **opts: Any,
) -> None:
    """Drive a trial on agents that are already running and connected to BROKER.

    Every finished hop is journaled in the run directory (journal.sqlite); after a crash, the same command
    with --resume RUN_DIR carries the trial on from its first unfinished hop."""
    setup_logging(log_level)

    def go() -> None:
        from coordinator.trial import run_trial
        from edge_agent.data import load_dataset

        config = build_config(trial_file, opts)
        url = broker or (provisioned_broker(provisioned) if provisioned else None)
        if url is None:
            raise click.UsageError("give --broker (or --provisioned DIR/coordinator)")
        check_broker(url)
        if resume is not None and out is not None and out != resume:
            raise click.UsageError("--resume names the run directory; leave out --out")
        run_dir = resume or out or default_out(config)
        if config.is_text:  # the agents hold their token partitions already
            from coordinator.lm_trial import text_workload

            data: Any = text_workload(config)[0]
        else:
            data = load_dataset(config.dataset)
        summary = run_trial(config, url, run_dir, data, exit_agents=not keep_agents,
                            show_progress=sys.stderr.isatty(), extra={"broker": "external"},
                            resume=resume is not None, provisioned=provisioned)  # fmt: skip
        finish(summary, run_dir, as_json)

    with exit_guard(log):
        go()


@main.command()
@click.argument("trial_file", type=click.Path(path_type=Path, dir_okay=False), required=False)
@click.option("--dataset", default="austen", show_default=True, help="Text dataset: austen[:DIR].")
@click.option("--model", default="gpt", show_default=True, type=click.Choice(MODEL_NAMES), help="Language model.")
@click.option("--seq-len", type=int, help="Tokens per sequence.")
@click.option("--pretrain-steps", type=int, help="Optimizer steps.")
@click.option("--seed", type=int, help="Seed of the init and the batches.")
def pretrain(trial_file: Path | None, **opts: Any) -> None:
    """Pretrain (or find in the cache) the base model a text trial with these settings fine-tunes: on the
    first lm.pretrain_fraction of every novel's training text (cached by a hash of its settings and tokens); prints its file."""
    setup_logging("info")

    def go() -> None:
        from coordinator.lm_trial import base_tensors, load_text, split_corpus

        config = build_config(trial_file, opts)
        ds = load_text(config)
        if config.lm.base_model != "auto":
            raise click.UsageError("pretrain builds the automatic base model; the trial sets lm.base_model otherwise")
        _, path = base_tensors(config, split_corpus(ds, config.lm.pretrain_fraction), ds)
        click.echo(path)

    with exit_guard(log):
        go()


@main.command()
@click.argument("trial_file", type=click.Path(path_type=Path, dir_okay=False), required=False)
@click.option("--agents", type=int, help="Number of agents to plan for.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--model", type=click.Choice(["mlp", "cnn", "vgg11"]), help="Model from the registry.")
@click.option("--rounds", type=int, help="Rounds.")
@click.option("--algorithm", type=click.Choice(["snake", "fedavg", "fedprox", "split"]), help="snake, or a baseline.")
@click.option("--split-cut", help="Split learning: the last layer group the agents train.")
@click.option("--mode", type=click.Choice(["p2p", "cs"]), help="Peer to peer or client-server.")
@click.option("--batch-size", type=int, help="Batch size (drives the activation memory estimate).")
@click.option("--partition", help="iid | dirichlet:ALPHA: the simulated agents' label mixes (label-skew methods).")
@click.option("--samples-per-agent", type=int, help="Cap each agent's partition, as simulate does.")
@click.option("--seed", type=int, help="Partition seed.")
def plan(trial_file: Path | None, as_json: bool, **opts: Any) -> None:
    """Print the plan without running anything: route, and per round each agent's segment with its
    estimated peak memory and hop time, and any agent left out with why.

    The fleet comes from the trial file's [[fleet]] tables (memory_mb as the budget, gflops as the
    speed); agents without one are taken as unlimited and of equal speed. A real trial plans from
    what the agents measure and report."""
    setup_logging("warning")

    def go() -> None:
        from coordinator.costmodel import TYPICAL_BASELINE_MB, TYPICAL_GFLOPS
        from coordinator.costs import profile_groups
        from coordinator.plan import AgentProfile, GroupInfo
        from coordinator.prepare import make_plan
        from models import InputSpec, build_model, layer_groups

        config = build_config(trial_file, opts)
        spec = InputSpec()
        model = build_model(config.model, spec)
        state = model.state_dict()
        names = layer_groups(model)
        costs = profile_groups(model, (spec.channels, spec.height, spec.width), names)
        groups = []
        for g in names:
            params = tuple(n for n, _ in model.named_parameters() if n.startswith(g + "."))
            buffers = tuple(
                n for n, t in state.items() if n.startswith(g + ".") and n not in params and t.is_floating_point()
            )
            count = sum(state[p].numel() for p in params), sum(state[b].numel() for b in buffers)
            groups.append(GroupInfo(g, params, buffers, *count, costs[g].act_bytes, costs[g].flops))
        samples = config.samples_per_agent or int(60_000 * (1 - config.val_fraction)) // config.agents
        fleet = []
        for i in range(config.agents):
            m = config.member(i)
            backend = m.backend or "ort"
            pixels = spec.channels * spec.height * spec.width  # one byte each: agents keep uint8 images
            data_mb = samples / (1 - config.val_fraction) * pixels / (1 << 20)
            fleet.append(AgentProfile(f"agent-{i}", float(m.memory_mb), TYPICAL_BASELINE_MB[backend],
                                      m.gflops or TYPICAL_GFLOPS, backend, samples * config.train.epochs, data_mb))  # fmt: skip
        p = make_plan(config, groups, fleet, simulated_labels(config))
        if as_json:
            click.echo(json.dumps(p.as_dict(), indent=2))
        else:
            click.echo(f"{config.algorithm} plan for {config.model}, {config.agents} agents, {config.rounds} rounds, "
                       f"batch {config.train.batch_size}, {samples * config.train.epochs} samples per hop "
                       f"(estimates: peak agent RSS, compute time at {TYPICAL_GFLOPS:.0f} GFLOP/s unless the "
                       f"fleet says otherwise)")  # fmt: skip
            click.echo("\n".join(p.describe()))

    with exit_guard(log):
        go()


@main.command()
@click.argument("trial_file", type=click.Path(path_type=Path, dir_okay=False), required=False)
@click.option(
    "--algorithms",
    default="snake,fedavg",
    show_default=True,
    help="Comma-separated algorithms to run (snake, fedavg, fedprox, split); variants: snake+kd, snake+fp16, "
    "snake+noskew (no label-skew methods), combined with +.",
)
@click.option("--seeds", help="Comma-separated seeds: every combination once per seed; the report adds medians.")
@click.option("--partitions", default="iid,dirichlet:0.1", show_default=True, help="Comma-separated partitions.")
@click.option("--target", default=0.8, show_default=True, help="Test accuracy for the rounds/bytes-to-target columns.")
@click.option("--agents", type=int, help="Number of agent processes.")
@click.option("--samples-per-agent", type=int, help="Cap each agent's partition (quick runs).")
@click.option("--broker", help="Use this broker instead of starting one.")
@click.option("--threads", default=0, show_default=True, help="Training threads per agent.")
@click.option("--agent-backends", help="Comma-separated backend per agent, cycled (e.g. portable).")
@trial_options
def compare(
    trial_file: Path | None,
    algorithms: str,
    partitions: str,
    seeds: str | None,
    target: float,
    broker: str | None,
    threads: int,
    agent_backends: str | None,
    out: Path | None,
    as_json: bool,
    log_level: str,
    **opts: Any,
) -> None:
    """Run every algorithm x partition as a simulated trial; write report.md, compare.json and plots."""
    setup_logging(log_level)

    def go() -> None:
        from coordinator.compare import compare as run_compare
        from coordinator.simulate import SimOptions

        opts.pop("algorithm", None)
        opts.pop("partition", None)
        config = build_config(trial_file, opts)
        if broker:
            check_broker(broker)
        run_dir = out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
        backends = tuple(b.strip() for b in agent_backends.split(",")) if agent_backends else ()
        options = SimOptions(broker, "auto", backends, threads, show_progress=sys.stderr.isatty())
        try:
            seed_list = [int(s) for s in seeds.split(",")] if seeds else []
        except ValueError as exc:
            raise click.BadParameter(f"--seeds takes comma-separated integers, not {seeds!r}") from exc
        result = run_compare(config, algorithms.split(","), partitions.split(","), run_dir, options, target, seed_list)
        if as_json:
            click.echo(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2, default=str))
        else:
            click.echo((run_dir / "report.md").read_text())
            click.echo(f"report in {run_dir}/report.md")
        failed = [f"{r['variant']}/{r['partition']}" for r in result["runs"] if "failed" in r]
        if failed:  # after the report, which records why
            raise TrialError(
                f"{len(failed)} of {len(result['runs'])} runs failed ({', '.join(failed)}); see the report"
            )

    with exit_guard(log):
        go()


main.add_command(provision_command)

if __name__ == "__main__":
    main()
