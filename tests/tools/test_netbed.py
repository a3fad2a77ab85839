"""The network test bed's pure parts: link specs, the tc commands and the loss filter's BPF, tc's
statistics, and the delay proxy's ordering rule (plus the proxy itself on loopback)."""

from __future__ import annotations

import asyncio
import time

import pytest

from tools.delay_proxy import Delay, release_at, serve
from tools.netbed import probe
from tools.netbed_links import LinkSpec, link_report, loss_bytecode, parse_class_stats, shaping_commands


def test_a_link_spec_parses_from_rate_loss_delay_jitter() -> None:
    assert LinkSpec.parse("1000,0.05,200,20") == LinkSpec(1000, 0.05, 200.0, 20.0)
    assert LinkSpec.parse("256") == LinkSpec(256)
    assert LinkSpec.parse("0,0,50").delayed and not LinkSpec.parse("0,0,50").shaped
    for bad in ("", "1000,1.5", "-1", "1,2,3,4,5"):
        with pytest.raises(ValueError):
            LinkSpec.parse(bad)


def run_classic_bpf(bytecode: str, rand: int) -> int:
    """Evaluate the four instructions ``loss_bytecode`` emits (ld rand; jgt #k; ret #k; ret #k)."""
    count, *ops = bytecode.split(",")
    program = [tuple(int(v) for v in op.split()) for op in ops]
    assert len(program) == int(count)
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        if code == 0x20:
            assert k == 0xFFFFF038  # SKF_AD_OFF + SKF_AD_RANDOM
            acc, pc = rand, pc + 1
        elif code == 0x25:
            pc += 1 + (jt if acc > k else jf)
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


@pytest.mark.parametrize("loss", [0.01, 0.05, 0.5])
def test_the_loss_filter_matches_that_share_of_random_values(loss: float) -> None:
    bytecode = loss_bytecode(loss)
    step = 2**32 // 10_000
    matched = sum(run_classic_bpf(bytecode, r) == 0xFFFFFFFF for r in range(0, 2**32, step))
    assert matched / 10_000 == pytest.approx(loss, abs=1e-3)
    assert run_classic_bpf(bytecode, 2**32 - 1) == 0  # the rest passes (no class: the default)


def test_shaping_caps_the_rate_and_drops_only_with_loss() -> None:
    plain = shaping_commands("eth0", LinkSpec(1000))
    assert len(plain) == 3 and all("1000kbit" in c for c in plain[1:])
    assert not any("bpf" in c for c in plain)
    lossy = shaping_commands("eth0", LinkSpec(0, 0.05))
    assert "10gbit" in lossy[1]  # loss without a rate cap
    assert ["pfifo", "limit", "0"] == lossy[4][-3:]  # the class the filter picks holds nothing: dropped
    assert lossy[5][lossy[5].index("bytecode") + 1] == loss_bytecode(0.05)


TC_STATS = """class htb 1:10 parent 1:1 prio 0 rate 1Mbit ceil 1Mbit burst 1600b cburst 1600b
 Sent 273604 bytes 1930 pkt (dropped 0, overlimits 0 requeues 0)
 backlog 0b 0p requeues 0
class htb 1:1 root rate 1Mbit ceil 1Mbit burst 1600b cburst 1600b
 Sent 273604 bytes 1930 pkt (dropped 0, overlimits 0 requeues 0)
class htb 1:20 parent 1:1 leaf 20: prio 0 rate 1Mbit ceil 1Mbit burst 1600b cburst 1600b
 Sent 0 bytes 0 pkt (dropped 70, overlimits 0 requeues 0)
"""


def test_tc_statistics_give_bytes_and_the_measured_loss() -> None:
    stats = parse_class_stats(TC_STATS)
    assert stats["1:10"] == {"bytes": 273604, "packets": 1930, "dropped": 0}
    report = link_report(stats)
    assert report == {"bytes": 273604, "packets": 2000, "dropped": 70, "loss": 0.035}
    assert link_report({})["loss"] == 0.0


def test_release_times_keep_the_order_and_stay_within_the_jitter() -> None:
    assert release_at(10.0, 0.0, 0.2, 0.0, 0.7) == pytest.approx(10.2)
    assert release_at(10.0, 0.0, 0.2, 0.05, 0.0) == pytest.approx(10.15)
    assert release_at(10.0, 0.0, 0.2, 0.05, 0.999) == pytest.approx(10.25, abs=1e-3)
    assert release_at(10.01, 10.25, 0.2, 0.05, 0.0) == 10.25  # never overtakes the bytes before it
    assert release_at(10.0, 0.0, 0.01, 0.05, 0.0) == 10.0  # jitter larger than the delay: not before arrival


def test_the_proxy_delays_each_direction_and_keeps_the_bytes_in_order() -> None:
    async def scenario() -> tuple[float, bytes]:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.close()
            await w.wait_closed()

        upstream = await asyncio.start_server(echo, "127.0.0.1", 0)
        up_port = upstream.sockets[0].getsockname()[1]
        listen = ("127.0.0.1", _free_port())
        proxy = asyncio.create_task(serve(listen, ("127.0.0.1", up_port), Delay(0.1, 0.02)))
        for _ in range(100):
            try:
                reader, writer = await asyncio.open_connection(*listen)
                break
            except OSError:
                await asyncio.sleep(0.02)
        payload = b"".join(i.to_bytes(4, "big") for i in range(50_000))
        started = time.monotonic()
        writer.write(payload)
        await writer.drain()
        got = await reader.readexactly(len(payload))
        elapsed = time.monotonic() - started
        writer.close()
        await writer.wait_closed()
        proxy.cancel()
        await asyncio.gather(proxy, return_exceptions=True)
        upstream.close()
        await upstream.wait_closed()
        return elapsed, got == payload

    elapsed, same = asyncio.run(scenario())
    assert same
    assert 0.16 <= elapsed < 2.0  # two ways of 100 +- 20 ms


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_probe_names_what_is_missing_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert probe()["missing"] == ["not root (network namespaces and tc need CAP_NET_ADMIN)"]
