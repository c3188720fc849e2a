"""Layout: one way to lay a model over GPUs; Candidates: many layouts as numpy columns.

Rank order follows Megatron-Core (megatron/core/parallel_state.py, order "tp-cp-ep-dp-pp"):
tp innermost, then cp, then dp (ep is carved out of dp x cp for expert layers), then pp.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum

import numpy as np

from .errors import PlannerError

# activation recompute policies. "selective" is Megatron-Core's default module list (--recompute-modules
# core_attn; torchtitan's op-level SAC under its stack); "selective:<a>+<b>" recompute exactly those
# Megatron-Core modules (transformer_config.py recompute_modules): the sets Megatron-Bridge's
# performance recipes run (scripts/performance/configs/*/workload_base_configs.py, 25.11: DeepSeek-V3
# mla_up_proj [+ mlp], GPT-OSS layernorm + moe_act, DeepSeek-V3 GB300 moe_act)
RECOMPUTE_MODULES = {"none": (), "selective": ("core_attn",), "full": (),
                     "selective:mla_up_proj": ("mla_up_proj",), "selective:mla_up_proj+mlp": ("mla_up_proj", "mlp"),
                     "selective:moe_act": ("moe_act",), "selective:layernorm+moe_act": ("layernorm", "moe_act")}
RECOMPUTE = tuple(RECOMPUTE_MODULES)
SCHEDULES = ("1f1b", "interleaved", "zb-h1", "zbv", "dualpipe")
CP_COMM = ("p2p", "allgather", "a2a")
PRECISIONS = ("bf16", "fp8", "fp16")
ZERO_STAGES = (0, 1, 2, 3)



class _Coded(IntEnum):
    """A string-valued knob as the small integer code its candidate column holds."""

    @property
    def label(self) -> str:
        return self._labels()[self]

    @classmethod
    def of(cls, label: str) -> "_Coded":
        return cls(cls._labels().index(label))


class Schedule(_Coded):
    """Pipeline schedules (codes index SCHEDULES; planner/schedules.py gives each its bubble)."""
    ONE_F_ONE_B = 0
    INTERLEAVED = 1
    ZB_H1 = 2
    ZBV = 3
    DUALPIPE = 4

    @staticmethod
    def _labels():
        return SCHEDULES


class Recompute(_Coded):
    NONE = 0
    SELECTIVE = 1
    FULL = 2
    MLA_UP_PROJ = 3
    MLA_UP_PROJ_MLP = 4
    MOE_ACT = 5
    LAYERNORM_MOE_ACT = 6

    @property
    def modules(self) -> tuple:
        """Megatron-Core's --recompute-modules of a selective policy (() for none and full)."""
        return RECOMPUTE_MODULES[self.label]

    @property
    def reruns_core(self) -> bool:
        """Core attention runs again in backward (selective's core_attn, full): so does CP's K/V ring."""
        return self in (Recompute.SELECTIVE, Recompute.FULL)

    @classmethod
    def rows(cls, value) -> list:
        """[value(code) for every code]: a per-code option list (costmodel.knobs.by_code)."""
        return [value(c) for c in cls]

    @staticmethod
    def _labels():
        return RECOMPUTE


class CpComm(_Coded):
    P2P = 0
    ALLGATHER = 1
    A2A = 2

    @staticmethod
    def _labels():
        return CP_COMM


class Precision(_Coded):
    BF16 = 0
    FP8 = 1
    FP16 = 2

    @staticmethod
    def _labels():
        return PRECISIONS


# integer knobs held as int64 columns; string knobs are held as codes into the tuples above
INT_KNOBS = ("tp", "pp", "dp", "cp", "ep", "etp", "vpp", "micro_batch", "global_batch", "seq_len",
             "zero", "shard_group", "first_stage_layers", "last_stage_layers", "offload_layers")
BOOL_KNOBS = ("sp", "overlap_tp", "overlap_dp", "overlap_pp", "overlap_ep")
CODE_KNOBS = {"recompute": RECOMPUTE, "schedule": SCHEDULES, "cp_comm": CP_COMM,
              "precision": PRECISIONS}


