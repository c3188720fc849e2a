"""Fits of calibration measurements to the planner's parameters (numpy only, no torch).

- alpha-beta: t = alpha + beta * bytes, weighted least squares on relative error (points span
  four or more decades of size, so an unweighted fit would ignore the small ones);
- the planner's collective model for one network level: t = latency * steps(op, n) +
  bytes * traffic(op, n) / bandwidth (planner/collectives.py: ring all-reduce 2(n-1) steps and
  2(n-1)/n of the buffer, all-gather / reduce-scatter / all-to-all n-1 steps and (n-1)/n,
  send/recv one step and the whole message): bandwidth from the largest messages' slope, latency
  by the same least squares (fit_level);
- GEMM efficiency: rate = peak * gemm_max * x / (x + gemm_half_dim), x = min(m, n, k)
  (planner/hardware.py Efficiency), least squares on log rate;
- attention: forward + backward time = 3.5 * causal forward FLOPs / (peak * attention_max)
  (the planner's flash-attention backward is 2.5x the forward, planner/costmodel.py);
- memory bandwidth: best streaming rate and the mean fraction of it the elementwise kernels reach;
- host overhead: a tiny model's step at two layer counts; the difference per layer over the
  planner's kernel count per dense layer (16 forward + 32 backward) is the per-kernel cost.

Every fit returns its parameters and its residuals (relative: (model - measured) / measured).
"""
from __future__ import annotations

import math

import numpy as np

KERNELS_PER_DENSE_LAYER = 48     # planner/costmodel.py KERNELS_DENSE_FWD = 16 forward, backward twice that
ATTN_FWD_BWD = 3.5               # forward + backward = (1 + 2.5) x forward (costmodel ATTN_BWD_FACTOR)


def _stats(res) -> dict:
    r = np.abs(np.asarray(res, dtype=float))
    if not len(r):
        return {"n": 0}
    return {"n": int(len(r)), "median_abs_rel": float(np.median(r)), "max_abs_rel": float(r.max()),
            "rms_rel": float(np.sqrt(np.mean(r ** 2)))}


def _wls(A: np.ndarray, t: np.ndarray, nonneg=True) -> np.ndarray:
    """min sum(((A x - t) / t)^2), x >= 0 (by dropping a column that comes out negative)."""
    w = 1.0 / t
    cols = list(range(A.shape[1]))
    while True:
        x_sub, *_ = np.linalg.lstsq(A[:, cols] * w[:, None], np.ones_like(t), rcond=None)
        x = np.zeros(A.shape[1])
        x[cols] = x_sub
        if not nonneg or (x >= 0).all() or len(cols) == 1:
            return np.maximum(x, 0.0) if nonneg else x
        cols.remove(cols[int(np.argmin(x_sub))])


