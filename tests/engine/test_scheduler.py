"""`StageScheduler`: earliest deadline first, batches of different sessions, one block per session per batch and in
order, calls first and on the same thread, failures per block, deadline accounting, capacity from measured cost,
waiting briefly for the sessions of the last batch so that sessions behind real time keep being batched.
Every test holds the compute thread on an event while it queues work, so the order is decided by the scheduler
alone (no sleeps)."""

from __future__ import annotations

import threading
import time

import pytest

from avatarserve.engine.scheduler import SchedulerClosed, StageScheduler, StepCosts, sessions_by_memory

WAIT_S = 60.0  # a bound for a future that must complete (work here takes microseconds)


class _Recorder:
    def __init__(self, fail=()):
        self.batches = []
        self.threads = set()
        self.fail = set(fail)

    def __call__(self, works):
        self.batches.append(list(works))
        self.threads.add(threading.get_ident())
        return [ValueError(f"bad {w}") if w in self.fail else f"done {w}" for w in works]


def _held(sched: StageScheduler) -> threading.Event:
    """Occupy the compute thread until the returned event is set."""
    release, running = threading.Event(), threading.Event()

    def hold():
        running.set()
        release.wait(WAIT_S)

    sched.call(hold)
    assert running.wait(WAIT_S)
    return release


def _scheduler(fn, **kw) -> StageScheduler:
    kw.setdefault("block_seconds", 0.48)
    return StageScheduler(fn, **kw)


def test_earliest_deadline_first_across_sessions():
    rec = _Recorder()
    sched = _scheduler(rec, max_batch=1, clock=lambda: 0.0)  # every deadline ahead
    try:
        release = _held(sched)
        futs = [sched.submit("a", "a0", 30.0), sched.submit("b", "b0", 10.0), sched.submit("c", "c0", 20.0)]
        release.set()
        assert [f.result(WAIT_S) for f in futs] == ["done a0", "done b0", "done c0"]
        assert rec.batches == [["b0"], ["c0"], ["a0"]]
    finally:
        sched.close()


def test_batches_take_the_earliest_heads_of_different_sessions_and_keep_each_session_in_order():
    rec = _Recorder()
    sched = _scheduler(rec, max_batch=2, clock=lambda: 0.0)
    try:
        release = _held(sched)
        futs = [sched.submit("a", "a0", 1.0), sched.submit("a", "a1", 2.0), sched.submit("b", "b0", 3.0),
                sched.submit("c", "c0", 4.0), sched.submit("a", "a2", 5.0)]
        release.set()
        for f in futs:
            f.result(WAIT_S)
        # a1 waits for a0's batch (it reads the cache a0 writes), then goes with c0; a2 after a1
        assert rec.batches == [["a0", "b0"], ["a1", "c0"], ["a2"]]
    finally:
        sched.close()


def test_late_blocks_go_first_and_take_turns_so_a_session_far_behind_cannot_starve_a_new_one():
    """Plain EDF would run all of `old`'s backlog (the earliest deadlines) before `new`'s first block."""
    rec = _Recorder()
    sched = _scheduler(rec, max_batch=1, clock=lambda: 100.0)
    try:
        release = _held(sched)
        futs = [sched.submit("old", f"old{i}", 10.0 + i) for i in range(4)]  # 90 s behind
        futs += [sched.submit("new", "new0", 99.0), sched.submit("new", "new1", 99.5),
                 sched.submit("ontime", "ontime0", 150.0), sched.submit("soon", "soon0", 120.0)]
        release.set()
        for f in futs:
            f.result(WAIT_S)
        # late heads in turn (longest waiting first); then the on-time ones, earliest deadline first
        assert rec.batches == [["old0"], ["new0"], ["old1"], ["new1"], ["old2"], ["old3"], ["soon0"], ["ontime0"]]
    finally:
        sched.close()


