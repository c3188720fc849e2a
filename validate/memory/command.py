"""`python -m validate memory`: the planner's predicted memory of one rank beside what PyTorch's
trackers measure for the same layout run at full size on fake tensors.

    python -m validate memory --model llama-3-8b --gpus 8 --stack torchtitan --recompute full \\
        --micro-batch 1 --seq-len 8192 [--format json]

Layout flags are plan's: the ones given are held and the rest chosen as plan chooses them (its
best layout, or the closest one when none fits), so the rank measured is a layout plan would
print. The rank measured is the pipeline rank the planner predicts the peak on (--stage to pick
another). The stack decides what is emulated: torchtitan (DTensor TP/SP, FSDP2, op-level SAC) or
megatron-core (Megatron's TP with SP re-gather, distributed optimizer, core-attention selective
recompute). Exit status 0 when the peak is within --tolerance of the tracker, 1 when not, 2 bad
input."""
from __future__ import annotations

import json

from planner.errors import PlannerError

EMULATED = {"torchtitan": "dtensor", "megatron-core": "megatron"}
TERMS = ("weights", "gradients", "optimizer", "activations")
# tracker categories (MemTracker / FSDPMemTracker) by planner term; the loss's tensors, comm
# buffers and backward temporaries are all activations to the tracker
CATEGORIES = {"weights": ("Parameter", "Sharded Param", "Unsharded Param", "All Gather", "Buffer"),
              "gradients": ("Gradient", "Sharded Grad", "Unsharded Grad", "Reduce Scatter"),
              "optimizer": ("Optstate", "OptState"),
              "activations": ("Activation", "Temp", "Inputs", "Other")}
PLANNER_TERMS = {"weights": ("weights",), "gradients": ("gradients",), "optimizer": ("optimizer",),
                 "activations": ("activations", "logits", "buffers")}


