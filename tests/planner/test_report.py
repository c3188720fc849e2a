"""planner/report.py: the table shows every knob that differs among the rows it prints; JSON and
CSV carry the search's settings."""
import json

from planner.report import knob_columns, to_csv, to_json, to_table
from planner.engine import search
from planner.model_io import load_model
from planner.profiles import load_hardware
from planner.stacks import STACKS

MODEL, H100 = load_model("llama-3-70b"), load_hardware("h100-sxm")


def test_rows_that_differ_only_in_cp_comm_show_it():
    """issue 12: rows 1, 3 and 5 of `plan --model llama-3-70b --gpus 512 --top 5` looked identical."""
    res = search(MODEL, H100, 512, top=5, fixed={"tp": 4, "pp": 4, "cp": 2, "micro_batch": 1, "vpp": 4,
                                                 "recompute": "none", "zero": 1, "precision": "fp8"})
    assert len({p.layout.cp_comm for p in res.plans}) > 1
    text = to_table(res, MODEL, H100, STACKS["megatron-core"])
    assert "cp_comm" in text.splitlines()[1]
    rows = [ln.split() for ln in text.splitlines()[2:2 + len(res.plans)]]
    assert len({tuple(r[2:-6]) for r in rows}) == len(rows)       # every row's knobs differ somewhere


def test_knobs_that_do_not_differ_stay_hidden():
    res = search(MODEL, H100, 64, top=3, fixed={"tp": 8, "pp": 2, "cp": 1})
    heads = [h for h, _ in knob_columns(res.plans)]
    assert "cp_comm" not in heads and "etp" not in heads and heads[:3] == ["tp", "pp", "dp"]


def test_json_and_csv_carry_the_settings():
    res = search(MODEL, H100, 64, top=2, seq_len=4096, global_batch=128)
    d = json.loads(to_json(res, MODEL, H100, STACKS["megatron-core"]))
    assert (d["seq_len"], d["global_batch"], d["stack"]) == (4096, 128, "megatron-core")
    assert (res.seq_len, res.global_batch, res.stack) == (4096, 128, "megatron-core")
    assert to_csv(res).splitlines()[0].startswith("tp,pp,dp")
