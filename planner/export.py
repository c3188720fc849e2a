"""Write a plan as a ready-to-run configuration for Megatron-LM, torchtitan or DeepSpeed, plus a
torchrun / Slurm launch line for its GPU count.

    emit(plan, model, fmt, cluster=None) -> (text, launch_line)      fmt: megatron|torchtitan|deepspeed

Flag and key names are those of the projects' own sources, checked by hand:

* Megatron-LM: ``megatron/training/arguments.py`` of NVIDIA/Megatron-LM (commit 000c4ac24f61,
  2025; every flag in MEGATRON_FLAGS below is an ``add_argument`` there) and the Megatron-FSDP
  user guide (docs/discussions/megatron-fsdp-user-guide) for the flags ZeRO-2/3 need.
* torchtitan: ``torchtitan/config/job_config.py`` of pytorch/torchtitan (commits 000204a4 and
  6404b932, the TOML-configured releases): [job], [model], [training], [parallelism],
  [activation_checkpoint], [float8]; ``expert_tensor_parallel_degree`` from the repository's
  deepseek_v3_671b.toml; schedule names from torch.distributed.pipelining get_schedule_class.
* DeepSpeed: ``deepspeed/runtime/config.py`` (train_batch_size, train_micro_batch_size_per_gpu,
  gradient_accumulation_steps, bf16/fp16, pipeline) and ``deepspeed/runtime/zero/config.py``
  (zero_optimization keys) of microsoft/DeepSpeed; activation_checkpointing keys from
  deepspeed/runtime/activation_checkpointing/config.py.
* torchrun: --nnodes, --nproc-per-node, --rdzv-id, --rdzv-backend, --rdzv-endpoint, --standalone
  (PyTorch docs, torchrun (Elastic Launch)).

GPUs per node come from the cluster's innermost network domain (Cluster.domain_sizes[0]). A
rack-scale NVLink domain (more than 8 GPUs, e.g. GB200 NVL72) is built from compute trays of 4
GPUs each (DGX GB200 user guide: 18 compute trays of 4 Blackwell GPUs per 72-GPU rack), so there
a node is taken to be one 4-GPU tray; the assumption is written into the output.
"""
from __future__ import annotations

import json
import shlex

from .errors import PlannerError
from .launchline import gpus_per_node, launch_line, node_layout  # noqa: F401 (export's API)

FORMATS = ("megatron", "torchtitan", "deepspeed")

# Megatron-LM pretrain_gpt.py flags this module can emit: name -> kind ("int", "float", "str",
# "flag" for store_true/store_false, "list" for nargs='+'). Every name verified in
# megatron/training/arguments.py (NVIDIA/Megatron-LM @ 000c4ac24f61).
MEGATRON_FLAGS = {
    # distributed (_add_distributed_args)
    "--tensor-model-parallel-size": "int", "--pipeline-model-parallel-size": "int",
    "--context-parallel-size": "int", "--cp-comm-type": "list",
    "--num-layers-per-virtual-pipeline-stage": "int", "--num-virtual-stages-per-pipeline-rank": "int",
    "--decoder-first-pipeline-num-layers": "int", "--decoder-last-pipeline-num-layers": "int",
    "--use-distributed-optimizer": "flag", "--num-distributed-optimizer-instances": "int",
    "--overlap-grad-reduce": "flag", "--overlap-param-gather": "flag",
    "--no-overlap-p2p-communication": "flag",
    "--use-megatron-fsdp": "flag", "--data-parallel-sharding-strategy": "str", "--ckpt-format": "str",
    # moe (_add_moe_args)
    "--expert-model-parallel-size": "int", "--expert-tensor-parallel-size": "int", "--num-experts": "int",
    "--moe-router-topk": "int", "--moe-ffn-hidden-size": "int", "--moe-shared-expert-intermediate-size": "int",
    "--moe-layer-freq": "str", "--moe-token-dispatcher-type": "str", "--moe-grouped-gemm": "flag",
    # mla (_add_mla_args)
    "--multi-latent-attention": "flag", "--q-lora-rank": "int", "--kv-lora-rank": "int",
    "--qk-head-dim": "int", "--qk-pos-emb-head-dim": "int", "--v-head-dim": "int",
    # training (_add_training_args)
    "--micro-batch-size": "int", "--global-batch-size": "int", "--sequence-parallel": "flag",
    "--recompute-granularity": "str", "--recompute-method": "str", "--recompute-num-layers": "int",
    "--tp-comm-overlap": "flag", "--no-gradient-accumulation-fusion": "flag", "--disable-bias-linear": "flag",
    "--train-iters": "int", "--log-interval": "int",
    # network size (_add_network_size_args)
    "--num-layers": "int", "--hidden-size": "int", "--ffn-hidden-size": "int", "--num-attention-heads": "int",
    "--kv-channels": "int", "--group-query-attention": "flag", "--num-query-groups": "int",
    "--max-position-embeddings": "int", "--position-embedding-type": "str", "--normalization": "str",
    "--swiglu": "flag", "--squared-relu": "flag", "--quick-geglu": "flag",
    "--untie-embeddings-and-output-weights": "flag",
    # regularization / learning rate
    "--attention-dropout": "float", "--hidden-dropout": "float", "--weight-decay": "float",
    "--clip-grad": "float", "--lr": "float", "--min-lr": "float", "--lr-decay-style": "str",
    "--lr-warmup-iters": "int",
    # data / tokenizer / logging
    "--seq-length": "int", "--mock-data": "flag", "--tokenizer-type": "str", "--vocab-size": "int",
    "--log-throughput": "flag", "--eval-iters": "int", "--eval-interval": "int",
    # mixed precision / transformer engine
    "--bf16": "flag", "--fp16": "flag", "--fp8-format": "str",
}

