#!/usr/bin/env python3
"""A network test bed on one Linux machine: hosts in network namespaces, slow and lossy links.

Namespaces ``PREFIX-sw`` (a bridge, the "switch"), ``PREFIX-broker``, ``PREFIX-coord`` and
``PREFIX-agentN`` are joined by veth pairs to the bridge (10.203.0.0/24: broker .1, coordinator .2,
agent N .10+N). An agent's link gets, in both directions (its own egress is the upload, the
switch port's egress the download):

- a rate cap: an htb qdisc (tbf would do, htb also lets a filter pick packets);
- random loss: a classic-BPF filter (``ld rand``) sends that share of packets to an htb class whose
  queue holds nothing (``pfifo limit 0``), so they are dropped. This kernel has neither netem nor the
  gact action, and the machine no iptables/nft binaries, so neither ``iptables -m statistic`` nor
  ``nft numgen`` is used; the BPF filter needs only cls_bpf;
- delay and jitter: a userspace TCP proxy (tools/delay_proxy.py) in the broker's namespace in front
  of mosquitto, which that agent connects to instead of the broker.

Segmentation offload is turned off (gso_max_segs 1) so the rate and the loss apply to wire-sized
packets. Mosquitto, the coordinator (``python -m coordinator.cli run``) and the agents
(``python -m edge_agent.cli run``, via ``coordinator.simulate.AgentProcesses``) run as real processes
with ``ip netns exec``. Everything goes with ``NetBed.close()`` (context manager, and atexit): the
processes, then the namespaces (which takes their veths, qdiscs and bridge along).

    python -m tools.netbed probe                      # what this kernel and machine offer
    python -m tools.netbed trial TRIAL.toml --link 1=1000,0.05,200 --out runs/slow-link
    python -m tools.netbed clean                      # namespaces a killed run left behind
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.netbed_links import LinkSpec, link_report, parse_class_stats, shaping_commands

log = logging.getLogger("netbed")
PREFIX_ROOT = "snkbed"
SUBNET = "10.203.0"
BROKER_PORT = 1883
PROXY_PORT_BASE = 2000
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- what this machine offers


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetBedError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class NetBedError(RuntimeError):
    """The test bed could not be set up or a process in it failed."""


def probe() -> dict[str, Any]:
    """What the test bed needs, tried for real in a throwaway namespace: {"missing": [reasons], ...}."""
    facts: dict[str, Any] = {"missing": []}
    missing: list[str] = facts["missing"]
    if os.geteuid() != 0:
        missing.append("not root (network namespaces and tc need CAP_NET_ADMIN)")
        return facts
    for tool in ("ip", "tc", "mosquitto"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            missing.append(f"no `{tool}` binary")
    if missing:
        return facts
    ns = f"{PREFIX_ROOT}-probe-{uuid.uuid4().hex[:6]}"
    if _run(["ip", "netns", "add", ns], check=False).returncode != 0:
        missing.append("`ip netns add` fails (no network namespaces)")
        return facts
    try:
        ok = _run(["ip", "-n", ns, "link", "add", "va", "type", "veth", "peer", "name", "vb"], check=False)
        facts["veth"] = ok.returncode == 0
        if not facts["veth"]:
            missing.append(f"no veth pairs: {ok.stderr.strip()}")
            return facts
        for kind, cmd in [
            ("bridge", ["ip", "-n", ns, "link", "add", "br0", "type", "bridge"]),
            ("netem", ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "vb", "root", "netem", "delay", "1ms"]),
            ("tbf", ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "vb", "root", "tbf", "rate", "1mbit",
                     "burst", "32kbit", "latency", "400ms"]),
        ]:  # fmt: skip
            facts[kind] = _run(cmd, check=False).returncode == 0
        for cmd in shaping_commands("va", LinkSpec(1000, 0.05)):
            result = _run(["ip", "netns", "exec", ns, *cmd], check=False)
            if result.returncode != 0:
                missing.append(f"`{' '.join(cmd[:4])} ... {cmd[-4]}` fails: {result.stderr.strip()}")
                break
        facts["htb_bpf_loss"] = not any("tc" in m for m in missing)
        if not facts["bridge"]:
            missing.append("no bridge devices")
        for tool in ("iptables", "nft", "ethtool"):
            facts[tool] = shutil.which(tool) is not None
    finally:
        _run(["ip", "netns", "del", ns], check=False)
    return facts


# ---------------------------------------------------------------- the bed


@dataclass
class Host:
    name: str  # "broker", "coord", "agent0", ...
    netns: str
    address: str
    port_dev: str  # its veth end in the switch namespace


@dataclass
class NetBed:
    """Namespaces, links and processes; ``close()`` (or leaving ``with``, or exiting) removes them all."""

    agents: int
    links: dict[int, LinkSpec] = field(default_factory=dict)  # agent index -> its link (default: unshaped)
    prefix: str = field(default_factory=lambda: f"{PREFIX_ROOT}-{uuid.uuid4().hex[:6]}")
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="snake-netbed-")))  # removed on close
    logdir: Path | None = None  # where mosquitto's and the proxies' logs go and stay (default: workdir)
    _closed: bool = False

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def __enter__(self) -> NetBed:
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        _run(["ip", "netns", "add", self.switch])
        self._in(self.switch, ["ip", "link", "set", "lo", "up"])
        self._in(self.switch, ["ip", "link", "add", "br0", "type", "bridge"])
        self._in(self.switch, ["ip", "link", "set", "br0", "up"])
        names = ["broker", "coord", *(f"agent{i}" for i in range(self.agents))]
        for index, name in enumerate(names):
            octet = index + 1 if index < 2 else 8 + index  # broker .1, coord .2, agent N .10+N
            host = Host(name, f"{self.prefix}-{name}", f"{SUBNET}.{octet}", f"p-{name}"[:15])
            self._add_host(host)
            self.hosts[name] = host
        for i, spec in self.links.items():
            host = self.hosts[f"agent{i}"]
            if spec.shaped:
                for cmd in shaping_commands("eth0", spec):
                    self._in(host.netns, cmd)  # upload
                for cmd in shaping_commands(host.port_dev, spec):
                    self._in(self.switch, cmd)  # download
        log.info("net bed %s: %s", self.prefix, ", ".join(f"{h.name} {h.address}" for h in self.hosts.values()))

    def _add_host(self, host: Host) -> None:
        _run(["ip", "netns", "add", host.netns])
        _run(["ip", "-n", self.switch, "link", "add", host.port_dev, "type", "veth", "peer", "name", "eth0",
              "netns", host.netns])  # fmt: skip
        for ns, dev in ((self.switch, host.port_dev), (host.netns, "eth0")):
            _run(["ip", "-n", ns, "link", "set", "dev", dev, "gso_max_segs", "1"])  # wire-sized packets
        self._in(self.switch, ["ip", "link", "set", host.port_dev, "master", "br0"])
        self._in(self.switch, ["ip", "link", "set", host.port_dev, "up"])
        self._in(host.netns, ["ip", "addr", "add", f"{host.address}/24", "dev", "eth0"])
        self._in(host.netns, ["ip", "link", "set", "eth0", "up"])
        self._in(host.netns, ["ip", "link", "set", "lo", "up"])

    def _in(self, netns: str, cmd: list[str]) -> subprocess.CompletedProcess[str]:
        return _run(["ip", "netns", "exec", netns, *cmd])

    def exec_prefix(self, host: str) -> list[str]:
        """Prepend to a command to run it on ``host``."""
        return ["ip", "netns", "exec", self.hosts[host].netns]

    # -- processes ------------------------------------------------------------------------------
    def spawn(self, name: str, host: str, cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = os.environ.copy()  # the repository first, so `-m tools.delay_proxy` resolves from any directory
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with log_path.open("ab") as fh:
            proc = subprocess.Popen([*self.exec_prefix(host), *cmd], stdin=subprocess.DEVNULL, stdout=fh,
                                    stderr=subprocess.STDOUT, env=env)  # fmt: skip
        self.procs.append((name, proc))
        return proc

    @property
    def logs(self) -> Path:
        return self.logdir if self.logdir is not None else self.workdir

    def start_broker(self, max_packet_bytes: int = 16 << 20) -> str:
        """mosquitto on the broker host (coordinator/broker.py's config); returns its URL."""
        from coordinator.broker import find_mosquitto
        from coordinator.mosquitto import MosquittoConfig, mosquitto_major, prepare_persistence, run_as_user

        exe = find_mosquitto()
        if exe is None:
            raise NetBedError("mosquitto is not installed")
        address = self.hosts["broker"].address
        conf = self.workdir / "mosquitto.conf"
        config = MosquittoConfig(BROKER_PORT, address, max_packet_bytes, self.workdir / "mosquitto.d",
                                 mosquitto_major(exe), run_as=run_as_user())  # fmt: skip
        prepare_persistence(config, fresh=True)
        conf.write_text(config.text())
        self.spawn("mosquitto", "broker", [str(exe), "-c", str(conf)], self.logs / "mosquitto.log")
        self.wait_mqtt("coord", address, BROKER_PORT)
        return f"mqtt://{address}:{BROKER_PORT}"

    def start_proxy(self, agent: int, spec: LinkSpec, seed: int = 0) -> str:
        """A delay proxy on the broker host for ``agent``; returns the URL that agent should use."""
        address, port = self.hosts["broker"].address, PROXY_PORT_BASE + agent
        cmd = [sys.executable, "-m", "tools.delay_proxy", "--listen", f"{address}:{port}",
               "--upstream", f"{address}:{BROKER_PORT}", "--delay-ms", str(spec.delay_ms),
               "--jitter-ms", str(spec.jitter_ms), "--seed", str(seed)]  # fmt: skip
        self.spawn(f"proxy{agent}", "broker", cmd, self.logs / f"proxy{agent}.log")
        self.wait_mqtt(f"agent{agent}", address, port)
        return f"mqtt://{address}:{port}"

    def broker_url_for(self, agent: int, broker_url: str) -> str:
        spec = self.links.get(agent, LinkSpec())
        return self.start_proxy(agent, spec) if spec.delayed else broker_url

    def wait_mqtt(self, host: str, address: str, port: int, timeout_s: float = 20.0) -> None:
        """Until an MQTT CONNECT from ``host`` to address:port is accepted (checks the path, not just the port)."""
        code = (
            "import sys, time\nfrom coordinator.broker import mqtt_ping\n"
            f"end = time.monotonic() + {timeout_s}\n"
            f"while not mqtt_ping({address!r}, {port}, timeout=2.0):\n"
            "    if time.monotonic() > end: sys.exit(1)\n    time.sleep(0.1)\n"
        )
        if subprocess.run([*self.exec_prefix(host), sys.executable, "-c", code], timeout=timeout_s + 10).returncode:
            raise NetBedError(f"no MQTT answer at {address}:{port} from {host} within {timeout_s:g} s")

    def link_stats(self) -> dict[str, dict[str, Any]]:
        """Per shaped agent: what went up (its egress) and down (its switch port's egress), and the drops."""
        report = {}
        for i, spec in self.links.items():
            if not spec.shaped:
                continue
            host = self.hosts[f"agent{i}"]
            up = self._in(host.netns, ["tc", "-s", "class", "show", "dev", "eth0"]).stdout
            down = self._in(self.switch, ["tc", "-s", "class", "show", "dev", host.port_dev]).stdout
            report[f"agent-{i}"] = {
                "up": link_report(parse_class_stats(up)),
                "down": link_report(parse_class_stats(down)),
            }
        return report

    def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL after 5 s), then delete the namespaces. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
                proc.kill()
                proc.wait()
        for netns in [h.netns for h in self.hosts.values()] + [self.switch]:
            remove_namespace(netns)
        shutil.rmtree(self.workdir, ignore_errors=True)


