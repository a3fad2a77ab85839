"""A real `snake-agent run --backend portable` process on plain onnxruntime.

The portable venv has neither torch, nor onnxruntime-training, nor onnx. The agent's run path
(CLI, service, trainers) must import there, and a real agent process must join a real broker and
introduce itself as a portable agent, with a speed it measured (the calibration graph once
never reached a clean clone, so every agent's speed was silently unknown). (A module of the split baseline once imported onnx at the
top, so the portable agent died at start while every trainer test still passed.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from coordinator.broker import RunningBroker
from edge_agent.mqtt import MqttLink, parse_broker_url
from edge_agent.protocol import topics
from edge_agent.protocol.envelope import decode

RUN_PATH = textwrap.dedent(
    """
    import sys
    import edge_agent.cli, edge_agent.service, edge_agent.portable_trainer, edge_agent.split_trainer
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "coordinator", "models"))
    print(heavy)
    sys.exit(1 if heavy else 0)
    """
)


def test_the_agent_run_path_imports_without_torch_or_onnx() -> None:
    proc = subprocess.run([sys.executable, "-c", RUN_PATH], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.broker
def test_a_portable_agent_process_joins_the_broker_and_says_hello(mosquitto: RunningBroker) -> None:
    agent_id = f"pi-{uuid.uuid4().hex[:6]}"
    watcher = MqttLink(
        parse_broker_url(mosquitto.url),
        f"watch-{agent_id}",
        [topics.coordinator_inbox(), topics.agent_status(agent_id)],
    )
    watcher.start(timeout=10)
    cmd = [sys.executable, "-m", "edge_agent.cli", "run", "--broker", mosquitto.url, "--agent-id", agent_id]
    cmd += ["--data", "fashion-mnist", "--samples", "300", "--backend", "portable"]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hello, online = None, False
    try:
        deadline = time.monotonic() + 60
        while (hello is None or not online) and time.monotonic() < deadline and agent.poll() is None:
            message = watcher.get(timeout=0.5)
            if message is None:
                continue
            if message.topic == topics.agent_status(agent_id):
                online = online or message.payload.startswith(b"{") and b"online" in message.payload
                continue
            env = decode(message.payload)
            if env.type == "hello" and env.src == agent_id:
                hello = env.body
    finally:
        agent.terminate()
        _, err = agent.communicate(timeout=30)
        watcher.stop()
    assert hello is not None, f"no hello from the portable agent (exit {agent.returncode}):\n{err[-2000:]}"
    assert online
    assert hello["backend"] == "portable" and hello["num_train"] > 0, json.dumps(hello)[:500]
    assert hello["gflops"] is not None and hello["gflops"] > 0  # the calibration graph shipped and ran
