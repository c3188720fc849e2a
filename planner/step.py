"""One model of a step, per rank: the FLOPs, state bytes, collectives and saved activations of
every pipeline rank of one layout, read from the cost model's own phases (planner/costmodel:
the per-layer terms of phases 1-3, stage_params and dp_flows of phase 4, traffic.py's flows).
This is what `python -m validate` holds a real run against; there is no second derivation.

FLOPs are the cost model's: GEMMs 2mnk, core attention as executed (causal, split over tp x cp),
backward 2x GEMMs and 2.5x core (FlashAttention-2), recompute the replayed forward. Collective
bytes follow traffic.py; calls and bytes are per step."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import rules
from .costmodel import LayerCache, Settings
from .costmodel import traffic as X
from .costmodel.compute import ATTN_BWD_FACTOR
from .costmodel.elements import ElementBytes, with_grads_of
from .costmodel.footprint import model_states
from .costmodel.knobs import LayerKnobs, StepKnobs
from .costmodel.shapes import DIM0
from .costmodel.state import dp_flows, stage_params
from .layout import Layout, Precision, Recompute
from .model_spec import ModelSpec
from .stacks import STACKS, Stack


@dataclass
class RankCounts:
    """One pipeline rank's step (every rank of a stage holds the same, except routed-token terms
    with expert parallelism, where the expert group's mean is predicted)."""
    stage: int
    chunks: list                                       # layer indices of each virtual stage held
    layers: list
    moe_layers: list
    flops: dict = field(default_factory=dict)          # forward / backward / recompute
    attention_flops: dict = field(default_factory=dict)  # of which core attention
    state: dict = field(default_factory=dict)          # weights / gradients / optimizer bytes (shard rank 0)
    # ZeRO-3 under FSDP2: the optimizer bytes of each rank of the shard group (the last ranks
    # hold fewer rows of each dim-0 chunk, costmodel/shapes.py); empty otherwise
    optimizer_by_shard_rank: list = field(default_factory=list)
    params: dict = field(default_factory=dict)         # dense / expert elements
    collectives: dict = field(default_factory=dict)    # (label, kind) -> {"calls", "bytes"}
    activations: dict = field(default_factory=dict)    # layer -> bytes per micro-batch

    def add(self, flows, times=1.0) -> None:
        for f in flows:
            calls = float(np.asarray(f.calls).ravel()[0]) * times
            if calls <= 0:
                continue
            d = self.collectives.setdefault((f.label, f.kind), {"calls": 0.0, "bytes": 0.0})
            d["calls"] += calls
            d["bytes"] += calls * float(np.asarray(f.nbytes).ravel()[0])


