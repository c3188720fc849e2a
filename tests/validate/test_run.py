"""validate/: real torch.distributed runs (gloo, CPU) of every parallel dimension alone at
degree 2 and of combinations on 8 processes; each must pass every count check and match the
single-process reference's losses and gradients. Layouts of one world size share one launch of
the ranks (process start-up is the dominant cost on a small machine)."""
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch  # noqa: F401  (validate's tests run wherever the suite runs: torch is required)

from planner.layout import Layout
from planner.errors import PlannerError
from planner.model_spec import ModelSpec, MoESpec
from validate import api
from validate.launch import RunFailed

ROOT = Path(__file__).resolve().parents[2]

LLAMA = ModelSpec(name="tiny-llama", layers=4, hidden=32, heads=4, kv_heads=2, ffn_hidden=64,
                  vocab=128, mlp="swiglu")
GPT = ModelSpec(name="tiny-gpt", layers=4, hidden=32, heads=4, kv_heads=4, ffn_hidden=128, vocab=128,
                mlp="gelu", tied_embeddings=True, bias=True)
MOE = ModelSpec(name="tiny-moe", layers=4, hidden=32, heads=4, kv_heads=2, ffn_hidden=64, vocab=128,
                mlp="swiglu", moe=MoESpec(experts=4, top_k=2, expert_ffn_hidden=32, shared_experts=1,
                                          dense_layers=1))


def L(**k):
    base = dict(micro_batch=1, global_batch=4, seq_len=16, zero=1)
    base.update(k)
    return Layout(**base)


# name -> (model, layout[, fault]); every dimension alone at degree 2
TWO = {
    "tp2": (LLAMA, L(tp=2)),
    "tp2-sp": (LLAMA, L(tp=2, sp=True)),
    "tp2-sp-full-recompute": (LLAMA, L(tp=2, sp=True, recompute="full")),
    "pp2": (LLAMA, L(pp=2)),
    "dp2-zero0": (LLAMA, L(dp=2, zero=0)),
    "dp2-zero1": (LLAMA, L(dp=2, zero=1)),
    "dp2-zero2": (LLAMA, L(dp=2, zero=2)),
    "dp2-zero3": (LLAMA, L(dp=2, zero=3)),
    "cp2": (LLAMA, L(cp=2)),
    "cp2-selective-recompute": (LLAMA, L(cp=2, recompute="selective")),
    "ep2-moe": (MOE, L(dp=2, ep=2)),
    "ep2-moe-full-recompute": (MOE, L(dp=2, ep=2, recompute="full", micro_batch=2)),
    "gpt-tied-bias-tp2-sp": (GPT, L(tp=2, sp=True)),
    "gpt-tied-pp2": (GPT, L(pp=2)),
    # ZeRO-2 reduces every micro-batch; the tied embedding's all-reduce waits for the drain
    # (it deadlocked when run per micro-batch: the stages reach their backwards at different times)
    "gpt-tied-pp2-zero2": (GPT, L(pp=2, zero=2)),
    # a layout that computes something else: the data-parallel gradient reduction left out
    "planted-no-grad-sync": (LLAMA, L(dp=2), {"kind": "skip_grad_sync"}),
}
# combinations on 8 processes
EIGHT = {
    "tp2-pp2-dp2": (LLAMA, L(tp=2, pp=2, dp=2, sp=True)),
    "tp2-cp2-dp2": (LLAMA, L(tp=2, cp=2, dp=2, sp=True)),
    # interleaved: rank 0's first chunk is the dense layer, so only one of its chunks has an
    # expert buffer (the planner counted one per chunk: 2 expert all-reduces against 1)
    "ep2-dp4-pp2-moe": (MOE, L(pp=2, vpp=2, schedule="interleaved", dp=4, ep=2, global_batch=8)),
    # MoE under TP + SP (Megatron's layout): router replicated (its gradient in the TP norm
    # all-reduce), shared experts split over TP, routed experts whole, EP across TP and DP ranks
    "tp2-sp-ep4-dp4-moe": (MOE, L(tp=2, sp=True, dp=4, ep=4, global_batch=8)),
    # SP norm gradients of both model chunks in one TP all-reduce (ZeRO-1), per chunk and
    # micro-batch (ZeRO-2); the tied embedding reduced once after the drain
    "pp2-vpp2-tp2-dp2-sp": (LLAMA, L(tp=2, pp=2, vpp=2, dp=2, sp=True)),
    "gpt-tied-tp2-pp2-vpp2-dp2-sp-zero2": (GPT, L(tp=2, pp=2, vpp=2, dp=2, sp=True, zero=2, global_batch=8)),
    # the two distributed-optimizer implementations over dp x cp (ZeRO-0 and ZeRO-2 share ZeRO-1's
    # buckets and run at dp2 above and in the tied 8-rank case)
    **{f"dp4-cp2-zero{z}": (LLAMA, L(dp=4, cp=2, zero=z)) for z in (1, 3)},
}