def test_a_batch_takes_late_heads_before_on_time_ones():
    rec = _Recorder()
    sched = _scheduler(rec, max_batch=2, clock=lambda: 100.0)
    try:
        release = _held(sched)
        futs = [sched.submit("a", "a0", 130.0), sched.submit("b", "b0", 110.0), sched.submit("c", "c0", 50.0)]
        release.set()
        for f in futs:
            f.result(WAIT_S)
        assert rec.batches == [["c0", "b0"], ["a0"]]
    finally:
        sched.close()


def _until(what: str, cond) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.001)


def _run_together(sched: StageScheduler, *blocks) -> None:
    """Submit (session, work, deadline) blocks while the compute thread is held, so they meet in one take; wait for
    all of them."""
    release = _held(sched)
    futs = [sched.submit(*b) for b in blocks]
    release.set()
    for f in futs:
        f.result(WAIT_S)


def test_a_returning_session_is_waited_for_and_batched_with_the_one_that_was_ready():
    """The serving layer submits a session's next block only after its previous result: without the wait, two
    sessions behind real time would alternate single blocks ([b1], [a1], ...) instead of sharing one call."""
    rec = _Recorder()
    sched = _scheduler(rec, max_batch=2, clock=lambda: 0.0, batch_linger_s=WAIT_S)  # only a submit ends the wait
    try:
        _run_together(sched, ("a", "a0", 1.0), ("b", "b0", 2.0))
        b1 = sched.submit("b", "b1", 3.0)
        _until("the thread waits for a", lambda: sched.lingers >= 1)
        assert not b1.done()
        a1 = sched.submit("a", "a1", 4.0)
        assert (b1.result(WAIT_S), a1.result(WAIT_S)) == ("done b1", "done a1")
        assert rec.batches == [["a0", "b0"], ["b1", "a1"]]
    finally:
        sched.close()


def test_a_session_that_does_not_return_delays_the_ready_ones_by_the_linger_only():
    rec = _Recorder()
    sched = _scheduler(rec, max_batch=2, clock=lambda: 0.0, batch_linger_s=0.05)
    try:
        _run_together(sched, ("a", "a0", 1.0), ("b", "b0", 2.0))
        assert sched.submit("b", "b1", 3.0).result(WAIT_S) == "done b1"  # a never came back
        assert rec.batches == [["a0", "b0"], ["b1"]]
        # Sessions that left are forgotten once their wait is over, also when only full batches follow.
        left_at = time.monotonic()
        _until("b's wait is over", lambda: time.monotonic() > left_at + 0.05)
        _run_together(sched, ("c", "c0", 4.0), ("d", "d0", 5.0))
        _until("the batch was accounted", lambda: set(sched._returning) == {"c", "d"})
    finally:
        sched.close()


def test_no_wait_with_batches_of_one_or_without_a_linger():
    for kw in ({"max_batch": 1, "batch_linger_s": WAIT_S}, {"max_batch": 2}):
        rec = _Recorder()
        sched = _scheduler(rec, clock=lambda: 0.0, **kw)
        try:
            _run_together(sched, ("a", "a0", 1.0), ("b", "b0", 2.0))
            assert sched.submit("b", "b1", 3.0).result(WAIT_S) == "done b1"  # at once: a is not waited for
            assert sched.lingers == 0
        finally:
            sched.close()
    with pytest.raises(ValueError):
        _scheduler(_Recorder(), batch_linger_s=-1.0)


def test_calls_run_first_and_on_the_compute_thread():
    rec = _Recorder()
    sched = _scheduler(rec, max_batch=4)
    order = []
    try:
        release = _held(sched)
        block = sched.submit("a", "a0", 0.0)
        call = sched.call(lambda: order.append(("call", threading.get_ident())) or "called")
        release.set()
        assert call.result(WAIT_S) == "called" and block.result(WAIT_S) == "done a0"
        assert rec.threads == {order[0][1]}  # one compute thread for calls and batches
        assert rec.batches == [["a0"]]
    finally:
        sched.close()