@dataclass(frozen=True)
class Layout:
    """One training layout. Degrees multiply to the GPU count: tp*cp*dp*pp (ep and etp split
    the expert layers inside tp*cp*dp, as Megatron-Core does)."""
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    vpp: int = 1
    sp: bool = False
    micro_batch: int = 1
    global_batch: int = 1
    seq_len: int = 4096
    recompute: str = "none"
    zero: int = 1
    shard_group: int = 0          # ZeRO/FSDP shard group size; 0 = the whole DP group (HSDP if smaller)
    precision: str = "bf16"
    schedule: str = "1f1b"
    cp_comm: str = "p2p"
    first_stage_layers: int = 0   # 0 = even split (Megatron --decoder-first-pipeline-num-layers)
    last_stage_layers: int = 0    # 0 = even split (Megatron --decoder-last-pipeline-num-layers)
    overlap_tp: bool = True
    overlap_dp: bool = True
    overlap_pp: bool = True
    overlap_ep: bool = True       # EP all-to-all hidden behind another micro-batch's compute where
                                  # Megatron-Core accepts --overlap-moe-expert-parallel-comm
                                  # (costmodel.stages.ep_overlap_allowed: pp 1 or interleaved, no full recompute)
    offload_layers: int = 0       # layers whose activations go to host memory between forward and
                                  # backward (Megatron-Core --cpu-offloading --cpu-offloading-num-layers)

    def __post_init__(self):
        for n in INT_KNOBS:
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise PlannerError(f"layout: {n} must be an integer, got {v!r}")
            lo = 0 if n in ("shard_group", "first_stage_layers", "last_stage_layers", "zero", "offload_layers") else 1
            if v < lo:
                raise PlannerError(f"layout: {n} must be >= {lo}, got {v}")
        if self.zero not in ZERO_STAGES:
            raise PlannerError(f"layout: zero must be one of 0, 1, 2, 3, got {self.zero}")
        for n, valid in CODE_KNOBS.items():
            if getattr(self, n) not in valid:
                raise PlannerError(f"layout: {n} must be one of {', '.join(valid)}, got {getattr(self, n)!r}")
        if self.vpp > 1 and self.schedule == "1f1b":
            object.__setattr__(self, "schedule", "interleaved")
        if self.schedule == "interleaved" and self.vpp < 2:
            raise PlannerError("layout: the interleaved schedule needs vpp >= 2")
        if self.schedule != "interleaved" and self.vpp != 1:
            raise PlannerError(f"layout: vpp > 1 is only meaningful with the interleaved schedule, not {self.schedule}")

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def to_candidates(self) -> "Candidates":
        return Candidates.from_layouts([self])


class Candidates:
    """Many layouts as equal-length numpy columns (the cost model's input)."""

    __slots__ = ("cols", "deg_table", "deg_index", "rank_table", "rank_index")

    def __init__(self, cols: dict, deg_table: dict | None = None, deg_index=None, rank_table: dict | None = None,
                 rank_index=None):
        n = {len(v) for v in cols.values()}
        if len(n) > 1:
            raise ValueError(f"columns of unequal length: {n}")
        missing = set(INT_KNOBS) | set(BOOL_KNOBS) | set(CODE_KNOBS)
        missing -= set(cols)
        if missing:
            raise ValueError(f"candidate columns missing: {sorted(missing)}")
        self.cols = cols
        # optional: the small table of distinct per-layer rows (costmodel.LAYER_COLS: degrees,
        # micro-batch, sp, precision, cp_comm, ...) these candidates were crossed from, and each
        # candidate's row in it; the cost model computes per-layer terms once per table row
        self.deg_table = deg_table
        self.deg_index = deg_index
        # optional: the table of distinct (degrees, pipeline knobs, SP, ZeRO) rows the cost model's
        # per-rank phase reads (costmodel/ranks.py), and each candidate's row in it
        self.rank_table = rank_table
        self.rank_index = rank_index

    def __len__(self):
        return len(next(iter(self.cols.values())))

    def __getattr__(self, name):
        try:
            return self.cols[name]
        except KeyError:
            raise AttributeError(name) from None

    def take(self, idx) -> "Candidates":
        di = None if self.deg_index is None else self.deg_index[idx]
        ri = None if self.rank_index is None else self.rank_index[idx]
        return Candidates({k: v[idx] for k, v in self.cols.items()}, self.deg_table, di, self.rank_table, ri)

    @staticmethod
    def from_layouts(layouts) -> "Candidates":
        cols = {}
        for n in INT_KNOBS:
            cols[n] = np.array([getattr(l, n) for l in layouts], dtype=np.int64)
        for n in BOOL_KNOBS:
            cols[n] = np.array([bool(getattr(l, n)) for l in layouts], dtype=bool)
        for n, valid in CODE_KNOBS.items():
            cols[n] = np.array([valid.index(getattr(l, n)) for l in layouts], dtype=np.int8)
        return Candidates(cols)

    def layout(self, i: int) -> Layout:
        kw = {n: int(self.cols[n][i]) for n in INT_KNOBS}
        kw.update({n: bool(self.cols[n][i]) for n in BOOL_KNOBS})
        kw.update({n: valid[int(self.cols[n][i])] for n, valid in CODE_KNOBS.items()})
        return Layout(**kw)


LAYOUT_FIELDS = tuple(f.name for f in fields(Layout))
