#!/usr/bin/env python3
"""Benchmark: what signatures cost per message (edge_agent.secure_link's work, no broker).

For a control message (a JSON envelope with a small body) and a chunk frame of ``--chunk-kib`` KiB, times the
sender's side (decode, sign with Ed25519 over the canonical header + data sha256, encode) and the receiver's
side (decode, verify against a trust directory, replay checks), medians of ``--repeats`` runs, and the bytes
a signature adds. Keys come from a throw-away ``provision``.

    PYTHONPATH=$PWD python -m tools.bench_signing --out bench_signing.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from coordinator.provision import ProvisionSpec, provision
from edge_agent.keys import FileSigner, TrustDir
from edge_agent.protocol.envelope import Envelope, decode, encode
from edge_agent.protocol.signing import Authenticator, SequenceNumbers, sign


def _case(env: Envelope, signer: FileSigner, trust: TrustDir, repeats: int) -> dict[str, float]:
    plain = encode(env)
    numbers, auth = SequenceNumbers(), Authenticator("a1", trust)
    send, receive, size = [], [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        wire = encode(sign(decode(plain), signer, numbers.next(time.time())))
        t1 = time.perf_counter()
        auth.check(decode(wire), time.time())
        t2 = time.perf_counter()
        send.append(t1 - t0)
        receive.append(t2 - t1)
        size = len(wire)
    return {"plain_bytes": len(plain), "signed_bytes": size, "extra_bytes": size - len(plain),
            "send_us": statistics.median(send) * 1e6, "receive_us": statistics.median(receive) * 1e6}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench_signing.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        provision(ProvisionSpec(root, ("a0", "a1")))
        signer = FileSigner(root / "agents" / "a0" / "signing.key")
        trust = TrustDir(root / "agents" / "a1" / "trust")
        control = Envelope(
            "hop_done", "a0", "a1", {"tasks": [{"hop": i, "groups": ["conv0", "fc1"]} for i in range(8)]}
        )
        chunk = Envelope("chunk", "a0", "a1", {"transfer_id": "t" * 32, "seq": 0, "total": 1},
                         data=os.urandom(args.chunk_kib * 1024))  # fmt: skip
        result = {
            "control": _case(control, signer, trust, args.repeats),
            f"chunk_{args.chunk_kib}kib": _case(chunk, signer, trust, args.repeats),
            "repeats": args.repeats,
            "cpus": os.cpu_count(),
        }
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
