"""Megatron-LM's argument parser and the validation rules dtplanner's emits must pass, recorded
from NVIDIA/Megatron-LM at d98e8a64ddf3 (2026-08-22) because its training arguments are not in a
registry package (megatron-core on PyPI ships megatron/core only). Each rule names the file and
line it mirrors: A = megatron/training/arguments.py, T = megatron/core/transformer/
transformer_config.py, M = megatron/core/model_parallel_config.py, P = megatron/core/
parallel_state.py, B = megatron/core/transformer/transformer_block.py.

    check(args, world) -> list of violated rules (empty: accepted)"""
from __future__ import annotations

import argparse
import ast
import math
from pathlib import Path

TSV = Path(__file__).with_name("megatron_args_d98e8a64.tsv")
_TYPES = {"type=int": int, "type=float": float, "type=str": str, "type=moe_freq_type": str}


def parser() -> argparse.ArgumentParser:
    """An argparse parser with the recorded option strings, types, choices and nargs."""
    p = argparse.ArgumentParser(allow_abbrev=False, add_help=False, exit_on_error=False)
    for line in TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        opts, dest, default, typ, choices, nargs, action = line.split("\t")
        opts = [o for o in opts.split() if o.startswith("--")]
        if not opts:
            continue
        dest = dest.removeprefix("dest=")
        try:
            ch = ast.literal_eval(choices.removeprefix("choices="))
        except (ValueError, SyntaxError):      # enum choices: not a flag dtplanner emits
            ch = None
        na = nargs.removeprefix("nargs=")
        if action in ("StoreTrue", "StoreFalse"):
            p.add_argument(*opts, dest=dest, action="store_true" if action == "StoreTrue" else "store_false")
            continue
        try:
            dflt = ast.literal_eval(default.removeprefix("default="))
        except (ValueError, SyntaxError):
            dflt = None
        kw = dict(dest=dest, type=_TYPES.get(typ, str), default=dflt)
        if ch:
            kw["choices"] = list(ch)
        if na in ("+", "*"):
            kw["nargs"] = na
        p.add_argument(*opts, **kw)
    return p


def parse(argv: list) -> argparse.Namespace:
    """Parse like Megatron's parser (unknown flags and bad values raise argparse.ArgumentError or
    SystemExit)."""
    ns, extra = parser().parse_known_args(argv)
    if extra:
        raise argparse.ArgumentError(None, f"unrecognized arguments: {' '.join(extra)}")
    return ns


def _layout_stages(layout: str) -> list:
    """Stages of a --pipeline-model-parallel-layout string (no repetition syntax emitted)."""
    return layout.split("|")


