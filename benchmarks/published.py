"""Published training runs (../shared/reference/published_runs.csv) as planner inputs.

Each row's stated layout is fixed; what the source did not state (micro-batch, recompute, SP,
ZeRO stage, virtual stages) is left to the search, restricted to what the row's software stack
runs. The stack is read from the row's `framework` column; its factors are global (stacks.py).
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from planner.errors import PlannerError
from planner.profiles import load_hardware
from planner.model_spec import ModelSpec, MoESpec
from planner.stacks import STACKS, with_compile, with_grad_dtype

DEFAULT_CSV = Path(__file__).resolve().parent.parent.parent / "shared" / "reference" / "published_runs.csv"


def read_runs(path=None) -> list:
    with open(path or DEFAULT_CSV, newline="") as fh:
        return list(csv.DictReader(fh))


def _int(v):
    v = (v or "").strip()
    if not v:
        return None
    try:
        return int(float(v))
    except ValueError:
        return None


def source_of(row: dict) -> str:
    """The publication a run comes from, for leave-one-source-out: one team's performance summary
    across its container releases counts as one source (same recipes, same measurement)."""
    s = row.get("source", "")
    if "Megatron-Bridge performance summary" in s:
        return "NVIDIA NeMo Megatron-Bridge performance summary"
    return s


def stack_of(framework: str) -> str:
    f = framework.lower()
    if "torchtitan" in f:
        return "torchtitan"
    if "foundry" in f or "composer" in f:
        return "llm-foundry"
    if "deepspeed" in f:
        return "deepspeed"
    if re.search(r"megatron-lm (\(|ptd)", f) or "(2021" in f or "(2022" in f:
        return "megatron-2021"
    return "megatron-core"


def hardware_of(gpu_type: str) -> str:
    g = gpu_type.lower()
    if "gb200" in g:
        return "gb200-nvl72"
    if "b200" in g:
        return "b200"
    if "h200" in g:
        return "h200-sxm"
    if "h800" in g:
        return "h800-sxm"
    if "h100" in g:
        return "h100-sxm-96gb" if "96gb" in g else "h100-sxm"
    if "a100" in g:
        return "a100-sxm-40gb" if "40gb" in g else "a100-sxm-80gb"
    if "mi300" in g:
        return "mi300x"
    raise PlannerError(f"no hardware profile for gpu_type {gpu_type!r}")


def schedule_of(framework: str) -> str | None:
    """A pipeline schedule the row's framework text states ('schedule=1F1B', 'Interleaved 1F1B')."""
    f = framework.lower()
    if "interleaved" in f:
        return "interleaved"
    if "1f1b" in f:
        return "1f1b"
    return None


def precision_of(p: str) -> str | None:
    p = p.lower()
    if "fp8" in p:
        return "fp8"
    if p.startswith("fp16"):
        return "fp16"
    if "bf16" in p or "amp" in p:
        return "bf16"
    return None


def recompute_of(r: str) -> str | None:
    r = r.lower()
    for k in ("selective", "full", "none"):
        if r.startswith(k):
            return k
    return None


def zero_of(d: str) -> int | None:
    d = d.lower()
    if not d:
        return None
    if "fsdp" in d or "zero-3" in d or "full_shard" in d:
        return 3
    if "distributed optimizer" in d:
        return 1
    if d.startswith("none"):
        return 0
    return None


