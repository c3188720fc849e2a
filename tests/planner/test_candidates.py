"""planner/candidates.py: what is searched (divisor axes, stage-split policies, equal virtual
stages unless --vpp is given) -- validity itself is rules.py's (tests/planner/test_rules.py)."""
import numpy as np

from planner.candidates import degree_table, iter_candidates, split_layers
from planner.model_io import load_model
from planner.rules import Context
from planner.stacks import STACKS

LLAMA70 = load_model("llama-3-70b")    # 80 layers
DSV3 = load_model("deepseek-v3")       # 61 layers


def test_split_policies():
    # 61 layers over 8 ranks: balanced (7, 8 x 6, 6); embedding+loss accounted needs (61+2) % 8 == 0: no
    first, last, ok = split_layers(61, np.array([8, 8, 8]), np.array([0, 1, 2]))
    assert (first[0], last[0], ok[0]) == (7, 6, True) and not ok[1] and not ok[2]
    # 126 layers over 8: (126+2)/8 = 16 per rank, first and last 15 (Llama 3.1 405B recipes) -- the
    # balanced split already, so the accounted policy adds no second copy of it
    first, last, ok = split_layers(126, np.array([8, 8]), np.array([0, 1]))
    assert (first[0], last[0], ok[0], ok[1]) == (15, 15, True, False)
    # even splits are written as 0/0 (not given)
    first, last, ok = split_layers(80, np.array([4]), np.array([0]))
    assert (first[0], last[0], ok[0]) == (0, 0, True)


def test_fixed_degrees_are_held():
    ctx = Context(LLAMA70, 256, 4096, 512, STACKS["megatron-core"])
    t = degree_table(ctx, {"tp": 8, "pp": 4})
    assert set(t["tp"]) == {8} and set(t["pp"]) == {4} and set(t["dp"] * t["cp"]) == {8}


def test_unequal_virtual_stages_are_searched_only_when_vpp_is_given():
    ctx = Context(DSV3, 1024, 4096, 1024, STACKS["megatron-core"])
    fixed = {"tp": 2, "pp": 8, "ep": 64, "precision": "fp8", "zero": 1, "recompute": "full", "micro_batch": 1}
    searched = {int(v) for c in iter_candidates(ctx, fixed) for v in np.unique(c.vpp)}
    # 61 layers over 8 ranks (7, 8 x 6, 6): 2 equal chunks per rank with the embedding counted as a
    # layer on the first, 4 not (the last rank's 6)
    assert searched == {1, 2}
    given = list(iter_candidates(ctx, {**fixed, "vpp": 4}))
    assert given and all((c.vpp == 4).all() for c in given)
    c = given[0]
    assert (c.first_stage_layers[0], c.last_stage_layers[0]) == (7, 6)


def test_each_class_is_one_table_of_layer_rows():
    ctx = Context(LLAMA70, 64, 4096, 512, STACKS["megatron-core"])
    for c in iter_candidates(ctx, {"precision": ["bf16"]}):
        assert c.deg_table is not None and c.deg_index.max() < len(c.deg_table["tp"])
        np.testing.assert_array_equal(c.deg_table["tp"][c.deg_index], c.tp)


def test_every_equal_virtual_stage_count_is_searched():
    # 112 layers on pp 16 = 7 per rank: vpp 7 (one layer per chunk) must be among the searched
    # counts -- a fixed list (1, 2, 3, 4, 6, 8) had left such a model on 1F1B (Megatron-LM
    # README's GPT 462B, 6144 H100s)
    import dataclasses
    from planner.candidates import vpp_values
    assert vpp_values(112, [16]) == [1, 2, 3, 4, 6, 7, 8]       # divisors of 6, 7 and 8
    m = dataclasses.replace(LLAMA70, layers=112)
    ctx = Context(m, 1024, 4096, 1024, STACKS["megatron-core"])
    fixed = {"tp": 8, "pp": 16, "precision": "bf16", "zero": 1, "recompute": "none", "micro_batch": 1}
    searched = {int(v) for c in iter_candidates(ctx, fixed) for v in np.unique(c.vpp)}
    assert searched == {1, 7}        # 2, 4, 8 divide the first or last rank's 8 only, not the 7 between