def _split_rules(a, pp) -> list:
    bad = []
    L = a.num_layers
    first, last = a.decoder_first_pipeline_num_layers, a.decoder_last_pipeline_num_layers
    nlpvs, nvspr, layout = (a.num_layers_per_virtual_pipeline_stage, a.num_virtual_stages_per_pipeline_rank,
                            a.pipeline_model_parallel_layout)
    if sum(x is not None for x in (nlpvs, nvspr, layout)) > 1:
        bad.append("A:929 at most one of the virtual-pipeline flags and the layout")
    vpp = None
    if layout is not None:
        st = _layout_stages(layout)
        if first is not None or last is not None:
            bad.append("T:2245 layout excludes --decoder-first/last-pipeline-num-layers")
        if len(st) % pp:
            bad.append("A:945 layout stages divisible by pp")
        joined = "".join(st)
        if not (st[0].startswith("E") and st[-1].endswith("L") and joined.count("E") == 1 and joined.count("L") == 1):
            bad.append("T:2290 E opens the first stage, L closes the last, each once")
        if joined.count("t") != L:
            bad.append("T:2290 as many t as --num-layers")
        return bad
    if nlpvs is not None:
        if first is not None or last is not None:
            bad.append("A:956 --num-layers-per-virtual-pipeline-stage excludes first/last stage layers")
        if L % pp or (L // pp) % nlpvs:
            bad.append("A:969/972 layers per rank divisible by layers per virtual stage")
        else:
            vpp = (L // pp) // nlpvs
    elif nvspr is not None:
        vpp = nvspr
    vpp = vpp if vpp and vpp > 1 else None
    if first is not None or last is not None:
        given = (first is not None) + (last is not None)
        mid_layers = L - (first or 0) - (last or 0)
        mid_pp = pp - given
        if (first is not None and first <= 0) or (last is not None and last <= 0):
            bad.append("T:2304/2323 first/last stage layers > 0")
        if vpp and ((first or 0) % vpp or (last or 0) % vpp):
            bad.append("T:2306/2325 first/last stage layers divisible by vpp")
        if (mid_pp > 0) != (mid_layers > 0):
            bad.append("T:2341 middle layers iff middle stages")
        elif mid_pp > 0 and (mid_layers % mid_pp or (vpp and (mid_layers // mid_pp) % vpp)):
            bad.append("T:2349/2358 middle layers split evenly over middle stages and vpp")
    else:
        if L % pp:
            bad.append("A:998 num_layers divisible by pp")
        elif vpp and (L // pp) % vpp:
            bad.append("B get_num_layers_to_build: layers per rank divisible by vpp")
    if vpp and not a.overlap_p2p_comm and pp <= 2:
        bad.append("A:1006 vpp with --no-overlap-p2p-communication needs pp > 2")
    return bad


def check(argv: list, world: int) -> list:
    """Violated rules of Megatron-LM's validate_args / TransformerConfig / initialize_model_parallel
    for `argv` on `world` ranks (argparse errors raise)."""
    a = parse(argv)
    tp, pp, cp = a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.context_parallel_size
    bad = []
    if world % (tp * pp * cp):
        return ["A:432 world divisible by tp x pp x cp"]
    dp = world // (tp * pp * cp)
    if a.global_batch_size % (a.micro_batch_size * dp):
        bad.append("A:715 global batch divisible by micro-batch x dp")
    if cp > 1 and a.seq_length % (2 * cp):
        bad.append("A:1336 seq_length divisible by 2 x cp")
    if a.sequence_parallel and tp == 1:
        bad.append("M:504 sequence parallelism needs tp > 1")
    if a.tp_comm_overlap and not a.sequence_parallel:
        bad.append("A:1442 --tp-comm-overlap needs --sequence-parallel")
    if a.num_attention_heads % tp:
        bad.append("T:1446 heads divisible by tp")
    groups = a.num_query_groups if a.group_query_attention else a.num_attention_heads
    if groups % tp and tp % groups:
        bad.append("T:1462 query groups a multiple or divisor of tp")
    bad += _split_rules(a, pp)
    if a.overlap_param_gather and not (a.use_distributed_optimizer and a.overlap_grad_reduce):
        bad.append("A:1025 --overlap-param-gather needs the distributed optimizer and --overlap-grad-reduce")
    if (dp * cp) % a.num_distributed_optimizer_instances:
        bad.append("P:922 dp x cp divisible by --num-distributed-optimizer-instances")
    if a.num_experts:
        ep = a.expert_model_parallel_size
        etp = a.expert_tensor_parallel_size or tp
        if a.num_experts % ep:
            bad.append("A:1656 num_experts divisible by ep")
        if world % (etp * ep * pp):
            bad.append("P initialize_model_parallel: etp x ep x pp tiles the world")
        if etp != 1 and a.add_bias_linear:
            bad.append("T:2612 MoE with linear biases needs etp 1")
    if a.moe_pad_expert_input_to_capacity and a.moe_expert_capacity_factor is None:
        bad.append("T:1862 moe_pad_expert_input_to_capacity needs moe_expert_capacity_factor")
    if a.moe_expert_capacity_factor is not None and a.moe_router_load_balancing_type not in (
            "aux_loss", "seq_aux_loss", "global_aux_loss", "none"):
        bad.append("T:1836 a capacity factor needs aux_loss, seq_aux_loss, global_aux_loss or no load balancing")
    if a.recompute_granularity == "full" and (a.recompute_method is None or a.recompute_num_layers is None):
        bad.append("T:1901-1931 full recompute needs --recompute-method and --recompute-num-layers")
    if a.recompute_granularity == "selective" and a.recompute_num_layers is not None:
        bad.append("T:1931 selective recompute excludes --recompute-num-layers")
    mods = a.recompute_modules or ["core_attn"]          # T:1940 the default module list
    if a.recompute_granularity == "selective":
        if set(mods) - {"core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts"}:
            bad.append("T:1943-1962 recompute_modules outside the allowed set")
        if "moe_act" in mods and not a.moe_grouped_gemm:
            bad.append("T:1964 moe_act recompute needs --moe-grouped-gemm")
        if "mla_up_proj" in mods and not a.multi_latent_attention:
            bad.append("T:1969 mla_up_proj recompute needs --multi-latent-attention")
        if a.fp8 and {"moe_act", "layernorm"} & set(mods) and a.fp8_recipe == "delayed":
            bad.append("T:2000-2004 moe_act / layernorm recompute refuse delayed scaling under fp8")
    if a.cpu_offloading_num_layers > 0:        # A:1950 sets cpu_offloading
        if a.cpu_offloading_num_layers >= a.num_layers:
            bad.append("T:1884 cpu_offloading_num_layers below num_layers")
        if pp > 1:
            bad.append("T:1891 CPU offloading without pipeline parallelism")
        if a.recompute_granularity is not None:
            bad.append("T:1896 CPU offloading without activation recomputation")
    if a.use_megatron_fsdp and not a.use_distributed_optimizer:
        bad.append("A Megatron-FSDP runs with the distributed optimizer")
    if a.fp8_param_gather and not (a.use_distributed_optimizer or a.use_torch_fsdp2 or a.use_megatron_fsdp):
        bad.append("A validate_args: --fp8-param-gather only with the distributed optimizer or FSDP")
    return bad


def emitted_args(script: str) -> list:
    """The MEGATRON_ARGS=( ... ) array of an emitted script, as argv."""
    import shlex
    body = script.split("MEGATRON_ARGS=(", 1)[1].split("\n)", 1)[0]
    return shlex.split(body)


__all__ = ["check", "parse", "emitted_args", "math"]
