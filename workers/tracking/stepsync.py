"""What the ranks share while they train, in one small background collective at chosen steps.

Three things need every rank's contribution during the loop: the strongest stop request of any rank (so all ranks
stop at the same step), the slowest rank's step time (which paces how often the first is checked), and, at log
steps, every rank's log values (loss, CPU %, RSS, ...). Each is small, and a collective costs far more in latency
and wake-ups than in bytes (on this project's 2-core CI machine a gloo all-reduce of 5 numbers takes 0.5–1.4 ms),
so they travel together: one asynchronous all-reduce per *exchange step*, whose result is read at the next
exchange (or at :meth:`StepSync.flush`) — by then it has finished beside the training step, and no rank waited.

Exchange steps are every log step plus enough others that an exchange comes about every ``POLL_INTERVAL_S``.
The others are placed inside each log interval (the interval split into equal parts), so logging adds no
collective at all whenever steps are long enough to need several exchanges per log interval anyway (on the CI
machine: steps over ~5 ms at ``log_every: 10``), and with shorter steps one per log interval (several when
``log_every`` exceeds ``MAX_EVERY``).

Non-log exchanges all-reduce ``[stop code, step time]`` with MAX. Log exchanges gather a world_size × k table
with SUM, each rank filling its own row and zeros elsewhere — exact (x + 0 = x; NaN and inf pass through, which a
MAX with -inf fill would lose) — with the stop code and step time as its first two columns. Which kind of
exchange a step gets depends only on the step number and values every rank has identically, so all ranks issue
the same collectives in the same order.

On GPUs the exchange runs over a gloo side group on the CPU: no device sync for the stop check. Log values are
host numbers (the loss and grad norm are read with one host sync at each log step — the only one logging makes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from workers.dist import DistContext
from workers.stop import NONE, StopFlag

TableHandler = Callable[[int, list[list[float]]], None]  # (log step, every rank's log values, by rank)


@dataclass
class _Exchange:
    step: int
    work: Any  # the async all-reduce's handle
    buffer: torch.Tensor
    table: bool  # a log exchange: buffer is the world_size × (2 + k) table


class StepSync:
    """Stop agreement, pacing and log-value gathering for one worker. See the module docstring.

    ``step`` must be called on all ranks once per step; ``flush`` (local: it only waits) on all ranks at the same
    step — before each checkpoint, so a checkpoint never exists before the log rows it ends — and after the loop.
    """

    POLL_INTERVAL_S = 0.05
    MAX_EVERY = 50

    def __init__(self, ctx: DistContext, stop: StopFlag, log_every: int, on_table: TableHandler) -> None:
        self.ctx, self.stop, self.log_every, self.on_table = ctx, stop, log_every, on_table
        self.active = ctx.distributed and ctx.world_size > 1
        # new_group is itself collective: every rank builds its StepSync at the same point of the loop setup.
        self.group = dist.new_group(backend="gloo") if self.active and ctx.backend != "gloo" else None
        self.every = 1  # exchange every `every` steps within a log interval (paced; 1 until the first result)
        self.pending: _Exchange | None = None
        self.carried = NONE  # a stop code read early by flush(), returned by the next step()
        self.window_s, self.window_steps = 0.0, 0  # this rank's step time since its last exchange

    def step(self, step: int, step_time_s: float, log_values: list[float] | None) -> int:
        """Called after each completed step; returns the stop code all ranks agreed (NONE on most steps).

        ``log_values`` (the same length on every rank) must be given exactly at log steps."""
        if not self.active:
            if log_values is not None:
                self.on_table(step, [log_values])
            return self.stop.code
        self.window_s, self.window_steps = self.window_s + step_time_s, self.window_steps + 1
        if log_values is None and (step % self.log_every) % self.every:
            return NONE
        mine = [float(self.stop.code), self.window_s / self.window_steps]
        self.window_s, self.window_steps = 0.0, 0
        if log_values is None:
            buffer, op = torch.tensor(mine, dtype=torch.float64, device="cpu"), dist.ReduceOp.MAX
        else:
            rows = [[0.0] * (2 + len(log_values)) for _ in range(self.ctx.world_size)]
            rows[self.ctx.rank] = mine + log_values
            buffer, op = torch.tensor(rows, dtype=torch.float64, device="cpu"), dist.ReduceOp.SUM
        work = dist.all_reduce(buffer, op=op, group=self.group, async_op=True)
        previous, self.pending = self.pending, _Exchange(step, work, buffer, log_values is not None)
        code, self.carried = self.carried, NONE
        if previous is not None:
            code = max(code, self._finish(previous))
        return code

    @property
    def agreed_code(self) -> int:
        """A stop code already agreed by all ranks (read by :meth:`flush`) but not yet returned by :meth:`step`;
        the same on every rank."""
        return self.carried

    def flush(self) -> None:
        """Finish the exchange in flight (its log row is written now; its stop code is acted on at the next
        ``step``). Local, but must happen at the same step on all ranks: it moves the pace."""
        if self.pending is not None:
            self.carried = max(self.carried, self._finish(self.pending))
            self.pending = None

    def _finish(self, exchange: _Exchange) -> int:
        exchange.work.wait()
        if exchange.table:
            rows = exchange.buffer.tolist()
            code, slowest = max(r[0] for r in rows), max(r[1] for r in rows)
            self.on_table(exchange.step, [r[2:] for r in rows])
        else:
            code, slowest = exchange.buffer.tolist()
        self._pace(slowest)
        return int(code)

    def _pace(self, step_time_s: float) -> None:
        """Split each log interval into the fewest equal parts that keep exchanges about POLL_INTERVAL_S apart.
        ``step_time_s`` is the slowest rank's, the same on every rank."""
        if step_time_s <= 0:
            return
        wanted = max(1, min(self.MAX_EVERY, int(self.POLL_INTERVAL_S / step_time_s)))
        parts = -(-self.log_every // wanted)  # ceil
        self.every = -(-self.log_every // parts)