# three ranks and sizes no power of two divides: the padding rules must be exact, not averaged
ODD = ModelSpec(name="tiny-odd", layers=2, hidden=40, heads=4, kv_heads=2, ffn_hidden=100, vocab=131,
                mlp="swiglu")
THREE = {f"odd-dp3-zero{z}": (ODD, L(dp=3, zero=z, global_batch=3)) for z in (1, 3)}


def _run(cases):
    t0 = time.perf_counter()
    runs = api.launch_layouts(list(cases.values()), steps=1, dtype="float64", timeout=240)
    out = {}
    for (name, case), (cfg, per_rank) in zip(cases.items(), runs):
        rep = api.report_for(cfg, case[0], case[1], per_rank, hardware="h100-sxm")
        out[name] = (cfg, per_rank, rep)
    out["_seconds"] = time.perf_counter() - t0
    return out


@pytest.fixture(scope="module")
def two():
    return _run(TWO)


@pytest.fixture(scope="module")
def eight():
    return _run(EIGHT)


@pytest.fixture(scope="module")
def three():
    return _run(THREE)


def _failures(rep):
    return [f"{c['quantity']} {c.get('group_label', '')}/{c.get('kind', '')} {c['group']}: "
            f"predicted {c['predicted']} measured {c['measured']}"
            for c in rep["checks"] if not c["ok"]]


def _has(rep, quantity):
    return any(c["quantity"] == quantity for c in rep["checks"])


@pytest.mark.parametrize("name", [n for n in TWO if not n.startswith("planted")])
def test_each_dimension_at_degree_two(two, name):
    rep = two[name][2]
    assert rep["ok"], _failures(rep)
    for q in ("flops.forward", "flops.backward", "memory.weights_bytes", "memory.gradients_bytes",
              "memory.optimizer_bytes", "activations.bytes_per_microbatch", "loss", "gradients"):
        assert _has(rep, q), q
    assert rep["step_time_s"]["predicted"] > 0 and rep["step_time_s"]["measured"] > 0


@pytest.mark.parametrize("name", list(EIGHT))
def test_combinations_on_eight_processes(eight, name):
    rep = eight[name][2]
    assert rep["world"] == 8
    assert rep["ok"], _failures(rep)
    assert _has(rep, "loss") and _has(rep, "gradients")


def test_padding_is_exact_on_three_ranks(three):
    """ZeRO-1 pads Megatron's flat buffer, FSDP2 each parameter's dim-0 chunk (131 vocab rows, 100
    FFN rows, 40 hidden rows over 3 ranks): every state and collective byte count is exact, the
    FSDP2 optimizer per shard rank (the last holds fewer rows). Before, ZeRO-1 failed its optimizer
    bytes at dp3 and FSDP2's collective bytes needed a 1% allowance."""
    for name in THREE:
        rep = three[name][2]
        assert rep["ok"], (name, _failures(rep))
        for c in rep["checks"]:
            if c["quantity"].startswith(("memory.", "collective.")):
                assert c["tol"] <= 1e-9, c
    opt = [c for c in three["odd-dp3-zero3"][2]["checks"] if c["quantity"] == "memory.optimizer_bytes"]
    by = {c["shard_rank"]: c["measured"] for c in opt}
    assert sorted(by) == [0, 1, 2] and by[2] < by[1] == by[0]


