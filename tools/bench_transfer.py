#!/usr/bin/env python3
"""Benchmark: large hand-offs through mosquitto (the real transfer code) vs raw loopback TCP.

For each payload size (MiB) and chunk size, a sender process and a receiver process (multiprocessing,
spawn) move one random payload:

- ``mqtt``: the project's own path, ``Outbox.send`` -> ``MqttLink.publish`` of every frame (each made
  as it is published, while the link's publish window has room) -> mosquitto -> ``MqttLink`` (its
  inbox byte budget) -> ``decode`` -> ``Reassembler.add`` -> ``TransferAck`` -> ``Outbox.on_ack``. The
  clock runs from just before ``Outbox.send`` (hashing and framing count) until the sender holds the
  ack, so the receiver has verified every chunk digest and the whole-transfer digest.
- ``raw``: plain sockets between two processes, ``sendall`` of the same bytes into a preallocated buffer,
  a one-byte ack back; no hashing. The ceiling of the machine's loopback.
- ``raw-sha``: the same, plus the least any digest-checked transfer does: the sender hashes the payload
  once on the clock and the receiver hashes it before it acks (``mqtt`` hashes twice at each end: every
  chunk and the whole transfer).

Each end reports its peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` once its link is up)
minus its RSS at that moment, as a multiple of the payload: the sender's figure includes the payload it
generates (the caller's own bytes), the receiver's the payload it reassembles; 1.0 is the floor. A
sampling thread also notes in which phase the RSS peaked. Every case runs ``--repeats`` times; medians
are reported (the machine is shared and noisy). MB means MiB (2**20 bytes) throughout.

    PYTHONPATH=$PWD python -m tools.bench_transfer --sizes 64,512 --out docs/results/bench-transfer.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

MIB = 1 << 20
SENDER, RECEIVER = "bench-tx", "bench-rx"


# ------------------------------------------------------------------ memory of this process


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class Memory:
    """Peak RSS above a baseline, and the phase the process was in when RSS was highest."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.phase = "setup"
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak_kib, self.peak_phase = 0, "setup"
        self.baseline_kib = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> None:
        """Take the baseline now and reset the kernel's high-water mark."""
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        self.baseline_kib = _status_kib("VmRSS")
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            rss = _status_kib("VmRSS")
            if rss > self.peak_kib:
                self.peak_kib, self.peak_phase = rss, self.phase

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        hwm = _status_kib("VmHWM")
        return {"baseline_mb": self.baseline_kib / 1024, "peak_mb": hwm / 1024,
                "delta_mb": (hwm - self.baseline_kib) / 1024, "peak_phase": self.peak_phase}  # fmt: skip


def make_payload(size: int) -> bytes:
    """Random bytes in one allocation (numpy's generators build a temporary copy first)."""
    return os.urandom(size)


# ------------------------------------------------------------------ mqtt ends (child processes)


def _link(url: str, client_id: str, inbox: str, buffer_bytes: int | None) -> Any:
    import logging

    logging.basicConfig(level=logging.WARNING, format=f"{client_id} %(levelname)s %(name)s: %(message)s")
    from edge_agent.mqtt import INBOX_BYTES, WINDOW_BYTES, MqttLink, parse_broker_url

    link = MqttLink(parse_broker_url(url), client_id, [inbox], clean_session=True,
                    window_bytes=buffer_bytes or WINDOW_BYTES, inbox_bytes=buffer_bytes or INBOX_BYTES)  # fmt: skip
    link.start(timeout=10.0)
    return link


def mqtt_receiver(conn: Connection, url: str, timeout_s: float, buffer_bytes: int | None = None) -> None:
    from edge_agent.protocol import topics
    from edge_agent.protocol.envelope import decode
    from edge_agent.protocol.kinds import MessageType
    from edge_agent.protocol.transfer import Reassembler

    link = _link(url, RECEIVER, topics.inbox(RECEIVER), buffer_bytes)
    mem, reasm = Memory(), Reassembler(RECEIVER)
    mem.start()
    conn.send(("ready", None))
    mem.phase, deadline, first, result = "receiving", time.monotonic() + timeout_s, None, None
    backlog = 0  # most frames waiting in the link's receive queue (private: a diagnostic only)
    while result is None and time.monotonic() < deadline:
        msg = link.get(timeout=0.5)
        backlog = max(backlog, link._inbox.qsize())
        now = time.time()
        if msg is None:
            for out in reasm.tick(now):
                link.publish(out.topic, out.payload)
            continue
        env = decode(msg.payload)
        if env.type != MessageType.CHUNK:
            continue
        first = first if first is not None else time.monotonic()
        partial = reasm.partial.get(env.body.get("transfer_id", ""))
        if partial is not None and partial.received() == partial.first.count - 1:
            mem.phase = "last chunk"
        done, replies = reasm.add(env, now)
        del env, msg
        for out in replies:
            link.publish(out.topic, out.payload)
        if done is not None:
            mem.phase = "holding"
            result = {"size": len(done.data), "sha256": hashlib.sha256(done.data).hexdigest(),
                      "receive_s": time.monotonic() - first, "max_backlog": backlog}  # fmt: skip
            link.wait_published(10.0)
            del done
    link.stop()
    conn.send(("done", {**(result or {"error": "timed out"}), **mem.finish()}))


