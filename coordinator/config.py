"""Typed trial configuration: TOML file, then command-line overrides.

A trial file (every key optional; defaults shown)::

    [trial]
    name = "snake"             # also the trial id on the wire
    algorithm = "snake"        # snake | fedavg (baseline: every agent trains everything, averaged)
                               #   | fedprox (FedAvg + a proximal term mu/2 ||w - w_global||^2 per agent)
                               #   | split (baseline: agents train the front, the coordinator the back)
    mode = "p2p"               # p2p | cs
    model = "cnn"              # mlp | cnn | vgg11 | gpt | opt:PATH (the last two: text datasets)
    dataset = "fashion-mnist"  # fashion-mnist[:DIR] | cifar10:DIR | npz:FILE
    partition = "iid"          # iid | dirichlet:ALPHA
    agents = 4                 # simulate: agents to start; run: agents to wait for
    rounds = 4
    seed = 0
    samples_per_agent = 0      # cap each agent's partition (0 = no cap)
    val_fraction = 0.1         # local validation split on each agent
    eval_every_round = false   # test accuracy after every round (P2P: the round's last hop sends a copy)

    [train]
    epochs = 1
    batch_size = 64
    lr = 0.001
    optimizer = "adamw"        # adamw | sgd
    max_steps = 0              # per hop, 0 = no cap
    kd_alpha = 0.0             # knowledge distillation (>= 0; 0 = off): loss = CE + kd_alpha * T^2 *
                               #   KL(softmax(teacher/T) || softmax(student/T)), teacher = the model
                               #   as received at the start of the hop; > 0 builds KD artifacts
    kd_temperature = 2.0       # T (> 0)
    label_skew = "auto"        # auto | on | off: the label-skew methods below apply when the agents' label
                               #   histograms are skewed (auto; coordinator.skew), always (on) or never (off)
    skew_kd_alpha = 4.0        #   distillation weight under label skew (a kd_alpha > 0 wins; 0 = no KD)
    logit_adjust = 1.0         #   tau of the logit adjustment by each hop's label prior (0 = none)
    bn_mix = 0.0               #   weight of a hop's BatchNorm statistics against the received ones (0 = none;
                               #   0.25 measured worse at Dirichlet(0.1), so off by default)
    balanced_head = false      #   snake, under label skew: the trial's last hop (it leaves the classifier as
                               #   the final model has it) goes to the agent whose label mix is closest to the
                               #   fleet's (distances within 0.05 count as alike: rotation decides); measured
                               #   no better than rotation (median -0.03 points over 8 fleets), so off
    prox_mu = 0.01             # fedprox: weight of the proximal term (>= 0)
    lr_decay = 0.0             # > 0: the learning rate falls over the rounds along a cosine, from lr in the
                               #   first round to lr * (1 - lr_decay) in the last (0 = constant; in [0, 1))
    split_cut = ""             # split learning: the last layer group the agents train ("" = the first
                               #   group); the coordinator trains every later group

    [transfer]
    chunk_bytes = 1048576      # never above the broker's packet limit
    compression = "none"       # none | fp16

    [timeouts]
    join_s = 180               # wait for agents
    hop_s = 900                # a hop without news for this long (+ 4x its estimate + its model's travel
                               #   at 1 Mbit/s): its agent is taken as hung and routed around (snake)
    gradient_s = 60            # split learning: an agent waits this long for a batch's gradient
    offline_s = 15             # an agent offline (last will) this long is routed around (snake) ...
    holder_s = 60              #   ... unless it holds the only copy of a finished hop: then this long
    silence_s = 30             # an agent that sent heartbeats and then nothing this long is routed around

    [lora]                     # optional: segments train only LoRA adapters (see coordinator.lora)
    rank = 0                   # adapter rank (0 = off)
    alpha = 16.0               # scale = alpha / rank
    targets = ""               # comma-separated projection names ("" = every projection of the blocks)

    [lm]                       # language models (dataset = "austen", model = "gpt" or "opt:PATH")
    seq_len = 64               # tokens per sequence (opt: at most the model's max_position_embeddings)
    base_model = "auto"        # auto: pretrain one (cached by its settings) | none: random init |
                               #   PATH: a .safetensors state dict of the model. opt:PATH: only auto (the
                               #   checkpoint is the base; the pretrain_* keys are ignored, with a log line)
    pretrain_steps = 150       # optimizer steps of the base model's pretraining (auto)
    pretrain_fraction = 0.5    # the first part of each novel's training text the base model sees;
                               #   the agents fine-tune on the rest; each novel's test part is held out
    pretrain_batch_size = 32
    pretrain_lr = 0.002
    test_per_source = 100      # test sequences evaluated per novel (0 = all)
    sample_tokens = 120        # tokens (gpt: bytes) generated per prompt for the before/after continuations
    cache_dir = ""             # pretrained base models ("" = ~/.cache/snakelearn)

    With a text dataset, train.batch_size, train.max_steps and trial.rounds default to 16, 40 and 2, and
    eval_every_round to true (the perplexity curve), unless the file or the command line sets them: a
    4-agent trial takes minutes on 2 cores.

    [[fleet]]                  # optional, one table per simulated agent, in agent order (agent-0 first);
    memory_mb = 0              #   agents without a table get the defaults. memory_mb: a hard cap on the
    threads = 0                #   agent process (a cgroup, so going over means an OOM kill) that the
    backend = ""               #   agent also reports as its budget (0 = none); threads: training threads
    gflops = 0.0               #   (0 = runtime default); backend: ort | portable ("" = simulate's choice);
                               #   gflops: assumed speed for `plan` only (agents measure their own)
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.errors import ConfigError
from coordinator.lora import LoraSettings
from edge_agent.protocol.topics import check_id

MODES = ("p2p", "cs")
TEXT_DATASETS = ("austen",)  # token data sets: they need a language model (LANGUAGE_MODELS)
LANGUAGE_MODELS = ("gpt",)
OPT_PREFIX = "opt:"  # opt:PATH, a local Hugging Face OPT checkpoint (as models.registry, without importing torch)
TEXT_DEFAULTS = {"rounds": 2, "train.batch_size": 16, "train.max_steps": 40, "eval_every_round": True}
ALGORITHMS = ("snake", "fedavg", "fedprox", "split")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.001
    optimizer: str = "adamw"
    max_steps: int = 0
    kd_alpha: float = 0.0
    kd_temperature: float = 2.0
    split_cut: str = ""
    label_skew: str = "auto"
    skew_kd_alpha: float = 4.0
    logit_adjust: float = 1.0
    bn_mix: float = 0.0
    balanced_head: bool = False
    prox_mu: float = 0.01
    lr_decay: float = 0.0


@dataclass(frozen=True)
class TransferConfig:
    chunk_bytes: int = 1 << 20
    compression: str = "none"


@dataclass(frozen=True)
class Timeouts:
    join_s: float = 180.0
    hop_s: float = 900.0
    gradient_s: float = 60.0
    offline_s: float = 15.0
    holder_s: float = 60.0
    silence_s: float = 30.0


@dataclass(frozen=True)
class LmConfig:
    seq_len: int = 64
    base_model: str = "auto"
    pretrain_steps: int = 150
    pretrain_fraction: float = 0.5
    pretrain_batch_size: int = 32
    pretrain_lr: float = 0.002
    test_per_source: int = 100
    sample_tokens: int = 120
    cache_dir: str = ""

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (2 <= self.seq_len <= 4096, "lm.seq_len must be in [2, 4096]"),
            (self.pretrain_steps >= 0 and self.pretrain_batch_size >= 1, "lm.pretrain_steps >= 0, batch_size >= 1"),
            (0.0 < self.pretrain_fraction < 1.0, "lm.pretrain_fraction must be in (0, 1)"),
            (math.isfinite(self.pretrain_lr) and self.pretrain_lr > 0, "lm.pretrain_lr must be > 0"),
            (self.test_per_source >= 0 and self.sample_tokens >= 0, "lm.test_per_source, sample_tokens >= 0"),
            (self.base_model != "", 'lm.base_model must be "auto", "none" or a .safetensors path'),
        ]


@dataclass(frozen=True)
class FleetAgent:
    memory_mb: int = 0
    threads: int = 0
    backend: str = ""
    gflops: float = 0.0


@dataclass(frozen=True)
class TrialConfig:
    name: str = "snake"
    algorithm: str = "snake"
    mode: str = "p2p"
    model: str = "cnn"
    dataset: str = "fashion-mnist"
    partition: str = "iid"
    agents: int = 4
    rounds: int = 4
    seed: int = 0
    samples_per_agent: int = 0
    val_fraction: float = 0.1
    eval_every_round: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    timeouts: Timeouts = field(default_factory=Timeouts)
    lm: LmConfig = field(default_factory=LmConfig)
    fleet: tuple[FleetAgent, ...] = ()
    lora: LoraSettings = field(default_factory=LoraSettings)  # [lora]: see coordinator.lora

    @property
    def is_checkpoint(self) -> bool:
        """Whether the model is a checkpoint (``opt:PATH``): its own base, tokenizer and vocabulary."""
        return self.model.startswith(OPT_PREFIX)

    @property
    def is_text(self) -> bool:
        """Whether the trial trains a language model on a token data set."""
        return self.dataset.partition(":")[0] in TEXT_DATASETS

    def member(self, index: int) -> FleetAgent:
        """The fleet table of agent ``index`` (defaults when the file has none for it)."""
        return self.fleet[index] if index < len(self.fleet) else FleetAgent()

    def validate(self) -> TrialConfig:
        checks = [
            (self.mode in MODES, f"trial.mode must be one of {MODES}, not {self.mode!r}"),
            (self.algorithm in ALGORITHMS, f"trial.algorithm must be one of {ALGORITHMS}, not {self.algorithm!r}"),
            (self.agents >= 1, "trial.agents must be >= 1"),
            (self.rounds >= 1, "trial.rounds must be >= 1"),
            (self.samples_per_agent >= 0, "trial.samples_per_agent must be >= 0"),
            (0.0 <= self.val_fraction < 0.5, "trial.val_fraction must be in [0, 0.5)"),
            (self.train.epochs >= 1 and self.train.batch_size >= 2, "train.epochs >= 1 and train.batch_size >= 2"),
            (self.train.lr > 0, "train.lr must be > 0"),
            (self.train.optimizer in ("adamw", "sgd"), "train.optimizer must be adamw or sgd"),
            (math.isfinite(self.train.kd_alpha) and self.train.kd_alpha >= 0, "train.kd_alpha must be >= 0"),
            (
                math.isfinite(self.train.kd_temperature) and self.train.kd_temperature > 0,
                "train.kd_temperature must be > 0",
            ),
            (self.train.label_skew in ("auto", "on", "off"), "train.label_skew must be auto, on or off"),
            (
                all(math.isfinite(v) and v >= 0 for v in (self.train.skew_kd_alpha, self.train.logit_adjust)),
                "train.skew_kd_alpha and train.logit_adjust must be >= 0",
            ),
            (math.isfinite(self.train.bn_mix) and 0 <= self.train.bn_mix <= 1, "train.bn_mix must be in [0, 1]"),
            (math.isfinite(self.train.prox_mu) and self.train.prox_mu >= 0, "train.prox_mu must be >= 0"),
            (math.isfinite(self.train.lr_decay) and 0 <= self.train.lr_decay < 1, "train.lr_decay must be in [0, 1)"),
            (self.timeouts.gradient_s > 0, "timeouts.gradient_s must be > 0"),
            (
                min(self.timeouts.offline_s, self.timeouts.holder_s, self.timeouts.silence_s) > 0,
                "timeouts.offline_s, holder_s and silence_s must be > 0",
            ),
            (
                not (self.algorithm == "split" and self.train.kd_alpha > 0),
                "train.kd_alpha applies to snake and fedavg; split learning trains no full model on agents",
            ),
            (
                not (self.algorithm == "split" and self.train.lr_decay > 0),
                "train.lr_decay applies to snake, fedavg and fedprox; split learning's back (on the coordinator) "
                "keeps one rate",
            ),
            (4096 <= self.transfer.chunk_bytes <= 64 << 20, "transfer.chunk_bytes must be in [4096, 64 MiB]"),
            (self.transfer.compression in ("none", "fp16"), "transfer.compression must be none or fp16"),
            *((False, problem) for problem in self.lora.problems()),
            (
                not (self.lora.enabled and self.algorithm == "split"),
                "lora applies to snake and fedavg; split learning trains its front whole",
            ),
        ]
        text, lm = self.is_text, self.model in LANGUAGE_MODELS or self.is_checkpoint
        models = ", ".join([*LANGUAGE_MODELS, f"{OPT_PREFIX}PATH"])
        checks += [
            (
                text or not lm,
                f"model {self.model} is a language model: use a text dataset ({', '.join(TEXT_DATASETS)})",
            ),
            (lm or not text, f"dataset {self.dataset} is text: use a language model ({models})"),
            (self.model != OPT_PREFIX, f"model {OPT_PREFIX}PATH needs the checkpoint's directory after the colon"),
            (
                not (self.is_checkpoint and self.lm.base_model != "auto"),
                f"lm.base_model = {self.lm.base_model!r}: an {OPT_PREFIX}PATH model is its own base (the checkpoint); "
                "--base-model / lm.base_model apply to gpt only",
            ),
            (not (text and self.algorithm == "split"), "split learning is not built for language models"),
            (not (text and self.train.kd_alpha > 0), "train.kd_alpha: distillation is not built for language models"),
            *self.lm.checks(),
        ]
        for i, a in enumerate(self.fleet):
            checks += [
                (a.memory_mb == 0 or a.memory_mb >= 64, f"fleet[{i}].memory_mb must be 0 (no cap) or >= 64"),
                (a.threads >= 0, f"fleet[{i}].threads must be >= 0"),
                (a.backend in ("", "ort", "portable"), f"fleet[{i}].backend must be ort or portable"),
                (math.isfinite(a.gflops) and a.gflops >= 0, f"fleet[{i}].gflops must be >= 0"),
            ]
        if len(self.fleet) > self.agents:
            checks.append((False, f"the trial has {self.agents} agents but {len(self.fleet)} [[fleet]] tables"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        try:
            check_id(self.name)
        except ValueError as exc:
            raise ConfigError(f"trial.name: {exc}") from exc
        return self


_SECTIONS = {
    "train": TrainConfig,
    "transfer": TransferConfig,
    "timeouts": Timeouts,
    "lora": LoraSettings,
    "lm": LmConfig,
}


def load_trial(path: Path | None, overrides: dict[str, Any] | None = None) -> TrialConfig:
    """Read a trial file (or defaults), apply ``overrides`` ("key" or "section.key" -> value), validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"trial file {path} does not exist") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"trial file {path} is not valid TOML: {exc}") from exc
    top = _build(TrialConfig, raw.get("trial", {}), "trial")
    unknown = set(raw) - {"trial", "fleet", *_SECTIONS}
    if unknown:
        raise ConfigError(f"unknown section(s) in trial file: {', '.join(sorted(unknown))}")
    sections = {name: _build(kind, raw.get(name, {}), name) for name, kind in _SECTIONS.items()}
    fleet = raw.get("fleet", [])
    if not isinstance(fleet, list):
        raise ConfigError("fleet must be an array of tables: [[fleet]]")
    members = tuple(_build(FleetAgent, table, f"fleet[{i}]") for i, table in enumerate(fleet))
    config: TrialConfig = dataclasses.replace(top, **sections, fleet=members)
    given = {k for k, v in (overrides or {}).items() if v is not None}
    given |= {f"{name}.{key}" for name in _SECTIONS for key in raw.get(name, {})} | set(raw.get("trial", {}))
    dataset = (overrides or {}).get("dataset") or config.dataset
    text = dataclasses.replace(config, dataset=dataset).is_text
    defaults = {k: v for k, v in TEXT_DEFAULTS.items() if k not in given} if text else {}
    for key, value in [*defaults.items(), *(overrides or {}).items()]:
        if value is None:
            continue
        section, _, leaf = key.rpartition(".")
        if section:
            config = dataclasses.replace(
                config, **{section: dataclasses.replace(getattr(config, section), **{leaf: value})}
            )
        else:
            config = dataclasses.replace(config, **{leaf: value})
    return config.validate()


def _build(kind: type, table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(kind) if f.name not in _SECTIONS and f.name != "fleet"}
    values = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"unknown key {where}.{key}; known: {', '.join(sorted(fields))}")
        default = getattr(kind(), key)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise ConfigError(f"{where}.{key} must be {type(default).__name__}, got {value!r}")
        values[key] = value
    return kind(**values)
