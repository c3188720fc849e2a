"""`plan`: rank layouts of a model on a cluster.

    plan --model gpt-20b --gpus 64 [--hardware h100-sxm] [--tp 8 ...] [--format table|json|csv]
    plan models | plan hardware

Imports are lazy so the command starts fast. Bad input: one line on stderr, exit status 2.
No layout fits in memory: the reason on stderr, exit status 1. Fixed knobs that admit no layout
together: one line naming them, exit status 2.
"""
from __future__ import annotations

import sys

from .cliutil import Parser, UsageError, float_arg, gpus_arg, guarded_main, int_arg


def build_parser() -> Parser:
    from .layout import CP_COMM, PRECISIONS, RECOMPUTE, SCHEDULES
    from .stacks import GRAD_DTYPES
    p = Parser(prog="plan", description="Rank distributed-training layouts of a transformer on a GPU cluster.")
    p.add_argument("--model", required=True, help="catalog name (see `plan models`), native .toml/.json model file, "
                                                   "or a Hugging Face config.json")
    p.add_argument("--gpus", required=True, type=gpus_arg, help="GPU count, or a range LO-HI to search over")
    p.add_argument("--hardware", default="h100-sxm", help="profile name (see `plan hardware`) or a .toml path")
    p.add_argument("--stack", default="megatron-core", help="software stack to model (default megatron-core)")
    r = p.add_argument_group("run settings")
    r.add_argument("--seq-len", type=int_arg("--seq-len"), help="sequence length (default: the model's, else 4096)")
    r.add_argument("--global-batch", type=int_arg("--global-batch"),
                   help="global batch in sequences (default: 4Mi tokens / seq-len)")
    r.add_argument("--precision", choices=PRECISIONS, help="linear-layer precision (default: searched over bf16, fp8)")
    r.add_argument("--grad-dtype", choices=GRAD_DTYPES,
                   help="megatron-core: gradients kept and reduced in bf16 (Megatron --grad-reduce-in-bf16, "
                        "as NVIDIA's performance recipes run) or fp32 (default)")
    r.add_argument("--compile", action="store_true",
                   help="torchtitan: each TransformerBlock under torch.compile (fused norms, RoPE, SwiGLU); "
                        "default eager, torchtitan's own default")
    d = p.add_argument_group("parallel degrees (given: held; omitted: searched)")
    for k in ("tp", "pp", "dp", "cp", "ep", "etp", "vpp"):
        d.add_argument(f"--{k}", type=int_arg(f"--{k}"))
    d.add_argument("--schedule", choices=SCHEDULES, help="pipeline schedule")
    d.add_argument("--cp-comm", choices=CP_COMM, help="context-parallel communication: ring p2p, all-gather, all-to-all")
    d.add_argument("--first-stage-layers", type=int_arg("--first-stage-layers"),
                   help="layers on the first pipeline stage (Megatron --decoder-first-pipeline-num-layers)")
    d.add_argument("--last-stage-layers", type=int_arg("--last-stage-layers"),
                   help="layers on the last pipeline stage (Megatron --decoder-last-pipeline-num-layers)")
    m = p.add_argument_group("batching and memory")
    m.add_argument("--micro-batch", type=int_arg("--micro-batch"))
    m.add_argument("--sp", dest="sp", action="store_true", default=None, help="sequence parallelism on")
    m.add_argument("--no-sp", dest="sp", action="store_false", help="sequence parallelism off")
    m.add_argument("--recompute", choices=RECOMPUTE)
    m.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO/FSDP stage (1 = distributed optimizer)")
    m.add_argument("--shard-group", type=int_arg("--shard-group"),
                   help="with --zero 3: shard within groups of N ranks, replicate across groups (HSDP)")
    m.add_argument("--offload-layers", type=int_arg("--offload-layers", 0),
                   help="activations of the first N layers to host memory between forward and backward "
                        "(Megatron-Core --cpu-offloading-num-layers; pp 1, no recompute; 0 = off)")
    m.add_argument("--no-overlap", default="", help="comma list of tp,dp,pp,ep: turn that overlap off")
    x = p.add_argument_group("mixture of experts")
    x.add_argument("--moe-imbalance", type=float_arg("--moe-imbalance", 1.0), default=1.0,
                   help="busiest expert's load over the mean (1.0 = balanced)")
    x.add_argument("--capacity-factor", type=float_arg("--capacity-factor", 0.0), default=0.0,
                   help="expert capacity factor; tokens beyond it are dropped (0 = dropless)")
    x.add_argument("--pad-to-capacity", action="store_true",
                   help="with --capacity-factor: every expert's input padded to its capacity "
                        "(Megatron --moe-pad-expert-input-to-capacity)")
    o = p.add_argument_group("objective and output")
    o.add_argument("--objective", choices=("throughput", "cost", "time"), default="throughput")
    o.add_argument("--tokens", help="training tokens, e.g. 2T or 300B: report time-to-train and cost")
    o.add_argument("--price", type=float_arg("--price"), help="USD per GPU-hour (default: the profile's)")
    o.add_argument("--mtbf-hours", type=float_arg("--mtbf-hours", 0.0, strict=True),
                   help="mean time between failures per GPU, hours: adds the goodput loss")
    o.add_argument("--checkpoint-minutes", type=float_arg("--checkpoint-minutes", 0.0, strict=True),
                   help="checkpoint interval (default: the Young/Daly optimum)")
    o.add_argument("--checkpoint-write-s", type=float_arg("--checkpoint-write-s", 0.0), default=None,
                   help="seconds to write one checkpoint (default: from model state size)")
    o.add_argument("--top", type=int_arg("--top"), default=10)
    o.add_argument("--explain", action="store_true",
                   help="explain the best layout: time and memory breakdown, why the runners-up lost")
    o.add_argument("--emit", choices=("megatron", "torchtitan", "deepspeed"),
                   help="write a ready-to-run configuration of the best layout for that framework")
    o.add_argument("--out", help="file for --emit (default: stdout)")
    o.add_argument("--plot", metavar="FILE.png", help="save the most useful plot for this query")
    o.add_argument("--format", choices=("table", "json", "csv"), default="table")
    return p


