"""`SyntheticStage`: a stage handler that holds each block for a fixed time without using the CPU.

It stands in for a model stage in data-plane tests and the TPP bench: the block's tensors pass
through untouched (no decode, no encode), and the stage appends its name to the block's
`trace` metadata so order and route can be checked at the caller.

Per-session config (JSON in the Open's config bytes, all keys optional):
    {"sink_from_block": N,             # sink consumers apply the "sink_update" from block N on
     "fail_at": {"<stage name>": K},   # that stage raises `SyntheticFailure` on block K
     "start_block": S}                 # the pipe starts at block S (a session rebuilt after a replica loss)
Blocks must arrive in order from the start block (a stage raises `StageError` otherwise), like a model stage.

Sink roles model the Adaptive Attention Sink hand-off: the "publisher" (the last denoising
stage) emits a `sink_update` control item right after block N-1; "consumer" stages (and the
publisher itself) wait for it, deterministically, before processing any block >= N.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

from avatarserve.serve.dataplane.transport import (
    BlockItem,
    ControlBoard,
    ControlItem,
    ErrorCode,
    Item,
    StageError,
)

__all__ = ["SINK_KIND", "SinkRole", "SyntheticFailure", "SyntheticSessionConfig", "SyntheticStage"]

SINK_KIND = "sink_update"
SinkRole = Literal["none", "consumer", "publisher"]
_ROLES = ("none", "consumer", "publisher")


class SyntheticFailure(StageError):
    """Failure injected through the session config (`fail_at`)."""

    code = ErrorCode.HANDLER_FAILED


class SyntheticConfigError(StageError, ValueError):
    code = ErrorCode.INVALID_ARGUMENT


@dataclass(frozen=True)
class SyntheticSessionConfig:
    sink_from_block: Optional[int] = None
    fail_at: Mapping[str, int] = field(default_factory=dict)
    start_block: int = 0

    @classmethod
    def from_bytes(cls, raw: bytes) -> "SyntheticSessionConfig":
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SyntheticConfigError(f"session config is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise SyntheticConfigError(f"session config must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"sink_from_block", "fail_at", "start_block"}
        if unknown:
            raise SyntheticConfigError(f"unknown session config keys {sorted(unknown)}")
        sink = data.get("sink_from_block")
        if sink is not None and (not isinstance(sink, int) or sink < 1):
            raise SyntheticConfigError(f"sink_from_block must be an integer >= 1, got {sink!r}")
        fail_at = data.get("fail_at", {})
        if not isinstance(fail_at, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in fail_at.items()):
            raise SyntheticConfigError(f"fail_at must map stage names to block indices, got {fail_at!r}")
        start = data.get("start_block", 0)
        if not isinstance(start, int) or start < 0:
            raise SyntheticConfigError(f"start_block must be an integer >= 0, got {start!r}")
        return cls(sink_from_block=sink, fail_at=dict(fail_at), start_block=start)

    def to_bytes(self) -> bytes:
        data: dict[str, Any] = {}
        if self.sink_from_block is not None:
            data["sink_from_block"] = self.sink_from_block
        if self.fail_at:
            data["fail_at"] = dict(self.fail_at)
        if self.start_block:
            data["start_block"] = self.start_block
        return json.dumps(data).encode()


@dataclass
class _Session:
    config: SyntheticSessionConfig
    blocks: int = 0


class SyntheticStage:
    """StageHandler that sleeps `hold_s` per block (asyncio.sleep, or a sleeping executor thread)."""

    def __init__(
        self,
        hold_s: float,
        *,
        name: str = "synthetic",
        sink_role: SinkRole = "none",
        use_thread: bool = False,
        sink_timeout_s: float = 60.0,
    ) -> None:
        if hold_s < 0:
            raise SyntheticConfigError(f"hold_s must be >= 0, got {hold_s}")
        if sink_role not in _ROLES:
            raise SyntheticConfigError(f"sink_role must be one of {_ROLES}, got {sink_role!r}")
        self.hold_s = float(hold_s)
        self.name = name
        self.sink_role = sink_role
        self.use_thread = use_thread
        self.sink_timeout_s = sink_timeout_s
        self.board = ControlBoard()
        self.sessions: dict[str, _Session] = {}
        self.blocks_processed = 0
        self.board_deliveries = 0  # control items received from downstream hops

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "SyntheticStage":
        """Build from a plain dict: {"hold_s" or "hold_ms", "name", "sink_role", "use_thread", "sink_timeout_s"}."""
        cfg = dict(config)
        if "hold_ms" in cfg:
            if "hold_s" in cfg:
                raise SyntheticConfigError("give hold_s or hold_ms, not both")
            cfg["hold_s"] = float(cfg.pop("hold_ms")) / 1000.0
        allowed = {"hold_s", "name", "sink_role", "use_thread", "sink_timeout_s"}
        unknown = set(cfg) - allowed
        if unknown:
            raise SyntheticConfigError(f"unknown SyntheticStage options {sorted(unknown)}; allowed: {sorted(allowed | {'hold_ms'})}")
        if "hold_s" not in cfg:
            raise SyntheticConfigError("SyntheticStage needs hold_s (or hold_ms)")
        return cls(**cfg)

    async def open_session(self, session_id: str, config: bytes) -> None:
        if session_id in self.sessions:
            raise StageError(f"session {session_id!r} already open on {self.name}")
        self.sessions[session_id] = _Session(SyntheticSessionConfig.from_bytes(config))
        self.board.open(session_id)

    async def process(self, session_id: str, item: BlockItem) -> list[Item]:
        session = self.sessions.get(session_id)
        if session is None:
            raise StageError(f"session {session_id!r} is not open on {self.name}")
        cfg = session.config
        expected = cfg.start_block + session.blocks
        if item.block_index != expected:
            raise StageError(f"{self.name}: session {session_id!r} expected block {expected}, got {item.block_index}")
        if cfg.fail_at.get(self.name) == item.block_index:
            raise SyntheticFailure(f"injected failure at {self.name}, block {item.block_index}")
        sink_from = cfg.sink_from_block
        if self.sink_role != "none" and sink_from is not None and item.block_index >= sink_from:
            update = await self.board.wait_for(session_id, SINK_KIND, for_block=item.block_index, timeout_s=self.sink_timeout_s)
            item.metadata[f"sink@{self.name}"] = update.metadata.get("version", "")
        if self.hold_s > 0:
            if self.use_thread:
                await asyncio.get_running_loop().run_in_executor(None, time.sleep, self.hold_s)
            else:
                await asyncio.sleep(self.hold_s)
        trace = item.metadata.get("trace")
        item.metadata["trace"] = f"{trace},{self.name}" if trace else self.name
        outputs: list[Item] = [item]
        if self.sink_role == "publisher" and sink_from is not None and item.block_index == sink_from - 1:
            update = ControlItem(
                kind=SINK_KIND,
                apply_from_block=sink_from,
                tensors={k: v for k, v in item.tensors.items() if k == "latent"},
                metadata={"version": f"{self.name}@{item.block_index}"},
            )
            self.board.publish(session_id, update)  # the publisher applies its own update too
            outputs.append(update)
        session.blocks += 1
        self.blocks_processed += 1
        return outputs

    async def on_control(self, session_id: str, item: ControlItem) -> None:
        self.board.publish(session_id, item)
        self.board_deliveries += 1

    async def close_session(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)
        self.board.close(session_id)


def synthetic_stage(config: Mapping[str, Any]) -> SyntheticStage:
    """Handler factory ("tests.support.synthetic:synthetic_stage") for StageSpec.handler."""
    return SyntheticStage.from_config(config)