# torchtitan pipeline schedule names (torch.distributed.pipelining.schedules.get_schedule_class)
TORCHTITAN_SCHEDULE = {"1f1b": "1F1B", "interleaved": "Interleaved1F1B", "zb-h1": "InterleavedZeroBubble",
                       "zbv": "ZBVZeroBubble", "dualpipe": "DualPipeV"}
# torchtitan model names and flavors for the catalog models it ships (models/<name>/train_configs)
TORCHTITAN_MODEL = {"llama-3-8b": ("llama3", "8B"), "llama-3-70b": ("llama3", "70B"),
                    "llama-3.1-405b": ("llama3", "405B"), "deepseek-v3": ("deepseek_v3", "671B")}


# ----------------------------------------------------------------------------------- megatron

def _moe_layer_freq(model) -> str | None:
    nd = model.moe.dense_layers if model.moe else 0
    if not nd:
        return None
    return f"([0]*{nd}+[1]*{model.layers - nd})"


def uneven_split(L, model) -> bool:
    """True when the layout's first/last stage layer counts differ from an even split."""
    if L.pp == 1 or not (L.first_stage_layers or L.last_stage_layers):
        return False
    even = model.layers // L.pp if model.layers % L.pp == 0 else None
    return not (even and L.first_stage_layers in (0, even) and L.last_stage_layers in (0, even))


class _Args(list):
    """[(flag, value)]; value None for a switch. Only flags from MEGATRON_FLAGS."""

    def add(self, flag, value=None):
        if flag not in MEGATRON_FLAGS:     # a typo here would silently emit a flag Megatron rejects
            raise AssertionError(f"{flag} is not a verified Megatron-LM flag")
        self.append((flag, value))


def megatron_args(plan, model) -> list:
    """[(flag, value)] for pretrain_gpt.py; value None for a switch. Flags only from MEGATRON_FLAGS."""
    a = _Args()
    _megatron_parallel(a, plan.layout, model)
    _megatron_model(a, plan.layout, model)
    _megatron_run(a, plan.layout, model)
    return list(a)