def mqtt_sender(
    conn: Connection, url: str, size: int, chunk_bytes: int, timeout_s: float, buffer_bytes: int | None = None
) -> None:
    from edge_agent.protocol import topics
    from edge_agent.protocol.envelope import decode
    from edge_agent.protocol.kinds import MessageType, Purpose
    from edge_agent.protocol.messages import TransferAck, TransferNack, body_of
    from edge_agent.protocol.transfer import Outbox

    link = _link(url, SENDER, topics.inbox(SENDER), buffer_bytes)
    mem, outbox = Memory(), Outbox(SENDER)
    mem.start()
    mem.phase = "payload"
    data = make_payload(size)
    digest = hashlib.sha256(data).hexdigest()
    mem.phase = "framing"
    t0 = time.monotonic()
    pending, out = outbox.send(RECEIVER, None, Purpose.MODEL, {}, data, chunk_bytes, time.time())
    mem.phase = "publishing"
    for o in out:
        link.publish(o.topic, o.payload)
    del out, pending
    queued = time.monotonic() - t0
    mem.phase, deadline, acked = "awaiting ack", time.monotonic() + timeout_s, None
    while acked is None and time.monotonic() < deadline:
        msg = link.get(timeout=0.5)
        now = time.time()
        if msg is None:
            resend, _ = outbox.tick(now)
        else:
            env = decode(msg.payload)
            if env.type == MessageType.TRANSFER_ACK:
                acked = outbox.on_ack(body_of(TransferAck, env.body), now)
                resend = []
            elif env.type == MessageType.TRANSFER_NACK:
                resend = outbox.on_nack(body_of(TransferNack, env.body), now)
            else:
                resend = []
        for o in resend:
            link.publish(o.topic, o.payload)
    elapsed = time.monotonic() - t0
    link.stop()
    result = {"seconds": elapsed, "queued_s": queued, "sha256": digest} if acked else {"error": "no ack"}
    conn.send(("done", {**result, **mem.finish()}))


# ------------------------------------------------------------------ raw TCP ends (child processes)


def raw_receiver(conn: Connection, size: int, verify: bool, timeout_s: float) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(timeout_s)
        mem = Memory()
        mem.start()
        conn.send(("ready", server.getsockname()[1]))
        peer, _ = server.accept()
        with peer:
            peer.settimeout(timeout_s)
            mem.phase = "receiving"
            buf = bytearray(size)
            view, got = memoryview(buf), 0
            while got < size:
                n = peer.recv_into(view[got:])
                if n == 0:
                    break
                got += n
            digest = hashlib.sha256(buf).hexdigest() if verify else None  # checked before the ack
            peer.sendall(b"k")
            mem.phase = "holding"
            result = {"size": got, "sha256": digest or hashlib.sha256(buf).hexdigest()}
            view.release()
    conn.send(("done", {**result, **mem.finish()}))


def raw_sender(conn: Connection, port: int, size: int, verify: bool, timeout_s: float) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        mem = Memory()
        mem.start()
        mem.phase = "payload"
        data = make_payload(size)
        digest = None if verify else hashlib.sha256(data).hexdigest()
        mem.phase = "sending"
        t0 = time.monotonic()
        digest = digest or hashlib.sha256(data).hexdigest()  # raw-sha: the sender's digest is on the clock
        sock.sendall(data)
        ack = sock.recv(1)
        elapsed = time.monotonic() - t0
    result = {"seconds": elapsed, "sha256": digest} if ack == b"k" else {"error": "no ack"}
    conn.send(("done", {**result, **mem.finish()}))


# ------------------------------------------------------------------ one run (parent)


def _spawn(ctx: Any, target: Callable[..., None], *args: Any) -> tuple[Any, Connection]:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    return proc, parent


