"""Token files in-process (workers/tasks/tokens.py): bad task.args are one-line usage errors naming the key."""

from __future__ import annotations

import numpy as np
import pytest

from workers.contract import FailureKind
from workers.errors import ConfigError
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
