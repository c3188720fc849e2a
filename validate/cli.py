"""`python -m validate run`: train a layout for real and hold the planner's counts against it.

    python -m validate run --model llama-3-8b --gpus 8 --tp 2 --pp 2 --dp 2 --sp \\
        --layers 4 --hidden 64 --heads 4 --kv-heads 2 --ffn-hidden 128 --vocab 256 --seq-len 32

Model and layout flags mean what they mean for `plan` and are checked the same way (the same
one-line errors, exit status 2). Started alone it spawns --gpus local ranks (gloo on CPU, NCCL on
GPUs); started under torchrun it is one of the launcher's ranks. Exit status: 0 all checks
passed, 1 a count or loss check failed, 2 bad input, 3 a rank died, failed or timed out.
"""
from __future__ import annotations

import dataclasses
import sys

from planner.cliutil import Parser as _Parser, UsageError as _UsageError, float_arg as _float_arg, int_arg as _int_arg, guarded_main

DEFAULT_SEQ_LEN = 128     # validation runs on CPU in seconds: a short sequence unless told


def build_parser():
    from planner.layout import CP_COMM, RECOMPUTE, SCHEDULES
    top = _Parser(prog="python -m validate", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="command", parser_class=_Parser)
    p = sub.add_parser("run", help="run a layout with torch.distributed and check the planner's counts")
    p.add_argument("--model", required=True, help="catalog name or model file (as for plan)")
    p.add_argument("--gpus", required=True, type=_int_arg("--gpus"), help="ranks: tp*pp*dp*cp")
    p.add_argument("--hardware", default="h100-sxm", help="profile for the predicted step time")
    p.add_argument("--stack", default=None, help="software stack for the predicted step time")
    r = p.add_argument_group("run settings")
    r.add_argument("--seq-len", type=_int_arg("--seq-len"),
                   help=f"sequence length (default {DEFAULT_SEQ_LEN}, short enough for a CPU)")
    r.add_argument("--global-batch", type=_int_arg("--global-batch"),
                   help="sequences per step (default dp x micro-batch x pp)")
    r.add_argument("--precision", choices=("bf16", "fp8", "fp16"), default="bf16",
                   help="precision of the predicted step time (the run itself uses --dtype)")
    d = p.add_argument_group("parallel degrees")
    for k in ("tp", "pp", "dp", "cp", "ep", "etp", "vpp"):
        d.add_argument(f"--{k}", type=_int_arg(f"--{k}"))
    d.add_argument("--schedule", choices=SCHEDULES)
    d.add_argument("--cp-comm", choices=CP_COMM, default="p2p")
    d.add_argument("--first-stage-layers", type=_int_arg("--first-stage-layers"))
    d.add_argument("--last-stage-layers", type=_int_arg("--last-stage-layers"))
    m = p.add_argument_group("batching and memory")
    m.add_argument("--micro-batch", type=_int_arg("--micro-batch"))
    m.add_argument("--sp", dest="sp", action="store_true", default=False, help="sequence parallelism on")
    m.add_argument("--no-sp", dest="sp", action="store_false")
    m.add_argument("--recompute", choices=RECOMPUTE[:3], default="none")   # RUN_STACK: no module lists
    m.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=1,
                   help="0 all-reduce, 1 distributed optimizer (default), 2 + sharded gradients, 3 FSDP2")
    m.add_argument("--shard-group", type=_int_arg("--shard-group"))
    s = p.add_argument_group("sizing the model down (unset: the model's own value)")
    for k in ("layers", "hidden", "heads", "kv-heads", "ffn-hidden", "vocab", "experts", "top-k",
              "expert-ffn-hidden"):
        s.add_argument(f"--{k}", type=_int_arg(f"--{k}"))
    x = p.add_argument_group("mixture of experts (as for plan)")
    x.add_argument("--capacity-factor", type=_float_arg("--capacity-factor", 0.0), default=0.0,
                   help="expert capacity factor (0 = dropless); validate runs it with --pad-to-capacity")
    x.add_argument("--pad-to-capacity", action="store_true",
                   help="every expert's input padded to its capacity (Megatron --moe-pad-expert-input-to-capacity)")
    v = p.add_argument_group("the run")
    v.add_argument("--steps", type=_int_arg("--steps"), default=2, help="counted steps (after one warm-up)")
    v.add_argument("--timed-steps", type=_int_arg("--timed-steps", 0), default=2,
                   help="uninstrumented steps timed after the counted ones")
    v.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default="float32")
    v.add_argument("--seed", type=_int_arg("--seed", 0), default=1234)
    v.add_argument("--timeout", type=_float_arg("--timeout", 0.0, strict=True), default=600.0,
                   help="seconds for the whole run; a hung or dead rank ends it (default 600)")
    v.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the single-process reference (losses and gradients unchecked)")
    v.add_argument("--format", choices=("table", "json"), default="table")
    v.add_argument("--out", help="also write the JSON report to this file (atomically)")
    from .calibrate.command import add_parser
    add_parser(sub)
    from .memory.command import add_parser as add_memory
    add_memory(sub)
    return top


