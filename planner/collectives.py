"""Collective times on the alpha-beta model over the network levels a group spans.

A group of `size` ranks at rank stride `stride` (Megatron order, tp innermost) has
k_l = min(size, max(1, D_l // stride)) members inside one level-l domain of D_l GPUs. It uses
level 0 links if k_0 > 1 and level l >= 1 links if k_{l-1} < k_l (it spans several level-(l-1)
domains). Bandwidth terms follow the ring/tree analyses of Thakur, Rabenseifner & Gropp 2005
("Optimization of collective communication operations in MPICH", sec. 4) and NCCL's bus-bandwidth
definitions (nccl-tests doc/PERFORMANCE.md): all-reduce moves 2(n-1)/n of the buffer per rank,
all-gather and reduce-scatter (n-1)/n, all-to-all (n-1)/n. Across a scale-out level, the k
members of a group inside one lower domain drive k NICs at once (NCCL opens one channel per
NIC), so the ring bandwidth there is k * per-GPU bandwidth / oversubscription, capped by the
inner level.
A level calibrated per collective (`NetLevel.fits`, written by `python -m validate calibrate`)
times each op with its own fitted latency and bandwidth; otherwise every op uses the level's.
"""
from __future__ import annotations

import numpy as np

from .hardware import Cluster


def _members(cluster: Cluster, size, stride):
    """k_l for every level (list of arrays), last level = whole group."""
    size = np.asarray(size, dtype=np.float64)
    stride = np.asarray(stride, dtype=np.float64)
    ks = []
    for d in cluster.domain_sizes:
        if d == 0:
            ks.append(size)
        else:
            ks.append(np.minimum(size, np.maximum(1.0, np.floor(d / stride))))
    return ks


def _level_terms(cluster: Cluster, size, stride, op=None):
    """Per level: (uses, k_inner, k_here, bw, alpha, level) for collective `op`."""
    ks = _members(cluster, size, stride)
    eff = cluster.efficiency.network
    out = []
    prev = np.ones_like(ks[0])
    for lv, k in zip(cluster.levels, ks):
        uses = k > prev
        alpha, lbw = lv.params(op)
        bw = lbw * eff / lv.oversubscription
        out.append((uses, prev, k, bw, alpha, lv))
        prev = k
    return out


def gloo_rs_as_all_reduce(cluster: Cluster) -> bool:
    """On gloo (flat-ring levels) a reduce-scatter costs an all-reduce of its input: measured
    across two hosts, reduce_scatter_tensor took the all-reduce's time at 2 and at 8 ranks (and
    twice the all-gather's), so it is timed with the all-reduce's traffic and steps
    (validate/README.md, "Two hosts")."""
    return any(lv.algorithm == "flat-ring" for lv in cluster.levels)


def ring_bandwidth(cluster: Cluster, size, stride, op=None):
    """Per-rank bus bandwidth (bytes/s) a ring/tree collective of the group achieves."""
    bw = np.full(np.broadcast(np.asarray(size), np.asarray(stride)).shape, np.inf)
    for uses, k_in, k, lbw, _, lv in _level_terms(cluster, size, stride, op):
        if lv.algorithm == "mesh":
            # full mesh of D GPUs: a member reaches k-1 peers over (k-1)/(D-1) of its links
            d = max(lv.domain, 2)
            lvl = lbw * np.maximum(k - 1, 1) / (d - 1)
        else:
            lvl = lbw * k_in  # k_in lower-domain members pool their links (k_in = 1 at level 0)
        bw = np.where(uses, np.minimum(bw, lvl), bw)
    return bw


def _latency(cluster: Cluster, size, stride, steps_factor: float, op=None):
    lat = 0.0
    flat = 0.0
    for uses, k_in, k, _, alpha, lv in _level_terms(cluster, size, stride, op):
        if lv.algorithm == "flat-ring":
            # one ring of all k members: each of its k-1 steps per pass waits for the slowest hop,
            # which crosses the outermost level used (gloo/allreduce_ring.h); outer levels override
            flat = np.where(uses, steps_factor * np.maximum(k - 1.0, 0.0) * alpha, flat)
            continue
        hops = np.maximum(k / k_in - 1.0, 0.0)
        if lv.algorithm in ("tree", "nvls"):
            hops = np.ceil(np.log2(np.maximum(k / k_in, 1.0)))
        lat = lat + np.where(uses, steps_factor * hops * alpha, 0.0)
    return lat + flat


def all_reduce(cluster, nbytes, size, stride, op="all_reduce"):
    """Ring all-reduce of an nbytes buffer: 2(n-1)/n * S / busbw + 2(n-1) alpha (Thakur 2005)."""
    n = np.asarray(size, dtype=np.float64)
    t = 2.0 * (n - 1) / n * nbytes / ring_bandwidth(cluster, size, stride, op)
    return np.where(n > 1, t + _latency(cluster, size, stride, 2.0, op), 0.0)


def all_gather(cluster, nbytes, size, stride, op="all_gather"):
    """Ring all-gather producing an nbytes buffer: (n-1)/n * S / busbw + (n-1) alpha."""
    n = np.asarray(size, dtype=np.float64)
    t = (n - 1) / n * nbytes / ring_bandwidth(cluster, size, stride, op)
    return np.where(n > 1, t + _latency(cluster, size, stride, 1.0, op), 0.0)


