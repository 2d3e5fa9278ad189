"""wandb in a child process of rank 0: the training loop only queues rows; the child logs them, back-fills a
resumed run's rows from the metrics file, and finishes within a bounded time after a stop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workers.config import Config, config_from_dict
from workers.contract import ENV_SWEEP_TRIAL
from workers.logsetup import setup_logging
from workers.rundir import RunDir
from workers.stop import STOP_SIGNALS, die_with_parent, ignore_stop_signals
from workers.tracking.metrics_file import read_metrics
from workers.tracking.wandb_records import last_persisted_step

log = logging.getLogger("workers.tracking")


class WandbSink:
    """Rank 0's wandb run (offline files under ``run.dir/wandb/`` or online)."""

    def __init__(self, cfg: Config, rid: str, mode: str | None, start_step: int = 0) -> None:
        import wandb  # noqa: PLC0415 - only when tracking is on

        t, paths = cfg.tracking, RunDir(cfg.run.dir)
        self.run = wandb.init(
            project=t.project, entity=t.entity, name=t.name or paths.root.name, group=t.group,
            tags=list(t.tags) or None, config={**cfg.to_dict(), **sweep_entry()}, dir=str(paths.root), id=rid,
            resume="allow", mode=mode,
            # workers own their console; wandb's system sampler would cost CPU on every rank-0 step
            # silent: wandb's own banner lines would break rank 0's progress bar; our log says the run id and mode
            settings=wandb.Settings(console="off", x_disable_stats=True, quiet=True, silent=True, save_code=False),
        )  # fmt: skip
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")
        # What wandb already holds: online, the server tells (starting_step); offline, its own files do.
        offline = last_persisted_step(paths.root, rid) if self.run.offline else 0
        self.skip_through = max(offline, int(getattr(self.run, "starting_step", 0) or 0) - 1)
        log.info(
            "wandb run %s (%s), continuing after step %d", rid, mode or os.environ.get("WANDB_MODE"), self.skip_through
        )
        if self.skip_through > start_step:  # wandb drops rows below its step: say whose values it keeps
            log.warning(
                "wandb already holds steps %d..%d from an attempt that ended without a later checkpoint; it keeps "
                "that attempt's values for them (a wandb run cannot be rewound here); this attempt's are in %s",
                start_step + 1, self.skip_through, paths.metrics.name,
            )  # fmt: skip
        self.backfilled: dict[int, set[str]] = {}  # step -> the keys back-filled at it
        self._backfill(paths, start_step)

    def _backfill(self, paths: RunDir, start_step: int) -> None:
        """A kill can take wandb's unflushed rows with it while the metrics file kept them (and the train row of
        an eval step reaches wandb only with its eval, see Tracker): log those rows again (same steps, same
        values) so the wandb run has no gap. Only earlier starts' rows (up to ``start_step``): this start's come
        from the worker, which holds some back on purpose."""
        rows = [r for r in read_metrics(paths) if self.skip_through < r["step"] <= start_step]
        for row in rows:
            values = {k: v for k, v in row.items() if k != "step"}
            self.log(row["step"], values)
            self.backfilled.setdefault(row["step"], set()).update(values)
        if rows:
            log.info("wandb: back-filled steps %d..%d from the metrics file", rows[0]["step"], rows[-1]["step"])

    def holds(self, step: int, row: dict[str, Any]) -> bool:
        """Whether wandb already has this row: its step is one an earlier start persisted, or the back-fill
        logged these very keys at it (the worker appended a resumed eval's row while the back-fill read the file)."""
        return step <= self.skip_through or set(row) <= self.backfilled.get(step, set())

    def log(self, step: int, row: dict[str, Any]) -> None:
        self.run.log({**row, "global_step": step}, step=step)

    def finish(self) -> None:
        self.run.finish()


def sweep_entry() -> dict[str, Any]:
    """A sweep's trial (``ORCH_SWEEP_TRIAL``, set by ``orchestrator sweep``): ``{"sweep": {"dir", "trial",
    "overrides"}}`` in its wandb run's config, so runs of one sweep (one wandb group) compare by what was swept."""
    text = os.environ.get(ENV_SWEEP_TRIAL)
    if not text:
        return {}
    try:
        trial = json.loads(text)
        return {"sweep": {"dir": trial["dir"], "trial": trial["trial"], "overrides": dict(trial["overrides"])}}
    except (ValueError, KeyError, TypeError):
        return {}  # (an older sweep's variable: tracking never stops a run)


def wandb_mode(cfg: Config) -> str | None:
    """``auto``: online when an API key is configured, else offline; ``WANDB_MODE`` wins when set."""
    if cfg.tracking.mode != "auto":
        return cfg.tracking.mode
    if os.environ.get("WANDB_MODE"):
        return None  # let wandb read it
    has_key = bool(os.environ.get("WANDB_API_KEY")) or Path("~/.netrc").expanduser().exists()
    return "online" if has_key else "offline"


