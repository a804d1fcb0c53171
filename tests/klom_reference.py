"""Reference transcriptions of KLOM that more than one test file checks against (tests import them from here,
never from each other)."""

from __future__ import annotations

import math

import numpy as np


def edub_klom_point(p_arr: np.ndarray, q_arr: np.ndarray) -> float:
    """The Easy Data Unlearning Bench's KL for one point, transcribed from its definition with plain loops.

    RoyRin/data-unlearning-bench, unlearning_bench/eval.py, compute_binned_KL_div(p_arr, q_arr): clip to
    [-100, 100]; 21 edges np.linspace(min, max) over both samples (max = min + 1 if they are all equal);
    np.digitize puts x in bin b when e_b <= x < e_{b+1}, and only bins 1..20 are counted, so a sample equal
    to the last edge is in no bin; p, q = counts / kept counts (zeros if none kept); q floored at 1e-5 where
    p > 0; scipy.stats.entropy(p, q) renormalises both and sums p log(p / q) over p > 0 (NaN if p sums to 0).
    Works in the arrays' own precision, as the bench does (float32 margins give float32 edges).
    """
    p_arr = np.clip(p_arr, -100, 100)
    q_arr = np.clip(q_arr, -100, 100)
    start = min(p_arr.min(), q_arr.min())
    end = max(p_arr.max(), q_arr.max())
    if start >= end:
        end = start + 1
    edges = np.linspace(start, end, 21)

    def counts(arr):
        c = [0] * 20
        for x in arr:
            for b in range(20):
                if edges[b] <= x < edges[b + 1]:
                    c[b] += 1
        return c

    p_counts, q_counts = counts(p_arr), counts(q_arr)
    p_total, q_total = sum(p_counts), sum(q_counts)
    if p_total == 0:
        return math.nan  # scipy.stats.entropy of an all-zero pk: 0 / 0
    p = [c / p_total for c in p_counts]
    q = [c / q_total if q_total > 0 else 0.0 for c in q_counts]
    q_safe = [max(qb, 1e-5) if pb > 0 else qb for pb, qb in zip(p, q)]
    z = sum(q_safe)
    return sum(pb * math.log(pb / (qb / z)) for pb, qb in zip(p, q_safe) if pb > 0)