def _expect(conn: Connection, kind: str, timeout_s: float) -> Any:
    if not conn.poll(timeout_s):
        raise TimeoutError(f"no {kind!r} from a benchmark process within {timeout_s:.0f} s")
    got, value = conn.recv()
    if got != kind:
        raise RuntimeError(f"expected {kind!r}, got {got!r}")
    return value


def run_once(
    transport: str, size: int, chunk_bytes: int, url: str, timeout_s: float, buffer_bytes: int | None = None
) -> dict[str, Any]:
    """One transfer between two fresh processes; the sender's and the receiver's reports."""
    ctx = mp.get_context("spawn")
    if transport == "mqtt":
        rx, rx_conn = _spawn(ctx, mqtt_receiver, url, timeout_s, buffer_bytes)
        _expect(rx_conn, "ready", 60)
        tx, tx_conn = _spawn(ctx, mqtt_sender, url, size, chunk_bytes, timeout_s, buffer_bytes)
    else:
        verify = transport == "raw-sha"
        rx, rx_conn = _spawn(ctx, raw_receiver, size, verify, timeout_s)
        port = _expect(rx_conn, "ready", 60)
        tx, tx_conn = _spawn(ctx, raw_sender, port, size, verify, timeout_s)
    try:
        sent = _expect(tx_conn, "done", timeout_s + 60)
        received = _expect(rx_conn, "done", timeout_s + 60)
    finally:
        for proc in (tx, rx):
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    return run_record(size, sent, received)


