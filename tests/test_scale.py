"""Scale, end to end on real processes: a dataset of 10**12 samples and a 2 GB token file train in memory that does
not grow with them (the global order is computed per position; token files are memory-mapped), the built-in GPT
task learns the shipped text and resumes exactly on another world size, and bad token inputs are one line, exit 2.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICK, ROOT, SUPPORT, cli, env, launch, launch_and_kill, load, rel_diff

from workers.data import GlobalOrder

LIMIT_MB = 700  # no process of a run over this, whatever the dataset's size
TEXT = ROOT / "workers" / "tasks" / "data" / "tiny_corpus.txt"
VAL_TEXT = ROOT / "workers" / "tasks" / "data" / "tiny_corpus_val.txt"


def _launch_measured(run: Path, nproc: int, *overrides: str) -> tuple[float, dict[int, float], list[dict]]:
    """Launch to the end; (the launcher's peak RSS, each rank's peak RSS at its last logged row, the rows)."""
    cmd = [sys.executable, str(SUPPORT / "peak_rss.py"), sys.executable, "-m", "orchestrator", "launch",
           "configs/quickstart.yaml", "--nproc", str(nproc), f"run.dir={run}", *QUICK, *overrides]  # fmt: skip
    proc = subprocess.run(cmd, env=env(), cwd=ROOT, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    launcher = float(re.search(r"PEAK_RSS_MB (\S+)", proc.stderr).group(1))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in rows if "rank0/rss_peak_mb" in r][-1]
    return launcher, {r: last[f"rank{r}/rss_peak_mb"] for r in range(nproc)}, rows


def test_a_dataset_of_10_12_samples_trains_20_steps_on_2_ranks_with_no_process_over_700_mb(tmp_path):
    common = ["task.factory=orch_test_tasks:huge", "train.max_steps=20", "train.log_every=5", "eval.every=0",
              "train.checkpoint_every=10", "data.global_batch_size=32"]  # fmt: skip
    launcher, ranks, rows = _launch_measured(tmp_path / "huge", 2, *common, "task.args={n: 1000000000000}")
    assert rows[-1]["step"] == 20 and launcher < LIMIT_MB and max(ranks.values()) < LIMIT_MB, (launcher, ranks)
    consumed = []  # the samples really are drawn from all 10**12, in the global order
    for line in (tmp_path / "huge" / "samples" / "rank-0.jsonl").read_text().splitlines():
        consumed += json.loads(line)["indices"]
    order = GlobalOrder(10**12, 0)
    assert consumed[:16] == order.take(0, 16) and max(consumed) > 10**11
    # the control: the same run whose workers each hold 800 MB more is seen over the limit
    _, heavy, _ = _launch_measured(tmp_path / "heavy", 2, *common, "task.args={n: 1000000000000, ballast_mb: 800}")
    assert min(heavy.values()) > LIMIT_MB, heavy


def _tokenize(text: Path, out: Path) -> None:
    proc = cli("data", "tokenize", str(text), str(out), check=True)
    assert f"wrote {len(text.read_bytes())} token ids (uint16" in proc.stdout


def _gpt(tokens: Path, val: Path | None = None, **args) -> list[str]:
    spec = {"tokens": str(tokens), "seq_len": 32, "d_model": 32, "n_layers": 1, "n_heads": 2, **args}
    if val is not None:
        spec["val_tokens"] = str(val)
    return ["task.factory=orch_test_tasks:gpt", f"task.args={json.dumps(spec)}", "data.global_batch_size=24"]


def test_the_gpt_task_trains_on_a_2_gb_token_file_with_no_process_over_700_mb(tmp_path):
    import numpy as np

    big, real = tmp_path / "big.bin", tmp_path / "real.bin"
    with open(big, "wb") as f:  # 2 GB of ids (sparse: the disk holds almost nothing, a read gets every byte)
        f.truncate(2 * 2**30)
    # 100 MB of real ids, read 9,600 times: a map that kept what it touched (~200 KB a read on a kernel that maps
    # whole large folios) would be ~2 GB resident by the end
    np.random.default_rng(0).integers(0, 256, 50 * 10**6, dtype=np.uint16).tofile(real)
    for tokens, steps in ((big, 20), (real, 200)):
        launcher, ranks, rows = _launch_measured(
            tmp_path / f"run-{tokens.stem}", 2, *_gpt(tokens), f"train.max_steps={steps}", "train.log_every=10",
            "eval.every=0", "data.global_batch_size=96", f"train.checkpoint_every={steps}",
        )  # fmt: skip
        assert rows[-1]["step"] == steps and launcher < LIMIT_MB and max(ranks.values()) < LIMIT_MB, (launcher, ranks)
        assert [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][-1] > 0


def test_gpt_learns_the_tokenized_shipped_text_and_resumes_exactly_on_another_world_size(tmp_path):
    tokens, val = tmp_path / "data" / "train.bin", tmp_path / "data" / "val.bin"
    _tokenize(TEXT, tokens)
    _tokenize(VAL_TEXT, val)
    task = [*_gpt(tokens, val, step_sleep_s=0.02), "train.max_steps=60", "train.checkpoint_every=20",
            "train.log_every=10", "eval.every=20", "optim.lr=0.003"]  # fmt: skip
    full = tmp_path / "full"
    launch(full, 2, *task)
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r and "eval/loss" not in r]
    assert losses[-1] < 0.6 * losses[0], losses  # ~5.5 nats (uniform over 256 bytes) falls a long way
    assert [r["eval/loss"] for r in rows if "eval/loss" in r][-1] < 3.5
    run = tmp_path / "killed"
    launch_and_kill(run, 2, *task, kill_after="step-00000020")
    proc = launch(run, 3, *task, "data.global_batch_size=24")
    assert "resumed from" in proc.stderr and "saved at world size 2, now 3" in proc.stderr
    assert rel_diff(load(run, step=60), load(full, step=60)) <= 1e-5


def _refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def test_bad_token_files_and_tokenize_arguments_are_one_line_and_exit_2(tmp_path):
    empty, odd, short = tmp_path / "empty.bin", tmp_path / "odd.bin", tmp_path / "short.bin"
    empty.write_bytes(b"")
    odd.write_bytes(b"\x01\x00\x02")
    short.write_bytes(b"\x01\x00" * 10)
    wide = tmp_path / "wide.bin"  # id 300 at id number 40: outside tokenize's byte vocabulary (was a retried crash)
    wide.write_bytes(b"\x01\x00" * 40 + b"\x2c\x01" + b"\x01\x00" * 40)
    cases = [
        (_gpt(tmp_path / "missing.bin"), ["task.args.tokens", "missing.bin", "No such file", "data tokenize"]),
        (_gpt(empty), ["task.args.tokens", "empty"]),
        (_gpt(odd), ["task.args.tokens", "3 bytes is not a whole number of uint16 ids"]),
        (_gpt(short), ["task.args.seq_len", "= 32", "10 ids"]),
        (_gpt(short, dtype="int8"), ["task.args.dtype", "'int8'"]),
        (_gpt(wide), ["task.args.vocab_size", "= 256", str(wide), "token id 300 (id number 40 of the file)", "HINT"]),
        (_gpt(short, empty, seq_len=4), ["task.args.val_tokens", "empty"]),
        (["task.factory=workers.tasks.gpt:build", "task.args={}"], ["task.args.tokens", "is not set"]),
    ]
    for overrides, words in cases:
        run = tmp_path / "run"
        _refused(launch(run, 1, *overrides, check=False), *words)
        assert not run.exists(), overrides
    out = tmp_path / "out" / "t.bin"
    _refused(cli("data", "tokenize", str(tmp_path / "nope.txt"), str(out)), "nope.txt", "no such file")
    (tmp_path / "empty.txt").write_text("")
    _refused(cli("data", "tokenize", str(tmp_path / "empty.txt"), str(out)), "empty")
    _refused(cli("data", "tokenize", str(TEXT), str(out), "--dtype", "int8"), "--dtype", "'int8'")
    assert not (tmp_path / "out").exists()
    _tokenize(TEXT, out)
    _refused(cli("data", "tokenize", str(TEXT), str(out)), "exists")
    assert os.path.getsize(out) == 2 * len(TEXT.read_bytes())


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_a_token_window_is_the_files_ids_without_a_copy_of_the_file(tmp_path, dtype):
    import numpy as np

    from workers.tasks.tokens import TokenWindows

    ids = np.arange(1000, dtype=dtype) * 7 % 256
    ids.tofile(tmp_path / "t.bin")
    windows = TokenWindows(str(tmp_path / "t.bin"), seq_len=10, dtype=dtype)
    assert len(windows) == 99
    x, y = windows[3]
    assert x.tolist() == ids[30:40].tolist() and y.tolist() == ids[31:41].tolist()
    import pickle

    assert len(pickle.dumps(windows)) < 500  # a loader worker gets the path, not the ids
    with pytest.raises(IndexError):
        windows[99]


def test_the_readmes_gpt_commands_work_as_written(tmp_path):
    from test_readme_examples import _block, _run

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "gpt.yaml").write_text((ROOT / "configs" / "gpt.yaml").read_text())
    (tmp_path / "workers" / "tasks" / "data").mkdir(parents=True)
    for text in (TEXT, VAL_TEXT):
        (tmp_path / "workers" / "tasks" / "data" / text.name).write_text(text.read_text())
    commands = [line.split() for line in _block("orchestrator data tokenize").splitlines() if line.strip()]
    assert [c[:3] for c in commands] == [["orchestrator", "data", "tokenize"]] * 2 + [
        ["orchestrator", "launch", "configs/gpt.yaml"]
    ]
    for command in commands:
        extra = ["train.max_steps=50", "tracking.mode=disabled"] if command[1] == "launch" else []
        proc = _run([*command[1:], *extra], tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert "eval at step 50: eval/accuracy" in proc.stderr and "run finished: runs/gpt" in proc.stderr
