"""Prediction ranges (planner/uncertainty.py): the class a plan belongs to, the fallback to coarser
classes, the table built from residuals, and the range on every plan, in its JSON, table and
explanation."""
import json

import numpy as np

from planner import uncertainty as U
from planner.engine import search
from planner.explain import explain_dict
from planner.model_io import load_model
from planner.profiles import load_hardware
from planner.report import to_json, to_table
from planner.stacks import STACKS


def _cls(stack="megatron-core", precision="bf16", gen="hopper", gpus=64, moe=False):
    return U.RunClass.of(stack, precision, gen, gpus, moe)


def test_scale_buckets_and_keys():
    assert _cls(gpus=64).scale == "<=64" and _cls(gpus=65).scale == "<=512" and _cls(gpus=8192).scale == ">4096"
    assert _cls(moe=True).kind == "moe"
    assert _cls().key(len(U.LEVELS) - 1) == "all"
    assert _cls().key(3) == "stack=megatron-core|precision=bf16"


def test_most_specific_class_with_enough_runs_is_used():
    rng = np.random.default_rng(0)
    wide = [(_cls(stack="deepspeed"), x) for x in rng.normal(0, 0.3, 40)]
    narrow = [(_cls(), x) for x in rng.normal(0, 0.02, U.MIN_RUNS)]
    lo, hi = U.quantiles_for(_cls(), wide + narrow)
    assert -0.1 < lo < 0 < hi < 0.1
    # too few of its own: falls back to everything
    lo2, hi2 = U.quantiles_for(_cls(), wide + narrow[: U.MIN_RUNS - 1])
    assert hi2 - lo2 > 3 * (hi - lo)


def test_table_holds_only_classes_with_enough_runs_and_ranges_scale_with_prediction():
    pairs = [(_cls(), x) for x in np.linspace(-0.2, 0.2, U.MIN_RUNS)] + [(_cls(stack="deepspeed"), 0.5)]
    table = U.build_table(pairs)
    assert "stack=deepspeed" not in table and table["all"][2] == U.MIN_RUNS + 1
    (lo, hi), key = U.range_for(_cls(), 1000.0, table)
    assert key == "stack=megatron-core|precision=bf16|generation=hopper|scale=<=64|kind=dense"
    assert lo < 1000.0 < hi
    (lo2, hi2), _ = U.range_for(_cls(), 2000.0, table)
    assert np.isclose(lo2, 2 * lo) and np.isclose(hi2, 2 * hi)
    assert U.range_for(_cls(), 1000.0, {}) == (None, "none")


def test_every_plan_carries_a_range_in_json_table_and_explain():
    assert U.TABLE, "benchmarks/accuracy.py --cross-validate --write-ranges has not filled the table"
    m, hw = load_model("gpt-1.7b"), load_hardware("h100-sxm")
    res = search(m, hw, 8, top=3, stack=STACKS["megatron-core"])
    for p in res.plans:
        lo, hi = p.tokens_per_s_per_gpu_range
        assert lo < p.tokens_per_s_per_gpu < hi and p.range_basis in U.TABLE
    d = json.loads(to_json(res, m, hw, STACKS["megatron-core"]))
    assert d["layouts"] and all(len(r["tokens_per_s_per_gpu_range"]) == 2 for r in d["layouts"])
    assert "80% range" in to_table(res, m, hw, STACKS["megatron-core"])
    e = explain_dict(res, m, hw, STACKS["megatron-core"])
    assert len(e["best"]["tokens_per_s_per_gpu_range"]) == 2
    assert "published runs of class" in e["best"]["range_basis"]
