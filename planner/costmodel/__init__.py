"""The analytical cost model: candidates (numpy columns) in, a typed Evaluation out.

One call scores every candidate in a handful of array operations, in named phases:
  1 compute (compute.py)      per-layer GEMM / attention / elementwise times and FLOPs
  2 communication (comm.py)   per-layer TP, CP, EP, PP traffic; data-parallel group coefficients
  3 activations               bytes each layer keeps per micro-batch, by recompute policy
  4 state (state.py)          parameters per pipeline rank and their DP traffic by ZeRO stage
  5 stages (stages.py)        per-rank sums over its layers, embedding and logits
  6 step (pipeline.py)        slowest stage, bubble, PP sends, exposed DP, optimizer
  7 memory (footprint.py)     per-rank memory, the peak rank
  8 headline (here)           step time, tokens/s, MFU, HFU
Phases 1-3 depend only on a small table of per-layer rows (terms.py, cached by the search);
4-8 combine them per candidate. Time is per training step (one global batch); memory is the
peak per GPU over pipeline ranks. step.py reads the same phases for one layout, per rank.
"""
from __future__ import annotations

import numpy as np

from .. import flops as F
from ..hardware import Cluster
from ..layout import Candidates
from ..model_spec import ModelSpec
from ..stacks import STACKS, Stack
from .footprint import MEMORY_TERMS, MemoryBreakdown, peak_memory
from .knobs import LAYER_COLS, StepKnobs
from .pipeline import TIME_TERMS, TimeBreakdown, compose_step, make_stage
from .records import Record, record
from .stages import stage_sums
from .ranks import RankCache
from .terms import LayerCache, Settings

__all__ = ["evaluate", "Evaluation", "Detail", "TimeBreakdown", "MemoryBreakdown", "TIME_TERMS",
           "MEMORY_TERMS", "LAYER_COLS", "LayerCache", "SearchCache", "Settings", "stages"]


@record
class Detail(Record):
    """What breakdowns and reports need beyond the ranking."""
    mfu: np.ndarray
    hfu: np.ndarray
    model_tflops_per_gpu: np.ndarray
    model_flops_step: np.ndarray
    hardware_flops_step: np.ndarray
    recompute_flops_step: np.ndarray
    micro_batches: np.ndarray
    peak_stage: np.ndarray     # the rank with the peak memory: 0 first, 1 middle, 2 last
    time: TimeBreakdown
    memory: MemoryBreakdown


@record
class Evaluation(Record):
    """Predictions, one value per candidate. `detail` is None when ranking only was asked for."""
    step_time_s: np.ndarray
    tokens_per_s_per_gpu: np.ndarray
    memory_bytes: np.ndarray
    feasible: np.ndarray       # fits, or is tight: within the memory model's uncertainty of HBM
    tight: np.ndarray          # over HBM as predicted, but within that uncertainty
    gpus: np.ndarray
    detail: Detail | None = None


def stages(lt, rt, k: StepKnobs, shared: bool, flops: bool, moe: bool, slowdown: float) -> list:
    """Phase 5 on phase 4's rank terms `rt`: [Stage of the first, a middle, the last pipeline rank];
    `slowdown`: compute lost per second of DP traffic hidden beside it (Efficiency.overlap_slowdown)."""
    split, only = rt.split, k.pp == 1
    spec = ((split.first, split.dense_first, True, only, rt.first), (split.mid, split.dense_mid, False, False, rt.mid),
            (split.last, split.dense_last, False, k.pp > 1, rt.last))
    if k.single_rank:       # no pipeline in any candidate: the first rank is every rank
        spec = spec[:1]
    out = [make_stage(stage_sums(lt, k, layers, ndense, first, last, flops, moe), rs.params, rs.dp,
                      k.overlap_dp & (not shared), slowdown) for layers, ndense, first, last, rs in spec]
    return out * 3 if k.single_rank else out


class SearchCache(LayerCache):
    """What a search computes once per table and gathers to its candidates: the layer rows'
    terms (phases 1-3) and the rank rows' terms (phase 4)."""

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.ranks = RankCache(settings)