def run_record(size: int, sent: dict[str, Any], received: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run from the two ends' reports (an ``error`` when the payload did not arrive intact)."""
    error = sent.get("error") or received.get("error")
    if error is None and (received.get("size") != size or received.get("sha256") != sent.get("sha256")):
        error = "payload arrived changed"
    record: dict[str, Any] = {
        "seconds": sent.get("seconds"),
        "mb_s": size / MIB / sent["seconds"] if error is None else None,
        "sender_rss_x": sent["delta_mb"] * MIB / size,
        "receiver_rss_x": received["delta_mb"] * MIB / size,
        "sender": sent,
        "receiver": received,
    }
    if error is not None:
        record["error"] = error
    return record


# ------------------------------------------------------------------ aggregation (pure)


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median_of(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats of throughput and each end's RSS multiple; failed runs are counted, not averaged."""
    ok = [r for r in runs if "error" not in r]
    return {
        "mb_s": _median([r["mb_s"] for r in ok]),
        "sender_rss_x": _median([r["sender_rss_x"] for r in ok]),
        "receiver_rss_x": _median([r["receiver_rss_x"] for r in ok]),
        "failed": len(runs) - len(ok),
    }


def summarize(cases: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (size, mqtt chunk size): throughput, mqtt/raw ratio, RSS multiples of both ends."""
    raw = {c["size_mb"]: c["median"]["mb_s"] for c in cases if c["transport"] == "raw"}
    raw_sha = {c["size_mb"]: c["median"]["mb_s"] for c in cases if c["transport"] == "raw-sha"}
    rows = []
    for c in cases:
        if c["transport"] != "mqtt":
            continue
        m, base = c["median"], raw.get(c["size_mb"])
        ratio = m["mb_s"] / base if m["mb_s"] is not None and base else None
        sha_base = raw_sha.get(c["size_mb"])
        ratio_sha = m["mb_s"] / sha_base if m["mb_s"] is not None and sha_base else None
        rows.append({"size_mb": c["size_mb"], "chunk_kib": c["chunk_bytes"] // 1024, "mqtt_mb_s": m["mb_s"],
                     "raw_mb_s": base, "ratio": ratio, "raw_sha_mb_s": sha_base, "ratio_sha": ratio_sha,
                     "sender_rss_x": m["sender_rss_x"],
                     "receiver_rss_x": m["receiver_rss_x"], "failed": m["failed"]})  # fmt: skip
    return rows


def format_table(rows: Sequence[dict[str, Any]], raw_cases: Sequence[dict[str, Any]]) -> str:
    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = ["size MB  chunk KiB   mqtt MB/s  raw MB/s  mqtt/raw  mqtt/raw-sha  sender RSS x  receiver RSS x  failed"]
    for r in rows:
        lines.append(f"{r['size_mb']:>7}  {r['chunk_kib']:>9}  {f(r['mqtt_mb_s'], '10.1f')}  {f(r['raw_mb_s'], '8.1f')}"
                     f"  {f(r['ratio'], '8.2f')}  {f(r['ratio_sha'], '12.2f')}  {f(r['sender_rss_x'], '12.2f')}"
                     f"  {f(r['receiver_rss_x'], '14.2f')}  {r['failed']:>6}")  # fmt: skip
    for c in raw_cases:
        m = c["median"]
        lines.append(f"{c['size_mb']:>7}  {c['transport']:<9}  {f(m['mb_s'], '10.1f')}  {'':>8}  {'':>8}  {'':>12}"
                     f"  {f(m['sender_rss_x'], '12.2f')}  {f(m['receiver_rss_x'], '14.2f')}  {m['failed']:>6}")  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------ driver


def _mosquitto_version() -> str:
    try:
        out = subprocess.run(["/usr/sbin/mosquitto", "-h"], capture_output=True, text=True, timeout=5).stdout
    except OSError:
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def run_case(transport: str, size_mb: int, chunk_bytes: int, args: argparse.Namespace, url: str) -> dict[str, Any]:
    size, runs = size_mb * MIB, []
    buffer = args.buffer_mb * MIB if args.buffer_mb else None
    timeout_s = args.timeout + size / (5 * MIB)  # at least 5 MB/s
    label = f"{transport} {size_mb} MB" + (f", {chunk_bytes // 1024} KiB chunks" if transport == "mqtt" else "")
    for i in range(args.repeats):
        try:
            run = run_once(transport, size, chunk_bytes, url=url, timeout_s=timeout_s, buffer_bytes=buffer)
        except (TimeoutError, RuntimeError, EOFError) as exc:
            run = {"error": str(exc), "mb_s": None, "sender_rss_x": None, "receiver_rss_x": None}
        runs.append(run)
        if "error" in run:
            print(f"  {label} #{i + 1}: FAILED ({run['error']})", flush=True)
        else:
            print(f"  {label} #{i + 1}: {run['mb_s']:.1f} MB/s, sender RSS +{run['sender_rss_x']:.2f}x "
                  f"(peak in {run['sender']['peak_phase']}), receiver +{run['receiver_rss_x']:.2f}x "
                  f"(peak in {run['receiver']['peak_phase']})", flush=True)  # fmt: skip
    return {"transport": transport, "size_mb": size_mb, "chunk_bytes": chunk_bytes if transport == "mqtt" else None,
            "runs": runs, "median": median_of(runs)}  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="64,512", help="payload sizes in MiB, comma separated")
    p.add_argument("--chunks", default="256,1024,4096", help="mqtt chunk sizes in KiB (1024 is the default)")
    p.add_argument("--repeats", type=int, default=3, help="runs per case (medians are reported)")
    p.add_argument("--max-packet-mb", type=int, default=16, help="broker message size limit, as trials use")
    p.add_argument("--buffer-mb", type=int, default=0,
                   help="MqttLink publish window and inbox budget in MiB (0: the link's defaults, 16)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per run on top of 5 MB/s")
    p.add_argument("--out", type=Path, default=Path("bench_transfer.json"), help="JSON results")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from coordinator.broker import start_broker

    sizes = [int(s) for s in args.sizes.split(",")]
    chunks = [int(c) * 1024 for c in args.chunks.split(",")]
    if max(chunks) + 64 * 1024 > args.max_packet_mb * MIB:
        raise SystemExit("a chunk size must stay below the broker's message size limit (with room for the header)")
    cases = []
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        broker = start_broker("mosquitto", max_packet_bytes=args.max_packet_mb * MIB, workdir=Path(tmp))
        with broker:
            print(f"mosquitto at {broker.url} (pid {broker.pid}, max packet {args.max_packet_mb} MiB)", flush=True)
            for size_mb in sizes:
                print(f"payload {size_mb} MB:", flush=True)
                cases.append(run_case("raw", size_mb, 0, args, broker.url))
                cases.append(run_case("raw-sha", size_mb, 0, args, broker.url))
                for chunk in chunks:
                    cases.append(run_case("mqtt", size_mb, chunk, args, broker.url))
    rows = summarize(cases)
    raw_cases = [c for c in cases if c["transport"] != "mqtt"]
    print(format_table(rows, raw_cases), flush=True)
    report = {
        "command": "python -m tools.bench_transfer " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "mosquitto": _mosquitto_version(),
        },  # fmt: skip
        "units": "MB = MiB; *_rss_x = (peak RSS - RSS before the transfer) / payload size",
        "repeats": args.repeats,
        "buffer_mb": args.buffer_mb or 16,
        "summary": rows,
        "cases": cases,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", flush=True)
    return 1 if any(r["failed"] for r in rows) or any(c["median"]["failed"] for c in raw_cases) else 0


if __name__ == "__main__":
    sys.exit(main())
