"""Measurement helpers for speed experiments: robust timing, memory bandwidth, a bytes-moved model.

Timing on a shared CPU is noisy: every helper here repeats a measurement and reports the median
(with quartiles), and ``time_interleaved`` runs competing variants round-robin so that a change in
machine load hits all of them alike. Never assert a time in a test; compare within one run.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``n`` repeats: median, quartiles and minimum (the least disturbed run)."""
    median: float
    q1: float
    q3: float
    min: float
    n: int

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> Timing:
        if len(samples) == 0:
            raise ValueError("need at least one timing sample")
        q1, med, q3 = np.percentile(np.asarray(samples, dtype=float), [25, 50, 75])
        return cls(median=float(med), q1=float(q1), q3=float(q3), min=float(min(samples)), n=len(samples))

    @property
    def ms(self) -> float:
        return self.median * 1e3


def _check_counts(repeats: int, warmup: int) -> None:
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")


def time_median(fn: Callable[[], object], repeats: int = 25, warmup: int = 3,
                clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed; return the Timing.

    ``clock``: wall time by default; ``time.thread_time`` counts only the CPU time of the calling
    thread, which a busy machine does not inflate by preempting it (for single-threaded work).
    """
    _check_counts(repeats, warmup)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = clock()
        fn()
        samples.append(clock() - start)
    return Timing.from_samples(samples)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 25,
                     warmup: int = 3,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Time several variants side by side: each round calls every ``fn`` once, in turn.

    Interleaving makes the comparison fair on a machine whose load drifts (other processes):
    all variants see the same conditions. Returns {name: Timing} in the order given. ``clock`` as
    in :func:`time_median` (``time.thread_time`` for CPU time of single-threaded work).
    """
    samples = time_rounds(fns, repeats, warmup, clock)
    return {name: Timing.from_samples(s) for name, s in samples.items()}


def time_rounds(fns: dict[str, Callable[[], object]], repeats: int = 25, warmup: int = 3,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """The raw samples behind :func:`time_interleaved`: {name: seconds of each round's call}.

    Keeping the rounds lets a variant be compared with its baseline round by round (a paired
    ratio), which cancels load drift better than a ratio of medians.
    """
    _check_counts(repeats, warmup)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            samples[name].append(clock() - start)
    return samples


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10,
                   clock: Callable[[], float] = time.perf_counter) -> float:
    """Memory bandwidth in bytes/s from copying a large float32 array into another one (torch).

    A copy reads ``nbytes`` and writes ``nbytes``: counted as ``2 * nbytes`` moved (write-allocate
    traffic is not counted, the same convention as ``bn_bytes_moved``). Pick ``nbytes`` well above the
    last-level cache to measure main memory; with a small one this measures the cache instead.
    ``clock`` as in :func:`time_median`.
    """
    import torch

    if nbytes < 4:
        raise ValueError(f"nbytes must be at least 4, got {nbytes}")
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = time_median(lambda: dst.copy_(src), repeats=repeats, warmup=2, clock=clock)
    return 2 * src.numel() * 4 / t.median


# Minimum number of full-tensor transfers (reads + writes of an x-sized array) each pass needs when
# the tensors do not stay in cache. Forward (training): one read of x for the statistics (a one-pass
# reduction; a two-pass one needs two), one read of x and one write of y to normalize: 3.
# Backward: sum(dout) and sum(dout * xhat) read dout and x: 2; dx reads dout and x and writes dx: 3.
# Inference is a per-channel affine map: read x, write y: 2. Per-channel vectors are negligible.
TENSOR_PASSES = {"forward": 3, "backward": 5, "forward+backward": 8, "inference": 2}


def bn_bytes_moved(shape: Sequence[int], itemsize: int = 4, pass_: str = "forward+backward") -> int:
    """Bytes a batch-norm pass must move between memory and the CPU, at least, for x of ``shape``.

    ``pass_`` is one of "forward", "backward", "forward+backward" (training) or "inference";
    the count is ``TENSOR_PASSES[pass_] * prod(shape) * itemsize`` (each read and each write once).
    """
    if pass_ not in TENSOR_PASSES:
        raise ValueError(f"pass_ must be one of {sorted(TENSOR_PASSES)}, got {pass_!r}")
    if len(shape) < 2 or any((not isinstance(s, (int, np.integer))) or s < 0 for s in shape):
        raise ValueError(f"shape must be (N, C, *spatial) with non-negative ints, got {tuple(shape)}")
    if itemsize not in (1, 2, 4, 8):
        raise ValueError(f"itemsize must be 1, 2, 4 or 8 bytes, got {itemsize}")
    return TENSOR_PASSES[pass_] * math.prod(int(s) for s in shape) * itemsize


def bandwidth_fraction(nbytes: int, seconds: float, bandwidth: float) -> float:
    """Achieved bytes/s (``nbytes / seconds``) as a fraction of ``bandwidth`` (bytes/s)."""
    if seconds <= 0 or bandwidth <= 0:
        raise ValueError(f"seconds and bandwidth must be > 0, got {seconds} and {bandwidth}")
    return nbytes / seconds / bandwidth


def format_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """A plain-text table: columns padded to their widest cell; numbers right-aligned."""
    if any(len(r) != len(headers) for r in rows):
        raise ValueError(f"every row must have {len(headers)} cells (one per header)")
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in rows) and len(rows) > 0 for i in range(len(headers))]

    def fmt(row):
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(row, widths, numeric, strict=True)).rstrip()

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def _is_number(c) -> bool:
    if isinstance(c, (int, float, np.integer, np.floating)):
        return True
    try:
        float(str(c).rstrip("x%"))
        return True
    except ValueError:
        return str(c) in ("", "-")
