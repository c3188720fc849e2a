"""80% ranges for predicted throughput, from the cross-validated residuals of published runs like
the one planned (benchmarks/accuracy.py --cross-validate: each run predicted by parameters fitted
without its source; residual = log(measured / predicted)).

A run's class is (stack, precision, GPU generation, scale, dense/MoE). The range of a plan is the
10th-90th percentile of the residuals of the most specific class with at least MIN_RUNS runs,
dropping scale, then dense/MoE, then generation, then precision, then stack. TABLE holds those
percentiles per class key and is written by `python benchmarks/accuracy.py --cross-validate
--write-ranges`; it is a global fit like the efficiency parameters, never per run."""
from __future__ import annotations

import numpy as np

from .frozen import frozen

# 16: below that a 10th/90th percentile rests on one or two runs (benchmarks/accuracy.py
# --cross-validate: nested coverage 68% with 8, 77% with 16 under linear interpolation)
MIN_RUNS = 16
LOW_Q, HIGH_Q = 10.0, 90.0
# Weibull plotting position p(n+1) (Hyndman & Fan 1996, definition 6): the quantile whose expected
# coverage of a new draw is p, so small classes get wider ranges than linear interpolation gives
METHOD = "weibull"
# coarsening order: which fields a key keeps at each level
LEVELS = (("stack", "precision", "generation", "scale", "kind"), ("stack", "precision", "generation", "kind"),
          ("stack", "precision", "generation"), ("stack", "precision"), ("stack",), ())
_GENERATIONS = (("gb200", "blackwell"), ("b200", "blackwell"), ("h100", "hopper"), ("h200", "hopper"),
                ("h800", "hopper"), ("a100", "ampere"))


@frozen(eq=True)
class RunClass:
    stack: str
    precision: str
    generation: str
    scale: str
    kind: str

    @staticmethod
    def of(stack: str, precision: str, generation: str, gpus: int, moe: bool) -> "RunClass":
        scale = "<=64" if gpus <= 64 else "<=512" if gpus <= 512 else "<=4096" if gpus <= 4096 else ">4096"
        return RunClass(stack, precision, generation, scale, "moe" if moe else "dense")

    def key(self, level: int) -> str:
        return "|".join(f"{f}={getattr(self, f)}" for f in LEVELS[level]) or "all"


def generation_of(cluster) -> str:
    """GPU generation from the profile's name (a calibrated profile of another name: 'other')."""
    name = cluster.name.lower()
    for prefix, gen in _GENERATIONS:
        if name.startswith(prefix):
            return gen
    return "other"


def quantiles_for(cls: RunClass, pairs) -> tuple:
    """(low, high) log residual of the most specific class of `cls` with MIN_RUNS runs in
    `pairs` [(RunClass, log residual)]."""
    for level in range(len(LEVELS)):
        k = cls.key(level)
        xs = [x for c, x in pairs if c.key(level) == k]
        if len(xs) >= MIN_RUNS or level == len(LEVELS) - 1:
            return float(np.percentile(xs, LOW_Q, method=METHOD)), float(np.percentile(xs, HIGH_Q, method=METHOD))
    raise AssertionError("unreachable")


def build_table(pairs) -> dict:
    """{class key: (low, high, runs)} for every key with MIN_RUNS runs (and 'all')."""
    out = {}
    for level in range(len(LEVELS)):
        for k in sorted({c.key(level) for c, _ in pairs}):
            xs = [x for c, x in pairs if c.key(level) == k]
            if len(xs) >= MIN_RUNS or k == "all":
                out[k] = (round(float(np.percentile(xs, LOW_Q, method=METHOD)), 4),
                          round(float(np.percentile(xs, HIGH_Q, method=METHOD)), 4),
                          len(xs))
    return out


def range_for(cls: RunClass, predicted: float, table: dict | None = None) -> tuple:
    """((low, high) tokens/s per GPU around `predicted`, the class key it comes from); (None,
    "none") while the table is empty."""
    table = TABLE if table is None else table
    for level in range(len(LEVELS)):
        k = cls.key(level)
        if k in table:
            lo, hi, _ = table[k]
            return (predicted * float(np.exp(lo)), predicted * float(np.exp(hi))), k
    return None, "none"


# written by benchmarks/accuracy.py --cross-validate --write-ranges
TABLE: dict = {
    'stack=megatron-core|precision=fp8|generation=hopper': (-0.2642, 0.0967, 17),
    'stack=megatron-core|precision=fp8': (-0.0879, 0.0855, 21),
    'stack=megatron-2021': (-0.043, 0.093, 21),
    'stack=megatron-core': (-0.2164, 0.077, 34),
    'all': (-0.1864, 0.0631, 84),
}
