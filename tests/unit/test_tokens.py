"""Token files in-process (workers/tasks/tokens.py): bad task.args are one-line usage errors naming the key."""

from __future__ import annotations

import numpy as np
import pytest

from workers.contract import FailureKind
from workers.errors import ConfigError
from workers.tasks import tokens
from workers.tasks.tokens import TokenWindows


def _file(tmp_path, ids, dtype: str = "uint16") -> str:
    path = tmp_path / "t.bin"
    np.asarray(ids, dtype=dtype).tofile(path)
    return str(path)


def _refused(call, *words: str) -> str:
    with pytest.raises(ConfigError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and "HINT: " in message, message
    assert all(w in message for w in words), message
    assert FailureKind.of(caught.value) is FailureKind.CONFIG  # exit 2, never retried
    return message


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({"seq_len": "32"}, ["'task.args.seq_len' = '32'", "whole number", "HINT: e.g. task.args.seq_len=64"]),
        ({"seq_len": 8.0}, ["'task.args.seq_len' = 8.0"]),
        ({"seq_len": True}, ["'task.args.seq_len' = True"]),
        ({"seq_len": 0}, ["'task.args.seq_len' = 0", "at least 1"]),
        ({"seq_len": 8, "dtype": "int8"}, ["'task.args.dtype' = 'int8'", "uint16, uint32", "HINT: the width"]),
        ({"seq_len": 8, "dtype": ["uint16"]}, ["'task.args.dtype' = ['uint16']"]),
        ({"seq_len": 8, "vocab_size": "256"}, ["'task.args.vocab_size' = '256'", "HINT: 256"]),
        ({"seq_len": 8, "vocab_size": 0}, ["'task.args.vocab_size' = 0"]),
    ],
)
def test_a_bad_seq_len_dtype_or_vocab_size_is_a_usage_error_naming_the_key(tmp_path, args, words):
    path = _file(tmp_path, range(100))
    _refused(lambda: TokenWindows(path, **args), *words)


def test_an_id_outside_the_vocabulary_is_refused_when_the_file_opens(tmp_path):
    path = _file(tmp_path, np.arange(1000) * 7 % 256)  # the first id >= 100: 105, id number 15
    message = _refused(lambda: TokenWindows(path, seq_len=10, vocab_size=100), "'task.args.vocab_size' = 100")
    assert f"{path!r} holds token id 105 (id number 15 of the file)" in message
    assert len(TokenWindows(path, seq_len=10, vocab_size=256)) == 99
    assert len(TokenWindows(path, seq_len=10, dtype="uint16", vocab_size=70000)) == 99  # every uint16 id fits


def test_in_a_file_too_large_to_scan_the_id_is_refused_when_its_window_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(tokens, "_SCAN_LIMIT", 100)  # bytes: this 2,000-byte file is read window by window
    path = _file(tmp_path, [1] * 500 + [300] + [1] * 499)
    windows = TokenWindows(path, seq_len=10, vocab_size=256)
    assert windows[48][1].tolist() == [1] * 10  # ids 480..490
    for index in (49, 50):  # ids 490..500 (300: the last target) and 500..510 (300: the first input)
        _refused(lambda i=index: windows[i], "'task.args.vocab_size' = 256", "token id 300 (id number 500 of the file)")


def _read_all(windows: TokenWindows) -> list[list[int]]:
    """Every window's input, read more times than a map lasts (tokens._REMAP_EVERY): the file is mapped afresh."""
    return [windows[i % len(windows)][0].tolist() for i in range(max(len(windows), 2 * tokens._REMAP_EVERY))]


def test_a_file_renamed_over_the_path_mid_run_is_not_read(tmp_path):
    path = _file(tmp_path, np.arange(1000) % 200)
    windows = TokenWindows(path, seq_len=10, vocab_size=256)
    first = _read_all(windows)
    for ids in (np.arange(1000) % 100 + 1, np.arange(3000) % 100):  # the same size, then another size
        np.asarray(ids, dtype="uint16").tofile(tmp_path / "new.bin")
        (tmp_path / "new.bin").replace(path)
        assert _read_all(windows) == first  # the file the dataset checked, not what the path names now


def test_a_file_whose_size_changes_in_place_is_refused_at_the_next_map(tmp_path):
    path = _file(tmp_path, range(100))
    windows = TokenWindows(path, seq_len=10, key="task.args.val_tokens")
    windows[0]
    with open(path, "ab") as f:
        f.write(b"\x01\x00" * 10)
    _refused(lambda: _read_all(windows), "'task.args.val_tokens'", path, "changed while the run read it",
             "200 bytes when it opened, now 220")  # fmt: skip


def test_a_pickled_copy_reads_the_same_file_or_refuses_another(tmp_path):
    import pickle

    path = _file(tmp_path, np.arange(1000) % 200)
    windows = TokenWindows(path, seq_len=10)
    copy = pickle.loads(pickle.dumps(windows))  # a spawned loader worker's
    assert _read_all(copy) == _read_all(windows)
    np.arange(1000, dtype="uint16").tofile(tmp_path / "new.bin")
    (tmp_path / "new.bin").replace(path)
    _refused(lambda: pickle.loads(pickle.dumps(windows))[0], path, "another file took its place")


def _descriptors_of(path: str) -> int:
    """How many of this process's descriptors are open on ``path``."""
    import os

    fds = "/proc/self/fd"
    return sum(1 for fd in os.listdir(fds) if os.path.realpath(f"{fds}/{fd}") == os.path.realpath(path))


def test_fresh_maps_open_no_descriptors_and_a_dropped_dataset_closes_its_own(tmp_path):
    import gc

    path = _file(tmp_path, range(100))
    datasets = [TokenWindows(path, seq_len=10) for _ in range(20)]
    assert _descriptors_of(path) == 20
    for windows in datasets:
        _read_all(windows)
        _read_all(windows)
    assert _descriptors_of(path) == 40  # its own and its live map's (mmap keeps a duplicate), however many maps
    del datasets, windows
    gc.collect()
    assert _descriptors_of(path) == 0


def _tokenize(capsys, text, out) -> tuple[int, str]:
    """``orchestrator data tokenize TEXT OUT`` in this process: (exit code, stderr)."""
    from orchestrator.cli import main

    code = main(["data", "tokenize", str(text), str(out)])
    return code, capsys.readouterr().err


def _files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_tokenize_that_fails_after_making_the_folder_is_one_line_and_leaves_nothing(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("hello\n")
    before = _files(tmp_path)
    # A real OSError once OUT's folders exist: OUT's name is legal, the temporary file's (OUT with a prefix) too long.
    out = tmp_path / "a" / "b" / ("x" * 250)
    code, err = _tokenize(capsys, text, out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(out) in err and "File name too long" in err and "HINT: " in err, err
    assert _files(tmp_path) == before, "tokenize left what it made"
    code, err = _tokenize(capsys, text, tmp_path / "a" / "b" / "t.bin")  # the control: the same folders work
    assert code == 0 and (tmp_path / "a" / "b" / "t.bin").stat().st_size == 12, err


def test_a_tokenize_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys):
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount here (needs root): {mounted.stderr.decode().strip()}")
    try:
        text = tmp_path / "text.txt"
        text.write_bytes(b"x" * 100_000)  # 200,000 bytes of uint16 ids: more than the disk holds
        code, err = _tokenize(capsys, text, disk / "new" / "t.bin")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "t.bin" in err and "the disk is full" in err, err
        assert _files(disk) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