def sized_model(a):
    """The model with the sizing flags applied; notes on what validate changes."""
    from planner.errors import PlannerError
    from planner.model_io import load_model
    spec = load_model(a.model)
    notes = []
    kw = {}
    for k in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab"):
        v = getattr(a, k)
        if v is not None:
            kw[k] = v
    if "hidden" in kw or "heads" in kw:
        kw["head_dim"] = None   # re-derived as hidden / heads
    if "heads" in kw and "kv_heads" not in kw and spec.kv_heads > kw["heads"]:
        kw["kv_heads"] = kw["heads"]
    moe = spec.moe
    if moe is not None:
        mk = {}
        if a.experts is not None:
            mk["experts"] = a.experts
        if a.top_k is not None:
            mk["top_k"] = a.top_k
        elif a.experts is not None and moe.top_k > a.experts:
            mk["top_k"] = a.experts
        ef = a.expert_ffn_hidden if a.expert_ffn_hidden is not None else kw.get("ffn_hidden")
        if ef is not None:
            mk["expert_ffn_hidden"] = ef
            mk["shared_expert_ffn_hidden"] = ef
        if "layers" in kw and moe.dense_layers >= kw["layers"]:
            mk["dense_layers"] = min(moe.dense_layers, max(kw["layers"] - 1, 0))
        if mk:
            kw["moe"] = dataclasses.replace(moe, **mk)
    elif a.experts is not None or a.top_k is not None or a.expert_ffn_hidden is not None:
        raise PlannerError(f"--experts/--top-k/--expert-ffn-hidden need a mixture-of-experts model; "
                           f"{spec.name} is dense")
    if spec.sliding_window is not None:
        kw["sliding_window"] = None
        kw["sliding_window_layers"] = None
        notes.append("sliding-window attention is run and counted as full causal attention")
    if spec.dropout:
        notes.append("dropout is off in the run (deterministic losses); counts assume no dropout masks")
    if kw:
        kw["name"] = f"{spec.name}-sized"
        try:
            spec = dataclasses.replace(spec, **kw)
        except TypeError as e:
            raise PlannerError(f"cannot size {spec.name} down: {e}") from None
    return spec, notes


def layout_from_args(a, spec):
    from planner import rules
    from planner.errors import PlannerError
    from .api import RUN_STACK

    def check_fixed(spec, gpus, seq, gb, fixed):
        rules.check_fixed(rules.Context(spec, gpus, seq, gb, RUN_STACK), fixed)
    from planner.layout import Layout
    tp, pp, cp = a.tp or 1, a.pp or 1, a.cp or 1
    seq = a.seq_len or DEFAULT_SEQ_LEN
    mb = a.micro_batch or 1
    dp = a.dp
    given = dict(tp=a.tp, pp=a.pp, cp=a.cp, dp=a.dp, ep=a.ep, vpp=a.vpp, micro_batch=a.micro_batch,
                 first_stage_layers=a.first_stage_layers, last_stage_layers=a.last_stage_layers)
    # the plan command's checks first, on the degrees as given (the same messages)
    check_fixed(spec, a.gpus, seq, a.global_batch or (dp or 1) * mb * pp,
                {k: v for k, v in given.items() if v is not None})
    if dp is None:
        if a.gpus % (tp * pp * cp):
            raise PlannerError(f"tp*pp*cp = {tp * pp * cp} does not divide --gpus {a.gpus}")
        dp = a.gpus // (tp * pp * cp)
    gb = a.global_batch or dp * mb * pp
    fixed = dict(tp=tp, pp=pp, cp=cp, dp=dp, ep=a.ep, vpp=a.vpp, micro_batch=mb,
                 first_stage_layers=a.first_stage_layers, last_stage_layers=a.last_stage_layers)
    check_fixed(spec, a.gpus, seq, gb, {k: v for k, v in fixed.items() if v is not None})
    schedule = a.schedule or ("interleaved" if (a.vpp or 1) > 1 else "1f1b")
    return Layout(tp=tp, pp=pp, dp=dp, cp=cp, ep=a.ep or 1, etp=a.etp or 1, vpp=a.vpp or 1, sp=bool(a.sp),
                  micro_batch=mb, global_batch=gb, seq_len=seq, recompute=a.recompute, zero=a.zero,
                  shard_group=a.shard_group or 0, precision=a.precision, schedule=schedule,
                  cp_comm=a.cp_comm, first_stage_layers=a.first_stage_layers or 0,
                  last_stage_layers=a.last_stage_layers or 0)


def run(argv) -> int:
    a = build_parser().parse_args(argv)
    if a.command == "calibrate":
        from .calibrate import command
        return command.run(a)
    if a.command == "memory":
        from .memory import command as memory
        return memory.run(a)
    if a.command != "run":
        raise _UsageError("expected a command: run, memory or calibrate")
    from . import api, report
    from .launch import RunFailed, check_torch, under_torchrun
    from planner.profiles import load_hardware
    spec, notes = sized_model(a)
    lay = layout_from_args(a, spec)
    api.supported(spec, lay, a.capacity_factor, a.pad_to_capacity)
    load_hardware(a.hardware)          # bad profile: refused before any rank starts
    if a.stack:
        from planner.stacks import get_stack
        get_stack(a.stack)
    check_torch()
    kw = dict(steps=a.steps, timed_steps=a.timed_steps, dtype=a.dtype, seed=a.seed,
              timeout=a.timeout, hardware=a.hardware, stack=a.stack, reference=a.reference,
              notes=notes, capacity_factor=a.capacity_factor, pad_to_capacity=a.pad_to_capacity)
    try:
        if under_torchrun():
            rep = api.run_torchrun(spec, lay, **kw)
            if rep is None:
                return 0
        else:
            import json
            import os
            # test hook (tests/test_validate_robust.py): make a rank die or stall on purpose
            fault = json.loads(os.environ["VALIDATE_FAULT"]) if os.environ.get("VALIDATE_FAULT") else None
            rep = api.run_layouts([(spec, lay, fault) if fault else (spec, lay)], **kw)[0]
    except RunFailed as e:
        print(f"validate: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 3
    text = report.to_json(rep)
    if a.out:
        from planner.atomic import atomic_write_text
        atomic_write_text(a.out, text + "\n")
    print(text if a.format == "json" else report.to_table(rep))
    return 0 if rep["ok"] else 1


def main(argv=None) -> int:
    return guarded_main("validate", run, argv)