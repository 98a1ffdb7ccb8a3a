"""The web adapter's track pacing: frame k is due at start + k * period; a late video loop skips to the
latest frame due (never sends a backlog), a late audio loop catches up (every sample is played)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("aiortc")

from avatarserve_client.web.tracks import _Pacer  # noqa: E402


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _frames(pacer: _Pacer, clock: _Clock, wake_at: list[float]) -> list[tuple[int, float]]:
    """Call next() with the clock at each of `wake_at` (the loop woke then; sleeps are not simulated)."""
    async def run():
        out = []
        for t in wake_at:
            clock.now = t
            out.append(await pacer.next())
        return out
    return asyncio.run(run())


PERIOD = 0.04


def test_on_time_frames_count_periods():
    clock = _Clock()
    got = _frames(_Pacer(PERIOD, skip_late=True, clock=clock), clock, [100.0, 100.04, 100.08])
    assert [n for n, _ in got] == [0, 1, 2]
    assert [due for _, due in got] == pytest.approx([100.0, 100.04, 100.08])


def test_a_late_video_loop_skips_to_the_latest_frame_due():
    clock = _Clock()
    pacer = _Pacer(PERIOD, skip_late=True, clock=clock)
    # frame 1 was due at 100.04; the loop wakes at 100.19: frames 1-3 are past, frame 4 (100.16) is the latest due
    got = _frames(pacer, clock, [100.0, 100.19, 100.2])
    assert [n for n, _ in got] == [0, 4, 5]
    assert got[1][1] == pytest.approx(100.16)
    assert pacer.skipped == 3


def test_less_than_a_period_late_is_sent_not_skipped():
    clock = _Clock()
    pacer = _Pacer(PERIOD, skip_late=True, clock=clock)
    got = _frames(pacer, clock, [100.0, 100.075])
    assert [n for n, _ in got] == [0, 1] and pacer.skipped == 0


def test_a_late_audio_loop_catches_up_frame_by_frame():
    clock = _Clock()
    pacer = _Pacer(PERIOD, clock=clock)
    got = _frames(pacer, clock, [100.0, 100.19, 100.19, 100.19])
    assert [n for n, _ in got] == [0, 1, 2, 3]
    assert pacer.skipped == 0
