#!/usr/bin/env python3
"""A TCP proxy that delays every byte by D +- J ms in each direction, keeping the order.

The kernel here has no netem, so latency and jitter for the network test bed (tools/netbed.py) come
from this proxy in front of the broker: each read from one side is released to the other side at
``arrival + D + uniform(-J, J)``, but never before the bytes read ahead of it (a TCP stream cannot
reorder). Every connection gets its own pair of directions. What it cannot emulate: TCP itself sees
no extra round-trip time (the proxy acknowledges bytes at once), so congestion control and loss
recovery behave as on a short link with a slow application.

    python -m tools.delay_proxy --listen 10.203.0.1:2000 --upstream 10.203.0.1:1883 --delay-ms 200 --jitter-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import signal
from dataclasses import dataclass, field

log = logging.getLogger("delay_proxy")
READ_BYTES = 64 * 1024
QUEUE_READS = 512  # reads buffered per direction before the reader waits (at most 32 MiB)


def release_at(arrival: float, previous: float, delay_s: float, jitter_s: float, u: float) -> float:
    """When bytes read at ``arrival`` go out: delayed by ``delay_s`` +- ``jitter_s`` (``u`` uniform in
    [0, 1)), never earlier than the ``previous`` read's release (order is kept), never before arrival."""
    return max(arrival, previous, arrival + delay_s + jitter_s * (2.0 * u - 1.0))


@dataclass
class Stats:
    connections: int = 0
    bytes: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})


@dataclass(frozen=True)
class Delay:
    delay_s: float
    jitter_s: float = 0.0


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    delay: Delay,
    rng: random.Random,
    stats: Stats,
    direction: str,
) -> None:
    """Copy ``reader`` to ``writer``, each read released at its delayed time, in order."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_READS)

    async def read() -> None:
        previous = 0.0
        try:
            while data := await reader.read(READ_BYTES):
                previous = release_at(loop.time(), previous, delay.delay_s, delay.jitter_s, rng.random())
                await queue.put((previous, data))
        except (ConnectionError, OSError):
            pass
        finally:
            await queue.put((previous, b""))  # end of stream

    reading = asyncio.create_task(read())
    try:
        while True:
            when, data = await queue.get()
            await asyncio.sleep(max(0.0, when - loop.time()))
            if not data:
                break
            writer.write(data)
            stats.bytes[direction] += len(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        writer.close()
        with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
            await writer.wait_closed()


async def _serve_one(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    upstream: tuple[str, int],
    delay: Delay,
    rng: random.Random,
    stats: Stats,
) -> None:
    stats.connections += 1
    try:
        up_r, up_w = await asyncio.open_connection(*upstream)
    except OSError as exc:
        log.warning("cannot reach upstream %s:%d: %s", *upstream, exc)
        client_w.close()
        await client_w.wait_closed()
        return
    await asyncio.gather(
        _pump(client_r, up_w, delay, rng, stats, "up"),
        _pump(up_r, client_w, delay, rng, stats, "down"),
    )


async def serve(listen: tuple[str, int], upstream: tuple[str, int], delay: Delay, seed: int = 0) -> None:
    """Run until cancelled (SIGTERM/SIGINT when run as a script)."""
    rng, stats = random.Random(seed), Stats()
    connections: set[asyncio.Task[None]] = set()

    async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        try:
            await _serve_one(r, w, upstream, delay, rng, stats)
        except asyncio.CancelledError:
            pass  # shutting down; ending normally keeps asyncio from logging the cancelled handler
        finally:
            connections.discard(task)

    server = await asyncio.start_server(accept, listen[0], listen[1])
    log.info(
        "delaying %s:%d -> %s:%d by %.0f +- %.0f ms each way",
        *listen, *upstream, delay.delay_s * 1e3, delay.jitter_s * 1e3,
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with server:
            await stop.wait()
    finally:
        for task in list(connections):
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
    log.info("stopped: %d connection(s), %d bytes up, %d bytes down", stats.connections, *stats.bytes.values())


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", type=_address, required=True, help="HOST:PORT to accept clients on")
    ap.add_argument("--upstream", type=_address, required=True, help="HOST:PORT to forward to (the broker)")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added to each direction")
    ap.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +- jitter on the delay (order is kept)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.listen, args.upstream, Delay(args.delay_ms / 1e3, args.jitter_ms / 1e3), args.seed))


if __name__ == "__main__":
    main()