def test_every_dimension_is_really_parallel(two, eight):
    """Each layout's own groups carry traffic: a dimension that silently ran serial would not."""
    def groups(rep):
        return {c["group_label"] for c in rep["checks"]
                if c["quantity"] == "collective.bytes" and c["measured"] > 0}
    expect = {"tp2": {"tp"}, "tp2-sp": {"tp"}, "pp2": {"pp"}, "dp2-zero0": {"dp"}, "dp2-zero3": {"dp"},
              "cp2": {"cp"}, "ep2-moe": {"ep", "dp"}, "gpt-tied-pp2": {"pp", "embd"}}
    for name, g in expect.items():
        assert g <= groups(two[name][2]), name
    assert {"tp", "pp", "dp"} <= groups(eight["tp2-pp2-dp2"][2])
    assert {"tp", "cp", "dp"} <= groups(eight["tp2-cp2-dp2"][2])
    assert {"ep", "edp", "pp", "dp"} <= groups(eight["ep2-dp4-pp2-moe"][2])
    assert {"tp", "ep", "edp", "dp"} <= groups(eight["tp2-sp-ep4-dp4-moe"][2])


def test_a_layout_computing_something_else_is_caught(two):
    rep = two["planted-no-grad-sync"][2]
    bad = {c["quantity"] for c in rep["checks"] if not c["ok"]}
    assert {"loss", "gradients"} <= bad


def test_tolerances_follow_the_dtype():
    """Machine epsilons x fixed multiples (api.tolerance): fp32 gradients 3.8e-6 at step 0, 3.9e-3
    after Adam steps (the issue's 1e-2 was 3x looser than the worst drift measured); bf16 only at
    step 0, where its rounding leaves 3.5 eps of the 32 allowed."""
    import torch
    eps = torch.finfo(torch.float32).eps
    assert api.tolerance("float32") == pytest.approx((16 * eps, 32 * eps, 2 ** 15 * eps))
    loss, g0, later = api.tolerance("bfloat16")
    assert later is None and g0 == pytest.approx(32 * torch.finfo(torch.bfloat16).eps)
    assert api.tolerance("float64")[2] < 1e-11


def test_bfloat16_runs_and_a_wrong_layout_still_fails():
    """The issue's case: TP + SP in bf16 failed its TP all-reduce bytes (the loss computed in bf16
    under loss_parallel, fp32 in the reference) and its gradients (a float32 tolerance). The CLI
    takes --dtype bfloat16 (its parser below); both layouts run in one launch."""
    from validate.cli import build_parser
    a = build_parser().parse_args(["run", "--model", "llama-3-8b", "--gpus", "2", "--dtype", "bfloat16"])
    assert a.dtype == "bfloat16"
    tp = L(tp=2, sp=True)
    (cfg, per_rank), (cfg2, per_rank2) = api.launch_layouts(
        [(LLAMA, tp), (LLAMA, L(dp=2), {"kind": "skip_grad_sync"})], dtype="bfloat16")
    rep = api.report_for(cfg, LLAMA, tp, per_rank)
    assert rep["ok"], _failures(rep)
    assert [c["step"] for c in rep["checks"] if c["quantity"] == "gradients"] == [0]
    assert any("step 0 only" in n for n in rep["notes"])
    bad = {c["quantity"] for c in api.report_for(cfg2, LLAMA, L(dp=2), per_rank2)["checks"] if not c["ok"]}
    assert "gradients" in bad


def test_planted_cost_model_bug_tp_collectives_counted_once(two, monkeypatch):
    """One TP collective pair per layer instead of two, planted in the cost model's traffic term
    (planner/costmodel/traffic.py, which also times TP): the check must fail."""
    import planner.costmodel.traffic as X
    cfg, per_rank, good = two["tp2"]
    assert good["ok"]
    monkeypatch.setattr(X, "TP_PAIRS_DENSE", 1)
    rep = api.report_for(cfg, *TWO["tp2"], per_rank, reference=False)
    bad = [c for c in rep["checks"] if not c["ok"]]
    assert bad and all(c.get("group_label") == "tp" and c["kind"] == "all_reduce" for c in bad)


