"""What a new user reads: the start line shows the configured learning rate and the warmup (not the warmup's first,
scaled-down value), and train.init_from names the checkpoint it took from a run dir."""

from __future__ import annotations

from conftest import MAX_STEPS, launch


def test_the_start_line_shows_the_configured_lr_and_warmup_and_init_from_names_its_checkpoint(refs, tmp_path):
    proc = launch(tmp_path / "run", 1, "optim.lr=0.004", "optim.warmup_steps=3", f"train.init_from={refs[2]}")
    line = next(ln for ln in proc.stderr.splitlines() if "optimizer AdamW" in ln)
    assert "schedule built-in (3 warmup steps, then cosine)" in line, line
    assert "lr 0.004," in line, line  # not 0.004/3, the warmup's first step
    taken = refs[2] / "checkpoints" / f"step-{MAX_STEPS:08d}" / "model.pt"
    assert f"initialised weights from {taken}" in proc.stderr, proc.stderr