def _megatron_parallel(a: _Args, L, model) -> None:
    add = a.add
    # parallelism
    add("--tensor-model-parallel-size", L.tp)
    add("--pipeline-model-parallel-size", L.pp)
    add("--context-parallel-size", L.cp)
    if L.cp > 1:
        add("--cp-comm-type", L.cp_comm)
    if L.tp > 1 and L.sp:
        add("--sequence-parallel")
        if L.overlap_tp:
            add("--tp-comm-overlap")
    uneven = uneven_split(L, model)
    if L.pp > 1 and uneven:
        if L.first_stage_layers:
            add("--decoder-first-pipeline-num-layers", L.first_stage_layers)
        if L.last_stage_layers:
            add("--decoder-last-pipeline-num-layers", L.last_stage_layers)
    if L.vpp > 1:
        # Megatron accepts the layers-per-chunk form only for an even split (validate_args)
        if uneven:
            add("--num-virtual-stages-per-pipeline-rank", L.vpp)
        else:
            add("--num-layers-per-virtual-pipeline-stage", model.layers // (L.pp * L.vpp))
    if L.pp > 1 and not L.overlap_pp:
        add("--no-overlap-p2p-communication")
    if model.moe:
        add("--expert-model-parallel-size", L.ep)
        add("--expert-tensor-parallel-size", L.etp)
    # data parallel sharding: ZeRO-1 = distributed optimizer; ZeRO-2/3 = Megatron-FSDP
    if L.zero == 1:
        add("--use-distributed-optimizer")
        if L.shard_group and L.shard_group < L.dp * L.cp:
            add("--num-distributed-optimizer-instances", (L.dp * L.cp) // L.shard_group)
    elif L.zero in (2, 3):
        add("--use-megatron-fsdp")
        add("--data-parallel-sharding-strategy", "optim_grads" if L.zero == 2 else "optim_grads_params")
        add("--no-gradient-accumulation-fusion")
        add("--use-distributed-optimizer")
        add("--ckpt-format", "fsdp_dtensor")
    if L.overlap_dp and L.dp * L.cp > 1:
        add("--overlap-grad-reduce")
        if L.zero >= 1:
            add("--overlap-param-gather")
    # recompute
    if L.recompute == "selective":
        add("--recompute-granularity", "selective")
    elif L.recompute == "full":
        add("--recompute-granularity", "full")
        add("--recompute-method", "uniform")
        add("--recompute-num-layers", 1)


def _megatron_model(a: _Args, L, model) -> None:
    add = a.add
    # batch
    add("--micro-batch-size", L.micro_batch)
    add("--global-batch-size", L.global_batch)
    add("--seq-length", L.seq_len)
    # model shape
    add("--num-layers", model.layers)
    add("--hidden-size", model.hidden)
    add("--ffn-hidden-size", model.ffn_hidden)
    add("--num-attention-heads", model.heads)
    add("--max-position-embeddings", max(L.seq_len, model.seq_len or 0))
    if model.mla:
        m = model.mla
        add("--multi-latent-attention")
        if m.q_lora_rank:
            add("--q-lora-rank", m.q_lora_rank)
        add("--kv-lora-rank", m.kv_lora_rank)
        add("--qk-head-dim", m.qk_nope_head_dim)
        add("--qk-pos-emb-head-dim", m.qk_rope_head_dim)
        add("--v-head-dim", m.v_head_dim)
    else:
        if model.head_dim * model.heads != model.hidden:
            add("--kv-channels", model.head_dim)
        if model.kv_heads != model.heads:
            add("--group-query-attention")
            add("--num-query-groups", model.kv_heads)
    if model.mlp == "swiglu":
        add("--swiglu")
    elif model.mlp == "relu2":
        add("--squared-relu")
    elif model.mlp == "geglu":
        add("--quick-geglu")
    if model.moe:
        mo = model.moe
        add("--num-experts", mo.experts)
        add("--moe-router-topk", mo.top_k)
        add("--moe-ffn-hidden-size", mo.expert_ffn_hidden)
        if mo.shared_experts:
            add("--moe-shared-expert-intermediate-size", mo.shared_experts * mo.shared_expert_ffn_hidden)
        freq = _moe_layer_freq(model)
        if freq:
            add("--moe-layer-freq", freq)
        add("--moe-token-dispatcher-type", "alltoall")
        add("--moe-grouped-gemm")
    if not model.bias:   # Llama-style family: RMSNorm, RoPE, no linear biases
        add("--normalization", "RMSNorm")
        add("--position-embedding-type", "rope")
        add("--disable-bias-linear")
    if not model.tied_embeddings:
        add("--untie-embeddings-and-output-weights")
    if not model.dropout:
        add("--attention-dropout", 0.0)
        add("--hidden-dropout", 0.0)


def _megatron_run(a: _Args, L, model) -> None:
    add = a.add
    # precision
    if L.precision == "fp16":
        add("--fp16")
    else:
        add("--bf16")
        if L.precision == "fp8":
            add("--fp8-format", "hybrid")
    # a runnable benchmark: synthetic data, a null tokenizer of the model's vocabulary
    add("--mock-data")
    add("--tokenizer-type", "NullTokenizer")
    add("--vocab-size", model.vocab)
    add("--train-iters", 100)
    add("--lr", 1.0e-4)
    add("--min-lr", 1.0e-5)
    add("--lr-decay-style", "cosine")
    add("--lr-warmup-iters", 10)
    add("--weight-decay", 0.1)
    add("--clip-grad", 1.0)
    add("--eval-iters", 0)
    add("--eval-interval", 1000)
    add("--log-interval", 1)
    add("--log-throughput")


def _predicted(plan) -> str:
    return (f"predicted: step {plan.step_time_s:.3f} s, {plan.tokens_per_s_per_gpu:,.0f} tokens/s per GPU, "
            f"MFU {plan.mfu:.1%}, {plan.memory_gib:.1f} of {plan.hbm_gib:.1f} GiB per GPU")


def _megatron(plan, model, cluster):
    L = plan.layout
    args = megatron_args(plan, model)
    body = []
    for flag, v in args:
        body.append(f"    {flag}" if v is None else f"    {flag} {shlex.quote(str(v))}")
    env = []
    if (L.tp > 1 or L.cp > 1) and L.zero < 2:
        env.append("export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron requires it with TP/CP > 1 before "
                   "Blackwell (arguments.py)")
    elif L.zero >= 2:
        env.append("unset CUDA_DEVICE_MAX_CONNECTIONS     # Megatron-FSDP user guide")
    gpus = plan.gpus
    launch = launch_line(gpus, cluster, 'pretrain_gpt.py "${MEGATRON_ARGS[@]}"')
    hw = f" x {cluster.name}" if cluster is not None else " GPUs"
    text = "\n".join([
        "#!/usr/bin/env bash",
        f"# Megatron-LM pretrain_gpt.py for {model.name} on {gpus}{hw}, written by dtplanner",
        f"# layout: tp={L.tp} pp={L.pp} dp={L.dp} cp={L.cp} ep={L.ep} etp={L.etp} vpp={L.vpp} "
        f"schedule={L.schedule} sp={'on' if L.sp else 'off'} mb={L.micro_batch} recompute={L.recompute} "
        f"zero={L.zero} {L.precision}",
        f"# {_predicted(plan)}",
        "# Run from a Megatron-LM checkout. Synthetic data (--mock-data) and the training hyper-",
        "# parameters after --vocab-size are placeholders for a throughput run; replace them for a real one.",
        "set -euo pipefail",
        *env,
        "MEGATRON_ARGS=(",
        *body,
        ")",
        launch,
        "",
    ])
    return text, launch


# ----------------------------------------------------------------------------------- torchtitan

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))     # a TOML basic string is a JSON string for these characters