def test_a_refused_block_fails_alone_and_a_failing_batch_fails_every_block_but_not_the_scheduler():
    rec = _Recorder(fail={"b0"})
    sched = _scheduler(rec, max_batch=4)
    try:
        release = _held(sched)
        a, b = sched.submit("a", "a0", 1.0), sched.submit("b", "b0", 2.0)
        release.set()
        assert a.result(WAIT_S) == "done a0"
        with pytest.raises(ValueError, match="bad b0"):
            b.result(WAIT_S)
    finally:
        sched.close()

    def explode(works):
        raise RuntimeError("out of memory")

    sched = _scheduler(explode, max_batch=4)
    try:
        release = _held(sched)
        futs = [sched.submit("a", "a0", 1.0), sched.submit("b", "b0", 2.0)]
        release.set()
        for f in futs:
            with pytest.raises(RuntimeError, match="out of memory"):
                f.result(WAIT_S)
        sched.batch_fn = _Recorder()
        assert sched.submit("a", "a1", 3.0).result(WAIT_S) == "done a1"
    finally:
        sched.close()


def test_deadline_slack_and_misses_are_counted_and_reported():
    reports = []
    sched = _scheduler(_Recorder(), max_batch=2, clock=lambda: 100.0, on_batch=reports.append)
    try:
        release = _held(sched)
        futs = [sched.submit("a", "a0", 99.0), sched.submit("b", "b0", 101.5)]
        release.set()
        for f in futs:
            f.result(WAIT_S)
        assert sched.deadline_misses == 1 and sched.blocks_done == 2
        assert len(reports) == 1 and reports[0].size == 2 and reports[0].misses == 1
        assert sorted(reports[0].slacks_s) == [-1.0, 1.5]
    finally:
        sched.close()


def test_snapshot_shows_what_waits_per_session():
    sched = _scheduler(_Recorder(), max_batch=1, clock=lambda: 0.0)
    try:
        release = _held(sched)
        futs = [sched.submit("a", "a0", 5.0), sched.submit("a", "a1", 6.0), sched.submit("b", "b0", 7.0)]
        snap = sched.snapshot()
        assert snap["queued"] == {"a": {"blocks": 2, "head_deadline": 5.0}, "b": {"blocks": 1, "head_deadline": 7.0}}
        assert snap["calls_queued"] == 0 and snap["blocks_done"] == 0
        release.set()
        for f in futs:
            f.result(WAIT_S)
        snap = sched.snapshot()
        assert snap["queued"] == {} and snap["blocks_done"] == 3 and snap["step_costs"][1]["count"] == 3
    finally:
        sched.close()


def test_close_fails_queued_work_and_refuses_more():
    sched = _scheduler(_Recorder(), max_batch=1)
    release = _held(sched)
    queued = sched.submit("a", "a0", 1.0)
    call = sched.call(lambda: None)
    closer = threading.Thread(target=sched.close)
    closer.start()
    release.set()
    closer.join(WAIT_S)
    for fut in (queued, call):
        with pytest.raises(SchedulerClosed):
            fut.result(WAIT_S)
    with pytest.raises(SchedulerClosed):
        sched.submit("a", "a1", 2.0)


def test_step_costs_interpolate_and_extrapolate_per_block():
    costs = StepCosts(alpha=1.0)
    assert costs.seconds(1) is None
    costs.record(1, 0.10)
    costs.record(4, 0.22)
    assert costs.seconds(1) == pytest.approx(0.10)
    assert costs.seconds(2) == pytest.approx(0.14)  # between 1 and 4
    assert costs.seconds(8) == pytest.approx(0.44)  # beyond 4: 4's per-block cost
    costs.record(1, 0.20)  # alpha 1: the latest measurement
    assert costs.seconds(1) == pytest.approx(0.20)
    assert costs.snapshot()[1]["count"] == 2


