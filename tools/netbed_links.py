"""The links of the network test bed (tools/netbed.py), as data: a link's spec, the tc commands that
give a device that rate and loss, and tc's statistics read back. Pure: builds argument lists and parses
text; running them is netbed's business.

Loss uses a classic-BPF cls_bpf filter (``ld rand``) that sends a share of packets to an htb class
whose queue holds nothing (``pfifo limit 0``): this kernel has neither netem nor the gact action.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

UNLIMITED = "10gbit"


@dataclass(frozen=True)
class LinkSpec:
    """One host's link to the switch. 0 means no limit / no loss / no delay."""

    rate_kbit: int = 0  # each direction
    loss: float = 0.0  # share of packets dropped, each direction
    delay_ms: float = 0.0  # one way, each direction (the proxy), so the round trip gains twice this
    jitter_ms: float = 0.0  # uniform +- on the delay

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """``RATE_KBIT[,LOSS[,DELAY_MS[,JITTER_MS]]]``, e.g. ``1000,0.05,200,20``."""
        values = [float(v) for v in text.split(",")]
        if not 1 <= len(values) <= 4:
            raise ValueError(f"link {text!r}: RATE_KBIT[,LOSS[,DELAY_MS[,JITTER_MS]]]")
        spec = cls(int(values[0]), *values[1:])
        if spec.rate_kbit < 0 or not 0.0 <= spec.loss < 1.0 or spec.delay_ms < 0 or spec.jitter_ms < 0:
            raise ValueError(f"link {text!r}: rate >= 0, 0 <= loss < 1, delay and jitter >= 0")
        return spec

    @property
    def shaped(self) -> bool:
        return self.rate_kbit > 0 or self.loss > 0

    @property
    def delayed(self) -> bool:
        return self.delay_ms > 0 or self.jitter_ms > 0


def loss_bytecode(loss: float) -> str:
    """Classic BPF for tc's cls_bpf: match (return -1, the filter's classid) a random ``loss`` share of
    packets, let the rest through (return 0). ``ld rand`` is the ancillary load SKF_AD_OFF + 56."""
    threshold = min(0xFFFFFFFF, max(0, round(loss * 2**32) - 1))
    ld_rand, jgt, ret = 0x20, 0x25, 0x06
    program = [(ld_rand, 0, 0, 0xFFFFF038), (jgt, 1, 0, threshold), (ret, 0, 0, 0xFFFFFFFF), (ret, 0, 0, 0)]
    return f"{len(program)}," + ",".join(f"{c} {jt} {jf} {k}" for c, jt, jf, k in program)


def shaping_commands(dev: str, spec: LinkSpec) -> list[list[str]]:
    """The tc commands (run in the device's namespace) that give ``dev``'s egress ``spec``'s rate and loss."""
    rate = f"{spec.rate_kbit}kbit" if spec.rate_kbit else UNLIMITED
    klass = ["htb", "rate", rate, "ceil", rate, "quantum", "1514"]
    cmds = [
        ["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10"],
        ["tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", *klass],
        ["tc", "class", "add", "dev", dev, "parent", "1:1", "classid", "1:10", *klass],
    ]
    if spec.loss > 0:
        cmds += [
            ["tc", "class", "add", "dev", dev, "parent", "1:1", "classid", "1:20", *klass],
            ["tc", "qdisc", "add", "dev", dev, "parent", "1:20", "handle", "20:", "pfifo", "limit", "0"],
            ["tc", "filter", "add", "dev", dev, "parent", "1:", "protocol", "all", "prio", "1",
             "bpf", "bytecode", loss_bytecode(spec.loss), "classid", "1:20"],
        ]  # fmt: skip
    return cmds


def parse_class_stats(text: str) -> dict[str, dict[str, int]]:
    """``tc -s class show`` output -> {classid: {"bytes", "packets", "dropped"}}."""
    stats: dict[str, dict[str, int]] = {}
    pattern = r"class htb (\S+) .*?\n\s*Sent (\d+) bytes (\d+) pkt \(dropped (\d+)"
    for classid, nbytes, packets, dropped in re.findall(pattern, text):
        stats[classid] = {"bytes": int(nbytes), "packets": int(packets), "dropped": int(dropped)}
    return stats


def link_report(stats: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Bytes and packets that left through a shaped device, and the share the loss filter dropped."""
    passed = stats.get("1:10", {"bytes": 0, "packets": 0, "dropped": 0})
    lost = stats.get("1:20", {"dropped": 0})["dropped"]
    total = passed["packets"] + lost
    return {"bytes": passed["bytes"], "packets": total, "dropped": lost, "loss": lost / total if total else 0.0}