def torchtitan_config(plan, model) -> tuple:
    """(sections {name: {key: value}}, comments {section.key: text})."""
    L = plan.layout
    notes = {}
    name, flavor = TORCHTITAN_MODEL.get(model.name, (None, None))
    if name is None:
        name, flavor = ("deepseek_v3", "CUSTOM") if model.moe else ("llama3", "CUSTOM")
        notes["model.flavor"] = (f"register a flavor with layers={model.layers} hidden={model.hidden} "
                                 f"heads={model.heads} kv_heads={model.kv_heads} ffn={model.ffn_hidden} "
                                 f"vocab={model.vocab}")
    model_sec = {"name": name, "flavor": flavor}
    if L.precision == "fp8":
        model_sec["converters"] = ["float8"]
    # data parallel: ZeRO-0 = DDP (replicate), ZeRO-3 = FSDP (shard), HSDP with a shard group
    dp = L.dp
    if L.zero == 0:
        shard, replicate = 1, dp
    else:
        shard = L.shard_group if (L.shard_group and dp % L.shard_group == 0 and L.shard_group <= dp) else dp
        replicate = dp // shard
    par = {"data_parallel_replicate_degree": replicate, "data_parallel_shard_degree": shard}
    if L.zero in (1, 2):
        par["fsdp_reshard_after_forward"] = "never"
        notes["parallelism.fsdp_reshard_after_forward"] = (
            f"torchtitan has no ZeRO-{L.zero}; FSDP that keeps parameters gathered after forward is closest")
    par["tensor_parallel_degree"] = L.tp
    par["enable_async_tensor_parallel"] = bool(L.tp > 1 and L.overlap_tp)
    if L.tp > 1 and not L.sp:
        notes["parallelism.tensor_parallel_degree"] = "torchtitan always shards the sequence with TP (SP on)"
    par["pipeline_parallel_degree"] = L.pp
    if L.pp > 1:
        par["pipeline_parallel_schedule"] = TORCHTITAN_SCHEDULE[L.schedule]
        par["pipeline_parallel_microbatch_size"] = L.micro_batch
        stages_per_rank = L.vpp if L.schedule == "interleaved" else (2 if L.schedule in ("zbv", "dualpipe") else 1)
        if not uneven_split(L, model) and model.layers % (L.pp * stages_per_rank) == 0:
            par["pipeline_parallel_layers_per_stage"] = model.layers // (L.pp * stages_per_rank)
        else:
            notes["parallelism.pipeline_parallel_degree"] = (
                f"uneven split (first stage {L.first_stage_layers}, last {L.last_stage_layers} layers): "
                f"set module_fqns_per_model_part")
    par["context_parallel_degree"] = L.cp
    if L.cp > 1:
        par["context_parallel_rotate_method"] = {"allgather": "allgather", "p2p": "alltoall"}.get(L.cp_comm,
                                                                                               "allgather")
        if L.cp_comm == "a2a":
            notes["parallelism.context_parallel_rotate_method"] = "torchtitan has no Ulysses (a2a) CP"
    if model.moe:
        par["expert_parallel_degree"] = L.ep
        par["expert_tensor_parallel_degree"] = L.etp
    # batch: local_batch_size is per DP rank per optimizer step for PP (split into micro-batches of
    # pipeline_parallel_microbatch_size); without PP it is one micro-batch and the rest accumulates
    local = L.global_batch // L.dp if L.pp > 1 else L.micro_batch
    training = {"local_batch_size": local, "global_batch_size": L.global_batch, "seq_len": L.seq_len,
                "steps": 100, "mixed_precision_param": "bfloat16", "compile": bool(L.tp > 1 and L.overlap_tp)}
    if L.precision == "fp16":
        notes["training.mixed_precision_param"] = "torchtitan trains in bf16, not fp16"
    sections = {
        "job": {"dump_folder": "./outputs", "description": f"{model.name} on {plan.gpus} GPUs (dtplanner)"},
        "model": model_sec,
        "training": training,
        "parallelism": par,
        "activation_checkpoint": {"mode": L.recompute, **({"selective_ac_option": "op"}
                                                          if L.recompute == "selective" else {})},
    }
    if L.precision == "fp8":
        fsdp8 = L.zero >= 1 and shard > 1
        sections["float8"] = {"enable_fsdp_float8_all_gather": fsdp8,
                              "precompute_float8_dynamic_scale_for_fsdp": fsdp8}
    return sections, notes


