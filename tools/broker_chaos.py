"""Restart the broker under a simulated trial and report what the trial made of it.

Starts its own mosquitto (persistent sessions, database in the run directory), runs ``simulate`` against
it with agent processes, and restarts the broker -- SIGTERM (it saves its database) or ``--kill``
(SIGKILL: it comes back from its last autosave) -- when the first model chunk one agent sends another
goes by (``--at chunk``, a transfer in flight) or every N seconds (``--at every:N``), staying down
``--down`` seconds each time. Prints one JSON line per run: whether the trial completed, its wall time,
the restarts, how much of the cut transfer had gone through, chunk requests and resends from the logs,
and the final model's digest (same seed and ``--no-calibrate`` agents: equal digests mean the restart
changed nothing).

Example::

    PYTHONPATH=. python tools/broker_chaos.py --out /tmp/chaos --kill --down 3 --repeat 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import onnx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from coordinator.broker import RunningBroker, start_broker
from coordinator.config import load_trial
from coordinator.errors import TrialError
from coordinator.simulate import SimOptions, simulate
from edge_agent.protocol import topics
from edge_agent.protocol.envelope import decode

# what the logs say when a transfer needed help: (label, text in the log line)
SIGNS = {
    "chunk_requests": "chunks missing",  # a receiver asked for what it lacked (TransferNack)
    "chunk_resends": "resending",  # a sender answered one
    "whole_resends": "no ack for transfer",  # a sender's ack timeout: the whole transfer again
    "given_up": "giving up on transfer",
    "lost_sessions": "had no session for",
}


class Chaos:
    """Watches ``snake/#`` and restarts the broker from its own thread when due."""

    def __init__(self, broker: RunningBroker, kill: bool, down_s: float, every_s: float | None) -> None:
        self.broker, self.kill, self.down_s, self.every_s = broker, kill, down_s, every_s
        self.seen: dict[str, set[int]] = {}
        self.cut: dict[str, Any] = {}
        self.restarts = 0
        self.done, self._fire = threading.Event(), threading.Event()
        # a persistent session: what goes by while the broker restarts is queued for the watcher too
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="broker-chaos", protocol=paho.MQTTv311,
                                  clean_session=False)  # fmt: skip
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(f"{topics.ROOT}/#", qos=1)
        self.client.reconnect_delay_set(1, 2)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        if msg.payload[:4] != b"SNK1" or "/agents/" not in msg.topic:
            return
        env = decode(bytes(msg.payload))
        if env.body["purpose"] != "model" or env.src == topics.COORDINATOR:
            return
        self.seen.setdefault(env.body["transfer_id"], set()).add(env.body["seq"])
        if not self.cut:
            self.cut.update(transfer_id=env.body["transfer_id"], count=env.body["count"], hop=env.body["meta"]["hop"])
            self._fire.set()

    def _run(self) -> None:
        if self.every_s is None:
            self._fire.wait()
            self._restart()
            self.cut["seen_before"] = len(self.seen[self.cut["transfer_id"]])
            return
        while not self.done.wait(self.every_s):
            self._restart()

    def _restart(self) -> None:
        self.broker.restart(kill=self.kill, down_s=self.down_s)
        self.restarts += 1

    def close(self) -> None:
        self.done.set()
        self.client.disconnect()
        self.client.loop_stop()
        self.thread.join(timeout=30)


def model_digest(out: Path) -> str | None:
    path = out / "final_model.onnx"
    if not path.is_file():
        return None
    model = onnx.load(str(path), load_external_data=False)
    return hashlib.sha256(b"".join(t.raw_data for t in model.graph.initializer)).hexdigest()


def one_run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    config = load_trial(args.trial, {"model": args.model, "agents": args.agents, "rounds": args.rounds,
                                     "samples_per_agent": args.samples, "train.batch_size": 32,
                                     "transfer.chunk_bytes": args.chunk_bytes, "timeouts.hop_s": args.hop_s})  # fmt: skip
    every = float(args.at.split(":", 1)[1]) if args.at.startswith("every:") else None
    out.mkdir(parents=True, exist_ok=True)
    log_file = logging.FileHandler(out / "coordinator.log")
    log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(log_file)
    failed, began = None, time.monotonic()
    with start_broker("mosquitto", workdir=out / "broker", autosave_s=args.autosave) as broker:
        chaos = Chaos(broker, args.kill, args.down, every)
        try:
            simulate(config, out, SimOptions(broker=broker.url, show_progress=False, calibrate=False))
        except TrialError as exc:
            failed = str(exc)
        finally:
            chaos.close()
            logging.getLogger().removeHandler(log_file)
            log_file.close()
    logs = "".join(p.read_text(errors="replace") for p in [out / "coordinator.log", *(out / "logs").glob("*.log")])
    return {
        "kill": args.kill, "down_s": args.down, "at": args.at, "completed": failed is None, "failed": failed,
        "wall_s": round(time.monotonic() - began, 1), "restarts": chaos.restarts, "cut": chaos.cut,
        **{label: logs.count(text) for label, text in SIGNS.items()}, "final_digest": model_digest(out),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Run directories go here (run-0, run-1, ...).")
    parser.add_argument("--trial", type=Path, default=None, help="A trial TOML (the flags below override it).")
    parser.add_argument("--model", default="mlp", help="Model name.")
    parser.add_argument("--agents", type=int, default=2, help="Agent processes.")
    parser.add_argument("--rounds", type=int, default=2, help="Rounds.")
    parser.add_argument("--samples", type=int, default=300, help="Training samples per agent.")
    parser.add_argument("--chunk-bytes", type=int, default=4096, help="Transfer chunk size (small: many publishes).")
    parser.add_argument("--hop-s", type=float, default=900.0, help="The coordinator's no-progress timeout.")
    parser.add_argument("--kill", action="store_true", help="SIGKILL the broker instead of SIGTERM.")
    parser.add_argument("--down", type=float, default=0.0, help="Seconds the broker stays down each time.")
    parser.add_argument("--at", default="chunk", help="'chunk' (first agent-to-agent model chunk) or 'every:N'.")
    parser.add_argument("--autosave", type=int, default=5, help="mosquitto's autosave interval (s).")
    parser.add_argument("--repeat", type=int, default=1, help="Runs.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, handlers=[logging.NullHandler()])
    for i in range(args.repeat):
        print(json.dumps(one_run(args, args.out / f"run-{i}")), flush=True)


if __name__ == "__main__":
    main()
