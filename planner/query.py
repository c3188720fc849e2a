"""A search's inputs, checked and completed once: defaults (sequence length, global batch,
precisions), the GPU counts of a range, and one-line refusals of numbers the model cannot use."""
from __future__ import annotations

import math

import numpy as np

from .errors import PlannerError
from .hardware import Cluster
from .layout import INT_KNOBS
from .model_spec import ModelSpec
from . import rules
from .rules import MAX_GPUS, Context
from .stacks import STACKS, Stack, get_stack
from .frozen import frozen

OBJECTIVES = ("throughput", "cost", "time")
MAX_TOP = 10_000             # plans one search returns with breakdowns
MAX_INT = 1 << 53            # integers the float64 cost model represents exactly
DEFAULT_SEQ_LEN = 4096
DEFAULT_BATCH_TOKENS = 4 * 1024 * 1024   # default global batch: 4Mi tokens (GPT-3's 3.2M, Llama-3's 4M-16M)


def default_global_batch(seq_len: int, gpus: int = 1) -> int:
    """4Mi tokens, or one sequence per 8 GPUs if that is more, rounded up to a power of two
    (Llama 3 405B: 2,048 x 8K sequences = 16M tokens on 16K GPUs, Dubey et al. 2024 sec. 3.3)."""
    gb = max(1, DEFAULT_BATCH_TOKENS // seq_len, -(-gpus // 8))
    return 1 << (gb - 1).bit_length()


@frozen
class Query:
    model: ModelSpec
    cluster: Cluster
    stack: Stack
    counts: tuple                    # GPU counts searched (one, or the counts of a range)
    seq_len: int
    global_batch: int
    fixed: dict                      # knob -> value, or a list of values to search
    overlap: dict
    top: int = 10
    objective: str = "throughput"
    tokens: float | None = None
    price: float | None = None
    moe_imbalance: float = 1.0
    capacity_factor: float = 0.0
    gpus_text: str = ""
    pad_to_capacity: bool = False    # experts padded to capacity (Megatron --moe-pad-expert-input-to-capacity)

    def context(self, gpus: int) -> Context:
        return Context(self.model, gpus, self.seq_len, self.global_batch, self.stack,
                       *rules.hardware_facts(self.cluster))

    @property
    def single(self) -> bool:
        return len(self.counts) == 1


def make_query(model, cluster, gpus, seq_len=None, global_batch=None, fixed=None, top=10,
               objective="throughput", precisions=None, stack=None, tokens=None, price=None, overlap=None,
               moe_imbalance=1.0, capacity_factor=0.0, pad_to_capacity=False) -> Query:
    """Check every input (one-line PlannerError) and fill in the defaults."""
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    if objective not in OBJECTIVES:
        raise PlannerError(f"unknown objective '{objective}'; valid: {', '.join(OBJECTIVES)}")
    _check_inputs(model, seq_len, global_batch, fixed, top, tokens, price, moe_imbalance, capacity_factor)
    if pad_to_capacity and not capacity_factor:
        raise PlannerError("--pad-to-capacity pads each expert's input to its capacity and needs "
                           "--capacity-factor > 0")
    stack = get_stack(stack) if isinstance(stack, str) else (stack or STACKS["megatron-core"])
    counts = gpu_counts(gpus, cluster)
    seq_len = seq_len or model.seq_len or DEFAULT_SEQ_LEN
    global_batch = global_batch or default_global_batch(seq_len, max(counts))
    if precisions is None:
        precisions = [p for p in ("bf16", "fp8") if p in cluster.gpu.peak_flops]
    fixed.setdefault("precision", list(precisions))
    return Query(model, cluster, stack, tuple(counts), seq_len, global_batch, fixed, dict(overlap or {}), top,
                 objective, tokens, price, moe_imbalance, capacity_factor,
                 str(gpus) if isinstance(gpus, (int, np.integer)) else "-".join(map(str, gpus)),
                 bool(pad_to_capacity))


def _check_int(name: str, v, lo: int = 1, hi: int = MAX_INT) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise PlannerError(f"{name} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise PlannerError(f"{name} must be between {lo} and {hi:,}, got {v}")


def _check_inputs(model, seq_len, global_batch, fixed, top, tokens, price, moe_imbalance, capacity_factor):
    """Refuse, in one line, numbers the search cannot represent or that make no sense (they would
    overflow int64 columns or give inf/NaN predictions)."""
    for name, v in (("--seq-len", seq_len), ("--global-batch", global_batch)):
        if v is not None:
            _check_int(name, v)
    _check_int("--top", top, 1, MAX_TOP)
    zero_ok = ("zero", "shard_group", "first_stage_layers", "last_stage_layers", "offload_layers")
    for k in INT_KNOBS:
        for v in (fixed[k] if isinstance(fixed.get(k), (list, tuple)) else [fixed.get(k)]):
            if v is not None:
                _check_int(f"--{k.replace('_', '-')}", v, 0 if k in zero_ok else 1)
    for name, v, lo in (("--tokens", tokens, 0.0), ("--price", price, 0.0), ("--moe-imbalance", moe_imbalance, 1.0),
                        ("--capacity-factor", capacity_factor, 0.0)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float, np.number))
                              or not math.isfinite(v) or v < lo):
            raise PlannerError(f"{name} must be a finite number >= {lo:g}, got {v!r}")
    for name, v, neutral in (("--moe-imbalance", moe_imbalance, 1.0), ("--capacity-factor", capacity_factor, 0.0)):
        if model.moe is None and v is not None and v != neutral:
            raise PlannerError(f"{name} applies to mixture-of-experts models; {model.name} has no experts")
    if model.moe and moe_imbalance > model.moe.experts / model.moe.top_k:
        # all tokens on one expert: load experts/top_k times the mean, the most there can be
        raise PlannerError(f"--moe-imbalance {moe_imbalance:g} is more than {model.name} allows: at most "
                           f"experts / top_k = {model.moe.experts / model.moe.top_k:g} (every token on one expert)")


def gpu_counts(gpus, cluster: Cluster) -> list:
    """A single count, or for a (lo, hi) range the counts clusters are allocated in: the ends of
    the range, powers of two, and the innermost domain size times powers of two (e.g. 72 x 2^k
    on NVL72) that lie in it."""
    if isinstance(gpus, (int, np.integer)) and not isinstance(gpus, bool):
        if gpus < 1:
            raise PlannerError(f"--gpus must be >= 1, got {gpus}")
        if gpus > MAX_GPUS:
            raise PlannerError(f"--gpus {gpus} is more than the planner searches (at most {MAX_GPUS:,})")
        return [int(gpus)]
    try:
        lo, hi = (x for x in gpus)
    except (TypeError, ValueError):
        raise PlannerError(f"--gpus must be a count or a (LO, HI) range, got {gpus!r}") from None
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise PlannerError(f"--gpus range ends must be integers, got {gpus!r}")
    lo, hi = int(lo), int(hi)
    if lo < 1 or hi < lo:
        raise PlannerError(f"--gpus range must be LO-HI with 1 <= LO <= HI, got {lo}-{hi}")
    if hi > MAX_GPUS:
        raise PlannerError(f"--gpus range {lo}-{hi} goes beyond what the planner searches (at most {MAX_GPUS:,})")
    dom = next((d for d in cluster.domain_sizes if d), 8)
    out = {lo, hi}
    for base in {1, dom}:
        k = base
        while k <= hi:
            if k >= lo:
                out.add(k)
            k *= 2
    return sorted(out)