def virtual_stages(model: ModelSpec, layout: Layout) -> list:
    """Layer indices of each virtual stage, in order: every rank's layers (rules.stage_layers)
    spread over its vpp chunks as evenly as they go, rank r holding stages r, r + pp, ..."""
    pp, v = layout.pp, layout.vpp
    first, mid, last = (int(np.asarray(x).ravel()[0]) for x in rules.stage_layers(
        model.layers, pp, layout.first_stage_layers, layout.last_stage_layers))
    per_rank = [first] + [mid] * (pp - 2) + ([last] if pp > 1 else [])
    sizes = [[n // v + (i < n % v) for i in range(v)] for n in per_rank]
    out, nxt = [], 0
    for i in range(v):
        for r in range(pp):
            out.append(list(range(nxt, nxt + sizes[r][i])))
            nxt += sizes[r][i]
    return out


def predict(model: ModelSpec, layout: Layout, stack: Stack | None = None, elements: ElementBytes | None = None,
            cluster=None, moe_imbalance: float = 1.0, capacity_factor: float = 0.0,
            pad_to_capacity: bool = False) -> list:
    """RankCounts of every pipeline rank (index = pp rank) of a valid layout."""
    stack = stack or STACKS["megatron-core"]
    rules.check_layout(layout, rules.context_for(model, layout, stack, cluster))
    if cluster is None:
        from .profiles import load_hardware
        cluster = load_hardware("h100-sxm")        # terms read here do not depend on the hardware
    settings = Settings(model, cluster, stack, moe_imbalance, capacity_factor, elements, pad_to_capacity)
    c = layout.to_candidates()
    lt = LayerCache(settings).for_candidates(c)
    lk, k = LayerKnobs.of(c.cols), StepKnobs.of(c)
    vs = virtual_stages(model, layout)
    return [_rank(model, layout, settings, lt, lk, k, r, vs[r::layout.pp]) for r in range(layout.pp)]


def _rank(model, L: Layout, st: Settings, lt, lk, k, r: int, chunks) -> RankCounts:
    nd = model.dense_layers
    layers = [i for ch in chunks for i in ch]
    rc = RankCounts(stage=r, chunks=chunks, layers=layers, moe_layers=[i for i in layers if i >= nd])
    first, last = r == 0, r == L.pp - 1
    nmb = L.global_batch // (L.dp * L.micro_batch)
    eb = with_grads_of(st.eb, st.stack, k.precision == Precision.FP16)
    _flops(rc, lt, L, nmb, len(layers), len(rc.moe_layers), last, st.stack.selective)
    nl, nd_ = np.array([float(len(layers))]), np.array([float(len(layers) - len(rc.moe_layers))])
    shards, rule = (lt.groups.shard, lt.groups.eshard), st.stack.zero3_padding
    prm = stage_params(model, k, nl, nd_, np.array([first]), np.array([last]), shards, rule)
    rc.params = {"dense": float(prm.dense[0]), "expert": float(prm.expert[0])}
    w, g, o = model_states(prm, lt.groups, k.zero, eb)
    rc.state = {"weights": float(w[0]), "gradients": float(g[0]), "optimizer": float(o[0])}
    if L.zero == 3 and rule == DIM0:
        rc.optimizer_by_shard_rank = [
            float(model_states(stage_params(model, k, nl, nd_, np.array([first]), np.array([last]), shards, rule, i),
                               lt.groups, k.zero, eb)[2][0]) for i in range(int(lt.groups.shard[0]))]
    _layer_collectives(rc, model, eb, lk, L, nmb, st.routed_load(lk), first, last)
    dp = dp_flows(model, lt.groups, k, st.stack, eb, prm, np.array([float(len(layers))]),
                  np.array([float(len(rc.moe_layers))]), np.array([first]), np.array([last]))
    rc.add([f for f, _ in dp.per_step])
    rc.add([f for f, _ in dp.per_mb_f + dp.per_mb_b + dp.serial], nmb)
    rec = Recompute.of(L.recompute)
    for i in layers:
        rows = lt.acts.moe if i >= nd else lt.acts.dense
        rc.activations[i] = float(rows[rec][0])
    return rc


def _flops(rc: RankCounts, lt, L: Layout, nmb: int, nl: int, nmoe: int, last: bool, selective: str) -> None:
    """Forward, backward and recompute FLOPs of the rank per step (stages.stage_sums' terms)."""
    c = lt.compute
    g = float((nl - nmoe) * c.gemm_flops_dense[0] + nmoe * c.gemm_flops_moe[0])
    a = float(nl * c.core_flops[0])
    lg = float(c.logits_flops[0]) if last else 0.0
    rec = L.recompute
    rc.flops = {"forward": nmb * (g + a + lg), "backward": nmb * (2 * (g + lg) + ATTN_BWD_FACTOR * a)}
    rc.attention_flops = {"forward": nmb * a, "backward": nmb * ATTN_BWD_FACTOR * a}
    if rec != "none":      # the cost model's recompute terms (compute._recompute)
        code = Recompute.of(rec)
        rc.flops["recompute"] = nmb * float((nl - nmoe) * c.fl_rc_dense[code][0] + nmoe * c.fl_rc_moe[code][0])
        # op-level SAC saves the SDPA outputs, and a module list without core_attn keeps them
        reruns = code.reruns_core and not (code == Recompute.SELECTIVE and selective == "op")
        rc.attention_flops["recompute"] = nmb * a if reruns else 0.0


def _layer_collectives(rc: RankCounts, model, eb, lk, L: Layout, nmb, imb, first, last) -> None:
    """TP, CP, EP traffic of the rank's layers, its embedding/logits, and its pipeline sends."""
    full = L.recompute == "full"
    ndense, nmoe = len(rc.layers) - len(rc.moe_layers), len(rc.moe_layers)
    passes = 2 + full                                # forward, backward, forward again under full recompute
    rc.add(X.tp_layer(model, lk, eb, False), ndense * passes * nmb)
    rc.add(X.tp_layer(model, lk, eb, True), nmoe * passes * nmb)
    core_again = Recompute.of(L.recompute).reruns_core   # core attention re-run: its K/V ring again
    rc.add(X.cp_layer(model, lk, eb, False), len(rc.layers) * (1 + core_again) * nmb)
    rc.add(X.cp_layer(model, lk, eb, True), len(rc.layers) * nmb)
    rc.add(X.ep_layer(model, lk, eb, imb, True), nmoe * (1 + full) * nmb)
    rc.add(X.ep_layer(model, lk, eb, imb, False), nmoe * nmb)
    if first:
        rc.add(X.tp_edges(model, lk, eb, True), nmb)
    if last:
        rc.add(X.tp_edges(model, lk, eb, False), nmb)
    if L.pp > 1:
        sends, recvs = X.pp_boundaries(rc.stage, L.pp, L.vpp)
        nbytes = X.p2p_bytes(model, lk, eb)
        rc.add([X.Flow("pp", "send", sends, nbytes), X.Flow("pp", "recv", recvs, nbytes)], nmb)


@dataclass(frozen=True)
class RankMemory:
    """One pipeline rank's predicted memory: which rank (pp coordinate), the layers it holds
    (dense ones lead), the micro-batches its schedule keeps in flight, bytes by MEMORY_TERMS."""
    stage: int
    layers: int
    dense_layers: int
    inflight: int
    first: bool
    last: bool
    breakdown: dict

    @property
    def allocated(self) -> float:
        return sum(v for k, v in self.breakdown.items() if k not in ("fragmentation", "reserved"))


def memory_by_rank(model: ModelSpec, cluster, layout: Layout, stack: Stack | None = None) -> list:
    """The first, a middle and the last pipeline rank's predicted memory (the ranks the cost
    model's memory phase scores; one entry without a pipeline, two with pp = 2)."""
    from .costmodel import SearchCache
    from .costmodel.footprint import MEMORY_TERMS, rank_breakdowns
    stack = stack or STACKS["megatron-core"]
    rules.check_layout(layout, rules.context_for(model, layout, stack, cluster))
    cache = SearchCache(Settings(model, cluster, stack, 1.0, 0.0))
    c = layout.to_candidates()
    lt = cache.for_candidates(c)
    rt = cache.ranks.for_candidates(c, cache, lt)
    k = StepKnobs.of(c)
    split = rt.split
    pp = layout.pp
    coords = [0, 1, pp - 1][: 1 if pp == 1 else (2 if pp == 2 else 3)]
    counts = [(split.first, split.dense_first), (split.mid, split.dense_mid), (split.last, split.dense_last)]
    ranks = rank_breakdowns(cluster, cache.settings.eb, stack, lt, k, rt, True)
    if pp == 2:
        ranks, counts = [ranks[0], ranks[2]], [counts[0], counts[2]]
    out = []
    for coord, (mb, infl), (n, nd) in zip(coords, ranks, counts):
        out.append(RankMemory(stage=coord, layers=int(n[0]), dense_layers=int(nd[0]), inflight=int(infl[0]),
                              first=coord == 0, last=coord == pp - 1,
                              breakdown={t: float(getattr(mb, t)[0]) for t in MEMORY_TERMS}))
    return out