@pytest.mark.parametrize("max_batch, expected", [(1, 4), (2, 6)])
def test_realtime_capacity_from_measured_cost(max_batch, expected):
    sched = _scheduler(_Recorder(), max_batch=max_batch, utilization=1.0)
    try:
        assert sched.realtime_capacity() is None  # nothing measured yet
        sched.costs.record(1, 0.10)
        sched.costs.record(2, 0.15)
        # unbatched: n x 0.10 <= 0.48 -> 4; batches of 2: 0.15 per pair (+0.10 for an odd one) -> 6 (0.45 s)
        assert sched.realtime_capacity() == expected
        assert sched.realtime_capacity(cap=3) == 3
    finally:
        sched.close()


@pytest.mark.parametrize("max_batch, costs, expected", [
    (4, {}, 4),  # nothing measured: batches as large as allowed
    (4, {4: 0.22}, 4),  # no single block measured yet
    (4, {1: 0.10, 4: 0.22}, 4),  # per block: 0.10, 0.07, 0.06, 0.055 (2 and 3 interpolated)
    (4, {1: 0.10, 4: 0.60}, 1),  # a batch costs more per block than single blocks (the toy VAE decoder on CPU)
    (2, {1: 0.10, 2: 0.196}, 1),  # 2% cheaper per block: less than MIN_BATCH_GAIN, not worth a batch's delay
    (4, {1: 0.10, 2: 0.18, 4: 0.36}, 2),  # 4 costs what two batches of 2 cost
    (1, {1: 0.10}, 1),
])
def test_batch_limit_is_the_size_with_the_lowest_measured_cost_per_block(max_batch, costs, expected):
    sched = _scheduler(_Recorder(), max_batch=max_batch)
    try:
        for n, seconds in costs.items():
            sched.costs.record(n, seconds)
        assert sched.batch_limit() == expected
        assert sched.snapshot()["batch_limit"] == expected
    finally:
        sched.close()


def test_where_batching_does_not_pay_blocks_run_alone_without_waiting_and_the_batch_is_measured_again_now_and_then():
    rec = _Recorder()
    # only a submit would end a wait for a returning session: a wait here would hold the test for WAIT_S
    sched = _scheduler(rec, max_batch=2, clock=lambda: 0.0, batch_linger_s=WAIT_S, reprobe_every=3)
    try:
        # costs far above anything a stall could add to the measured microsecond calls below
        sched.costs.record(1, 10.0)
        sched.costs.record(2, 30.0)  # 15 s per block in a pair
        assert sched.batch_limit() == 1
        for k in range(3):
            _run_together(sched, ("a", f"a{k}", 2.0 * k + 1), ("b", f"b{k}", 2.0 * k + 2))
        # pairs 0 and 1: one block per call; by pair 2, three calls ran since the last batch of 2 was measured
        assert rec.batches == [["a0"], ["b0"], ["a1"], ["b1"], ["a2", "b2"]]
        assert sched.lingers == 0
        assert sched.costs.records_since(2) == 0 and sched.costs.snapshot()[2]["count"] == 2
    finally:
        sched.close()


def test_realtime_capacity_counts_single_blocks_where_batching_does_not_pay():
    sched = _scheduler(_Recorder(), max_batch=2, utilization=1.0)
    try:
        sched.costs.record(1, 0.10)
        sched.costs.record(2, 0.30)
        assert sched.realtime_capacity() == 4  # 4 x 0.10 <= 0.48 (in pairs: 0.30 + 0.10 -> 3)
    finally:
        sched.close()


def test_sessions_by_memory_counts_what_free_memory_takes_after_the_activations():
    gb = 1 << 30
    # 40 GB free, 2 sessions held, 12.5 GB per session, 4 GB kept for a forward's activations: 2 more fit
    assert sessions_by_memory(free_bytes=40 * gb, live_sessions=2, session_bytes=int(12.5 * gb),
                              activation_bytes=4 * gb) == 4
    assert sessions_by_memory(free_bytes=gb, live_sessions=3, session_bytes=2 * gb, activation_bytes=2 * gb) == 3
    with pytest.raises(ValueError):
        sessions_by_memory(free_bytes=gb, live_sessions=0, session_bytes=0)
