"""Deadline scheduling and cross-session batching for one stage (no Ray, no gRPC: the serving layer and local
benchmarks drive the same object).

A stage replica runs its model on one compute thread. `StageScheduler` owns that thread:

- **Blocks** are submitted with their session and deadline (the wall time by which the block must leave the last
  stage to stay real time). The thread runs earliest-deadline-first, and puts the ready blocks of *other* sessions
  into the same call of `batch_fn` (one forward), up to `max_batch`, in that order. A session's blocks always
  run one at a time, in the order submitted (block b+1 reads the KV cache block b wrote).
- **Overload**: blocks already past their deadline go first, but among themselves in turn (the session that has
  waited longest since its previous block ran goes first), not by deadline. Plain EDF would give the whole stage to
  the session furthest behind (its deadlines are the earliest) until every other session is as far behind: a new
  session would get no frame for as long as an old one's backlog lasts.
- **Gathering a batch**: when a batch finishes, its sessions are *returning*: their next blocks, if they have
  some waiting upstream, arrive a moment later (the serving layer submits a session's next block only after the
  previous one's result). Taking whatever is queued at once would then pair nobody: under load two sessions would
  alternate single blocks forever (measured on the toy VAE decoder: about 69% of its decode time in unbatched
  blocks with two sessions behind real time). So while fewer than `max_batch` heads are ready, the thread waits up to
  `batch_linger_s` for the returning sessions; one that comes back is batched, one that has nothing queued costs
  the others at most that wait. Never with `max_batch` 1.
- **Batches only as large as pays**: `batch_limit()` is the batch size that serves the most blocks per second by
  the measured costs, up to `max_batch`; a larger batch counts only where it costs at least `MIN_BATCH_GAIN` less per
  block than the best smaller one (a batch delays its first block by the others' compute). Where batching gains
  nothing the thread runs blocks one at a time and never lingers (on a quiet CPU the toy VAE decoder took 470 ms for
  a batch of three, 141 ms for one block). A size the stage stopped using runs again once every `reprobe_every`
  batches, so its cost follows the machine.
- **Calls** (`call(fn, ...)`: session creation, sink prefill, close) run on the same thread before any block, so
  model state is only ever touched from that thread.
- **Cost**: the time of every batch is recorded per batch size (`StepCosts`); `realtime_capacity()` is how many
  sessions this stage can serve in real time from those measurements (in calls of `batch_limit()` blocks, each
  block period's calls must fit in one block's duration, with `utilization` headroom).
- **Deadlines**: each finished block's slack (deadline minus finish time) and every miss are counted, and reported
  to `on_batch` for metrics.

`batch_fn(works) -> results` gets the submitted works in batch order and returns one result per work: a value, or
an Exception instance, which fails that block alone. An exception raised by `batch_fn` itself fails the whole batch.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

__all__ = ["BatchReport", "SchedulerClosed", "StageScheduler", "StepCosts", "sessions_by_memory"]

MAX_CAPACITY = 4096  # the most sessions realtime_capacity reports (a stage whose calls cost next to nothing)
MIN_BATCH_GAIN = 0.05  # a larger batch must cost this much less per block than the best smaller one to be used


def sessions_by_memory(*, free_bytes: int, live_sessions: int, session_bytes: int, activation_bytes: int = 0) -> int:
    """Sessions a replica's accelerator memory holds: those it holds now plus as many more state allocations
    (KV cache, decoder cache) of `session_bytes` as its free memory takes after keeping `activation_bytes` (the
    largest forward's activations seen) free."""
    if session_bytes <= 0:
        raise ValueError("session_bytes must be > 0")
    return max(0, live_sessions) + max(0, int(free_bytes) - max(0, int(activation_bytes))) // int(session_bytes)


class SchedulerClosed(RuntimeError):
    """The scheduler was closed: the work will never run."""


@dataclass(frozen=True)
class BatchReport:
    """What one batch did: for metrics (`on_batch`)."""

    size: int
    seconds: float
    slacks_s: Sequence[float]  # deadline minus finish time, per block (negative: missed)

    @property
    def misses(self) -> int:
        return sum(1 for s in self.slacks_s if s < 0)


class StepCosts:
    """Measured seconds per batch, per batch size (exponentially weighted); thread-safe."""

    def __init__(self, alpha: float = 0.2) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self._s: Dict[int, float] = {}
        self._n: Dict[int, int] = {}
        self._records = 0
        self._last: Dict[int, int] = {}  # batch size -> self._records at its latest record
        self._lock = threading.Lock()

    def record(self, batch: int, seconds: float) -> None:
        if batch < 1 or not math.isfinite(seconds) or seconds < 0:
            return
        with self._lock:
            old = self._s.get(batch)
            self._s[batch] = seconds if old is None else old + self.alpha * (seconds - old)
            self._n[batch] = self._n.get(batch, 0) + 1
            self._records += 1
            self._last[batch] = self._records

    def records_since(self, batch: int) -> Optional[int]:
        """Records (of any size) after the latest of `batch`; None if `batch` was never measured."""
        with self._lock:
            last = self._last.get(batch)
            return None if last is None else self._records - last

    def seconds(self, batch: int) -> Optional[float]:
        """Estimated seconds of a batch of `batch` blocks: measured, else interpolated / extrapolated linearly
        from the nearest measured sizes (per-block cost of the largest one beyond it); None before any."""
        with self._lock:
            known = dict(self._s)
        if not known:
            return None
        if batch in known:
            return known[batch]
        sizes = sorted(known)
        below = [n for n in sizes if n < batch]
        above = [n for n in sizes if n > batch]
        if below and above:
            lo, hi = below[-1], above[0]
            return known[lo] + (known[hi] - known[lo]) * (batch - lo) / (hi - lo)
        if below:  # beyond the largest measured: its per-block cost (batching gains no more)
            lo = below[-1]
            return known[lo] * batch / lo
        return known[above[0]] * batch / above[0]  # below the smallest measured: no better than its per-block cost

    def snapshot(self) -> Dict[int, Dict[str, float]]:
        with self._lock:
            return {n: {"seconds": round(s, 6), "count": self._n[n]} for n, s in sorted(self._s.items())}


@dataclass
class _Work:
    session_id: str
    work: Any
    deadline: float
    future: concurrent.futures.Future


@dataclass
class _SessionQueue:
    """One session's queued blocks, in submission order."""

    works: Deque[_Work]
    ready_at: float  # when its head became runnable: submitted to an empty queue, or the previous block finished
    seq: int  # ties of ready_at, in that order

    def key(self, now: float) -> tuple:
        """Order of heads: late ones first, longest waiting first; then earliest deadline first."""
        head = self.works[0]
        if head.deadline <= now:
            return (0, self.ready_at, self.seq)
        return (1, head.deadline, self.seq)


class StageScheduler:
    """EDF + batching on one compute thread (see the module docstring)."""

    def __init__(self, batch_fn: Callable[[List[Any]], Sequence[Any]], *, max_batch: int = 1,
                 block_seconds: float, utilization: float = 0.9, name: str = "stage",
                 on_batch: Optional[Callable[[BatchReport], None]] = None,
                 clock: Callable[[], float] = time.time, batch_linger_s: float = 0.0,
                 reprobe_every: int = 64) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if reprobe_every < 1:
            raise ValueError("reprobe_every must be >= 1")
        if not batch_linger_s >= 0:
            raise ValueError("batch_linger_s must be >= 0")
        if block_seconds <= 0 or not 0 < utilization <= 1:
            raise ValueError("block_seconds must be > 0 and utilization in (0, 1]")
        self.batch_fn = batch_fn
        self.max_batch = max_batch
        self.block_seconds = block_seconds
        self.utilization = utilization
        self.name = name
        self.on_batch = on_batch
        self.clock = clock  # wall clock (deadlines are unix seconds: they cross processes)
        self.costs = StepCosts()
        self.deadline_misses = 0
        self.blocks_done = 0
        self.batch_linger_s = float(batch_linger_s)
        self.reprobe_every = reprobe_every
        self.lingers = 0  # times the thread waited for returning sessions
        self._queues: Dict[str, _SessionQueue] = {}  # sessions with queued blocks
        # Sessions whose block just finished and which have not submitted their next one: monotonic finish time.
        # Entries expire after batch_linger_s, so a session that ended leaves nothing behind.
        self._returning: Dict[str, float] = {}
        self._calls: Deque[tuple] = deque()
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"{name}-compute", daemon=True)
        self._thread.start()

    # ----- submitting -------------------------------------------------------------------------------------------
    def submit(self, session_id: str, work: Any, deadline: float) -> concurrent.futures.Future:
        """Queue one block of `session_id` due at `deadline` (unix seconds); the future gets its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise SchedulerClosed(f"{self.name}: scheduler closed")
            self._returning.pop(session_id, None)
            q = self._queues.get(session_id)
            item = _Work(session_id, work, float(deadline), fut)
            if q is None:
                self._queues[session_id] = _SessionQueue(deque([item]), self.clock(), next(self._seq))
            else:
                q.works.append(item)
            self._cv.notify()
        return fut

    def call(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run `fn(*args)` on the compute thread before any queued block (session setup and teardown)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise SchedulerClosed(f"{self.name}: scheduler closed")
            self._calls.append((fn, args, fut))
            self._cv.notify()
        return fut

    def queued(self) -> int:
        with self._cv:
            return sum(len(q.works) for q in self._queues.values())

    def snapshot(self) -> Dict[str, Any]:
        """What waits and what was done (for a replica's status): blocks queued per session with the head's
        deadline, calls queued, totals, measured costs."""
        with self._cv:
            queued = {sid: {"blocks": len(q.works), "head_deadline": q.works[0].deadline}
                      for sid, q in self._queues.items()}
            calls = len(self._calls)
        return {"queued": queued, "calls_queued": calls, "blocks_done": self.blocks_done,
                "deadline_misses": self.deadline_misses, "lingers": self.lingers, "batch_limit": self.batch_limit(),
                "step_costs": self.costs.snapshot()}

    # ----- batch size and capacity --------------------------------------------------------------------------------
    def batch_limit(self) -> int:
        """The most blocks one call takes now: the size (up to `max_batch`) with the lowest measured cost per block,
        a larger one only where it costs at least `MIN_BATCH_GAIN` less per block than the best smaller one (sizes
        between measured ones are interpolated). `max_batch` until a batch of one was measured."""
        if self.max_batch == 1 or self.costs.records_since(1) is None:  # no single block measured yet
            return self.max_batch
        best, best_per_block = 1, self.costs.seconds(1)
        for n in range(2, self.max_batch + 1):
            per_block = self.costs.seconds(n) / n
            if per_block <= (1.0 - MIN_BATCH_GAIN) * best_per_block:
                best, best_per_block = n, per_block
        return best

    def realtime_capacity(self, cap: Optional[int] = None) -> Optional[int]:
        """Sessions this stage can serve in real time: the largest n (at most `cap`, else `MAX_CAPACITY`) whose
        measured cost per block period fits `utilization` x block_seconds. A session gets one block per block
        period; with calls of b = `batch_limit()` blocks, n sessions take n // b full calls plus one of n % b. None
        before anything was measured. Cheap (no loop over n): the replica's metrics task calls it on its event loop."""
        if self.costs.seconds(1) is None:
            return None
        budget = self.utilization * self.block_seconds
        limit = cap if cap is not None else MAX_CAPACITY
        size = self.batch_limit()
        full_cost = self.costs.seconds(size)
        full = int(budget // full_cost) if full_cost > 0 else limit
        if full * size >= limit:
            return limit
        left = budget - full * full_cost
        rest = max((r for r in range(size) if r == 0 or self.costs.seconds(r) <= left), default=0)
        return min(limit, full * size + rest)

    # ----- lifecycle --------------------------------------------------------------------------------------------
    def close(self, timeout_s: Optional[float] = None) -> None:
        """Stop the thread; queued blocks and calls fail with SchedulerClosed (the one running finishes)."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            pending = [w for q in self._queues.values() for w in q.works]
            calls = list(self._calls)
            self._queues.clear()
            self._calls.clear()
            self._returning.clear()
            self._cv.notify_all()
        for w in pending:
            w.future.set_exception(SchedulerClosed(f"{self.name}: scheduler closed"))
        for _, _, fut in calls:
            fut.set_exception(SchedulerClosed(f"{self.name}: scheduler closed"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    # ----- the compute thread -----------------------------------------------------------------------------------
    def _take(self) -> tuple:
        """-> ("call", (fn, args, fut)) or ("batch", [works]); None once closed. Holds the lock."""
        while True:
            if self._closed:
                return None
            if self._calls:
                return "call", self._calls.popleft()
            if self._queues:
                now = self.clock()
                # One head per session: a session never has two blocks in one batch. Few sessions wait at a stage,
                # so sorting their heads on every take costs nothing next to a forward.
                heads = sorted(self._queues.items(), key=lambda kv: kv[1].key(now))
                size = self.batch_limit()
                order = heads[: self._reprobe_size(min(len(heads), self.max_batch), size)]
                linger = self._linger_left() if len(order) < size else 0.0
                if linger > 0:
                    self.lingers += 1
                    self._cv.wait(linger)  # a returning session's submit (or a call, or close) wakes it
                    continue
                batch = []
                for sid, q in order:
                    batch.append(q.works.popleft())
                    if not q.works:
                        del self._queues[sid]
                return "batch", batch
            self._cv.wait()

    def _run(self) -> None:
        while True:
            with self._cv:
                taken = self._take()
            if taken is None:
                return
            kind, what = taken
            if kind == "call":
                fn, args, fut = what
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(*args))
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(exc)
                continue
            self._run_batch(what)
            with self._cv:  # their next blocks became runnable now (for the turn order of late blocks)
                now, finished = self.clock(), time.monotonic()
                for w in what:
                    q = self._queues.get(w.session_id)
                    if q is not None:
                        q.ready_at, q.seq = now, next(self._seq)
                    elif self.batch_linger_s > 0 and self.max_batch > 1:
                        self._returning[w.session_id] = finished
                self._linger_left()  # drops the sessions that did not return in time (full batches never ask)

    def _reprobe_size(self, ready: int, size: int) -> int:
        """`size`, or a larger batch of the `ready` heads whose cost was last measured `reprobe_every` or more
        batches ago (or never)."""
        for n in range(ready, size, -1):
            since = self.costs.records_since(n)
            if since is None or since >= self.reprobe_every:
                return n
        return size

    def _linger_left(self) -> float:
        """Seconds to wait for returning sessions (0: take the batch now). Drops those whose wait is over. Holds the
        lock."""
        now = time.monotonic()
        left = 0.0
        for sid, finished in list(self._returning.items()):
            remaining = finished + self.batch_linger_s - now
            if remaining <= 0 or sid in self._queues:
                del self._returning[sid]
            else:
                left = max(left, remaining)
        return left

    def _run_batch(self, batch: List[_Work]) -> None:
        live = [w for w in batch if w.future.set_running_or_notify_cancel()]
        if not live:
            return
        t0 = time.perf_counter()
        try:
            results = list(self.batch_fn([w.work for w in live]))
            if len(results) != len(live):
                raise RuntimeError(f"{self.name}: batch_fn returned {len(results)} results for {len(live)} blocks")
        except BaseException as exc:  # noqa: BLE001 - every block of the batch gets it
            results = [exc] * len(live)
        seconds = time.perf_counter() - t0
        self.costs.record(len(live), seconds)
        finished = self.clock()
        slacks = [w.deadline - finished for w in live]
        self.blocks_done += len(live)
        self.deadline_misses += sum(1 for s in slacks if s < 0)
        for w, r in zip(live, results):
            if isinstance(r, BaseException):
                w.future.set_exception(r)
            else:
                w.future.set_result(r)
        if self.on_batch is not None:
            try:
                self.on_batch(BatchReport(size=len(live), seconds=seconds, slacks_s=slacks))
            except Exception:  # noqa: BLE001 - metrics never stop the stage
                pass