def fit_alpha_beta(nbytes, seconds) -> dict:
    """t = alpha + beta * bytes (alpha: latency s, beta: s/byte). Residuals relative."""
    S = np.asarray(nbytes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    if len(S) < 2:
        raise ValueError("an alpha-beta fit needs at least two points")
    a, b = _wls(np.stack([np.ones_like(S), S], 1), t)
    res = (a + b * S - t) / t
    return {"alpha_s": float(a), "beta_s_per_byte": float(b),
            "bandwidth_bytes_per_s": (1.0 / b) if b > 0 else math.inf,
            "residuals": [float(x) for x in res], **_stats(res)}


def planner_terms(op: str, n: int):
    """(latency steps, share of the buffer moved per rank) of the planner's ring model."""
    if n <= 1:
        return 0.0, 0.0
    if op == "all_reduce":
        return 2.0 * (n - 1), 2.0 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return float(n - 1), (n - 1) / n
    if op == "send_recv":
        return 1.0, 1.0
    raise ValueError(op)


def level_terms(op: str, n: int, pool: int = 1, gloo: bool = False):
    """(latency steps, share of the buffer per unit of the level's per-rank bandwidth) of the
    planner's formula for a group of n with `pool` members per lower-level domain, whose links a
    ring pools (planner/collectives.ring_bandwidth: k_in x bandwidth). On gloo a reduce-scatter
    is timed as an all-reduce (planner/collectives.gloo_rs_as_all_reduce)."""
    steps, share = planner_terms("all_reduce" if (gloo and op == "reduce_scatter") else op, n)
    return steps, share / pool


def _large_message_slope(A, t, series) -> float | None:
    """Seconds per unit of planner traffic where bandwidth dominates: the median over series (op,
    group, pool) of the slope between each one's two largest messages (Hockney 1994, 'The
    communication challenge for MPP': the asymptotic rate from long messages). A least squares on
    relative error over four decades of size is set by the small, latency-bound messages and read
    the bandwidth of a 1 Gbit/s link 20% high for the 16 MiB collectives a training step moves."""
    slopes = []
    for key in dict.fromkeys(series):
        idx = [i for i, k in enumerate(series) if k == key]
        idx.sort(key=lambda i: A[i, 1])
        if len(idx) >= 2 and A[idx[-1], 1] > A[idx[-2], 1]:
            slopes.append((t[idx[-1]] - t[idx[-2]]) / (A[idx[-1], 1] - A[idx[-2], 1]))
    slopes = [x for x in slopes if x > 0]
    return float(np.median(slopes)) if slopes else None


def fit_level(points, gloo: bool = False) -> dict:
    """One level's (latency, bandwidth) under the planner's collective formulas over points
    [(op, group size, bytes, seconds[, pool])]; residuals per op. `pool`: members of the group
    inside one lower-level domain (level_terms); 1 when each host holds one member. Bandwidth from
    the large messages (_large_message_slope), then latency by least squares on relative error
    over every point; both by that least squares where no series has two sizes."""
    rows, t, ops, series = [], [], [], []
    for op, n, S, sec, *pool in points:
        steps, share = level_terms(op, n, pool[0] if pool else 1, gloo)
        rows.append((steps, S * share))
        t.append(sec)
        ops.append(op)
        series.append((op, n, pool[0] if pool else 1))
    A, t = np.asarray(rows, dtype=float), np.asarray(t, dtype=float)
    inv_bw = _large_message_slope(A, t, series)
    if inv_bw is None:
        lat, inv_bw = _wls(A, t)
    else:
        # min sum(((steps lat + x inv_bw - t) / t)^2) over lat >= 0
        w2, r = 1.0 / t ** 2, t - A[:, 1] * inv_bw
        lat = max(float(np.sum(w2 * A[:, 0] * r) / np.sum(w2 * A[:, 0] ** 2)), 0.0) if A[:, 0].any() else 0.0
    res = (A @ np.array([lat, inv_bw]) - t) / t
    per_op = {}
    for op in dict.fromkeys(ops):
        sel = [i for i, o in enumerate(ops) if o == op]
        per_op[op] = _stats(res[sel])
        per_op[op]["mean_rel"] = float(np.mean(res[sel]))
    return {"latency_s": float(lat), "bandwidth_bytes_per_s": (1.0 / inv_bw) if inv_bw > 0 else math.inf,
            "residuals": [float(x) for x in res], "by_op": per_op, **_stats(res)}


def per_op_planner_params(op: str, n: int, ab: dict, pool: int = 1, gloo: bool = False) -> dict:
    """An op's own alpha-beta fit expressed as the planner's per-step latency and bandwidth (per
    member link, level_terms)."""
    steps, share = level_terms(op, n, pool, gloo)
    return {"latency_s": ab["alpha_s"] / steps if steps else 0.0,
            "bandwidth_bytes_per_s": (share / ab["beta_s_per_byte"]) if ab["beta_s_per_byte"] > 0
            else math.inf}


def fit_gemm(points, peak: float, half_dim: float | None = None) -> dict:
    """points [(m, n, k, seconds)]; peak FLOP/s. Fits gemm_max in (0, 1], gemm_half_dim >= 0 and
    a per-call host cost c >= 0 of

        t = 2mnk / (peak * gemm_max * x / (x + half_dim)) + c,    x = min(m, n, k),

    weighted least squares on relative error (half_dim given: only gemm_max and c). The per-call
    cost is reported, not written to the profile: the planner charges host time per kernel
    separately (kernel_overhead), so the curve must describe the arithmetic alone."""
    x = np.array([min(m, n, k) for m, n, k, _ in points], dtype=float)
    F = np.array([2.0 * m * n * k for m, n, k, _ in points], dtype=float)
    t = np.array([p[3] for p in points], dtype=float)

    def solve(h):
        # t = u * F (x + h) / (x peak) + c, u = 1 / gemm_max >= 1
        A = np.stack([F * (x + h) / (x * peak), np.ones_like(t)], 1)
        u, c = _wls(A, t)
        if u < 1.0:               # gemm_max <= 1: refit c with u held at 1
            u = 1.0
            c = max(float(np.sum((t - A[:, 0]) / t ** 2) / np.sum(1.0 / t ** 2)), 0.0)
        res = (A @ np.array([u, c]) - t) / t
        return u, c, float(np.sum(res ** 2)), res

    if half_dim is None:
        grid = np.concatenate([[0.0], np.geomspace(0.01, 1e5, 300)])
        errs = [solve(h)[2] for h in grid]
        i = int(np.argmin(errs))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        for _ in range(60):                   # golden-section refinement around the grid minimum
            a = lo + (hi - lo) * 0.382
            b = lo + (hi - lo) * 0.618
            if solve(a)[2] <= solve(b)[2]:
                hi = b
            else:
                lo = a
        h = (lo + hi) / 2
        if solve(h)[2] > errs[i]:
            h = grid[i]
    else:
        h = float(half_dim)
    u, c, _, res = solve(h)
    return {"gemm_max": 1.0 / u, "gemm_half_dim": float(h), "per_call_s": float(c),
            "peak_flops": float(peak), "residuals": [float(v) for v in res], **_stats(res)}


def fit_attention(points, peak: float) -> dict:
    """points [(causal forward FLOPs, fwd+bwd seconds)]: the attention_max that minimises the
    squared relative error of t = 3.5 * F / (peak * eff)."""
    c = np.array([ATTN_FWD_BWD * f / peak for f, _ in points], dtype=float)
    t = np.array([s for _, s in points], dtype=float)
    # minimise sum((c_i * u - t_i) / t_i)^2 over u = 1 / eff
    u = float(np.sum(c / t) / np.sum((c / t) ** 2))
    eff = 1.0 / u
    res = (c * u - t) / t
    return {"attention_max": eff, "peak_flops": float(peak),
            "residuals": [float(v) for v in res], **_stats(res)}


def fit_memory(points) -> dict:
    """points [(op, bytes moved, seconds)]: best streaming bandwidth and the mean fraction of it."""
    bw = np.array([b / s for _, b, s in points], dtype=float)
    best = float(bw.max())
    frac = float(np.mean(bw / best))
    res = (best * frac - bw) / bw
    return {"bandwidth_bytes_per_s": best, "efficiency": frac,
            "residuals": [float(v) for v in res], **_stats(res)}


def fit_overhead(t_by_layers: dict) -> dict:
    """{layers: step seconds} of the tiny probe model: per-kernel and per-step host overhead."""
    ls = sorted(t_by_layers)
    if len(ls) < 2:
        raise ValueError("the overhead fit needs two layer counts")
    lo, hi = ls[0], ls[-1]
    per_layer = max((t_by_layers[hi] - t_by_layers[lo]) / (hi - lo), 0.0)
    step = max(t_by_layers[lo] - lo * per_layer, 0.0)
    pred = {L: step + L * per_layer for L in ls}
    res = [(pred[L] - t_by_layers[L]) / t_by_layers[L] for L in ls]
    return {"per_layer_s": per_layer, "kernel_overhead_s": per_layer / KERNELS_PER_DENSE_LAYER,
            "step_overhead_s": step, "residuals": res, **_stats(res)}
