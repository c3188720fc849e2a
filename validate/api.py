"""Run layouts and build their reports (what `python -m validate run` and the tests call).

Several layouts of one world size run in one launch of the ranks, so process start-up is paid
once (tests group their checks this way)."""
from __future__ import annotations

import os

from planner.costmodel.elements import ElementBytes
from planner.errors import PlannerError
from planner.layout import Layout
from planner.model_spec import ModelSpec
from planner.stacks import Stack
from planner.step import predict

from .config import DTYPE_BYTES, routing_of, scenario

# Tolerances of the match with the single-process reference, in units of the dtype's machine
# epsilon (torch.finfo(dtype).eps): the same layout differs from the reference only by the order
# of its sums (and its reductions' rounding), so errors scale with eps; a layout that computes
# something else is off by O(1). Measured on tests/validate/test_run.py's 2- and 8-rank cases, 3
# steps (validate/README.md): loss <= 3.3 eps (fp32), 0.8 eps (fp64), 0.1 eps (bf16: the loss is
# computed in fp32); step-0 gradients <= 10 eps (fp32), 7.7 eps (fp64), 3.5 eps (bf16); after Adam
# steps gradients drift further (Adam's normalisation turns rounding in near-zero gradients into
# whole-step updates): up to 1.1e4 eps in fp32, 1.3e3 in fp64, O(1) in bf16, where a comparison
# checks nothing and is not made.
LOSS_EPS, GRAD0_EPS, GRAD_LATER_EPS = 16, 32, 2 ** 15


def tolerance(dtype: str) -> tuple:
    """(loss, step-0 gradients, later-step gradients or None) relative tolerances for a dtype."""
    from .config import torch_dtype
    import torch
    eps = torch.finfo(torch_dtype(dtype)).eps
    later = GRAD_LATER_EPS * eps
    return LOSS_EPS * eps, GRAD0_EPS * eps, (later if later < 1 else None)


# validate's implementation as a stack the planner models (planner/step.py counts a run with it):
# eager PyTorch with flash attention (CPU SDPA), DTensor TP whose ColwiseParallel keeps SP's
# gathered inputs, no communication overlap, a hand-written distributed optimizer (ZeRO 0-2, one
# flat buffer per model chunk) and FSDP2 (ZeRO-3), 1F1B / interleaved pipelines, ring (p2p) CP.
RUN_STACK = Stack("validate", "validate/: eager PyTorch, DTensor TP, hand-written ZeRO 0-2, FSDP2, "
                  "torch.distributed.pipelining", tp_overlap=False, ep_overlap=False, flash_attention=True,
                  sp_keeps_gathered_inputs=True, schedules=("1f1b", "interleaved"), zero_stages=(0, 1, 2, 3),
                  cp_comms=("p2p",), source="validate/model.py, validate/parallel.py")


def counts(spec: ModelSpec, layout: Layout, dtype: str, capacity_factor: float = 0.0, pad_to_capacity: bool = False):
    """The planner's per-rank step (planner/step.py) for this run's element sizes and routing."""
    return predict(spec, layout, RUN_STACK, element_bytes(dtype, layout.zero), capacity_factor=capacity_factor,
                   pad_to_capacity=pad_to_capacity)


def counted_flops(rank, layout: Layout) -> dict:
    """FLOPs of a rank as torch.utils.flop_counter.FlopCounterMode counts this run: it counts
    scaled-dot-product attention with its full score matrix (sdpa_flop_count ignores is_causal),
    so a causal block is counted in full. Ring CP (2cp chunks, rank r holding chunks r and
    2cp-1-r) computes one causal diagonal block of 2c x 2c and cp-1 full blocks of 2c x c: counted
    = causal FLOPs x (cp + 1) / cp (cp = 1: twice the causal count)."""
    extra = (layout.cp + 1) / layout.cp - 1
    return {k: v + extra * rank.attention_flops.get(k, 0.0) for k, v in rank.flops.items()}


