"""planner.explain: breakdowns, why runners-up lost, one-knob neighbours and what overflowed."""
import json
from dataclasses import replace

import pytest

from planner import load_hardware, load_model, search
from planner.cli import main
from planner.costmodel import MEMORY_TERMS, TIME_TERMS
from planner.explain import explain_dict, explain_text, group_level, neighbours, placement
from planner.hardware import Cluster
from planner.errors import PlannerError
from planner.layout import Layout
from planner.stacks import get_stack


@pytest.fixture(scope="module")
def gpt20b():
    m, c = load_model("gpt-20b"), load_hardware("h100-sxm")
    return m, c, search(m, c, 64, top=6)


def test_dict_is_json_and_breakdowns_add_up(gpt20b):
    m, c, res = gpt20b
    d = explain_dict(res, m, c)
    json.dumps(d, allow_nan=False)
    b = d["best"]
    assert [r["term"] for r in b["time_breakdown"]] == list(TIME_TERMS)
    assert [r["term"] for r in b["memory_breakdown"]] == list(MEMORY_TERMS)
    assert sum(r["seconds"] for r in b["time_breakdown"]) == pytest.approx(res.best.step_time_s, rel=1e-4)
    assert sum(r["gib"] for r in b["memory_breakdown"]) == pytest.approx(res.best.memory_gib, rel=1e-4)
    assert b["headroom_gib"] == pytest.approx(res.best.hbm_gib - res.best.memory_gib, rel=1e-4)


def test_runners_up_name_what_differs_and_why(gpt20b):
    m, c, res = gpt20b
    d = explain_dict(res, m, c)
    assert d["runners_up"], "expected runners-up"
    layouts = [tuple(sorted(r["layout"].items())) for r in d["runners_up"]]
    assert len(layouts) == len(set(layouts)), "duplicate layouts must be shown once"
    for r in d["runners_up"]:
        assert r["differs"], r
        assert r["slower_by"] >= -1e-9
        if not r["tie"]:
            assert r["reasons"] and all(x["term"] in TIME_TERMS and x["text"] for x in r["reasons"])
            assert len(r["reasons"]) <= 2


def test_infeasible_neighbours_say_which_memory_term_overflowed(gpt20b):
    m, c, res = gpt20b
    d = explain_dict(res, m, c)
    bad = d["infeasible_neighbours"]
    assert bad, "doubling micro-batch or dropping ZeRO should overflow somewhere"
    for r in bad:
        o = r["overflow"]
        assert o["term"] in MEMORY_TERMS and o["over_gib"] > 0 and o["term_delta_gib"] > 0
        assert r["memory_gib"] > r["hbm_gib"]
        assert "GiB over the" in o["text"]
    # the micro-batch neighbour grows activations
    mb = [r for r in d["neighbours"] if r["change"].startswith("micro_batch") and not r["fits"]]
    assert all(r["overflow"]["term"] == "activations" for r in mb)


def test_neighbours_change_one_knob_and_keep_gpu_count():
    m = load_model("llama-3-70b")
    c = load_hardware("h100-sxm")
    B = Layout(tp=4, pp=4, dp=4, cp=1, sp=True, micro_batch=1, global_batch=256, seq_len=8192, zero=1)
    nb = neighbours(m, c, B)
    assert nb
    for desc, L in nb:
        assert L.gpus == B.gpus, desc
        assert L != B
    descs = [d for d, _ in nb]
    assert any(d.startswith("tp 4->8") for d in descs) and any(d.startswith("pp 4->8") for d in descs)
    assert any(d.startswith("recompute") for d in descs) and any(d.startswith("zero") for d in descs)


def test_tp_crossing_the_nvlink_domain_is_named_from_the_profile():
    m, c = load_model("gpt-175b"), load_hardware("h100-sxm")
    res = search(m, c, 512, fixed={"tp": 8}, top=2)
    d = explain_dict(res, m, c)
    tp16 = [r for r in d["neighbours"] if r["change"].startswith("tp 8->16")]
    assert tp16 and tp16[0]["fits"]
    assert "tp=16 crosses the nvlink4 domain of 8 GPUs" in tp16[0]["reasons"][0]["text"]
    # the same layout on a cluster whose innermost domain holds 16 GPUs does not cross it
    lv0 = replace(c.levels[0], domain=16)
    c16 = Cluster(name="h100-nvl16", gpu=c.gpu, levels=(lv0,) + c.levels[1:],
                  price_per_gpu_hour=c.price_per_gpu_hour, efficiency=c.efficiency)
    assert c16.domain_sizes[0] == 16
    res16 = search(m, c16, 512, fixed={"tp": 8}, top=2)
    d16 = explain_dict(res16, m, c16)
    assert not any("crosses" in x["text"] for r in d16["neighbours"] if r["change"].startswith("tp 8->16")
                   for x in r.get("reasons", []))


def test_placement_reads_domains_off_the_cluster():
    c = load_hardware("h100-sxm")
    L = Layout(tp=8, pp=2, dp=4, cp=2, micro_batch=1, global_batch=64, seq_len=4096)
    p = placement(L, c)
    assert p["tp"]["level_index"] == 0 and p["cp"]["level_index"] == 1 and p["pp"]["level_index"] == 1
    assert group_level(c, 1, 1) is None
    nvl = load_hardware("gb200-nvl72")
    assert placement(L, nvl)["cp"]["level_index"] == 0       # 8 x 2 GPUs fit in one NVL72 rack


def test_text_has_every_section(gpt20b):
    m, c, res = gpt20b
    t = explain_text(res, m, c)
    for s in ("Why this layout", "Time per step", "Memory per GPU", "Runners-up", "does not fit"):
        assert s in t, s


def test_nothing_fits_explains_the_closest_layout():
    m, c = load_model("llama-3.1-405b"), load_hardware("h100-sxm")
    res = search(m, c, 8, top=2)
    assert not res.plans
    d = explain_dict(res, m, c)
    assert d["best"] is None and "GiB" in d["closest_infeasible"]["why"]
    assert "closest" in explain_text(res, m, c)


def test_cli_explain_table_and_json(capsys):
    assert main(["--model", "gpt-20b", "--gpus", "64", "--top", "3", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "Why this layout" in out and "One knob changed" in out
    assert main(["--model", "gpt-20b", "--gpus", "64", "--top", "3", "--explain", "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["explain"]["best"]["layout"]["tp"] == d["layouts"][0]["tp"]


def test_explain_defaults_to_the_stack_the_search_ran_under():
    """A notebook's explain_dict(res, model, cluster) judges neighbours under the search's stack
    (res.stack), and a stack may be passed by name: torchtitan's neighbours never include an
    interleaved Megatron-only knob it cannot run, and the names agree with the Stack itself."""
    m, c = load_model("gpt-20b"), load_hardware("h100-sxm")
    res = search(m, c, 64, top=2, stack="torchtitan")
    by_default = explain_dict(res, m, c)
    by_name = explain_dict(res, m, c, "torchtitan")
    by_stack = explain_dict(res, m, c, get_stack("torchtitan"))
    assert by_default["stack"] == by_name["stack"] == by_stack["stack"] == "torchtitan"
    assert by_default == by_stack
    assert explain_dict(res, m, c, "megatron-core")["stack"] == "megatron-core"
    with pytest.raises(PlannerError, match="unknown stack"):
        explain_dict(res, m, c, "nemo")
