"""The non-finite guard (train.nonfinite), with real gloo process groups and real SIGKILLs.

- one poisoned sample (NaN inputs, on one rank): every rank skips the steps that hold it, on 2 ranks and on 1
  the same steps; the run ends with finite weights; a SIGKILL + relaunch across a skip is bitwise equal;
- a loss that is NaN at every step: exit 1 after train.max_nonfinite skips, with a report naming the step, its
  samples' positions and the last good checkpoint; not retried; nothing non-finite committed; ``halt`` fails at
  the first;
- weights that the optimizer step itself made non-finite (lr = 1e30, guard off) are caught at the next save: no
  committed checkpoint holds NaN/inf and ``latest`` names the last good one.
"""

from __future__ import annotations

import json
import re

import torch
from conftest import EVERY, GBS, MAX_STEPS, final_dir, latest_name, launch, launch_and_kill, load, tensors_equal

from workers.data import GlobalOrder

SKIP = re.compile(
    r"non-finite gradient norm \(nan\) at step (\d+) \(global stream positions (\d+)\.\.(\d+)\): step skipped on "
    r"every rank"
)


def _skips(text: str) -> list[tuple[int, int, int]]:
    return [tuple(map(int, m)) for m in SKIP.findall(text)]


def _finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_a_poisoned_sample_is_skipped_by_every_rank_on_any_world_size_and_across_a_kill(tmp_path):
    order = GlobalOrder(200, 0)
    bad = order.take(5 * GBS + 7, 1)[0]  # a sample of step 6 (and of any later step that draws it again)
    steps = [s + 1 for s in range(MAX_STEPS) if bad in order.take(s * GBS, GBS)]
    expected = [(s, (s - 1) * GBS, s * GBS - 1) for s in steps]
    assert steps[0] == 6
    poison = f"task.args.poison_index={bad}"

    runs = {ws: tmp_path / f"ws{ws}" for ws in (2, 1)}
    for ws, run in runs.items():
        proc = launch(run, ws, poison)
        assert _skips(proc.stderr) == expected, proc.stderr
        for rank in range(ws):  # every rank took the decision (rank 1 holds no poisoned sample at some steps)
            assert _skips((run / "logs" / f"rank-{rank}.log").read_text()) == expected
        assert _finite(load(run)) and _finite({k: v for k, v in _adam_state(run).items()})
        state = json.loads((final_dir(run) / "train_state.json").read_text())
        assert state["nonfinite_skipped"] == len(steps) and state["nonfinite_streak"] == 0
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert max(r.get("nonfinite_skipped", 0) for r in rows) == len(steps)
    # The skipped steps are the same, so the runs agree as closely as any two world sizes do.
    w1, w2 = load(runs[1]), load(runs[2])
    assert all(torch.allclose(w1[k], w2[k], rtol=1e-5, atol=1e-7) for k in w2)

    # With BatchNorm, the poisoned forward also wrecked the running statistics of the rank that held it: a skipped
    # step puts the buffers back, so the saved model is finite and the skips are the same.
    bn = tmp_path / "batchnorm"
    proc = launch(bn, 2, poison, "task.args.batchnorm=true")
    assert _skips(proc.stderr) == expected
    saved = load(bn)
    assert "1.running_var" in saved and _finite(saved)

    killed = tmp_path / "killed"  # killed after step 4, relaunched: it replays step 6's skip from the checkpoint
    launch_and_kill(killed, 2, poison, "task.args.step_sleep_s=0.1", kill_after=f"step-{EVERY:08d}")
    relaunched = launch(killed, 2, poison)
    assert _skips(relaunched.stderr) == expected
    assert tensors_equal(load(killed), load(runs[2]))
    assert tensors_equal(load(killed, "optim.pt"), load(runs[2], "optim.pt"))


def _adam_state(run) -> dict[str, torch.Tensor]:
    state = load(run, "optim.pt")["optimizer"]["state"]
    return {f"{name}.{key}": v for name, s in state.items() for key, v in s.items() if isinstance(v, torch.Tensor)}


def test_nan_at_every_step_fails_after_max_nonfinite_and_halt_fails_at_once(tmp_path):
    run = tmp_path / "always-nan"
    proc = launch(run, 2, "task.args.nan_loss=true", "train.max_nonfinite=3", "launch.max_restarts=2", check=False)
    assert proc.returncode == 1, proc.stderr
    assert len(_skips(proc.stderr)) == 3
    assert "4 consecutive non-finite steps, more than train.max_nonfinite=3" in proc.stderr
    assert "at step 4 (global stream positions 72..95)" in proc.stderr
    assert "no checkpoint was committed yet" in proc.stderr
    assert "restarting" not in proc.stderr.lower()  # an exact resume would only repeat it: never retried
    assert latest_name(run) is None and not list((run / "checkpoints").glob("step-*"))

    halted = tmp_path / "halt"
    bad = GlobalOrder(200, 0).take(5 * GBS, 1)[0]  # first drawn at step 6, after the step-4 checkpoint
    proc = launch(halted, 2, f"task.args.poison_index={bad}", "train.nonfinite=halt", check=False)
    assert proc.returncode == 1
    assert "at step 6 (global stream positions 120..143): train.nonfinite=halt" in proc.stderr
    assert "the last good checkpoint is step-00000004" in proc.stderr
    assert latest_name(halted) == "step-00000004"


def test_weights_made_non_finite_by_the_optimizer_are_never_committed(tmp_path):
    run = tmp_path / "exploded"
    proc = launch(
        run, 1, "optim.name=sgd", "optim.lr=1e30", "optim.warmup_steps=0", "train.grad_clip=0", "train.nonfinite=off",
        "train.checkpoint_every=1", "train.keep_checkpoints=100", check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    found = re.search(r"the weights are not finite at step (\d+) \('([\w.]+)' holds NaN/inf\): not saved", proc.stderr)
    assert found, proc.stderr
    bad_step = int(found[1])
    committed = sorted((run / "checkpoints").glob("step-*"))
    assert [int(f.name[5:]) for f in committed] == list(range(1, bad_step))
    assert latest_name(run) == (committed[-1].name if committed else None)
    for folder in committed:
        assert _finite(torch.load(folder / "model.pt", weights_only=True)), folder
