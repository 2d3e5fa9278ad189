"""A tiny character-level transformer language model on a text file the repo ships.

More realistic than the quickstart: embeddings, attention, layer norm and *dropout*, so the RNG handling of
resume is exercised (an interrupted run must still equal an uninterrupted one bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"
VALIDATION = Path(__file__).parent / "data" / "tiny_corpus_val.txt"  # held-out text, the same characters


class CharDataset(Dataset):
    """Windows of ``block_size + 1`` characters every ``stride`` characters; sample = (input, target)."""

    def __init__(self, text: str, block_size: int, stride: int, vocab: list[str] | None = None) -> None:
        """``vocab``: the training set's (for a validation text: characters outside it are dropped)."""
        self.vocab = vocab if vocab is not None else sorted(set(text))
        lookup = {c: i for i, c in enumerate(self.vocab)}
        self.tokens = torch.tensor([lookup[c] for c in text if c in lookup], dtype=torch.long)
        if len(self.tokens) < block_size + 1:
            raise ValueError(f"the text has {len(self.tokens)} usable characters: fewer than block_size + 1")
        self.block_size, self.stride = block_size, stride
        self._len = (len(self.tokens) - block_size - 1) // stride + 1

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self._len:
            raise IndexError(index)
        chunk = self.tokens[index * self.stride : index * self.stride + self.block_size + 1]
        return chunk[:-1], chunk[1:]


class TinyGPT(nn.Module):
    """Decoder-only transformer: token + position embeddings, pre-norm causal self-attention blocks."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 32,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout, batch_first=True, norm_first=True)
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(block_size), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.drop(self.tok(idx) + self.pos(torch.arange(t, device=idx.device)))
        for block in self.blocks:
            h = block(h, src_mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


@dataclass
class CharLMTask:
    model: TinyGPT
    dataset: CharDataset
    eval_dataset: CharDataset | None = None  # non-overlapping windows of the validation text
    random_samples = False  # __getitem__ is deterministic: no per-sample RNG seeding needed
    tokens_per_sample: int | None = None  # block_size (build sets both)
    flops_per_sample: float | None = None  # ~6 x parameters x tokens: a training step's forward and backward

    def loss(self, model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def evaluate(self, model: nn.Module, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per window: the mean next-character cross-entropy (``loss``, nats) and the share predicted right."""
        x, y = batch
        logits = model(x)
        ce = nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # [B, T]
        return {"loss": ce.mean(dim=1), "accuracy": (logits.argmax(-1) == y).float().mean(dim=1)}


def build(
    path: str | None = None,
    block_size: int = 32,
    stride: int = 4,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    dropout: float = 0.1,
    val_path: str | None = None,
) -> CharLMTask:
    """Factory named by ``task.factory: workers.tasks.charlm:build``; ``path`` defaults to the shipped corpus,
    ``val_path`` (the eval set) to the shipped validation text."""
    text = Path(path).read_text(encoding="utf-8") if path else CORPUS.read_text(encoding="utf-8")
    data = CharDataset(text, block_size, stride)
    val_text = Path(val_path).read_text(encoding="utf-8") if val_path else VALIDATION.read_text(encoding="utf-8")
    val = CharDataset(val_text, block_size, block_size, vocab=data.vocab)
    task = CharLMTask(TinyGPT(len(data.vocab), block_size, d_model, n_layers, n_heads, dropout), data, val)
    task.tokens_per_sample = block_size  # (metrics: tokens_per_s; on a GPU with a known peak, mfu)
    task.flops_per_sample = 6.0 * sum(p.numel() for p in task.model.parameters()) * block_size
    return task