def test_planted_cost_model_bug_in_activation_memory(two, monkeypatch):
    """The gated MLP's activations counted for two matrices instead of three, planted in the
    formula the cost model's memory phase uses (planner/memory.py mlp_activation_bytes)."""
    import planner.memory as M
    cfg, per_rank, _ = two["dp2-zero1"]
    orig = M.mlp_activation_bytes
    monkeypatch.setattr(M, "mlp_activation_bytes",
                        lambda m, tokens, tp, sp, ffn=None, act=2.0, gated_tensors=3, gemm_in=None:
                        orig(m, tokens, tp, sp, ffn, act, gated_tensors, gemm_in) - act * tokens * (ffn or m.ffn_hidden) / tp)
    rep = api.report_for(cfg, *TWO["dp2-zero1"], per_rank, reference=False)
    assert {c["quantity"] for c in rep["checks"] if not c["ok"]} == {"activations.bytes_per_microbatch"}


def test_planted_planner_bug_in_flops_formula(two, monkeypatch):
    """A gated MLP counted with 2 matrices instead of 3 (planner/flops.py mlp_flops)."""
    import planner.flops as F
    cfg, per_rank, _ = two["dp2-zero1"]
    orig = F.mlp_flops
    monkeypatch.setattr(F, "mlp_flops", lambda m, tokens, ffn=None: orig(m, tokens, ffn) * 2 / 3)
    rep = api.report_for(cfg, *TWO["dp2-zero1"], per_rank, reference=False)
    assert {c["quantity"] for c in rep["checks"] if not c["ok"]} == {"flops.forward", "flops.backward"}


def test_expert_parallel_counts_are_exact_as_a_group_mean(two):
    """Routed tokens differ per EP rank, so its all-to-all bytes and expert FLOPs do; summed
    over the EP group they are exactly what the planner predicts for every rank."""
    _, per_rank, rep = two["ep2-moe"]
    pred = next(c["predicted"] for c in rep["checks"] if c["quantity"] == "collective.bytes"
                and c["group_label"] == "ep" and c["kind"] == "all_to_all")
    per = [r["coll_bytes"][0]["ep|all_to_all"] for r in per_rank]
    assert sum(per) == pred * len(per)
    fpred = next(c["predicted"] for c in rep["checks"] if c["quantity"] == "flops.forward")
    assert sum(r["flops"][0]["forward"] for r in per_rank) == fpred * len(per_rank)


# ------------------------------------------------------------------------------ CLI
def _cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "validate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_run_json():
    p = _cli("run", "--model", "llama-3-8b", "--gpus", "2", "--pp", "2", "--layers", "2",
             "--hidden", "32", "--heads", "4", "--kv-heads", "2", "--ffn-hidden", "64", "--vocab", "128",
             "--seq-len", "16", "--steps", "1", "--timed-steps", "1", "--format", "json")
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads(p.stdout)
    assert rep["ok"] and rep["world"] == 2
    for c in rep["checks"]:
        assert {"quantity", "predicted", "measured", "rel_err"} <= set(c)
    assert set(rep["step_time_s"]) >= {"predicted", "measured"}
    assert rep["step_time_s"]["predicted"] > 0 and rep["step_time_s"]["measured"] > 0
    assert any(c["quantity"] == "collective.bytes" and c["group_label"] == "pp" for c in rep["checks"])


SIZE = ["--layers", "2", "--hidden", "32", "--heads", "4", "--kv-heads", "2", "--ffn-hidden", "64",
        "--vocab", "128", "--seq-len", "16"]