class WandbProcess:
    """Rank 0's wandb run, in a child process of rank 0 (``orch-wandb``). The training process only puts the rows
    of each :meth:`flush` on a queue (a list of small dicts, pickled into a pipe by a feeder thread at once); wandb's
    Python work — serialisation and IPC to its service, ~0.2–0.4 ms of CPU per row here — never holds the training
    process's interpreter lock. (On a
    thread inside the worker it did, and cost the training thread ~1 ms per logged row on 2 cores.) wandb also
    starts there, so training no longer waits for ``wandb.init``.

    The child knows what wandb already holds (:meth:`WandbSink.holds`: the steps earlier starts persisted, and what
    it back-filled from the metrics file) and drops those rows, so the parent sends every row.
    Tracking trouble never stops training: if wandb fails to start, the child says so on rank 0's log and drains
    the queue.

    Lifetime: the child ignores the stop signals (they reach the whole process group; the worker saves first and
    then ends it with :meth:`finish`, which waits for wandb to flush), and the kernel kills it if the worker dies.
    """

    skip_through = 0  # the child filters
    FINISH_TIMEOUT_S = 120.0  # after a normal end: wandb may need a while to flush (online)
    QUICK_FINISH_TIMEOUT_S = 10.0  # after a stop or an error: leave promptly (a requeue may be waiting); the rows
    # are in the metrics file and the next start back-fills whatever wandb missed

    def __init__(self, cfg: Config, rid: str, mode: str | None, start_step: int = 0) -> None:
        ctx = multiprocessing.get_context("spawn")  # fork would copy a process with torch and gloo threads
        reader, self.writer = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(
            target=wandb_process_main, args=(cfg.to_dict(), rid, mode, reader, os.getpid(), start_step),
            name="orch-wandb",
            daemon=True,
        )  # fmt: skip
        # A stop signal sent to the process group while the child starts would kill it before it ignores them:
        # block them across the start (the child inherits the mask, ignores them, then unblocks); ours stay pending.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        reader.close()  # the child holds the only read end: end-of-file there if this process dies
        # A plain queue and a feeder thread: the training thread never blocks on the pipe, even if the child lags.
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = False  # the child is gone: rows are dropped here (the metrics file has them)
        self.batch: list[tuple[int, dict[str, Any]]] = []  # logged, not yet handed to the feeder
        self.feeder = threading.Thread(target=self._feed, name="orch-wandb-feeder", daemon=True)
        self.feeder.start()

    def _feed(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                self.writer.send(item)
            self.writer.send(None)  # the end, explicitly: a forked process may hold a copy of our pipe end
        except Exception as exc:
            self.closed = True
            log.warning("wandb: the tracking process stopped taking rows (%s); the metrics file keeps them", exc)
        finally:
            self.writer.close()

    def log(self, step: int, row: dict[str, Any]) -> None:
        if not self.closed:
            self.batch.append((step, row))

    def flush(self) -> None:
        if self.batch:
            self.queue.put(self.batch)
            self.batch = []

    def finish(self, quick: bool = False) -> None:
        """Send what is logged, then wait for wandb to flush and end; ``quick`` after a stop or an error."""
        timeout = self.QUICK_FINISH_TIMEOUT_S if quick else self.FINISH_TIMEOUT_S
        self.flush()
        self.queue.put(None)
        deadline = time.monotonic() + timeout
        self.feeder.join(timeout)
        self.proc.join(max(0.0, deadline - time.monotonic()))
        if self.proc.exitcode is None:
            log.warning("wandb: the tracking process did not finish in %.0f s; ending it", timeout)
            self.proc.kill()
            self.proc.join()
        elif self.proc.exitcode:
            log.warning("wandb: the tracking process exited with code %s", self.proc.exitcode)


def _background_priority() -> None:
    """Run (with wandb's service, which inherits it) only on CPU time the workers leave idle: Linux SCHED_IDLE,
    else the lowest nice value. A woken tracking process then never preempts a worker — on a machine whose cores
    the workers fill, a worker descheduled for a moment stalls every rank at the next all-reduce."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(19)


def _rows(conn: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """The rows sent by the worker (lists of them), until its end message (or end-of-file: it died)."""
    while True:
        try:
            batch = conn.recv()
        except EOFError:
            return
        if batch is None:
            return
        yield from batch


def wandb_process_main(
    cfg_dict: dict[str, Any], rid: str, mode: str | None, conn: Any, parent: int, start_step: int = 0
) -> None:
    """Entry of the ``orch-wandb`` process: start (or continue) the wandb run, log rows until the worker ends."""
    ignore_stop_signals()  # they arrive blocked (see WandbProcess): ignore first, then let them through
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if not die_with_parent(parent):  # the worker is already gone
        return
    _background_priority()
    cfg = config_from_dict(cfg_dict)
    setup_logging(RunDir(cfg.run.dir), 0)
    try:
        sink = WandbSink(cfg, rid, mode, start_step)
    except Exception as exc:  # tracking trouble must not stop training
        log.error("wandb: could not start run %s (%s); training goes on and the metrics file keeps every row", rid, exc)
        for _ in _rows(conn):  # keep the pipe flowing
            pass
        return
    meter, logged = _CpuMeter(), 0
    for step, row in _rows(conn):
        if sink.holds(step, row):
            continue
        try:
            sink.log(step, row)
            logged += 1
        except Exception as exc:
            log.warning("wandb: could not log step %d: %s", step, exc)
    cpu_s = meter.used_s()
    sink.finish()
    if logged:
        log.info(
            "wandb: %d rows logged live; %.3f ms of CPU a row (this process and wandb's service, start-up excluded)",
            logged, 1000 * cpu_s / logged,
        )  # fmt: skip


class _CpuMeter:
    """CPU time (user + system) of this process and its children (wandb's service) since creation."""

    def __init__(self) -> None:
        self.start = self._now()

    @staticmethod
    def _now() -> float:
        import psutil  # noqa: PLC0415 - the child's own import

        total = time.process_time()
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                times = child.cpu_times()
                total += times.user + times.system
        return total

    def used_s(self) -> float:
        return self._now() - self.start
