"""The Pareto front of a search over time-to-train, cost and peak memory per GPU (all minimised),
kept chunk by chunk as candidates and Evaluation records."""
from __future__ import annotations

import numpy as np

from .costmodel import Evaluation
from .layout import Candidates


def chunk_front(ev: Evaluation, cands: Candidates, ok):
    """A chunk reduced to its Pareto-optimal feasible points, or None.

    Within one GPU count cost is proportional to time, so the chunk's front is the 2-D front of
    (time per token, memory). Exact pre-filter: a point slower than the leanest point, or heavier
    than the fastest one, is dominated by that point; the rest is swept in time order."""
    idx = np.nonzero(ok)[0]
    if not len(idx):
        return None
    t = 1.0 / (ev.tokens_per_s_per_gpu[idx] * ev.gpus[idx])   # time per token: time-to-train order
    mem = ev.memory_bytes[idx]
    fast, lean = int(np.argmin(t)), int(np.argmin(mem))
    keep = (t <= t[lean]) & (mem <= mem[fast])
    idx, t, mem = idx[keep], t[keep], mem[keep]
    order = np.lexsort((mem, t))
    run_min = np.minimum.accumulate(mem[order])
    prev = np.concatenate([[np.inf], run_min[:-1]])
    idx = idx[order[mem[order] < prev]]
    return cands.take(idx), ev.take(idx)


def reduce_fronts(parts, cluster, tokens, price):
    """Chunk fronts merged into one front (candidates, Evaluation), fastest first, or None."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    cols = {k: np.concatenate([p[0].cols[k] for p in parts]) for k in parts[0][0].cols}
    ev = Evaluation.concat([p[1] for p in parts])
    ttt = (tokens or 1e12) / (ev.tokens_per_s_per_gpu * ev.gpus)
    cost = ttt / 3600 * ev.gpus * (cluster.price_per_gpu_hour if price is None else price)
    pts = np.stack([ttt, cost, ev.memory_bytes], axis=1)
    keep = np.nonzero(pareto_mask(pts))[0]
    # equal objective vectors do not dominate each other: keep one of each
    _, first = np.unique(np.round(pts[keep], 9), axis=0, return_index=True)
    keep = keep[np.sort(first)]
    keep = keep[np.argsort(ttt[keep], kind="stable")]
    return Candidates({k: v[keep] for k, v in cols.items()}), ev.take(keep)


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """True for rows not dominated by any other row (all objectives minimised)."""
    n = len(points)
    if n == 0:
        return np.zeros(0, bool)
    order = np.lexsort(points.T[::-1])
    pts = points[order]
    keep = np.ones(n, bool)
    # block-wise dominance check: O(n^2 / block) memory-bounded
    for start in range(0, n, 2048):
        blk = pts[start:start + 2048]
        le = np.all(pts[None, :, :] <= blk[:, None, :], axis=2)
        lt = np.any(pts[None, :, :] < blk[:, None, :], axis=2)
        keep[start:start + len(blk)] = ~np.any(le & lt, axis=1)
    out = np.zeros(n, bool)
    out[order] = keep
    return out
