"""Deadline scheduling and batching on a synthetic stage: throughput and latency vs sessions and batch size.

One `StageScheduler` (engine/scheduler.py, the one every stage replica runs) drives a synthetic stage whose call
costs `--base-ms + --per-block-ms x blocks` (a sleep on the compute thread, as a GPU kernel wait releases the GIL):
the fixed part is what a batch shares (weights read once), the per-block part what it does not. For 1, 2, 4 and 8
sessions, each submitting one block every 0.48 s (real time) with its deadline (the end of its audio plus
`--budget-s`), and for each `max_batch`: blocks per second, latency from submission to result (p50 / p95 / max),
deadline misses, mean batch size, the latency drift (last quarter of the blocks minus the first), and whether the
sessions kept real time (no block past its deadline, and no drift of half a block or more).

Prints ONE JSON object with `--json` (a readable table otherwise).

    python bench/batching.py --json [--base-ms 200 --per-block-ms 40] [--blocks 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))

BLOCK_S = 0.48


def run_case(sessions: int, max_batch: int, args: argparse.Namespace) -> Dict[str, Any]:
    from avatarserve.engine.scheduler import StageScheduler

    sizes: List[int] = []

    def synthetic(works: List[Any]) -> List[Any]:
        sizes.append(len(works))
        time.sleep((args.base_ms + args.per_block_ms * len(works)) / 1000.0)
        return list(works)

    sched = StageScheduler(synthetic, max_batch=max_batch, block_seconds=BLOCK_S, name="synthetic")
    latencies: List[float] = []
    late: List[float] = []
    by_block: List[tuple] = []  # (block index, latency)
    lock = threading.Lock()
    t0 = time.time() + 0.2

    def session(i: int) -> None:
        offset = i * BLOCK_S / sessions  # sessions started at different moments of a block period
        pending = []
        for b in range(args.blocks):
            due = t0 + offset + b * BLOCK_S
            wait = due - time.time()
            if wait > 0:
                time.sleep(wait)
            deadline = due + BLOCK_S + args.budget_s  # audio of block b ends one block after its start
            submitted = time.time()
            fut = sched.submit(f"s{i}", b, deadline)
            fut.add_done_callback(lambda f, s=submitted, d=deadline, b=b: _done(b, s, d))
            pending.append(fut)
        for fut in pending:
            fut.result()

    def _done(b: int, submitted: float, deadline: float) -> None:
        now = time.time()
        with lock:
            latencies.append(now - submitted)
            late.append(now - deadline)
            by_block.append((b, now - submitted))

    threads = [threading.Thread(target=session, args=(i,)) for i in range(sessions)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - start
    sched.close()
    misses = sum(1 for x in late if x > 0)
    # Keeping pace: latency does not grow over the run (a stage slower than real time falls further behind with
    # every block, even while the deadline budget still hides it).
    q = max(1, args.blocks // 4)
    first = [lat for b, lat in by_block if b < q]
    last = [lat for b, lat in by_block if b >= args.blocks - q]
    drift = float(np.mean(last) - np.mean(first))
    return {"sessions": sessions, "max_batch": max_batch, "blocks": len(latencies),
            "blocks_per_s": round(len(latencies) / wall, 3),
            "latency_p50_s": round(float(np.percentile(latencies, 50)), 3),
            "latency_p95_s": round(float(np.percentile(latencies, 95)), 3),
            "latency_max_s": round(max(latencies), 3), "deadline_misses": misses,
            "mean_batch": round(float(np.mean(sizes)), 2), "latency_drift_s": round(drift, 3),
            "realtime": misses == 0 and drift < BLOCK_S / 2,
            "capacity_estimate": sched.realtime_capacity()}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-ms", type=float, default=200.0, help="cost of a call shared by its blocks")
    p.add_argument("--per-block-ms", type=float, default=40.0, help="cost of each block in a call")
    p.add_argument("--blocks", type=int, default=30, help="blocks per session")
    p.add_argument("--budget-s", type=float, default=3.0, help="deadline after a block's audio ends (late_after_s)")
    p.add_argument("--sessions", default="1,2,4,8")
    p.add_argument("--max-batch", default="1,2,4,8")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.base_ms < 0 or args.per_block_ms < 0 or args.blocks < 1:
        p.error("costs must be >= 0 and --blocks >= 1")
    rows = [run_case(s, mb, args) for s in (int(x) for x in args.sessions.split(","))
            for mb in (int(x) for x in args.max_batch.split(",")) if mb <= max(s, 1)]
    out = {"bench": "batching", "cost_ms": {"base": args.base_ms, "per_block": args.per_block_ms},
           "block_seconds": BLOCK_S, "budget_s": args.budget_s, "rows": rows}
    if args.json:
        print(json.dumps(out))
    else:
        for r in rows:
            print(f"{r['sessions']} sessions, max_batch {r['max_batch']}: {r['blocks_per_s']} blocks/s, latency p50 "
                  f"{r['latency_p50_s']} s p95 {r['latency_p95_s']} s, misses {r['deadline_misses']}, "
                  f"mean batch {r['mean_batch']}, real time {r['realtime']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
