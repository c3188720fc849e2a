"""What a prediction returns: Plan (one layout with its figures and named breakdowns),
SearchResult (a ranked search), their flat row and DataFrame forms. Engine, report, explain,
plots and the CLI import these from here."""
from __future__ import annotations

from dataclasses import dataclass, field

from .costmodel import MEMORY_TERMS, TIME_TERMS, Evaluation
from .layout import LAYOUT_FIELDS, Candidates, Layout
from .units import GiB


@dataclass(frozen=True)
class Plan:
    """One evaluated layout with its predictions and named breakdowns."""
    layout: Layout
    gpus: int
    step_time_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    model_tflops_per_gpu: float
    memory_gib: float
    feasible: bool
    time_breakdown_s: dict
    memory_breakdown_gib: dict
    hbm_gib: float
    time_to_train_s: float | None = None
    cost_usd: float | None = None
    hardware_tflops_per_gpu: float | None = None   # incl. recompute and flash-attention backward
    hfu: float | None = None
    fit: str = "yes"           # "yes", or "tight": predicted above HBM by less than the model's uncertainty
    # 80% range of tokens/s per GPU from cross-validated residuals of published runs like this one
    # (planner/uncertainty.py), and the class of runs it comes from
    tokens_per_s_per_gpu_range: tuple | None = None
    range_basis: str = ""

    def to_dict(self) -> dict:
        d = {k: getattr(self.layout, k) for k in LAYOUT_FIELDS}
        d.update(gpus=self.gpus, step_time_s=self.step_time_s, tokens_per_s_per_gpu=self.tokens_per_s_per_gpu,
                 mfu=self.mfu, model_tflops_per_gpu=self.model_tflops_per_gpu,
                 hardware_tflops_per_gpu=self.hardware_tflops_per_gpu, hfu=self.hfu, memory_gib=self.memory_gib,
                 feasible=self.feasible, fit=self.fit,
                 tokens_per_s_per_gpu_range=list(self.tokens_per_s_per_gpu_range)
                 if self.tokens_per_s_per_gpu_range else None, range_basis=self.range_basis,
                 memory_breakdown_gib=dict(self.memory_breakdown_gib),
                 time_breakdown_s=dict(self.time_breakdown_s))
        if self.time_to_train_s is not None:
            d["time_to_train_s"] = self.time_to_train_s
            d["time_to_train_days"] = self.time_to_train_s / 86400
        if self.cost_usd is not None:
            d["cost_usd"] = self.cost_usd
        return d

    def overflow(self) -> str:
        """Why this layout does not fit, naming the largest memory term."""
        over = self.memory_gib - self.hbm_gib
        term, val = max(self.memory_breakdown_gib.items(), key=lambda kv: kv[1])
        return (f"needs {self.memory_gib:.1f} GiB per GPU, {over:.1f} GiB over the {self.hbm_gib:.1f} GiB HBM; "
                f"largest term: {term} {val:.1f} GiB")


@dataclass
class SearchResult:
    """A ranked search, with the settings it ran under (so reports need nothing else)."""
    model: str
    hardware: str
    gpus: int
    evaluated: int
    feasible: int
    search_seconds: float
    plans: list = field(default_factory=list)        # best first, feasible only
    closest_infeasible: Plan | None = None
    pareto: list = field(default_factory=list)
    empty_reason: str | None = None   # no layout at all: which fixed knobs clash (rules.explain_empty)
    seq_len: int | None = None
    global_batch: int | None = None
    stack: str | None = None

    @property
    def best(self) -> Plan | None:
        return self.plans[0] if self.plans else None

    def to_dataframe(self):
        """The ranked layouts, one row each, breakdowns flattened to time_*_s / mem_*_gib columns."""
        import pandas as pd
        return pd.DataFrame(flat_rows(self.plans))

    def pareto_frame(self):
        """The Pareto front over time-to-train, cost and peak memory per GPU (all minimised),
        fastest first, as a DataFrame."""
        import pandas as pd
        return pd.DataFrame(flat_rows(self.pareto))


def plan_from_eval(ev: Evaluation, cands: Candidates, i: int, cluster, tokens: float | None = None,
                   price: float | None = None, stack_name: str | None = None, moe: bool = False) -> Plan:
    """Candidate i of a detailed Evaluation as a Plan (time-to-train and cost when `tokens`; the
    80% throughput range when the stack is named)."""
    d = ev.detail
    world = int(ev.gpus[i])
    tps = float(ev.tokens_per_s_per_gpu[i])
    rng, basis = None, ""
    if stack_name:
        from . import uncertainty as U
        L = cands.layout(i)
        cls = U.RunClass.of(stack_name, L.precision, U.generation_of(cluster), world, moe)
        rng, basis = U.range_for(cls, tps)
    ttt = cost = None
    if tokens:
        ttt = tokens / (tps * world)
        cost = ttt / 3600 * world * (cluster.price_per_gpu_hour if price is None else price)
    step = float(ev.step_time_s[i])
    return Plan(layout=cands.layout(i), gpus=world, step_time_s=step, tokens_per_s_per_gpu=tps,
                mfu=float(d.mfu[i]), model_tflops_per_gpu=float(d.model_tflops_per_gpu[i]),
                memory_gib=float(ev.memory_bytes[i]) / GiB, feasible=bool(ev.feasible[i]),
                time_breakdown_s={k: float(getattr(d.time, k)[i]) for k in TIME_TERMS},
                memory_breakdown_gib={k: float(getattr(d.memory, k)[i]) / GiB for k in MEMORY_TERMS},
                hbm_gib=cluster.gpu.hbm_bytes / GiB, time_to_train_s=ttt, cost_usd=cost,
                hardware_tflops_per_gpu=float(d.hardware_flops_step[i] / step / world / 1e12),
                hfu=float(d.hfu[i]), fit=_fit(ev, i), tokens_per_s_per_gpu_range=rng, range_basis=basis)


def _fit(ev: Evaluation, i: int) -> str:
    if not ev.feasible[i]:
        return "no"
    return "tight" if ev.tight[i] else "yes"


def flat_rows(plans) -> list:
    """One dict per plan, breakdowns flattened to time_<term>_s / mem_<term>_gib keys."""
    rows = []
    for p in plans:
        d = p.to_dict()
        for k, v in d.pop("time_breakdown_s").items():
            d[f"time_{k}_s"] = v
        for k, v in d.pop("memory_breakdown_gib").items():
            d[f"mem_{k}_gib"] = v
        rows.append(d)
    return rows