def default_micro_batch(stack: str, row: dict, pp: int, dp: int) -> int | None:
    """The micro-batch a run used when its source states the framework but not the size: torchtitan
    of 2024 split each rank's batch into as many micro-batches as pipeline ranks unless told
    otherwise (torchtitan 9dec370 config_manager.py --experimental.pipeline_parallel_microbatches,
    'default: the number of pipeline stages'; pipelining_utils.py build_pipeline_schedule uses
    pipeline_parallel_degree). Elsewhere, and without a pipeline, the search chooses (None)."""
    gb = _int(row.get("global_batch"))
    if stack != "torchtitan" or pp <= 1 or not gb or gb % dp or (gb // dp) % pp:
        return None
    return gb // dp // pp


def model_of(row: dict) -> ModelSpec:
    """ModelSpec from the row's shape columns. MLA, head_dim and sliding windows, which the CSV
    does not carry, come from the catalog entry of the same family (_family: deepseek-v3, gpt-oss,
    qwen3, ...) where its hidden size and heads are the row's."""
    name = row["model"]
    h, a = _int(row["hidden"]), _int(row["heads"])
    L = _int(row["layers"])
    mlp = (row.get("mlp") or "gelu").strip().lower()
    ffn = _int(row["ffn_hidden"])
    experts = _int(row.get("moe_experts"))
    moe = None
    if experts:
        moe = MoESpec(experts=experts, top_k=_int(row["moe_topk"]), expert_ffn_hidden=_int(row["moe_ffn_hidden"]),
                      shared_experts=_int(row.get("moe_shared_experts")) or 0,
                      dense_layers=_int(row.get("moe_dense_layers")) or 0)
    if ffn is None:
        ffn = moe.expert_ffn_hidden if moe else 4 * h
    # facts the CSV does not carry (head_dim when it differs from hidden/heads, MLA ranks, sliding
    # windows) come from the catalog entry of the same family when its shape agrees
    head_dim = mla = window = window_layers = None
    fam = _family(name, row.get("attention", ""))
    if fam is None and h % a:
        raise PlannerError(f"row {row['row_id']}: hidden {h} not divisible by heads {a} and no catalog family")
    if fam is not None:
        from planner.model_io import load_model
        ref = load_model(fam)
        if (ref.hidden, ref.heads) == (h, a):       # the same shape, not a sibling size
            mla, head_dim = ref.mla, ref.head_dim
            window, window_layers = ref.sliding_window, ref.sliding_window_layers
            if moe and ref.moe:
                moe = MoESpec(moe.experts, moe.top_k, moe.expert_ffn_hidden,
                              moe.shared_experts or ref.moe.shared_experts, moe.dense_layers or ref.moe.dense_layers)
    old = stack_of(row.get("framework", "")) in ("megatron-2021", "deepspeed")
    gpt_style = mlp == "gelu" and "mpt" not in name.lower()
    return ModelSpec(name=name, layers=L, hidden=h, heads=a, kv_heads=_int(row["kv_heads"]) or a,
                     ffn_hidden=ffn, vocab=_int(row["vocab"]), mlp=mlp, head_dim=head_dim, mla=mla, moe=moe,
                     dropout=old, bias=gpt_style, seq_len=_int(row["seq_len"]), sliding_window=window,
                     sliding_window_layers=window_layers)


def _family(name: str, attention: str) -> str | None:
    """The catalog entry a row's model belongs to: DeepSeek-V3's for MLA rows, else the entry whose
    name is the row's model name without spaces and hyphens ('Qwen3 30B-A3B' -> qwen3-30b-a3b,
    'GPT-OSS 120B' -> gpt-oss-120b), so that e.g. Qwen3's head_dim of 128 (config.json), twice its
    hidden / heads, is not lost."""
    from planner.model_io import list_models
    squash = lambda s: s.lower().replace(" ", "").replace("-", "")  # noqa: E731
    n = squash(name)
    if attention.strip().lower() == "mla" or "deepseekv3" in n:
        return "deepseek-v3"
    return next((m for m in list_models() if squash(m) == n), None)


@dataclass
class RunInputs:
    row_id: str
    model: ModelSpec
    hardware: str
    gpus: int
    seq_len: int
    global_batch: int
    fixed: dict
    stack: str
    measured: float | None
    compiled: bool = False        # torchtitan under torch.compile (plan --compile)
    grad_dtype: str | None = None   # gradients kept and reduced in bf16 (plan --grad-dtype)


def inputs_of(row: dict) -> RunInputs:
    stack = stack_of(row.get("framework", ""))
    st = STACKS[stack]
    gpus = _int(row["num_gpus"])
    tp, pp, cp = _int(row["tp"]) or 1, _int(row["pp"]) or 1, _int(row["cp"]) or 1
    dp = _int(row["dp"]) or gpus // (tp * pp * cp)
    fixed = {"tp": tp, "pp": pp, "cp": cp, "dp": dp, "ep": _int(row["ep"]) or 1,
             "micro_batch": _int(row["micro_batch"]) or default_micro_batch(stack, row, pp, dp)}
    vp = _int(row["vp"])
    named = schedule_of(row.get("framework", ""))
    if vp is not None:
        fixed["vpp"] = vp
        fixed["schedule"] = "interleaved" if vp > 1 else "1f1b"
    elif named == "1f1b":             # a stated plain 1F1B has no virtual stages
        fixed["vpp"], fixed["schedule"] = 1, "1f1b"
    elif named:
        fixed["schedule"] = named
    else:
        fixed["schedule"] = [s for s in st.schedules if s in ("1f1b", "interleaved")]
    sp = row.get("sp", "").strip().lower()
    if sp.startswith("on"):
        fixed["sp"] = True
    elif sp.startswith("off"):
        fixed["sp"] = False
    fixed["recompute"] = recompute_of(row.get("recompute", ""))
    z = zero_of(row.get("dp_sharding", ""))
    fixed["zero"] = z if z is not None else list(st.zero_stages)
    fixed["precision"] = precision_of(row.get("precision", "")) or "bf16"
    if cp > 1:
        fixed["cp_comm"] = "p2p"
    meas = (row.get("measured_tokens_per_s_per_gpu") or "").strip()
    return RunInputs(row_id=row["row_id"], model=model_of(row), hardware=hardware_of(row["gpu_type"]),
                     gpus=gpus, seq_len=_int(row["seq_len"]), global_batch=_int(row["global_batch"]),
                     fixed={k: v for k, v in fixed.items() if v is not None}, stack=stack,
                     measured=float(meas) if meas else None, compiled=compiled_of(stack, row.get("framework", "")),
                     grad_dtype=grad_dtype_of(row))


def compiled_of(stack: str, framework: str) -> bool:
    """A torchtitan row whose framework text names torch.compile ('FSDP + torch.compile', '2D + compile')."""
    return stack == "torchtitan" and "compile" in framework.lower()


def grad_dtype_of(row: dict) -> str | None:
    """bf16 where the run's recipe keeps and reduces gradients in bf16 (None: the stack's own):
    Megatron-Bridge's performance recipes set grad_reduce_in_fp32 false for every model family
    (scripts/performance/configs/*/..._llm_pretrain.yaml of 2025-09, .py since); of NeMo 24.07's
    launcher recipes only nemotron_340b.yaml sets optim.grad_sync_dtype: bf16
    (NeMo-Framework-Launcher launcher_scripts/conf/training/nemotron/nemotron_340b.yaml)."""
    f = row.get("framework", "").lower()
    if "megatron-bridge" in f or ("nemo 24.07" in f and row.get("model", "").lower() == "nemotron-340b"):
        return "bf16"
    return None


def stack_for(ri: RunInputs, stacks=STACKS):
    """The Stack a row ran: its named stack (from `stacks`, e.g. with fitted factors), compiled
    and with bf16 gradients where its recipe says so."""
    return with_grad_dtype(with_compile(stacks[ri.stack], ri.compiled), ri.grad_dtype)


def predict_run(row: dict, cluster_override=None):
    """Best predicted plan for a published row (its stated layout fixed; None when every layout is
    refused for memory), or raises PlannerError."""
    from planner.engine import search
    ri = inputs_of(row)
    cluster = cluster_override or load_hardware(ri.hardware)
    precisions = [ri.fixed["precision"]]
    res = search(ri.model, cluster, ri.gpus, seq_len=ri.seq_len, global_batch=ri.global_batch,
                 fixed=ri.fixed, top=1, precisions=precisions, stack=stack_for(ri))
    return ri, res.best, res          # None: refused (a miss, never scored as its closest layout)
