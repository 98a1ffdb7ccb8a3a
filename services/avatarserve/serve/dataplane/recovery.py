"""A session's pipe that survives the loss of a stage replica.

The gateway drives each stream through one `PipelineSession` (gateway -> AudioEncoder -> stages -> VaeDecoder and
back). When a replica on that chain dies (kill -9, node loss) or its stream breaks, the hop before it reports an Error
with `lost_hop` set, every other hop frees the session, and the caller sees a `PipelineError`. `RecoveringPipe` turns
that into a pause instead of the end of the stream:

1. `reroute(error)` (the gateway) re-places the lost hop: another live replica of that stage, or the replacement
   Serve starts (admission parks meanwhile, like CreateSession).
2. A new pipe opens on the new route at block `start = max(0, r - replay_blocks)`, where r is the first block the
   client has not received. Hops that survived kept the session (StageHost `resume_hold_s`) and continue it; the new
   replica creates it at `start` (serve/dataplane/handlers.py `start_block`).
3. The blocks [start, r) are replayed from the audio this pipe keeps (the gateway's copy of what it sent), flagged
   `replay`, then the blocks that were in flight [r, ...) are sent again, in order. A surviving hop answers the
   blocks it already did from its memo of recent results (exact, no compute); the new replica computes them and so
   rebuilds its KV window (or audio context, or decoder cache). Outputs of replayed blocks are dropped here.

Because the noise of every block is a pure function of (seed, block), the rebuild is exact when the replay reaches
block 0 (r <= replay_blocks); later the new replica lacks the history before `start`, and the seam is small once a
whole KV window was replayed (tests/engine/test_resume.py measures it). No block is lost from the client's timeline:
the blocks in flight are generated again from their audio. Other sessions never notice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from typing import Awaitable, Callable, Deque, List, Optional, Union

from avatarserve.serve.cancel_safe import wait_for
from avatarserve.serve.dataplane.transport import (
    REPLAY_KEY,
    BlockItem,
    ErrorCode,
    Item,
    PipelineError,
    PipelineSession,
    ProtocolError,
)

__all__ = ["RecoveringPipe", "Recovery"]

log = logging.getLogger(__name__)
RECOVERIES_KEPT = 32  # the latest recoveries a pipe keeps for reports (a stream may run for days)

# start block (None: the stream's first open) -> an open pipe on the session's current route
OpenPipe = Callable[[Optional[int]], Awaitable[PipelineSession]]
Reroute = Callable[[PipelineError], Awaitable[None]]  # re-place the lost hop of the session's route (or raise)


@dataclass
class Recovery:
    """One recovery of a session's pipe."""

    lost_hop: str  # address of the hop that was lost
    error: str
    started_at: float  # time.monotonic() when the loss was seen
    reopened_at: float = 0.0  # the new pipe was open
    first_block_at: float = 0.0  # the first block after the loss came back
    start_block: int = 0  # the new pipe's first block
    replayed: int = 0  # blocks replayed to rebuild state (outputs dropped)
    resent: int = 0  # blocks that were in flight and were sent again


class PipelineStalled(PipelineError):
    """No result came back for `stall_s` while blocks were in flight: some hop is stuck (every replica still
    answers, or the loss would have been reported). The pipe is reopened on the same route."""

    def __init__(self, session_id: str, stall_s: float, in_flight: int) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, f"no result for {stall_s:g} s with {in_flight} blocks in flight",
                         session_id=session_id)


def _is_loss(err: PipelineError) -> bool:
    return (bool(err.lost_hop) or isinstance(err, PipelineStalled)) and \
        err.code in (ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED)