@pytest.mark.parametrize("args,needle", [
    (["--model", "no-such-model", "--gpus", "2"], "no-such-model"),
    (["--model", "llama-3-8b", "--gpus", "2", "--tp", "3"], "--tp 3"),
    (["--model", "llama-3-8b", "--gpus", "4", "--tp", "2", "--dp", "1"], "--gpus"),
    (["--model", "llama-3-8b", "--gpus", "2", "--ep", "2"], "mixture-of-experts"),
    (["--model", "llama-3-8b", "--gpus", "2", "--tp", "2", "--zero", "3"], "--zero 3"),
    (["--model", "llama-3-8b", "--gpus", "2", "--cp", "2", "--seq-len", "18"], "--cp 2"),
    (["--model", "llama-3-8b", "--gpus", "2", "--pp", "2", "--layers", "3"], "--pp 2"),
    (["--model", "llama-3-8b", "--gpus", "0"], "--gpus"),
    (["--model", "llama-3-8b", "--gpus", "two"], "--gpus"),
    (["--model", "llama-3-8b", "--gpus", "2", "--recompute", "sometimes"], "recompute"),
    (["--model", "deepseek-v3", "--gpus", "2"], "latent attention"),
    (["--model", "mixtral-8x7b", "--gpus", "2", "--tp", "2"], "needs --sp"),    # Megatron's MoELayer too
    (["--model", "llama-3-8b", "--gpus", "2", "--experts", "4"], "dense"),
    (["--model", "llama-3-8b", "--gpus", "2", "--timeout", "-1"], "--timeout"),
    (["--model", "llama-3-8b", "--gpus", "2", "--hardware", "no-such-gpu"], "no-such-gpu"),
    (["--model", "llama-3-8b", "--gpus", "2", "--hidden", "36", "--heads", "4", "--kv-heads", "2"], "is odd"),
    (["--model", "llama-3-8b", "--gpus", "4", "--tp", "4"], "KV heads"),     # planner: replicated; validate: not
])
def test_cli_bad_input_is_one_line_exit_2(args, needle, capsys):
    from validate.cli import main
    a = list(args)
    for flag, value in zip(SIZE[::2], SIZE[1::2]):
        if flag not in a:
            a += [flag, value]
    rc = main(["run", *a])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("validate: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert "validate: error: validate:" not in err        # the prefix once
    assert needle in err


# ------------------------------------------------------------------------------ dead or hung ranks
def test_a_dead_rank_ends_the_run_and_is_named():
    t0 = time.perf_counter()
    with pytest.raises(RunFailed, match=r"rank 1 exited with status 9 in step 1"):
        api.launch_layouts([(LLAMA, L(dp=2), {"kind": "exit", "rank": 1, "step": 1})], timeout=60)
    assert time.perf_counter() - t0 < 60


def test_a_hung_rank_times_out_and_leaves_no_process():
    t0 = time.perf_counter()
    with pytest.raises(RunFailed, match=r"timed out after 12 s; ranks still running: .*1"):
        api.launch_layouts([(LLAMA, L(dp=2), {"kind": "hang", "rank": 1, "step": 0})], timeout=12)
    assert time.perf_counter() - t0 < 30
    from validate.launch import LAST_PIDS
    assert len(LAST_PIDS) == 2
    for pid in LAST_PIDS:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# experts padded to their capacity (Megatron --moe-pad-expert-input-to-capacity): cap =
# ceil(16 tokens x top-2 / 4 experts x 0.75) = 6 of each router call's 8 mean, so tokens are dropped
CAPACITY = {"dp2-ep2-moe-cf0.75": (MOE, L(dp=2, ep=2)), "tp2-sp-ep2-moe-cf0.75": (MOE, L(tp=2, sp=True, ep=2))}


def _launch_padded(cases, cf):
    """{name: (scenario, per-rank results)} of one launch with experts padded to capacity cf."""
    runs = api.launch_layouts(list(cases.values()), steps=1, dtype="float64", timeout=240,
                              capacity_factor=cf, pad_to_capacity=True)
    return dict(zip(cases, runs))


@pytest.fixture(scope="module")
def capacity():
    return _launch_padded(CAPACITY, 0.75)


@pytest.mark.parametrize("name", list(CAPACITY))
def test_experts_padded_to_capacity(capacity, name, monkeypatch):
    """Dropped and padded tokens are counted exactly (FLOPs, all-to-all bytes, activations) and the
    single-process reference drops what the ranks drop (its batch routed in the ranks' calls). The
    checks can fail: a dropless prediction misses, and so does a reference routing its batch at once."""
    import torch
    import validate.api as A
    import validate.reference as R
    cfg, per_rank = capacity[name]
    model, lay = CAPACITY[name]
    rep = api.report_for(cfg, model, lay, per_rank, hardware="h100-sxm")
    assert rep["ok"], _failures(rep)
    counts = A.counts
    monkeypatch.setattr(A, "counts", lambda spec, layout, dtype, cf=0.0, pad=False: counts(spec, layout, dtype))
    missed = {c["quantity"] for c in api.report_for(cfg, model, lay, per_rank, hardware="h100-sxm")["checks"]
              if not c["ok"]}
    assert {"flops.forward", "collective.bytes"} <= missed, missed
    monkeypatch.setattr(A, "counts", counts)
    monkeypatch.setattr(R, "reference_calls", lambda lay: (lambda rows, seq: [torch.arange(rows * seq)]))
    wrong = api.report_for(cfg, model, lay, per_rank, hardware="h100-sxm")
    assert not wrong["ok"] and any(c["quantity"] == "loss" and not c["ok"] for c in wrong["checks"])


def test_dropping_without_padding_is_refused_in_one_line():
    with pytest.raises(PlannerError, match="without --pad-to-capacity drops a number of tokens"):
        api.supported(MOE, L(dp=2, ep=2), capacity_factor=1.0)


def test_a_recompute_module_list_is_refused_in_one_line():
    """validate's model recomputes core attention or whole layers; a Megatron-Core module list
    would run as none while the cost model prices it, so it is refused before any rank starts
    (RUN_STACK has no Stack.recompute_modules: rules.stack_recompute_modules)."""
    with pytest.raises(PlannerError, match="names Megatron-Core recompute modules, which validate does not"):
        api.supported(MOE, L(dp=2, ep=2, recompute="selective:moe_act"))


# expert TP: the etp group gathers the tokens its ranks received and reduce-scatters the experts'
# partial outputs; counts are even only with experts padded to capacity (gloo has no uneven all-gather)
MOE_NB = dataclasses.replace(MOE, bias=False)       # Megatron refuses expert TP with linear biases
ETP = {"dp4-ep2-etp2": (MOE_NB, L(dp=4, ep=2, etp=2, global_batch=8)),
       "tp2-sp-dp2-ep2-etp2": (MOE_NB, L(tp=2, sp=True, dp=2, ep=2, etp=2, global_batch=8))}


@pytest.fixture(scope="module")
def etp():
    return _launch_padded(ETP, 1.0)


@pytest.mark.parametrize("name", list(ETP))
def test_expert_tensor_parallel(etp, name):
    """Experts split over expert TP (fc1 by rows, fc2 by columns, DTensor shards on the etp mesh):
    losses and gradients match the single-process reference, and the etp group's gather and
    reduce-scatter, the expert activations (the gathered input kept by fc1) and FLOPs are the
    planner's, exactly per rank."""
    cfg, per_rank = etp[name]
    model, lay = ETP[name]
    rep = api.report_for(cfg, model, lay, per_rank, hardware="h100-sxm")
    assert rep["ok"], _failures(rep)
    got = {(c["quantity"], c.get("group_label"), c.get("kind")) for c in rep["checks"] if c["predicted"]}
    assert {("collective.bytes", "etp", "all_gather"), ("collective.bytes", "etp", "reduce_scatter")} <= got


def test_expert_tp_is_refused_where_gloo_cannot_run_it():
    with pytest.raises(PlannerError, match="--etp 2 gathers .* --pad-to-capacity"):
        api.supported(MOE_NB, L(dp=4, ep=2, etp=2, global_batch=8))
    with pytest.raises(PlannerError, match="linear biases"):
        api.supported(dataclasses.replace(MOE, bias=True), L(dp=4, ep=2, etp=2, global_batch=8), 1.0, True)


def test_the_rank_that_died_is_named_not_the_peer_that_lost_it(tmp_path):
    """Rank 1 exits (status 9) and rank 0 fails on gloo's 'connection closed by peer' within the same
    poll (seen in a clean-clone CI rehearsal): the run names rank 1. A signal comes first; with
    no lost-peer error either way, the lowest rank."""
    from validate.launch import _root_cause
    errs = [tmp_path / f"rank{r}.err" for r in range(3)]
    errs[0].write_text("RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:15263\n")
    errs[1].write_text("")
    errs[2].write_text("RuntimeError: injected failure\n")
    assert _root_cause([(0, 3), (1, 9)], errs) == (1, 9)
    assert _root_cause([(0, 3), (2, 3)], errs) == (2, 3)
    assert _root_cause([(0, 3), (1, -9), (2, 3)], errs) == (1, -9)
    assert _root_cause([(1, 9), (2, 3)], errs) == (1, 9)