def reduce_scatter(cluster, nbytes, size, stride):
    """Same traffic and steps as all-gather (Thakur 2005, sec. 4.3); its own fit when calibrated;
    an all-reduce's on gloo (gloo_rs_as_all_reduce)."""
    if gloo_rs_as_all_reduce(cluster):
        return all_reduce(cluster, nbytes, size, stride, "reduce_scatter")
    return all_gather(cluster, nbytes, size, stride, "reduce_scatter")


def all_to_all(cluster, nbytes, size, stride):
    """All-to-all of nbytes per rank: each rank sends S/n to each peer. Traffic to peers outside
    the lower domain leaves through the rank's own link of that level; levels run concurrently."""
    n = np.asarray(size, dtype=np.float64)
    t = 0.0
    lat = 0.0
    for uses, k_in, k, lbw, alpha, lv in _level_terms(cluster, size, stride, "all_to_all"):
        frac = (k - k_in) / n  # share of the buffer going to peers first reachable at this level
        if lv.algorithm == "mesh":
            lbw = lbw / max(lv.domain - 1, 1) * np.maximum(k - 1, 1)
        t = np.maximum(t, np.where(uses, frac * nbytes / lbw, 0.0))
        lat = np.maximum(lat, np.where(uses, alpha * np.maximum(k / k_in - 1, 0), 0.0))
    return np.where(n > 1, t + lat, 0.0)


def ring_step(cluster, nbytes, size, stride):
    """One step of a ring over `size` ranks at `stride` (ring attention's K/V pass): every rank
    sends to its neighbour at once and the step ends with the slowest hop, which crosses the
    outermost level the ring spans (Liu et al. 2023 'Ring Attention' sec. 3.1: each step is
    bounded by the inter-host link when the ring leaves a host)."""
    size = np.asarray(size, dtype=np.float64)
    stride = np.asarray(stride, dtype=np.float64)
    return p2p(cluster, nbytes, np.where(size > 1, (size - 1) * stride, stride))   # first-to-last distance


def p2p(cluster, nbytes, stride):
    """Send/recv of nbytes to the rank `stride` away: over the innermost level whose domain holds
    both ranks (first and last rank of a domain cross it; a stride below the domain stays in)."""
    stride = np.asarray(stride, dtype=np.float64)
    t = np.full(stride.shape, np.nan)
    for lv, d in zip(cluster.levels, cluster.domain_sizes):
        alpha, lbw = lv.params("send_recv")
        bw = lbw * cluster.efficiency.network / lv.oversubscription
        inside = (stride < d) if d else np.ones(stride.shape, bool)
        t = np.where(np.isnan(t) & inside, nbytes / bw + alpha, t)
    return t


class Group:
    """A parallel group (size, stride) on a cluster with its bus bandwidth and per-step latencies
    computed once per collective, so that every collective on it is two multiply-adds."""

    __slots__ = ("n", "bw", "lat", "share", "cluster", "size", "stride")

    OPS = (("ar", "all_reduce", 2.0), ("ag", "all_gather", 1.0), ("rs", "reduce_scatter", 1.0))

    def __init__(self, cluster: Cluster, size, stride, take=None):
        """`take`: optional index array; the group is computed on the (small) arrays given and
        then gathered to candidate length with it."""
        size = np.asarray(size, dtype=np.float64)
        stride = np.broadcast_to(np.asarray(stride, dtype=np.float64), size.shape)
        per_op = any(lv.fits for lv in cluster.levels)     # else every op shares the level's pair
        self.share = {key: share for key, _, share in self.OPS}
        if gloo_rs_as_all_reduce(cluster):
            self.share["rs"] = 2.0
        self.bw, self.lat = {}, {}
        for key, op, _ in self.OPS:
            o = op if per_op else None
            self.bw[key] = (ring_bandwidth(cluster, size, stride, o) + np.zeros_like(size)
                            if per_op or key == "ar" else self.bw["ar"])
            self.lat[key] = _latency(cluster, size, stride, self.share[key], o) + np.zeros_like(size)
        if take is not None:
            size, stride = size[take], stride[take]
            self.bw = {k: v[take] for k, v in self.bw.items()}
            self.lat = {k: v[take] for k, v in self.lat.items()}
        self.cluster, self.size, self.stride, self.n = cluster, size, stride, size

    def _time(self, key, share, nbytes):
        n = self.n
        return np.where(n > 1, share * (n - 1) / n * nbytes / self.bw[key] + self.lat[key], 0.0)

    def all_reduce(self, nbytes):
        return self._time("ar", self.share["ar"], nbytes)

    def all_gather(self, nbytes):
        return self._time("ag", self.share["ag"], nbytes)

    def reduce_scatter(self, nbytes):
        return self._time("rs", self.share["rs"], nbytes)

    def all_to_all(self, nbytes):
        return all_to_all(self.cluster, nbytes, self.size, self.stride)

    def coefficients(self, keys=("ar", "ag", "rs")) -> dict:
        """Time = a * bytes + b for all-reduce (ar), all-gather (ag) and reduce-scatter (rs), zero
        for a group of one: lets callers gather a few arrays instead of recomputing the group."""
        n = self.n
        one = n <= 1
        out = {}
        for key, _, _ in self.OPS:
            if key not in keys:
                continue
            share = self.share[key]
            out[f"a_{key}"] = np.where(one, 0.0, share * (n - 1) / n / self.bw[key])
            out[f"b_{key}"] = np.where(one, 0.0, self.lat[key])
        return out
