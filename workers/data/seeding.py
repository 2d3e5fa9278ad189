"""Per-sample RNG seeding: what makes a sample's random augmentation a function of its place in the global stream
(not of the loader worker, the world size or where the run resumed) — at a few microseconds a sample.

Seeding every generator before every sample is the simple way, and what this module is equivalent to; it cost
~15 µs a sample, most of it in two generators a typical dataset never touches: Python's ``random.seed`` (~7 µs:
CPython re-runs Mersenne Twister's init over 624 words) and NumPy's legacy global state (~4 µs). torch's own
generator (~1.6 µs) is always seeded. The other two are seeded only while they are in use:

- a generator is *watched* through a read-only view of its position (Mersenne Twister's index and first state
  words, whose memory layout is checked on a private instance at start-up; where the check fails it is simply
  always seeded). Any draw moves the position;
- before a sample is fetched, a watched generator is left as it is — unless its cache of a second Gaussian value
  could be filled (Python's ``gauss_next``; NumPy's ``has_gauss``, which only a draw can set: NumPy is seeded
  whenever it moved since we last saw it), because a cached value is handed out without moving the position;
- if the fetch moved a watched generator, the dataset draws from it: every generator is seeded and the sample
  fetched again (the first result is discarded), and from then on that generator is seeded before every sample.

So a sample that draws nothing is made from unseeded generators, which cannot change it; a sample that draws is
always made from seeded ones. The result is bit-identical to seeding everything every time; the only cost of a
dataset that does draw is one extra fetch, once per process. After a micro-batch's samples, :meth:`settle` seeds
whatever was left alone, so a collate function that draws finds seeded generators too.

What it asks of ``__getitem__`` (what exact resume asks anyway): no side effects that a second call would see
(the one extra fetch), and no reading of a global generator's state without drawing (``getstate`` / ``setstate``
around a draw leaves the position where it was). A dataset that cannot promise that keeps every generator seeded
by drawing from each once in its first ``__getitem__`` call.
"""

from __future__ import annotations

import ctypes
import random
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

try:
    import numpy as _np
except ImportError:  # numpy is optional for the orchestrator itself
    _np = None

T = TypeVar("T")
_MASK64 = (1 << 64) - 1
_MT_N = 624  # Mersenne Twister's state words: index N after seeding means "regenerate at the next draw"


def sample_seed(seed: int, position: int) -> int:
    """A 63-bit seed for stream position ``position`` of a run seeded ``seed`` (splitmix64's finaliser over both:
    ~1 µs, where hashing a tuple took ~3 µs; distinct positions give unrelated seeds)."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def seed_all(seed: int, device: torch.device | None = None) -> None:
    """Seed torch's CPU generator (and ``device``'s, when it is a GPU), Python's ``random`` and NumPy.

    ``torch.manual_seed`` would also do it, but costs ~150 µs (it visits every backend); this costs ~10 µs.
    """
    torch.default_generator.manual_seed(seed)
    if device is not None and device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the current device: each rank's own
    random.seed(seed)
    if _np is not None:
        _np.random.seed(seed % (1 << 32))


class _Position:
    """A live, read-only view of a Mersenne Twister's position: ``(index, first two state words)``. Any draw
    changes it (a draw of exactly 624·k words returns the index where it was, but regenerates the words)."""

    def __init__(self, index_address: int, words_address: int) -> None:
        self._index = ctypes.c_int.from_address(index_address)
        self._words = ctypes.c_uint64.from_address(words_address)

    def mark(self) -> tuple[int, int]:
        return self._index.value, self._words.value


def _python_position(rng: random.Random) -> _Position | None:
    """CPython's ``RandomObject``: the object header, ``int index``, then ``uint32_t state[624]``. Checked on a
    private instance first: None where the layout is not that one (another interpreter or version)."""
    if sys.implementation.name != "cpython":
        return None
    header = ctypes.sizeof(ctypes.c_ssize_t) + ctypes.sizeof(ctypes.c_void_p)  # ob_refcnt, ob_type

    def view(obj: random.Random) -> _Position:
        return _Position(id(obj) + header, id(obj) + header + ctypes.sizeof(ctypes.c_int))

    probe = random.Random()
    probe.seed(12345)
    seeded = view(probe).mark()
    # init_by_array ends with state[0] = 0x80000000 and index = N; one random() consumes two words
    if seeded[0] != _MT_N or seeded[1] & 0xFFFFFFFF != 0x80000000:
        return None
    probe.random()
    if view(probe).mark()[0] != 2:
        return None
    return view(rng)


def _numpy_position() -> _Position | None:
    """NumPy's legacy global state: its MT19937 bit generator's ``mt19937_state {uint32_t key[624]; int pos;}``,
    through the bit generator's public ``ctypes.state_address``. Checked on a private instance first."""
    if _np is None:
        return None
    try:

        def view(state: Any) -> _Position:
            address = state._bit_generator.ctypes.state_address
            return _Position(address + _MT_N * 4, address)

        probe = _np.random.RandomState(12345)
        seeded = view(probe).mark()
        if seeded[0] != _MT_N or seeded[1] & 0xFFFFFFFF != 12345:  # legacy seeding: key[0] = seed, pos = N
            return None
        probe.random_sample()
        moved = view(probe).mark()
        if moved[0] == _MT_N or moved == seeded:
            return None
        return view(_np.random.mtrand._rand)
    except (AttributeError, TypeError, ValueError):
        return None


class SampleSeeder:
    """Makes one sample with the RNGs as if all of them had been seeded from the sample's seed (see the module
    docstring). One per process: it watches that process's generators (created lazily where it is used, so a
    DataLoader worker gets its own)."""

    def __init__(self) -> None:
        self._python = _python_position(random._inst)  # type: ignore[attr-defined] - the module-level generator
        self._numpy = _numpy_position()
        self.python_drawn = self._python is None  # True: seeded before every sample
        self.numpy_drawn = self._numpy is None
        self._numpy_seen: tuple[int, int] | None = None  # NumPy's position after the last sample (None: unknown)

    def settle(self, seed: int) -> None:
        """Seed the generators the last sample left alone (before a collate that may draw from them)."""
        if not self.python_drawn:
            random.seed(seed)
        if not self.numpy_drawn and _np is not None:
            _np.random.seed(seed % (1 << 32))

    def make(self, seed: int, fetch: Callable[[], T]) -> T:
        """``fetch()`` with the RNGs seeded from ``seed`` wherever it draws."""
        torch.default_generator.manual_seed(seed)
        seed_python = self.python_drawn or random._inst.gauss_next is not None  # type: ignore[attr-defined]
        if seed_python:
            random.seed(seed)
        seed_numpy = self.numpy_drawn or self._numpy.mark() != self._numpy_seen
        if seed_numpy and _np is not None:
            _np.random.seed(seed % (1 << 32))  # also empties its Gaussian cache
        python_before = None if self._python is None else self._python.mark()
        numpy_before = None if self._numpy is None else self._numpy.mark()
        sample = fetch()
        python_moved = python_before is not None and self._python.mark() != python_before
        numpy_moved = numpy_before is not None and self._numpy.mark() != numpy_before
        self.python_drawn |= python_moved
        self.numpy_drawn |= numpy_moved
        if (python_moved and not seed_python) or (numpy_moved and not seed_numpy):
            seed_all(seed)  # it drew from a generator we had left alone: make the sample again, seeded
            sample = fetch()
        if self._numpy is not None:
            self._numpy_seen = self._numpy.mark()
        return sample
