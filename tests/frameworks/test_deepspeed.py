"""Emitted DeepSpeed configurations accepted by DeepSpeed's own DeepSpeedConfig (the `frameworks`
test extra installs DeepSpeed 0.19.8), with the data-parallel size DeepSpeed derives for each
layout; and the layouts DeepSpeed cannot run refused at plan time."""
import importlib.util
from pathlib import Path

import pytest

from planner.engine import search
from planner.errors import PlannerError
from planner.export import deepspeed_config, deepspeed_dp
from planner.model_io import load_model
from planner.profiles import load_hardware
from planner.stacks import STACKS

from .driver import ask

HERE = Path(__file__).resolve().parent
DS = STACKS["deepspeed"]

# name -> (model, gpus, fixed knobs); each is planned with --stack deepspeed and emitted
CASES = {
    "dp32-zero0": ("gpt-1.7b", 32, dict(tp=1, pp=1, cp=1, zero=0)),
    "dp64-zero1": ("llama-3-8b", 64, dict(tp=1, pp=1, cp=1, zero=1)),
    "dp64-zero2": ("llama-3-8b", 64, dict(tp=1, pp=1, cp=1, zero=2)),
    "dp64-zero3-full": ("llama-3-8b", 64, dict(tp=1, pp=1, cp=1, zero=3, recompute="full")),
    "autotp8-zero3": ("llama-3-8b", 64, dict(tp=8, pp=1, cp=1, zero=3)),
    "pp4-zero1": ("llama-3-8b", 64, dict(tp=1, pp=4, cp=1, zero=1)),
    "pp4-tp2-zero1": ("llama-3-70b", 64, dict(tp=2, pp=4, cp=1, zero=1)),
    "pp8-tp8-zero0": ("gpt-175b", 256, dict(tp=8, pp=8, cp=1, zero=0, recompute="full")),
    "ulysses-cp4-zero3": ("llama-3-8b", 64, dict(tp=1, pp=1, cp=4, zero=3, seq_len=32768)),
    "fp16-zero2": ("gpt-7.5b", 32, dict(tp=1, pp=1, cp=1, zero=2, precision="fp16")),
}


def _plan(model, gpus, fixed):
    fx = dict(fixed)
    seq = fx.pop("seq_len", None)
    prec = [fx["precision"]] if "precision" in fx else ["bf16"]
    res = search(load_model(model), load_hardware("h100-sxm"), gpus, seq_len=seq, fixed=fx, top=1,
                 precisions=prec, stack=DS)
    assert res.best is not None, res.empty_reason
    return res.best


@pytest.fixture(scope="module")
def verdicts():
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed not installed (pip install -e '.[frameworks]')")
    cases, plans = [], {}
    for name, (model, gpus, fixed) in CASES.items():
        p = plans[name] = _plan(model, gpus, fixed)
        cases.append({"name": name, "config": deepspeed_config(p, load_model(model)), "world": gpus,
                      "pp": p.layout.pp, "tp": p.layout.tp})
    return ask(HERE / "ds_accept.py", cases, timeout=600), plans


@pytest.mark.parametrize("name", list(CASES))
def test_deepspeed_accepts_the_emitted_config(verdicts, name):
    v, plans = verdicts
    L = plans[name].layout
    assert v[name]["ok"], v[name]["error"]
    # DeepSpeed's own arithmetic: the dp it derives, and the batch it will run
    assert v[name]["dp"] == deepspeed_dp(L)
    assert v[name]["micro"] == L.micro_batch
    assert v[name]["micro"] * v[name]["gas"] * L.dp == L.global_batch


@pytest.mark.parametrize("fixed, needle", [
    (dict(pp=4, zero=2), "does not combine --zero 2 with pipeline"),
    (dict(zero=3, shard_group=8, tp=1), "no hybrid sharding"),
    (dict(cp=2, pp=2), "does not combine context parallelism"),
    (dict(pp=2, schedule="interleaved", vpp=2), "is not run by deepspeed"),
])
def test_what_deepspeed_cannot_run_is_refused_at_plan_time(fixed, needle):
    with pytest.raises(PlannerError, match=needle):
        search(load_model("llama-3-8b"), load_hardware("h100-sxm"), 64, fixed=fixed, top=1, stack=DS)