def add_parser(sub):
    from planner.cli import build_parser as plan_parser
    p = sub.add_parser("memory", help="one rank's memory on fake tensors under PyTorch's trackers vs the planner")
    plan = plan_parser()
    keep = {"run settings", "parallel degrees (given: held; omitted: searched)", "batching and memory"}
    for g in plan._action_groups:
        if g.title in keep:
            ng = p.add_argument_group(g.title)
            for act in g._group_actions:
                ng._add_action(act)
    for act in plan._actions:
        if act.dest in ("model", "gpus", "hardware"):
            p._add_action(act)
    p.add_argument("--stack", default="megatron-core", choices=tuple(EMULATED),
                   help="stack to emulate and predict (default megatron-core)")
    p.add_argument("--stage", choices=("peak", "first", "middle", "last"), default="peak",
                   help="pipeline rank to run (default: where the planner predicts the peak)")
    p.add_argument("--layers", type=int, help="size the model down to this many layers (tests)")
    p.add_argument("--tolerance", type=float, default=0.10, help="peak error accepted (default 0.10)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    return p


def _layout(a, model, cluster, stack):
    """The layout plan would print for these flags (best, or closest infeasible)."""
    from planner.cli import _fixed
    from planner.engine import search
    fixed = _fixed(a)
    if a.vpp and a.vpp > 1 and not a.schedule:
        fixed["schedule"] = "interleaved"
    res = search(model, cluster, a.gpus, seq_len=a.seq_len, global_batch=a.global_batch, fixed=fixed, top=1,
                 stack=stack)
    plan = res.best or res.closest_infeasible
    if plan is None:
        raise PlannerError(res.empty_reason or f"no layout of {model.name} on {a.gpus} GPUs with the given knobs")
    return plan.layout


def _supported(L, stack_name: str) -> None:
    """What the fake-tensor run does not emulate, refused with the reason."""
    if stack_name == "torchtitan" and L.zero != 3:
        raise PlannerError(f"validate memory emulates torchtitan with FSDP2 (--zero 3), got --zero {L.zero}")
    if stack_name == "megatron-core" and L.zero == 3:
        raise PlannerError("validate memory emulates Megatron-Core with --zero 0 or 1 (distributed optimizer); "
                           "its FSDP (--zero 3) is not FSDP2 and is not emulated")
    if L.zero == 2:
        raise PlannerError("validate memory emulates --zero 0, 1 (Megatron distributed optimizer) or 3 (FSDP2); "
                           "Megatron-Core has no ZeRO-2")
    if L.etp > 1:
        raise PlannerError("validate memory does not emulate expert tensor parallelism (--etp > 1)")
    if L.shard_group and L.shard_group < L.dp * L.cp:
        raise PlannerError("validate memory does not emulate HSDP (--shard-group); FSDP2 over dp x cp only")


def rank_spec(model, L, rank, stack_name: str):
    """The measure.RankSpec of a planner rank (step.RankMemory) of layout L."""
    from .fakemodel import Shape
    from .measure import RankSpec
    from planner.stacks import STACKS
    from planner import rules
    first, mid, last = (int(x) for x in (v.ravel()[0] if hasattr(v, "ravel") else v for v in rules.stage_layers(
        model.layers, L.pp, L.first_stage_layers, L.last_stage_layers)))
    start = 0 if rank.stage == 0 else first + (rank.stage - 1) * mid
    ids = tuple(range(start, start + rank.layers))
    return RankSpec(shape=Shape.of(model), world=L.gpus, tp=L.tp, pp=L.pp, dp=L.dp, cp=L.cp, ep=L.ep, sp=L.sp,
                    micro_batch=L.micro_batch, seq_len=L.seq_len, recompute=L.recompute,
                    selective=STACKS[stack_name].selective, tp_mode=EMULATED[stack_name], zero=L.zero,
                    stage=rank.stage, layer_ids=ids, first=rank.first, last=rank.last, inflight=rank.inflight,
                    offload_layers=L.offload_layers)


def _pick(ranks, which: str):
    if which == "peak":
        return max(ranks, key=lambda r: sum(r.breakdown.values()))
    want = {"first": lambda r: r.first, "last": lambda r: r.last, "middle": lambda r: not (r.first or r.last)}[which]
    for r in ranks:
        if want(r):
            return r
    raise PlannerError(f"--stage {which}: the layout has no such pipeline rank (pp = {len(ranks)} ranks scored)")


def _gemm_flops(model, L, stack, rank) -> float:
    """The planner's linear-layer FLOPs of the run: the rank's step FLOPs (step.predict) less core
    attention, per micro-batch, times the micro-batches run."""
    from planner.step import predict
    rc = predict(model, L, stack)[rank.stage]
    nmb = L.global_batch // (L.dp * L.micro_batch)
    return (sum(rc.flops.values()) - sum(rc.attention_flops.values())) / nmb * rank.inflight


def compare(model, L, stack, rank, m) -> dict:
    """The report: layout, peak, the four terms, FLOPs (the JSON of the issue's contract)."""
    from planner.results import LAYOUT_FIELDS
    terms = []
    for t in TERMS:
        pred = sum(rank.breakdown[k] for k in PLANNER_TERMS[t])
        meas = sum(m.peak_by_category.get(c, 0.0) for c in CATEGORIES[t])
        terms.append({"term": t, "predicted": pred, "measured": meas,
                      "measured_max": sum(m.category_max.get(c, 0.0) for c in CATEGORIES[t])})
    gemm = sum(v for k, v in m.flops.items() if k.split(".", 1)[1] in ("mm", "addmm", "addmm_", "bmm", "baddbmm", "_grouped_mm"))
    return {"layout": {f: getattr(L, f) for f in LAYOUT_FIELDS}, "stack": stack.name,
            "rank": {"stage": rank.stage, "layers": rank.layers, "inflight_microbatches": rank.inflight,
                     "first": rank.first, "last": rank.last},
            "peak_bytes": {"predicted": rank.allocated, "measured": m.peak_bytes},
            "peak_at": m.where, "terms": terms,
            "flops": {"predicted": _gemm_flops(model, L, stack, rank), "measured": gemm,
                      "basis": "linear-layer GEMM FLOPs of the micro-batches run, incl. recompute"},
            "measured_by_category": m.peak_by_category, "params_local": m.params_local,
            "cpu_seconds": round(m.seconds, 1)}


def to_table(rep: dict, notes) -> str:
    G = 2 ** 30
    L, r = rep["layout"], rep["rank"]
    out = [f"{rep['stack']}: tp{L['tp']} pp{L['pp']} dp{L['dp']} cp{L['cp']} ep{L['ep']} mb{L['micro_batch']} "
           f"seq {L['seq_len']} recompute {L['recompute']} zero {L['zero']} | pipeline rank {r['stage']} "
           f"({r['layers']} layers, {r['inflight_microbatches']} micro-batches in flight)",
           f"{'term':12s} {'predicted GiB':>14s} {'tracked GiB':>12s} {'error':>8s}"]
    rows = [(t["term"], t["predicted"], t["measured"]) for t in rep["terms"]]
    rows.append(("peak", rep["peak_bytes"]["predicted"], rep["peak_bytes"]["measured"]))
    for name, p, mm in rows:
        err = f"{(p - mm) / mm:+.1%}" if mm > 0 else "-"
        out.append(f"{name:12s} {p / G:14.2f} {mm / G:12.2f} {err:>8s}")
    f = rep["flops"]
    out.append(f"GEMM FLOPs   {f['predicted'] / 1e12:14.1f}T {f['measured'] / 1e12:11.1f}T "
               f"{(f['predicted'] - f['measured']) / max(f['measured'], 1):+8.1%}")
    out.append(f"peak at {rep['peak_at']}; {rep['cpu_seconds']} CPU s")
    out += [f"note: {n}" for n in notes]
    return "\n".join(out)


def run(a) -> int:
    import dataclasses
    import warnings
    from planner.model_io import load_model
    from planner.profiles import load_hardware
    from planner.stacks import get_stack
    from planner.step import memory_by_rank
    from .measure import measure
    model = load_model(a.model)
    if a.layers:
        moe = model.moe and dataclasses.replace(model.moe, dense_layers=min(model.moe.dense_layers, a.layers - 1))
        model = dataclasses.replace(model, layers=a.layers, moe=moe or None)
    cluster, stack = load_hardware(a.hardware), get_stack(a.stack)
    L = _layout(a, model, cluster, stack)
    notes = []
    if L.precision != "bf16":
        notes.append(f"the run is bf16: {L.precision} layout measured and predicted at bf16 (fp8 caches not emulated)")
        L = dataclasses.replace(L, precision="bf16")
    _supported(L, stack.name)
    rank = _pick(memory_by_rank(model, cluster, L, stack), a.stage)
    warnings.filterwarnings("ignore", module="torch.distributed._tools")
    m = measure(rank_spec(model, L, rank, stack.name))
    rep = compare(model, L, stack, rank, m)
    rep["notes"] = notes
    print(json.dumps(rep, indent=1) if a.format == "json" else to_table(rep, notes))
    p, mm = rep["peak_bytes"]["predicted"], rep["peak_bytes"]["measured"]
    return 0 if abs(p - mm) <= a.tolerance * mm else 1
