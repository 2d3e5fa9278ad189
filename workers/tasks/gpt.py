"""The built-in GPT task: a small decoder-only transformer trained on token files (workers.tasks.tokens) that are
read through a memory map, so the dataset may be far larger than memory.

    orchestrator data tokenize workers/tasks/data/tiny_corpus.txt data/tiny.bin
    orchestrator launch configs/gpt.yaml task.args.tokens=data/tiny.bin

``tokens_per_sample`` (``seq_len``) and ``flops_per_sample`` (6 x parameters x tokens: forward and backward) give
``tokens_per_s`` and, on a GPU with a known peak, ``mfu``.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.errors import ConfigError
from workers.tasks.charlm import CharLMTask, TinyGPT
from workers.tasks.tokens import BYTE_VOCAB, TokenWindows


@dataclass
class GPTTask(CharLMTask):
    """Next-token cross-entropy (``loss``) and, on ``val_tokens``, per-window ``loss`` and ``accuracy``."""

    random_samples = False  # a window is read, never drawn


def build(
    tokens: str | None = None,
    val_tokens: str | None = None,
    seq_len: int = 64,
    dtype: str = "uint16",
    vocab_size: int = BYTE_VOCAB,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    dropout: float = 0.0,
) -> GPTTask:
    """Factory named by ``task.factory: workers.tasks.gpt:build``. ``tokens``: the training token file (required);
    ``val_tokens``: a held-out one for eval (windows of the same ``seq_len``); ``vocab_size``: 256 for
    ``orchestrator data tokenize``'s byte-level files, the tokenizer's size for files written by another."""
    if not tokens:
        raise ConfigError(
            "config key 'task.args.tokens' is not set: the GPT task trains on a token file. "
            "HINT: orchestrator data tokenize TEXT OUT, then task.args.tokens=OUT"
        )
    train = TokenWindows(tokens, seq_len, dtype, vocab_size)
    val = TokenWindows(val_tokens, seq_len, dtype, vocab_size, key="task.args.val_tokens") if val_tokens else None
    task = GPTTask(TinyGPT(vocab_size, seq_len, d_model, n_layers, n_heads, dropout), train, val)
    task.tokens_per_sample = seq_len
    task.flops_per_sample = 6.0 * sum(p.numel() for p in task.model.parameters()) * seq_len
    return task