def evaluate(model: ModelSpec, cluster: Cluster, c: Candidates, stack: Stack | None = None,
             moe_imbalance: float = 1.0, capacity_factor: float = 0.0, detail: bool = True,
             cache: SearchCache | None = None, fits_only: bool = False, pad_to_capacity: bool = False) -> Evaluation:
    """Score every candidate. detail=False returns only what ranking needs; the search re-scores
    the few it keeps with detail=True. `cache`: the search's SearchCache (same settings).
    fits_only (ranking only): memory first, then the step time of the candidates that fit (or are
    tight) alone; the others get an infinite step time -- a search never ranks them on it."""
    stack = stack or STACKS["megatron-core"]
    cache = cache or SearchCache(Settings(model, cluster, stack, moe_imbalance, capacity_factor,
                                          pad_to_capacity=pad_to_capacity))
    lt = cache.for_candidates(c)
    rt = cache.ranks.for_candidates(c, cache, lt)
    k = StepKnobs.of(c)
    mem, which = peak_memory(cluster, cache.settings.eb, stack, lt, k, rt, detail)
    mem_total = mem.total() if detail else mem
    hbm = cluster.gpu.hbm_bytes
    fits = mem_total <= hbm * (1 + stack.memory_uncertainty)
    ev = dict(memory_bytes=mem_total, feasible=fits, tight=mem_total > hbm, gpus=k.world)
    if fits_only and not detail and not fits.all():
        step = np.full(k.n, np.inf)
        idx = np.flatnonzero(fits)
        if len(idx):
            step[idx] = _step(model, cluster, stack, c.take(idx), cache, False)[0]
        return Evaluation(step_time_s=step, tokens_per_s_per_gpu=k.gb * k.s / step / k.world, **ev)
    tb, st = _step(model, cluster, stack, c, cache, detail, lt, rt, k)
    step = tb.total() if detail else tb
    ev.update(step_time_s=step, tokens_per_s_per_gpu=k.gb * k.s / step / k.world)
    if not detail:
        return Evaluation(**ev)
    return Evaluation(**ev, detail=_headline(model, lt, k, st, tb, mem, which, step))


def _step(model, cluster, stack, c, cache, detail, lt=None, rt=None, k=None) -> tuple:
    """Phases 5-6 of candidates `c`: (TimeBreakdown, or step seconds where not detail; stages)."""
    lt = lt if lt is not None else cache.for_candidates(c)
    rt = rt if rt is not None else cache.ranks.for_candidates(c, cache, lt)
    k = k if k is not None else StepKnobs.of(c)
    st = stages(lt, rt, k, cluster.gpu.shared_by > 1, detail, model.moe is not None,
                cluster.efficiency.overlap_slowdown)
    tb, _ = compose_step(lt, k, cluster, stack, rt.split, st, detail)
    return tb, st


def _headline(model, lt, k: StepKnobs, stages, tb, mem, which, step) -> Detail:
    """Phase 8: model FLOPs (MFU basis) and hardware FLOPs (with recompute) per step."""
    s, world, n = k.s, k.world, k.n
    if np.all(s == s.flat[0]):
        mflops_tok = F.model_flops_per_token(model, int(s.flat[0]), causal=True)
    else:   # mixed sequence lengths: per-candidate attention share
        base = F.model_flops_per_token(model, 1, causal=True)
        core1 = 3 * model.layers * F.attention_core_flops(model, 1.0, 1.0, True)
        mflops_tok = base - core1 + core1 * s * F.mean_attended(model, s)
    model_flops = mflops_tok * k.gb * s
    # hardware FLOPs per step summed over every GPU of every stage (tp*cp*dp GPUs per stage)
    first, mid, last = stages
    per_stage_gpus = k.tp * k.cp * k.dp * k.micro_batches
    mids = np.where(k.pp > 2, np.maximum(k.pp - 2, 0), 0.0)
    hw = (first.sums.flops + mid.sums.flops * mids + np.where(k.pp > 1, last.sums.flops, 0.0)) * per_stage_gpus
    rc = (first.sums.flops_rc + mid.sums.flops_rc * mids
          + np.where(k.pp > 1, last.sums.flops_rc, 0.0)) * per_stage_gpus
    peak = lt.compute.lin_peak
    # MFU against the dense peak of the precision the linear layers run in (PaLM, Chowdhery et al.
    # 2022 appendix B: model FLOPs over the peak of the hardware as used)
    return Detail(mfu=model_flops / step / world / peak, hfu=hw / step / world / peak,
                  model_tflops_per_gpu=model_flops / step / world / 1e12,
                  model_flops_step=model_flops * np.ones(n), hardware_flops_step=hw, recompute_flops_step=rc,
                  micro_batches=k.micro_batches, peak_stage=which, time=tb, memory=mem)