class RecoveringPipe:
    """Drop-in for `PipelineSession` (send / end / receive / close) that re-places and rebuilds a lost hop."""

    def __init__(self, session_id: str, open_pipe: OpenPipe, reroute: Reroute, *,
                 replay_blocks: Union[int, Callable[[str], int]], max_recoveries: int, max_replay: Optional[int] = None,
                 stall_s: Optional[float] = None, end_wait_s: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_recovery: Optional[Callable[[Recovery], None]] = None) -> None:
        """`replay_blocks`: blocks to replay, or a function of the lost hop's address giving them (at most
        `max_replay`, the audio kept)."""
        if callable(replay_blocks):
            if max_replay is None:
                raise ValueError("max_replay is needed with a replay_blocks function")
            self._replay_for = replay_blocks
        else:
            max_replay = replay_blocks if max_replay is None else max_replay
            self._replay_for = lambda _hop: replay_blocks
        if max_replay < 0 or max_recoveries < 0:
            raise ValueError("replay_blocks and max_recoveries must be >= 0")
        self.session_id = session_id
        self._open_pipe = open_pipe
        self._reroute = reroute
        self.replay_blocks = max_replay
        self.stall_s = stall_s  # None: wait for results however long they take
        # Once the input is ended and nothing is in flight, the pipe's end-of-stream is bounded by this (None: not):
        # every result is in, and a read that never returns must not hold the stream open.
        self.end_wait_s = end_wait_s
        self._end_sent_at: Optional[float] = None
        self._recv: Optional[asyncio.Task] = None  # the current pipe's pending receive
        self._progress_at = clock()  # last result received, or the first block sent into an empty pipe
        self.max_recoveries = max_recoveries
        self._clock = clock
        self._on_recovery = on_recovery
        self._pipe: Optional[PipelineSession] = None
        self._ready = asyncio.Event()  # the current pipe takes new blocks (cleared while recovering)
        # set when a block enters an empty pipe (a stall deadline starts) or the input ends (the end-of-stream one)
        self._wake_receiver = asyncio.Event()
        self._pending: "OrderedDict[int, BlockItem]" = OrderedDict()  # sent, result not yet received
        self._history: Deque[BlockItem] = deque(maxlen=max(max_replay, 1))  # received, newest last
        self._next_block = 0  # the next block index the caller sends
        self._skip_below = 0  # results of blocks below this are replays: dropped
        self._end_reason: Optional[str] = None
        self._replayer: Optional[asyncio.Task] = None
        self._closed = False
        self.recoveries: Deque[Recovery] = deque(maxlen=RECOVERIES_KEPT)  # the latest, newest last
        # Reopens since video last came through (a recovery whose reopen hits another lost hop takes more than one).
        # Reset by the first new block after a recovery: an endless stream rides out any number of losses spread
        # over its life; only losses in a row, with no video between them, use up `max_recoveries`.
        self._attempts = 0

    # ----- lifecycle --------------------------------------------------------------------------------------------
    async def open(self) -> "RecoveringPipe":
        """Open the stream's pipe; a hop that is gone already (its replica died since the route was recorded) is
        re-placed first, within the same budget of `max_recoveries`."""
        moved = 0
        while True:
            try:
                self._pipe = await self._open_pipe(None)
                break
            except PipelineError as exc:
                if not _is_loss(exc) or moved >= self.max_recoveries:
                    raise
                moved += 1
                log.warning("session %s: %s is gone at open (%s); re-placing it", self.session_id, exc.lost_hop,
                            exc.message)
                await self._reroute(exc)
        self._ready.set()
        return self

    @property
    def finished(self) -> bool:
        return self._closed or (self._pipe is not None and self._pipe.finished and self._ready.is_set())

    async def close(self, drain_s: float = 0.0) -> None:
        """Tear the pipe down. With `drain_s`, a pipe still running is first ended cleanly (its blocks in flight
        finish, results dropped) so every hop frees the session at once; a plain cancel looks like a lost hop to the
        hops after the first, which then keep the session for a reopen (StageHost `resume_hold_s`)."""
        self._closed = True
        if self._replayer is not None:
            self._replayer.cancel()
            await asyncio.gather(self._replayer, return_exceptions=True)
        pipe = self._pipe
        if pipe is not None and drain_s > 0 and not pipe.finished:
            try:
                await wait_for(self._drain(pipe), drain_s)
            except (asyncio.TimeoutError, PipelineError, ProtocolError):
                pass
        await self._drop_receive()  # (cancelling a read cancels the call: only once the pipe is done with)
        if pipe is not None:
            await pipe.close()
        self._ready.set()  # wake senders: they see the pipe closed

    async def _drain(self, pipe: PipelineSession) -> None:
        await pipe.end("closed")
        while True:
            if self._recv is None:
                self._recv = asyncio.get_running_loop().create_task(pipe.receive())
            task = self._recv
            await asyncio.wait({task})
            self._recv = None
            if task.result() is None:
                return

    # ----- caller side ------------------------------------------------------------------------------------------
    async def send(self, item: BlockItem) -> None:
        await self._ready.wait()
        if self._closed:
            raise ProtocolError(f"session {self.session_id!r}: send after close")
        if not self._pending:
            self._progress_at = self._clock()
            self._wake_receiver.set()  # a receive waiting without a stall deadline now needs one
        self._pending[item.block_index] = item
        self._next_block = item.block_index + 1
        try:
            await self._pipe.send(item)
        except PipelineError as exc:
            if not _is_loss(exc):
                raise
            # The receiving side sees the loss and recovers; this block is pending and is sent again then.

    async def end(self, reason: str = "") -> None:
        self._end_reason = reason
        await self._ready.wait()
        if not self._closed:
            await self._pipe.end(reason)
            self._end_sent_at = self._clock()
            self._wake_receiver.set()

    async def _next(self) -> Optional[Item]:
        """The current pipe's next item; raises `PipelineStalled` when blocks are in flight and none came back for
        `stall_s`."""
        if self._recv is None:
            self._recv = asyncio.get_running_loop().create_task(self._pipe.receive())
        while True:
            deadline, sent = None, None
            awaiting_end = not self._pending and self._end_sent_at is not None and self.end_wait_s is not None
            if awaiting_end:  # every result is in: only the end-of-stream is to come
                deadline = max(self._progress_at, self._end_sent_at) + self.end_wait_s
            elif self._pending:
                if self.stall_s is not None:
                    deadline = self._progress_at + self.stall_s
            else:  # nothing in flight: no deadline until a block is sent or the input ends; wake up then
                self._wake_receiver.clear()
                sent = asyncio.ensure_future(self._wake_receiver.wait())
            timeout = None if deadline is None else max(0.0, deadline - self._clock())
            try:
                await asyncio.wait({self._recv} | ({sent} if sent else set()), timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                if sent is not None:
                    sent.cancel()
            if self._recv.done():
                task, self._recv = self._recv, None
                item = task.result()
                self._progress_at = self._clock()
                return item
            if deadline is None or self._clock() < deadline:
                continue
            if awaiting_end:
                log.warning("session %s: every block came back but the pipeline's end-of-stream did not within "
                            "%g s; ending the stream here", self.session_id, self.end_wait_s)
                await self._drop_receive()
                await self._pipe.close()
                return None
            raise PipelineStalled(self.session_id, self.stall_s, len(self._pending))

    async def _drop_receive(self) -> None:
        task, self._recv = self._recv, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def receive(self) -> Optional[Item]:
        while True:
            try:
                item = await self._next()
            except PipelineError as exc:
                if self._closed or not _is_loss(exc) or self._attempts >= self.max_recoveries:
                    raise
                await self._recover(exc)
                continue
            if isinstance(item, BlockItem):
                if item.block_index < self._skip_below:
                    continue  # a replayed block: state rebuilt, output already delivered
                sent = self._pending.pop(item.block_index, None)
                if sent is not None:
                    self._history.append(sent)
                if self.recoveries and not self.recoveries[-1].first_block_at:
                    rec = self.recoveries[-1]
                    rec.first_block_at = self._clock()
                    self._attempts = 0
                    log.warning("session %s: video again %.2f s after losing %s (pipe reopened after %.2f s; %d "
                                "blocks replayed, %d resent)", self.session_id, rec.first_block_at - rec.started_at,
                                rec.lost_hop, rec.reopened_at - rec.started_at, rec.replayed, rec.resent)
            return item

    # ----- recovery ---------------------------------------------------------------------------------------------
    async def _recover(self, err: PipelineError) -> None:
        rec = Recovery(lost_hop=err.lost_hop, error=err.message, started_at=self._clock())
        self.recoveries.append(rec)
        self._attempts += 1
        self._ready.clear()
        if self._replayer is not None:
            self._replayer.cancel()
            await asyncio.gather(self._replayer, return_exceptions=True)
        await self._drop_receive()
        await self._pipe.close()
        first_pending = next(iter(self._pending), self._next_block)
        depth = max(0, min(self.replay_blocks, int(self._replay_for(err.lost_hop))))
        replay = [b for b in self._history if b.block_index < first_pending][-depth:] if depth else []
        start = replay[0].block_index if replay else first_pending
        if start != 0 and replay and len(replay) < depth and replay[0].block_index != 0:
            log.warning("session %s: only %d blocks kept to replay before block %d", self.session_id, len(replay),
                        first_pending)
        log.warning("session %s: lost %s (%s); reopening at block %d (replaying %d, resending %d)", self.session_id,
                    err.lost_hop, err.message, start, len(replay), len(self._pending))
        while True:
            if err.lost_hop:  # a stall keeps the route: reopening supersedes the stuck pipe at every hop
                await self._reroute(err)  # raises when the stage cannot be re-placed (ends the stream)
            try:
                self._pipe = await self._open_pipe(start)
                break
            except PipelineError as exc:
                if not _is_loss(exc) or self._attempts >= self.max_recoveries:
                    raise
                err = exc
                self._attempts += 1
        rec.reopened_at = self._progress_at = self._clock()
        rec.start_block, rec.replayed, rec.resent = start, len(replay), len(self._pending)
        self._skip_below = first_pending
        resend = [*(replace(b, metadata={**b.metadata, REPLAY_KEY: "1"}) for b in replay), *self._pending.values()]
        # Sent by a task: the pipe's queues are bounded, so results must be read while the backlog goes in.
        self._replayer = asyncio.get_running_loop().create_task(self._resend(self._pipe, resend),
                                                                name=f"{self.session_id}/replay")
        if self._on_recovery is not None:
            self._on_recovery(rec)

    async def _resend(self, pipe: PipelineSession, items: List[BlockItem]) -> None:
        try:
            for item in items:
                await pipe.send(item)
            if self._end_reason is not None:
                await pipe.end(self._end_reason)
                self._end_sent_at = self._clock()
                self._wake_receiver.set()
        except PipelineError:
            return  # lost again: the receiving side recovers once more
        finally:
            if self._pipe is pipe:
                self._ready.set()