def _fixed(a) -> dict:
    return {"tp": a.tp, "pp": a.pp, "dp": a.dp, "cp": a.cp, "ep": a.ep, "etp": a.etp, "vpp": a.vpp,
            "micro_batch": a.micro_batch, "sp": a.sp, "recompute": a.recompute, "zero": a.zero,
            "shard_group": a.shard_group, "precision": a.precision, "schedule": a.schedule,
            "cp_comm": a.cp_comm, "first_stage_layers": a.first_stage_layers,
            "last_stage_layers": a.last_stage_layers, "offload_layers": a.offload_layers}


def _overlap(text: str) -> dict:
    from .errors import PlannerError
    out = {}
    for part in filter(None, (s.strip() for s in text.split(","))):
        if part not in ("tp", "dp", "pp", "ep"):
            raise PlannerError(f"--no-overlap: unknown '{part}'; valid: tp, dp, pp, ep (comma separated)")
        out[f"overlap_{part}"] = False
    return out


def run(argv) -> int:
    from .errors import PlannerError
    if argv and argv[0] in ("models", "hardware"):
        if len(argv) > 1:
            raise UsageError(f"'plan {argv[0]}' takes no arguments, got {' '.join(argv[1:])}")
        return _list(argv[0])
    a = build_parser().parse_args(argv)
    from .profiles import load_hardware
    from .model_io import load_model
    from .engine import search
    from .stacks import get_stack, with_compile, with_grad_dtype
    from .units import parse_count
    model = load_model(a.model)
    cluster = load_hardware(a.hardware)
    stack = with_compile(with_grad_dtype(get_stack(a.stack), a.grad_dtype), a.compile)
    tokens = parse_count(a.tokens, "--tokens") if a.tokens is not None else None
    fixed = _fixed(a)
    if a.vpp and a.vpp > 1 and not a.schedule:
        fixed["schedule"] = "interleaved"     # virtual stages mean the interleaved schedule
    res = search(model, cluster, a.gpus, seq_len=a.seq_len, global_batch=a.global_batch, fixed=fixed,
                 top=a.top, objective=a.objective, stack=stack, tokens=tokens, price=a.price,
                 overlap=_overlap(a.no_overlap), moe_imbalance=a.moe_imbalance,
                 capacity_factor=a.capacity_factor, pad_to_capacity=a.pad_to_capacity)
    goodput = None
    if a.mtbf_hours:
        from .goodput import goodput_for
        goodput = goodput_for(res, model, a.mtbf_hours, a.checkpoint_minutes, a.checkpoint_write_s, cluster)
    if not res.plans and res.evaluated == 0:
        # the fixed knobs, each possible alone, clash: an input error that names them
        raise PlannerError(res.empty_reason or f"no layout of {model.name} on {res.gpus} GPUs satisfies "
                                               f"the divisibility constraints with the fixed knobs")
    if not res.plans:
        msg = f"no layout of {model.name} fits on {res.gpus} x {cluster.name}"
        if res.closest_infeasible is not None:
            cl = res.closest_infeasible
            L = cl.layout
            msg += (f"; closest: tp={L.tp} pp={L.pp} dp={L.dp} cp={L.cp} ep={L.ep} mb={L.micro_batch} "
                    f"recompute={L.recompute} zero={L.zero}: {cl.overflow()}")
        print(msg, file=sys.stderr)
        if a.format == "json":
            from .report import to_json
            print(to_json(res, model, cluster, stack, a, goodput))
        return 1
    from . import report
    if a.emit:
        from .export import emit
        text, launch = emit(res.best, model, a.emit, cluster=cluster, out=a.out, capacity_factor=a.capacity_factor,
                            pad_to_capacity=a.pad_to_capacity, stack=stack)
        if a.out:
            from .atomic import atomic_write_text
            atomic_write_text(a.out, text)
            print(f"wrote {a.emit} configuration to {a.out}", file=sys.stderr)
        else:
            print(text)
        print(launch, file=sys.stderr if not a.out else sys.stdout)
        return 0
    if a.plot:
        from .plots import plot_for_query
        plot_for_query(res, model, cluster, a.plot, stack=stack)
    if a.explain and a.format == "table":
        from .explain import explain_text
        print(report.to_table(res, model, cluster, stack, a, goodput))
        print()
        print(explain_text(res, model, cluster, stack))
        return 0
    if a.format == "json":
        print(report.to_json(res, model, cluster, stack, a, goodput))
    elif a.format == "csv":
        print(report.to_csv(res), end="")
    else:
        print(report.to_table(res, model, cluster, stack, a, goodput))
    return 0


def _list(what: str) -> int:
    if what == "models":
        from .model_io import catalog_table
        df = catalog_table()
    else:
        from .profiles import hardware_table
        df = hardware_table()
    import pandas as pd
    with pd.option_context("display.width", 200, "display.max_rows", 500, "display.max_colwidth", 90):
        print(df.to_string(index=False, float_format=lambda x: f"{x:,.2f}"))
    return 0


def main(argv=None) -> int:
    from .heap import keep_temporaries_on_heap
    keep_temporaries_on_heap()
    return guarded_main("plan", run, argv)


if __name__ == "__main__":
    sys.exit(main())