def _torchtitan(plan, model, cluster):
    L = plan.layout
    sections, notes = torchtitan_config(plan, model)
    lines = [f"# torchtitan job config for {model.name} on {plan.gpus}"
             f"{' x ' + cluster.name if cluster is not None else ' GPUs'}, written by dtplanner",
             f"# layout: tp={L.tp} pp={L.pp} dp={L.dp} cp={L.cp} ep={L.ep} mb={L.micro_batch} "
             f"recompute={L.recompute} zero={L.zero} {L.precision}",
             f"# {_predicted(plan)}",
             "# Keys of torchtitan/config/job_config.py (TOML-configured releases)."]
    for sec, kv in sections.items():
        lines.append("")
        lines.append(f"[{sec}]")
        for k, v in kv.items():
            note = notes.get(f"{sec}.{k}")
            lines.append(f"{k} = {_toml_value(v)}" + (f"  # {note}" if note else ""))
    text = "\n".join(lines) + "\n"
    launch = launch_line(plan.gpus, cluster, "-m torchtitan.train --job.config_file plan.toml")
    return text, launch


# ----------------------------------------------------------------------------------- deepspeed

def deepspeed_config(plan, model) -> dict:
    L = plan.layout
    gas = L.global_batch // (L.micro_batch * L.dp)
    cfg = {
        "train_batch_size": L.micro_batch * gas * L.dp,
        "train_micro_batch_size_per_gpu": L.micro_batch,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 1.0,
        "steps_per_print": 10,
        "wall_clock_breakdown": False,
    }
    # train_batch_size = micro-batch x gradient accumulation x DP (DeepSpeed's own check,
    # runtime/config.py _configure_train_batch_size); the global batch must come out unchanged
    assert cfg["train_batch_size"] == cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * L.dp
    assert cfg["train_batch_size"] == L.global_batch, "global batch is not micro-batch x accumulation x dp"
    if L.precision == "fp16":
        cfg["fp16"] = {"enabled": True}
    else:
        cfg["bf16"] = {"enabled": True}
    zero = {"stage": L.zero, "overlap_comm": bool(L.overlap_dp), "contiguous_gradients": True,
            "reduce_scatter": True, "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000}
    if L.zero == 3:
        zero["stage3_prefetch_bucket_size"] = 50_000_000
        zero["stage3_param_persistence_threshold"] = 100_000
        if L.shard_group and L.shard_group < L.dp:
            zero["mics_shard_size"] = L.shard_group
    cfg["zero_optimization"] = zero
    if L.recompute != "none":
        cfg["activation_checkpointing"] = {"partition_activations": bool(L.tp > 1),
                                           "contiguous_memory_optimization": False,
                                           "cpu_checkpointing": False}
    if L.pp > 1:
        cfg["pipeline"] = {"stages": L.pp, "partition": "parameters",
                           "activation_checkpoint_interval": 1 if L.recompute == "full" else 0}
    if L.tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": L.tp}
    return cfg


def _deepspeed_notes(plan, model) -> list:
    L = plan.layout
    n = []
    if L.pp > 1:
        n.append(f"pipeline: build the model as deepspeed.pipe.PipelineModule(layers, num_stages={L.pp}); "
                 f"DeepSpeed runs its 1F1B schedule"
                 + (f" (the planned {L.schedule} schedule is not available)" if L.schedule != "1f1b" else ""))
    if L.tp > 1:
        n.append(f"tensor parallel: tensor_parallel.autotp_size = {L.tp} (DeepSpeed AutoTP training, >= 0.16.4), "
                 f"or pass a Megatron-style mpu to deepspeed.initialize")
    if L.cp > 1:
        n.append(f"context parallel {L.cp}: DeepSpeed-Ulysses sequence parallelism over {L.cp} ranks "
                 f"(set up in the model code)")
    if L.precision == "fp8":
        n.append("fp8: DeepSpeed has no fp8 switch; use Transformer Engine layers in the model (bf16 is set here)")
    if L.zero == 3 and L.pp > 1:
        n.append("ZeRO-3 does not combine with DeepSpeed pipeline parallelism; use zero stage <= 1 with PP")
    return n


def _deepspeed(plan, model, cluster):
    cfg = deepspeed_config(plan, model)
    notes = _deepspeed_notes(plan, model)
    text = json.dumps(cfg, indent=2) + "\n"
    launch = launch_line(plan.gpus, cluster, "train.py --deepspeed --deepspeed_config ds_config.json")
    if notes:
        launch = "\n".join(f"# {x}" for x in notes) + "\n" + launch
    return text, launch


# ----------------------------------------------------------------------------------- public

def emit(plan, model, fmt: str, cluster=None) -> tuple:
    """(configuration text, launch line) for `plan` in `fmt` (megatron, torchtitan, deepspeed)."""
    if plan is None:
        raise PlannerError("no layout to export")
    if fmt not in FORMATS:
        raise PlannerError(f"unknown export format '{fmt}'; valid: {', '.join(FORMATS)}")
    return {"megatron": _megatron, "torchtitan": _torchtitan, "deepspeed": _deepspeed}[fmt](plan, model, cluster)


__all__ = ["emit", "megatron_args", "torchtitan_config", "deepspeed_config", "launch_line", "node_layout",
           "gpus_per_node", "MEGATRON_FLAGS", "FORMATS"]
