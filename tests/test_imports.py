"""Dependency direction, read from the source (AST, so comments and strings cannot fool it).

- nothing in ``edge_agent`` imports torch, onnx, ONNX Runtime's graph builders (``artifacts``,
  ``onnxblock``), ``models`` or ``coordinator``: the agent runs on boards that have none of them;
- the coordinator and the tools use only the agent's public surface (``PUBLIC_AGENT_API``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AGENT_FORBIDDEN = (
    "torch",
    "onnx",
    "onnxruntime.training.artifacts",
    "onnxruntime.training.onnxblock",
    "models",
    "coordinator",
)
PUBLIC_AGENT_API = (
    "edge_agent.protocol",  # the wire format and the bundle manifest
    "edge_agent.data",  # data sets and partitions: the coordinator loads and splits the same data
    "edge_agent.textdata",  # the token data sets (NPZ) of language models: the coordinator writes them
    "edge_agent.link",  # the transport seam (Link, Clock) the services take
    "edge_agent.mqtt",  # the one paho adapter: the production Link
    "edge_agent.memlink",  # the in-memory broker and Link: tests and large simulations
    "edge_agent.optim",  # the AdamW defaults every trainer uses (graphs and split's back are built with them)
    "edge_agent.errors",  # the agent's exception root (and the transport's LinkError)
    "edge_agent.exitcodes",  # the exit codes and the CLI guard both tools share
    "edge_agent.ort_training",  # the one adapter that imports onnxruntime's training parts without torch
    "edge_agent.keys",  # signing keys and trust directories (provision, the coordinator's signatures)
    "edge_agent.tls",  # the TLS files and diagnosis of a broker link
    "edge_agent.secure_link",  # the signing, checking Link wrapper (the coordinator's side of signatures)
)
TOOLS_REACHING_IN = {  # benchmarks of the agent itself: they drive its internals on purpose
    "tools/bench_agent_memory.py": "runs one AgentService hop in-process and measures its memory",
    "tools/bench_backends.py": "times and measures the trainer backends directly",
    "tools/fakes.py": "fake trainers, model cache and jobs implementing the agent's internal interfaces",
    "tools/inmemory.py": "runs a whole fleet of AgentServices in-process over the in-memory broker",
    "tools/bench_llm_memory.py": "measures one OrtTrainer hop's peak memory on an LLM against full fine-tuning",
    "tools/lm_hops.py": "Snake hops of the GPT on Austen in-process with OrtTrainer (until trials take token data)",
    "tools/skew_hops.py": "a snake trial's hops in-process with OrtTrainer and the hop's BatchNorm mixing (screening)",
    "tools/skew_screen.py": "the same trial in plain torch with the agent's batch order (fast, approximate screening)",
}


def _module_name(path: Path) -> str:
    """``a/b/c.py`` -> ``a.b.c``; ``a/b/__init__.py`` -> ``a.b.__init__`` (so a relative import drops the last part)."""
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted module) for every import in ``path``, including ``training_module("x")`` and
    ``import_module("x")`` calls with a literal name; ``from a import b`` names ``a.b`` if that is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the file's own package
                anchor = _module_name(path).split(".")[: -node.level]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield node.lineno, full if _is_module(full) or base.startswith("onnxruntime") else base
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func == "training_module" and isinstance(node.args[0].value, str):
                yield node.lineno, f"onnxruntime.training.{node.args[0].value}"
            elif func == "import_module" and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_the_parser_sees_every_kind_of_import(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text(
        "import onnx  # noqa\nfrom torch import nn\nimport importlib\n"
        "importlib.import_module('models.registry')\ntraining_module('onnxblock')\n# import coordinator\n"
    )
    found = {name for _, name in imports(tmp_path / "m.py")}
    assert found == {"onnx", "torch", "importlib", "models.registry", "onnxruntime.training.onnxblock"}


@pytest.mark.parametrize("path", _sources("edge_agent"), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_agent_module_imports_torch_onnx_graph_builders_models_or_coordinator(path: Path) -> None:
    bad = [f"line {line}: {name}" for line, name in imports(path) if _within(name, AGENT_FORBIDDEN)]
    assert not bad, f"{path.relative_to(ROOT)} imports what devices do not have: {bad}"


def test_the_coordinator_and_tools_use_only_the_agents_public_surface() -> None:
    bad = []
    for path in _sources("coordinator", "tools"):
        rel = path.relative_to(ROOT).as_posix()
        if rel in TOOLS_REACHING_IN:
            continue
        for line, name in imports(path):
            if _within(name, ("edge_agent",)) and not _within(name, PUBLIC_AGENT_API):
                bad.append(f"{rel}:{line} imports {name}")
    assert not bad, "outside the public agent API " + str(PUBLIC_AGENT_API) + ":\n" + "\n".join(bad)
    assert all((ROOT / rel).is_file() for rel in TOOLS_REACHING_IN), "an exempt tool is gone: drop it from the list"