def supported(spec: ModelSpec, layout: Layout, capacity_factor: float = 0.0, pad_to_capacity: bool = False):
    """What validate implements; one-line PlannerError otherwise (checked before any rank starts)."""
    if capacity_factor and spec.moe is None:
        raise PlannerError(f"--capacity-factor needs a mixture-of-experts model; {spec.name} has no experts")
    if capacity_factor and not pad_to_capacity:
        raise PlannerError("--capacity-factor without --pad-to-capacity drops a number of tokens that depends "
                           "on the routing, which the planner does not predict per rank; validate runs "
                           "--pad-to-capacity, where every expert takes exactly its capacity")
    if pad_to_capacity and not capacity_factor:
        raise PlannerError("--pad-to-capacity needs --capacity-factor > 0")
    from planner import rules
    rules.check_layout(layout, rules.context_for(spec, layout, RUN_STACK))
    if spec.mla is not None:
        raise PlannerError(f"{spec.name} uses multi-head latent attention, which validate does not "
                           "implement (GQA/MHA models only)")
    if spec.head_dim % 2:
        raise PlannerError(f"head_dim {spec.head_dim} (--hidden / --heads) is odd: validate's rotary embedding "
                           f"rotates pairs of channels and needs an even head_dim")
    if layout.first_stage_layers or layout.last_stage_layers:
        raise PlannerError("uneven pipeline stages (first/last stage layers) are not implemented")
    if layout.offload_layers:
        raise PlannerError("activation offloading (--offload-layers) is not implemented: validate's ranks keep "
                           "every activation on the device")
    if spec.layers % (layout.pp * layout.vpp):
        raise PlannerError(f"the {spec.layers} layers of {spec.name} must split evenly over pp x vpp = "
                           f"{layout.pp * layout.vpp} stages")
    if layout.etp > 1:
        if not pad_to_capacity:
            raise PlannerError(f"--etp {layout.etp} gathers the tokens each expert-TP rank received, a routing-"
                               "dependent count that gloo's all-gather cannot take unevenly; run it with "
                               "--capacity-factor F --pad-to-capacity (every rank then receives the same count)")
        if spec.bias:
            raise PlannerError("--etp > 1 with linear biases: Megatron-Core refuses it (MoE with expert TP "
                               "needs add_bias_linear off)")
        if spec.moe.expert_ffn_hidden % layout.etp:
            raise PlannerError(f"--expert-ffn-hidden {spec.moe.expert_ffn_hidden} must be divisible by "
                               f"--etp {layout.etp}")
    sp = layout.sp and layout.tp > 1
    if sp and (layout.seq_len // layout.cp) % layout.tp:
        raise PlannerError(f"--sp needs the sequence per CP rank ({layout.seq_len // layout.cp}) "
                           f"divisible by --tp {layout.tp}")
    tp, pp, ep = layout.tp, layout.pp, layout.ep
    if spec.kv_heads % tp:
        raise PlannerError(f"--tp {tp} exceeds the {spec.kv_heads} KV heads: Megatron replicates KV heads "
                           f"then, validate shards them and does not implement replication "
                           f"(use --tp <= {spec.kv_heads} or --kv-heads {tp})")
    if spec.moe is not None and tp > 1 and not sp:
        raise PlannerError(f"--tp {tp} with the experts of {spec.name} needs --sp (Megatron-Core's MoELayer "
                           "refuses MoE with tensor parallelism and without sequence parallelism in training)")
    if layout.zero == 3 and (tp > 1 or pp > 1 or ep > 1 or layout.etp > 1):
        raise PlannerError("--zero 3 (FSDP2) is implemented with data and context "
                           "parallelism only (--tp, --pp and --ep must be 1)")
    if layout.cp > 1 and _cuda():
        raise PlannerError("--cp > 1 runs on CPU ranks only (ring attention uses the CPU "
                           "flash-attention kernels)")
    if layout.cp_comm != "p2p":
        raise PlannerError(f"--cp-comm {layout.cp_comm} is not implemented (ring p2p only)")
    if layout.shard_group not in (0, layout.dp * layout.cp):
        raise PlannerError("--shard-group (HSDP) is not implemented")
    if spec.vocab % tp:
        raise PlannerError(f"--vocab {spec.vocab} must be divisible by --tp {tp} "
                           "(vocab-parallel embedding)")
    if spec.ffn_hidden % tp:
        raise PlannerError(f"--ffn-hidden {spec.ffn_hidden} must be divisible by --tp {tp}")
    nmb = layout.global_batch // (layout.dp * layout.micro_batch)
    if pp > 1 and nmb < pp:
        raise PlannerError(f"--pp {pp} needs at least {pp} micro-batches per step, got "
                           f"{nmb} (global batch / (dp x micro-batch)); raise --global-batch")
    if layout.vpp > 1 and nmb % pp:
        raise PlannerError(f"the interleaved schedule needs micro-batches ({nmb}) "
                           f"divisible by --pp {pp}")


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def element_bytes(dtype: str, zero: int) -> ElementBytes:
    return ElementBytes.uniform(DTYPE_BYTES[dtype], zero)


def _plan(spec, layout, hardware, stack, dtype="float32"):
    """(Plan, profile name, notes) of the planner's prediction for this run, or None.
    A calibrated profile (validate calibrate) is used as validate runs: calibrate_predict."""
    if hardware is None:
        return None
    try:
        from planner.hardware import Cluster
        from planner.profiles import load_hardware
        from planner.stacks import get_stack
        from .calibrate.predict import predict
        cluster = hardware if isinstance(hardware, Cluster) else load_hardware(hardware)
        p, notes = predict(spec, layout, cluster, get_stack(stack) if stack else None, dtype)
        return p, cluster.name, notes
    except PlannerError:
        raise
    except Exception:  # the step-time prediction is informational
        return None


def launch_layouts(items, *, steps=1, timed_steps=0, dtype="float32", seed=1234, timeout=300.0,
                   capacity_factor=0.0, pad_to_capacity=False):
    """items: [(ModelSpec, Layout)] or [(ModelSpec, Layout, fault)] of one world size, run in
    one launch. Returns [(scenario dict, per-rank results)]."""
    from .launch import check_torch, launch
    check_torch()
    worlds = {it[1].gpus for it in items}
    if len(worlds) != 1:
        raise ValueError(f"one launch runs one world size, got {sorted(worlds)}")
    for it in items:
        supported(it[0], it[1], capacity_factor, pad_to_capacity)
    cfgs = [scenario(it[0], it[1], steps, timed_steps, seed, dtype, fault=it[2] if len(it) > 2 else None,
                     capacity_factor=capacity_factor, pad_to_capacity=pad_to_capacity) for it in items]
    results = launch(cfgs, worlds.pop(), timeout)
    return list(zip(cfgs, results))


def run_layouts(items, *, steps=1, timed_steps=0, dtype="float32", seed=1234, timeout=300.0,
                hardware="h100-sxm", stack=None, reference=True, notes=(), capacity_factor=0.0,
                pad_to_capacity=False):
    """Launch `items` (one world size) and return one report dict per item."""
    runs = launch_layouts(items, steps=steps, timed_steps=timed_steps, dtype=dtype, seed=seed,
                          timeout=timeout, capacity_factor=capacity_factor, pad_to_capacity=pad_to_capacity)
    return [report_for(cfg, it[0], it[1], per_rank, reference=reference, hardware=hardware,
                       stack=stack, notes=notes)
            for (cfg, per_rank), it in zip(runs, items)]


def report_for(cfg, spec, lay, per_rank, *, reference=True, hardware=None, stack=None, notes=(),
               ref=None):
    """Predict the counts of (spec, lay) and hold a finished run's measurements against them.
    `ref`: a reference run (reference.run_reference) to reuse."""
    return _report(cfg, spec, lay, per_rank, cfg["dtype"], reference, hardware, stack, notes, ref)


def _report(cfg, spec, lay, per_rank, dtype, reference, hardware, stack, notes, ref=None):
    from . import report
    from .reference import compare, run_reference
    stages = counts(spec, lay, dtype, *routing_of(cfg))
    ref_checks = []
    notes = list(notes)
    if reference:
        tol = tolerance(dtype)
        ref_checks = compare(cfg, per_rank, ref or run_reference(cfg), tol)
        if tol[2] is None and cfg["steps"] + cfg.get("timed_steps", 0) > 0:
            notes.append(f"{dtype}: gradients are compared at step 0 only; after an Adam step rounding alone "
                         f"moves them by O(1) from the reference (every step's loss is compared)")
    else:
        notes.append("no single-process reference run (--no-reference): losses and gradients not checked")
    pl = _plan(spec, lay, hardware, stack, dtype)
    plan, hw, pnotes = pl if pl else (None, None, [])
    rep = report.build(cfg, per_rank, stages, ref_checks, plan, notes,
                       flops=[counted_flops(st, lay) for st in stages])
    rep["step_time_s"]["hardware"] = hw
    if pnotes:
        rep["step_time_s"]["prediction_notes"] = pnotes
    return rep


def run_torchrun(spec, lay, *, steps, timed_steps, dtype, seed, timeout, hardware, stack,
                 reference, notes=(), capacity_factor=0.0, pad_to_capacity=False):
    """Under torchrun: this process is one rank; rank 0 returns the report, others None."""
    runs = torchrun_layouts([(spec, lay)], steps=steps, timed_steps=timed_steps, dtype=dtype, seed=seed,
                            timeout=timeout, capacity_factor=capacity_factor, pad_to_capacity=pad_to_capacity)
    if runs is None:
        return None
    (cfg, per_rank), = runs
    return _report(cfg, spec, lay, per_rank, dtype, reference, hardware, stack, notes)


def torchrun_layouts(items, *, steps=1, timed_steps=0, dtype="float32", seed=1234, timeout=300.0,
                     capacity_factor=0.0, pad_to_capacity=False, beside=None):
    """launch_layouts under torchrun: this process is one rank of the launcher's world, which runs
    every (ModelSpec, Layout) of `items` in turn. Rank 0 returns [(scenario dict, per-rank
    results)], the others None. beside(i, device), if given, runs on every rank before layout i
    and once more after the last (i = len(items)): a measurement to take beside each run."""
    import torch.distributed as dist
    from .worker import init_rank, run_scenario
    world = int(os.environ["WORLD_SIZE"])
    for spec, lay in items:
        supported(spec, lay, capacity_factor, pad_to_capacity)
        if world != lay.gpus:
            raise PlannerError(f"torchrun started {world} ranks (WORLD_SIZE) but the layout needs "
                               f"tp*pp*dp*cp = {lay.gpus}; start {lay.gpus} ranks or change --gpus "
                               f"and the degrees")
    device = init_rank(timeout)
    runs = []
    for i, (spec, lay) in enumerate(items):
        if beside is not None:
            beside(i, device)
        cfg = scenario(spec, lay, steps, timed_steps, seed, dtype, capacity_factor=capacity_factor,
                       pad_to_capacity=pad_to_capacity)
        runs.append((cfg, run_scenario(cfg, device)))
    if beside is not None:
        beside(len(items), device)
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    return runs if rank == 0 else None
