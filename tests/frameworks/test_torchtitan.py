"""Emitted torchtitan 0.3 configuration modules accepted by torchtitan's own code (the
`frameworks` test extra installs torchtitan 0.3.0): configuration loading, the model's checks,
ParallelDims on a fake process group, and for pipelines the stage split and the real schedule;
and what torchtitan 0.3 cannot run refused at plan or emit time."""
import importlib.util
from pathlib import Path

import pytest

from planner.engine import search
from planner.errors import PlannerError
from planner.export import emit
from planner.model_io import load_model
from planner.profiles import load_hardware
from planner.stacks import STACKS, with_compile

from .driver import ask

HERE = Path(__file__).resolve().parent
TT = STACKS["torchtitan"]

# name -> (model, gpus, fixed knobs); planned with --stack torchtitan in bf16 (fp8's Float8Linear
# swap needs an SM89+ GPU, so a CPU cannot load an fp8 configuration)
CASES = {
    "fsdp64": ("llama-3-8b", 64, dict(tp=1, pp=1, cp=1)),
    "ddp8": ("gpt-oss-120b", 64, dict(tp=1, pp=1, cp=1, ep=8)),
    "tp8-hsdp16": ("llama-3-70b", 256, dict(tp=8, pp=1, shard_group=16)),
    "tp8-cp4": ("llama-3-70b", 256, dict(tp=8, cp=4, pp=1)),
    "pp4-1f1b-full": ("llama-3-70b", 128, dict(tp=8, pp=4, schedule="1f1b", recompute="full")),
    "pp8-interleaved": ("llama-3-70b", 256, dict(tp=4, pp=8, schedule="interleaved", vpp=2)),
    "pp4-zbv": ("llama-3-8b", 64, dict(tp=2, pp=4, schedule="zbv")),
    "deepseek-v3-ep": ("deepseek-v3", 256, dict(pp=8, recompute="selective")),
    "qwen3-moe": ("qwen3-30b-a3b", 64, {}),
    "fsdp64-compiled": ("llama-3-8b", 64, dict(tp=1, pp=1, cp=1)),
}
COMPILED = {"fsdp64-compiled"}    # planned with --compile


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    if importlib.util.find_spec("torchtitan") is None:
        pytest.skip("torchtitan not installed (pip install -e '.[frameworks]')")
    folder = tmp_path_factory.mktemp("tt_modules")
    cases, plans = [], {}
    for name, (model, gpus, fixed) in CASES.items():
        m, cl = load_model(model), load_hardware("h100-sxm")
        stack = with_compile(TT, name in COMPILED)
        res = search(m, cl, gpus, fixed=fixed, top=1, precisions=["bf16"], stack=stack)
        assert res.best is not None, res.empty_reason
        plans[name] = res.best
        module = "plan_" + name.replace("-", "_")
        text, _ = emit(res.best, m, "torchtitan", cl, out=str(folder / f"{module}.py"), stack=stack)
        (folder / f"{module}.py").write_text(text)
        cases.append({"name": name, "folder": str(folder), "module": module, "world": gpus})
    return ask(HERE / "tt_accept.py", cases, timeout=900), plans


@pytest.mark.parametrize("name", list(CASES))
def test_torchtitan_accepts_the_emitted_module(verdicts, name):
    v, plans = verdicts
    L = plans[name].layout
    assert v[name]["ok"], v[name]["error"]
    assert v[name]["dp_replicate"] * v[name]["dp_shard"] == L.dp
    assert v[name]["compile"] == (name in COMPILED)
    if L.pp > 1:
        assert v[name]["stages"] == L.pp * (2 if L.schedule == "zbv" else L.vpp)


@pytest.mark.parametrize("fixed, needle", [
    (dict(zero=1), "is not run by torchtitan"),
    (dict(etp=2, tp=2, ep=2), "no expert tensor parallelism"),
    (dict(cp=2, cp_comm="a2a"), "is not run by torchtitan"),
])
def test_what_torchtitan_cannot_run_is_refused_at_plan_time(fixed, needle):
    model = "qwen3-30b-a3b" if "etp" in fixed else "llama-3-8b"
    with pytest.raises(PlannerError, match=needle):
        search(load_model(model), load_hardware("h100-sxm"), 64, fixed=fixed, top=1, stack=TT)


def test_models_torchtitan_does_not_ship_are_refused_at_emit_time():
    m, cl = load_model("mixtral-8x7b"), load_hardware("h100-sxm")
    res = search(m, cl, 64, top=1, stack=TT)
    with pytest.raises(PlannerError, match="ships no recipe for mixtral-8x7b"):
        emit(res.best, m, "torchtitan", cl)