def remove_namespace(netns: str) -> None:
    """Kill what still runs in ``netns`` (only our namespaces hold only our processes), then delete it."""
    pids = _run(["ip", "netns", "pids", netns], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _run(["ip", "netns", "del", netns], check=False)


def clean(root: str = PREFIX_ROOT) -> list[str]:
    """Remove namespaces named ``root-*`` that a killed run left behind; returns their names."""
    listed = _run(["ip", "netns", "list"], check=False).stdout.split("\n")
    stale = [line.split()[0] for line in listed if line.startswith(f"{root}-")]
    for netns in stale:
        remove_namespace(netns)
    return stale


# ---------------------------------------------------------------- CLI


def _link(text: str) -> tuple[int, LinkSpec]:
    agent, _, spec = text.partition("=")
    try:
        return int(agent), LinkSpec.parse(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: AGENT=RATE_KBIT[,LOSS[,DELAY_MS[,JITTER_MS]]] ({exc})") from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("probe", help="print what the kernel and machine offer (JSON)")
    sub.add_parser("clean", help=f"remove {PREFIX_ROOT}-* namespaces left behind (none may be in use)")
    trial = sub.add_parser("trial", help="run a trial file on the bed; prints the summary's key figures (JSON)")
    trial.add_argument("trial_file", type=Path)
    trial.add_argument("--link", type=_link, action="append", default=[],
                       help="AGENT=RATE_KBIT[,LOSS[,DELAY_MS[,JITTER_MS]]], e.g. 1=1000,0.05,200 (repeatable)")  # fmt: skip
    trial.add_argument("--out", type=Path, required=True, help="run directory")
    trial.add_argument("--backend", default="auto", help="agents' trainer backend: auto | ort | portable")
    trial.add_argument("--timeout", type=float, default=900.0, help="seconds before the trial counts as failed")
    args = ap.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "probe":
        print(json.dumps(probe(), indent=2))
        return 0
    if args.command == "clean":
        print("\n".join(clean()) or "nothing to clean")
        return 0
    missing = probe()["missing"]
    if missing:
        print("the test bed cannot run here: " + "; ".join(missing), file=sys.stderr)
        return 2
    from tools.netbed_trial import run_trial

    summary = run_trial(args.trial_file, dict(args.link), args.out, args.backend, args.timeout)
    keys = ("trial_id", "final_test_accuracy", "hops", "bytes_total", "wall_s", "netbed")
    print(json.dumps({k: summary.get(k) for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
