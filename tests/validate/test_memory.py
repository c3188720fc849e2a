"""`python -m validate memory`: the planner's per-rank memory held to PyTorch's trackers on fake
tensors (full-width models, a few layers so the suite stays fast; full size in
benchmarks/memory.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def vm(*args, check_json=True):
    p = subprocess.run([sys.executable, "-m", "validate", "memory", *args, "--format", "json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    if not check_json:
        return p
    assert p.returncode in (0, 1), p.stderr[-2000:]
    return json.loads(p.stdout)


S = ["--seq-len", "2048", "--micro-batch", "1"]
CASES = {
    "torchtitan-fsdp-full": ["--model", "llama-3-8b", "--gpus", "8", "--stack", "torchtitan", "--zero", "3",
                             "--tp", "1", "--pp", "1", "--cp", "1", "--recompute", "full", "--layers", "2", *S],
    "torchtitan-tp2-opsac": ["--model", "llama-3-8b", "--gpus", "8", "--stack", "torchtitan", "--zero", "3",
                             "--tp", "2", "--sp", "--pp", "1", "--cp", "1", "--recompute", "selective",
                             "--layers", "2", *S],
    "torchtitan-pp-first": ["--model", "llama-3-70b", "--gpus", "64", "--stack", "torchtitan", "--zero", "3",
                            "--tp", "8", "--sp", "--pp", "4", "--cp", "1", "--vpp", "1", "--schedule", "1f1b",
                            "--recompute", "full", "--layers", "8", "--global-batch", "64", "--stage", "first", *S],
    "megatron-cp2-none": ["--model", "llama-3-8b", "--gpus", "16", "--stack", "megatron-core", "--zero", "1",
                          "--tp", "2", "--sp", "--pp", "1", "--cp", "2", "--recompute", "none", "--layers", "2", *S],
    "megatron-moe-mla": ["--model", "deepseek-v3", "--gpus", "64", "--stack", "megatron-core", "--zero", "1",
                         "--tp", "2", "--sp", "--pp", "1", "--cp", "1", "--ep", "32", "--etp", "1",
                         "--recompute", "full", "--layers", "4", *S],
    # Megatron-Core --cpu-offloading-num-layers: TE's saved-tensors hook, emulated (blocks._offload)
    "megatron-offload": ["--model", "llama-3-8b", "--gpus", "8", "--stack", "megatron-core", "--zero", "1",
                         "--tp", "1", "--pp", "1", "--cp", "1", "--recompute", "none", "--layers", "4",
                         "--offload-layers", "2", *S],
    "megatron-gpt-tied-bias": ["--model", "gpt-175b", "--gpus", "64", "--stack", "megatron-core", "--zero", "1",
                               "--tp", "8", "--sp", "--pp", "1", "--cp", "1", "--recompute", "selective",
                               "--layers", "2", *S],
}


@pytest.fixture(scope="module")
def reports():
    return {}


def _report(reports, name):
    if name not in reports:
        reports[name] = vm(*CASES[name])
    return reports[name]


@pytest.mark.parametrize("name", CASES)
def test_peak_matches_the_tracker(name, reports):
    rep = _report(reports, name)
    p, m = rep["peak_bytes"]["predicted"], rep["peak_bytes"]["measured"]
    assert abs(p - m) <= 0.10 * m, (name, p / 2 ** 30, m / 2 ** 30, rep["terms"])
    # the model states are counted exactly (the layer shapes are the planner's)
    for t in rep["terms"]:
        if t["term"] == "optimizer":
            assert t["predicted"] == pytest.approx(t["measured"], rel=0.02), (name, t)


def test_json_contract_and_terms(reports):
    rep = _report(reports, "megatron-cp2-none")
    assert set(rep) >= {"layout", "peak_bytes", "terms", "flops"}
    assert set(rep["peak_bytes"]) == {"predicted", "measured"}
    assert [t["term"] for t in rep["terms"]] == ["weights", "gradients", "optimizer", "activations"]
    for t in rep["terms"]:
        assert t["predicted"] >= 0 and t["measured"] >= 0
        # Megatron's states are persistent buffers: each term within 5% at the peak
        assert abs(t["predicted"] - t["measured"]) <= 0.05 * t["measured"] + 2 ** 26, t
    assert rep["layout"]["tp"] == 2 and rep["layout"]["cp"] == 2 and rep["layout"]["zero"] == 1
    # linear-layer FLOPs of the run (no recompute here): the planner's GEMM count exactly
    assert rep["flops"]["predicted"] == pytest.approx(rep["flops"]["measured"], rel=1e-6)


@pytest.mark.parametrize("args,needle", [
    (["--stack", "deepspeed"], "--stack"),
    (["--stack", "torchtitan", "--zero", "0", "--pp", "1", "--cp", "1"], "FSDP2"),
    (["--stack", "megatron-core", "--zero", "3"], "not emulated"),
    (["--stack", "megatron-core", "--zero", "1", "--stage", "middle", "--pp", "1"], "no such pipeline rank"),
])
def test_bad_input_is_one_line_exit_2(args, needle, capsys):
    """Refused before any process group starts: in-process, the CLI's own error path."""
    from validate.cli import main
    rc = main(["memory", "--model", "llama-3-8b", "--gpus", "8", "--layers", "2", "--tp", "1",
               "--seq-len", "1024", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_local_flops_match_flop_counter_mode():
    """LocalFlops (used beside the tracker, which FlopCounterMode would perturb) counts what
    PyTorch's FlopCounterMode counts on a plain model, op by op (mm, bmm; forward and backward),
    and also the CPU flash SDPA kernel FlopCounterMode has no formula for."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode
    from validate.memory.tracking import LocalFlops

    def step():
        x = torch.randn(2, 64, 32, requires_grad=True)
        w = torch.randn(48, 32, requires_grad=True)
        q = F.linear(x, w).view(2, 64, 3, 16).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        (o.sum() + torch.bmm(x, x.transpose(1, 2)).sum()).backward()

    with FlopCounterMode(display=False) as ref:
        step()
    lf = LocalFlops()
    with lf:
        step()
    theirs = {str(k).split(".")[-1]: v for k, v in ref.get_flop_counts()["Global"].items()}
    ours = {}
    for (_, op), v in lf.counts.items():
        ours[op] = ours.get(op, 0) + v
    assert theirs and all(ours.get(op) == v for op, v in theirs.items()), (ours, theirs)
    assert ours.get("_scaled_dot_product_flash_attention_for_cpu", 0) > 0
