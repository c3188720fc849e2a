"""Write a plan as a ready-to-run configuration for Megatron-LM (at MEGATRON_COMMIT), torchtitan 0.3
or DeepSpeed 0.19, plus a torchrun / Slurm launch line for its GPU count.

    emit(plan, model, fmt, cluster=None) -> (text, launch_line)      fmt: megatron|torchtitan|deepspeed

Flag and key names are those of the projects' own sources, checked by hand:

* Megatron-LM: ``megatron/training/arguments.py`` of NVIDIA/Megatron-LM at MEGATRON_COMMIT (every
  flag in MEGATRON_FLAGS below is in the parser ``add_megatron_arguments`` builds there, literal or
  generated from TransformerConfig fields) and the Megatron-FSDP user guide
  (docs/discussions/megatron-fsdp-user-guide) for the flags ZeRO-2/3 need.
* torchtitan 0.3.0: a Python configuration module (planner/export_torchtitan.py).
* DeepSpeed 0.19.8: ``deepspeed/runtime/config.py`` (train_batch_size, train_micro_batch_size_per_gpu,
  gradient_accumulation_steps, bf16/fp16, sequence_parallel_size, pipeline) and
  ``deepspeed/runtime/zero/config.py`` (zero_optimization keys); activation_checkpointing keys from
  deepspeed/runtime/activation_checkpointing/config.py; checked in tests/frameworks with
  DeepSpeedConfig itself.
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
from .uncertainty import generation_of
from .costmodel.elements import fp8_params
from .costmodel.stages import ep_overlap_allowed
from .layout import Recompute, Schedule
from .stacks import STACKS, compiled, grad_dtype

FORMATS = ("megatron", "torchtitan", "deepspeed")

# The Megatron-LM source the flags and rules are checked against (main, 2026-08-22; megatron-core
# 0.20.0 inside); the emitted script names it.
MEGATRON_COMMIT = "d98e8a64ddf34856e74b24714e3bedb2f5a39553"
# Megatron-LM pretrain_gpt.py flags this module can emit: name -> kind ("int", "float", "str",
# "flag" for store_true/store_false, "list" for nargs='+'). Every name verified in the parser of
# megatron/training/arguments.py at MEGATRON_COMMIT (A.add_megatron_arguments).
MEGATRON_FLAGS = {
    # distributed (_add_distributed_args)
    "--tensor-model-parallel-size": "int", "--pipeline-model-parallel-size": "int",
    "--context-parallel-size": "int", "--cp-comm-type": "list",
    "--num-layers-per-virtual-pipeline-stage": "int", "--num-virtual-stages-per-pipeline-rank": "int",
    "--decoder-first-pipeline-num-layers": "int", "--decoder-last-pipeline-num-layers": "int",
    "--pipeline-model-parallel-layout": "str",
    "--use-distributed-optimizer": "flag", "--num-distributed-optimizer-instances": "int",
    "--overlap-grad-reduce": "flag", "--overlap-param-gather": "flag",
    "--no-overlap-p2p-communication": "flag",
    "--use-megatron-fsdp": "flag", "--data-parallel-sharding-strategy": "str", "--ckpt-format": "str",
    # moe (_add_moe_args)
    "--expert-model-parallel-size": "int", "--expert-tensor-parallel-size": "int", "--num-experts": "int",
    "--moe-router-topk": "int", "--moe-ffn-hidden-size": "int", "--moe-shared-expert-intermediate-size": "int",
    "--moe-layer-freq": "str", "--moe-token-dispatcher-type": "str", "--moe-grouped-gemm": "flag",
    "--overlap-moe-expert-parallel-comm": "flag",
    "--moe-expert-capacity-factor": "float", "--moe-pad-expert-input-to-capacity": "flag",
    # mla (_add_mla_args)
    "--multi-latent-attention": "flag", "--q-lora-rank": "int", "--kv-lora-rank": "int",
    "--qk-head-dim": "int", "--qk-pos-emb-head-dim": "int", "--v-head-dim": "int",
    # training (_add_training_args)
    "--micro-batch-size": "int", "--global-batch-size": "int", "--sequence-parallel": "flag",
    "--recompute-granularity": "str", "--recompute-method": "str", "--recompute-num-layers": "int",
    "--recompute-modules": "list", "--cpu-offloading-num-layers": "int",
    "--tp-comm-overlap": "flag", "--no-gradient-accumulation-fusion": "flag", "--disable-bias-linear": "flag",
    "--train-iters": "int", "--log-interval": "int",
    # network size (_add_network_size_args)
    "--num-layers": "int", "--hidden-size": "int", "--ffn-hidden-size": "int", "--num-attention-heads": "int",
    "--kv-channels": "int", "--group-query-attention": "flag", "--num-query-groups": "int",
    "--max-position-embeddings": "int", "--position-embedding-type": "str", "--normalization": "str",
    "--rotary-base": "int",
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
    "--bf16": "flag", "--fp16": "flag", "--fp8-format": "str", "--fp8-param-gather": "flag",
    "--fp8-recipe": "str",
    "--grad-reduce-in-bf16": "flag",
}

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


def pipeline_layout(L, model) -> str | None:
    """Megatron's --pipeline-model-parallel-layout for a virtual-stage split its other flags cannot
    state (a rank's layers not divisible by vpp: transformer_config.py requires first/last stage
    layers % vpp == 0 and layers per middle rank % vpp == 0), else None. Virtual stage
    v*pp + r holds rank r's v-th chunk; E (embedding) opens the first, L (loss) closes the last
    (transformer_config.py validate_layer_layout). A rank's layers spread over its chunks as
    evenly as possible, the chunk holding E or L taking the smaller share."""
    if L.pp == 1 or L.vpp == 1:
        return None
    from .rules import chunk_layers, rank_layers
    per = rank_layers(L, model.layers)
    if all(n % L.vpp == 0 for n in per) and len(set(per[1:-1] or [0])) <= 1 and not uneven_split(L, model):
        return None
    stages = []
    for v in range(L.vpp):
        for r, n in enumerate(per):
            sizes = chunk_layers(n, L.vpp)
            if r == 0:
                sizes = sizes[::-1]          # E's chunk takes the smaller share
            seg = ("E" if (v, r) == (0, 0) else "") + "t" * sizes[v]
            stages.append(seg + ("L" if (v, r) == (L.vpp - 1, L.pp - 1) else ""))
    return "|".join(stages)


class _Args(list):
    """[(flag, value)]; value None for a switch. Only flags from MEGATRON_FLAGS."""

    def add(self, flag, value=None):
        if flag not in MEGATRON_FLAGS:     # a typo here would silently emit a flag Megatron rejects
            raise AssertionError(f"{flag} is not a verified Megatron-LM flag")
        self.append((flag, value))


def megatron_args(plan, model, capacity_factor: float = 0.0, pad_to_capacity: bool = False,
                  grad_bf16: bool = False) -> list:
    """[(flag, value)] for pretrain_gpt.py; value None for a switch. Flags only from MEGATRON_FLAGS.
    grad_bf16: the plan's stack keeps gradients in bf16 (stacks.with_grad_dtype)."""
    a = _Args()
    _megatron_parallel(a, plan.layout, model)
    _megatron_model(a, plan.layout, model)
    if model.moe and capacity_factor:     # token dropping by the default "probs" policy
        a.add("--moe-expert-capacity-factor", capacity_factor)
        if pad_to_capacity:
            a.add("--moe-pad-expert-input-to-capacity")
    _megatron_run(a, plan.layout, model)
    if grad_bf16 and plan.layout.precision != "fp16":     # under --fp16 the grads are fp16 already
        a.add("--grad-reduce-in-bf16")      # arguments.py: accumulate_allreduce_grads_in_fp32 = False
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
    layout = pipeline_layout(L, model)
    if layout is not None:
        add("--pipeline-model-parallel-layout", layout)
    elif L.pp > 1 and uneven:
        if L.first_stage_layers:
            add("--decoder-first-pipeline-num-layers", L.first_stage_layers)
        if L.last_stage_layers:
            add("--decoder-last-pipeline-num-layers", L.last_stage_layers)
    if L.vpp > 1 and layout is None:
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
    elif L.zero in (2, 3):
        add("--use-megatron-fsdp")
        add("--data-parallel-sharding-strategy", "optim_grads" if L.zero == 2 else "optim_grads_params")
        add("--no-gradient-accumulation-fusion")
        add("--use-distributed-optimizer")
        add("--ckpt-format", "fsdp_dtensor")
    # HSDP: shards within a group, replicas across (distributed optimizer copies; Megatron-FSDP
    # enables HSDP when instances > 1, core/distributed/fsdp/mcore_fsdp_adapter.py); instances
    # must divide dp x cp (core/parallel_state.py initialize_model_parallel)
    if L.zero >= 1 and L.shard_group and L.shard_group < L.dp * L.cp:
        add("--num-distributed-optimizer-instances", (L.dp * L.cp) // L.shard_group)
    if L.overlap_dp and L.dp * L.cp > 1:
        add("--overlap-grad-reduce")
        if L.zero >= 1:
            add("--overlap-param-gather")
    # recompute
    if L.recompute == "selective":
        add("--recompute-granularity", "selective")
    elif Recompute.of(L.recompute).modules:           # a Megatron-Core module list (layout.RECOMPUTE_MODULES)
        add("--recompute-granularity", "selective")
        add("--recompute-modules", Recompute.of(L.recompute).modules)
    elif L.recompute == "full":
        add("--recompute-granularity", "full")
        add("--recompute-method", "uniform")
        add("--recompute-num-layers", 1)
    # activation offloading: arguments.py validate_args sets cpu_offloading when this is > 0
    if L.offload_layers:
        add("--cpu-offloading-num-layers", L.offload_layers)


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
        # the EP all-to-all the plan hid behind another micro-batch, where Megatron allows it
        if L.overlap_ep and L.ep > 1 and ep_overlap_allowed(L.pp, Schedule.of(L.schedule), Recompute.of(L.recompute)):
            add("--overlap-moe-expert-parallel-comm")
    if not model.bias:
        add("--disable-bias-linear")
    # Llama-style families (and gpt-oss, which keeps biases): RMSNorm and RoPE; GPT-3 style:
    # LayerNorm and learned positions (Megatron's defaults)
    if not model.bias or model.rope_theta is not None:
        add("--normalization", "RMSNorm")
        add("--position-embedding-type", "rope")
        if model.rope_theta is not None:
            # an int in Megatron's parser (arguments.py --rotary-base type=int; '1e6' is rejected)
            if float(model.rope_theta) != int(model.rope_theta):
                raise PlannerError(f"{model.name}: rope_theta {model.rope_theta:g} is not an integer, which "
                                   f"Megatron-LM's --rotary-base (type int) cannot express")
            add("--rotary-base", int(model.rope_theta))
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
            if {"moe_act", "layernorm"} & set(Recompute.of(L.recompute).modules):
                # transformer_config.py: moe_act / layernorm recompute refuse delayed scaling under fp8
                add("--fp8-recipe", "tensorwise")
            if fp8_params(STACKS["megatron-core"], L.to_candidates())[0]:   # the memory model's rule
                add("--fp8-param-gather")
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


def _megatron_unexpressed(model) -> list:
    """Comment lines for what the model has that these flags do not set."""
    out = []
    if not model.bias and model.rope_theta is None:
        out.append("# RoPE base not stated in the model file: Megatron's default --rotary-base 10000 applies.")
    if model.mla is not None and model.moe is not None:
        out.append("# Not set here (the model file does not say): router score function, expert bias, "
                   "group-limited routing, multi-token prediction (--moe-router-score-function, "
                   "--moe-router-enable-expert-bias, --moe-router-num-groups/--moe-router-group-topk, "
                   "--mtp-num-layers); throughput is planned without MTP.")
    return out


def _megatron(plan, model, cluster, out=None, capacity_factor=0.0, pad_to_capacity=False, grad_bf16=False):
    L = plan.layout
    args = megatron_args(plan, model, capacity_factor, pad_to_capacity, grad_bf16)
    body = []
    for flag, v in args:
        vs = v if isinstance(v, tuple) else (v,)          # a tuple: one argv item each (nargs='+')
        body.append(f"    {flag}" if v is None else f"    {flag} {' '.join(shlex.quote(str(x)) for x in vs)}")
    env = []
    blackwell = cluster is not None and generation_of(cluster) == "blackwell"
    if (L.tp > 1 or L.cp > 1) and L.zero < 2 and not blackwell:
        env.append("export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron requires it with TP/CP > 1 on GPUs "
                   "before Blackwell (arguments.py validate_args)")
    elif L.zero >= 2:
        env.append("unset CUDA_DEVICE_MAX_CONNECTIONS     # Megatron-FSDP user guide")
    gpus = plan.gpus
    launch = launch_line(gpus, cluster, 'pretrain_gpt.py "${MEGATRON_ARGS[@]}"')
    run = (f"# from a Megatron-LM checkout{', on every node' if node_layout(gpus, cluster)[0] > 1 else ''}:\n"
           f"bash {shlex.quote(out)}") if out else launch
    hw = f" x {cluster.name}" if cluster is not None else " GPUs"
    text = "\n".join([
        "#!/usr/bin/env bash",
        f"# Megatron-LM pretrain_gpt.py for {model.name} on {gpus}{hw}, written by dtplanner",
        f"# layout: tp={L.tp} pp={L.pp} dp={L.dp} cp={L.cp} ep={L.ep} etp={L.etp} vpp={L.vpp} "
        f"schedule={L.schedule} sp={'on' if L.sp else 'off'} mb={L.micro_batch} recompute={L.recompute} "
        f"zero={L.zero} {L.precision}",
        f"# {_predicted(plan)}",
        f"# Target: NVIDIA/Megatron-LM at commit {MEGATRON_COMMIT[:12]} (flags and validation rules checked there).",
        *_megatron_unexpressed(model),
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
    return text, run


# ----------------------------------------------------------------------------------- deepspeed

DEEPSPEED_RELEASE = "0.19.8"


def deepspeed_dp(L) -> int:
    """The data-parallel size DeepSpeedConfig checks train_batch_size against (runtime/config.py,
    DeepSpeedConfig.__init__): the pipeline grid's data dimension when a PipelineModule is built
    with PipeModelDataParallelTopology(pp, tp, dp) (deepspeed/__init__.py passes model.mpu());
    world / sequence_parallel_size for Ulysses; otherwise the whole world, AutoTP's ranks
    included (its groups do not exist yet when the configuration is checked)."""
    world = L.tp * L.pp * L.dp * L.cp
    if L.pp > 1:
        return L.dp
    if L.cp > 1:
        return world // L.cp
    return world


def deepspeed_config(plan, model) -> dict:
    """DeepSpeed 0.19 JSON configuration (runtime/config.py, runtime/zero/config.py key names)."""
    L = plan.layout
    gas = L.global_batch // (L.micro_batch * L.dp)
    cfg = {"train_micro_batch_size_per_gpu": L.micro_batch, "gradient_accumulation_steps": gas,
           "gradient_clipping": 1.0, "steps_per_print": 10, "wall_clock_breakdown": False}
    # train_batch_size = micro x accumulation x the dp DeepSpeed derives (_configure_train_batch_size);
    # where that dp is not the layout's (AutoTP ranks counted as data parallel), it is left for
    # DeepSpeed to derive from the two given and the note says what the real global batch is
    assert L.micro_batch * gas * L.dp == L.global_batch, "global batch is not micro-batch x accumulation x dp"
    if deepspeed_dp(L) == L.dp:
        cfg = {"train_batch_size": L.global_batch, **cfg}
    if L.precision == "fp16":
        cfg["fp16"] = {"enabled": True}
    else:
        cfg["bf16"] = {"enabled": True}
    zero = {"stage": L.zero, "overlap_comm": bool(L.overlap_dp), "contiguous_gradients": True,
            "reduce_scatter": True, "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000}
    if L.zero == 3:
        zero["stage3_prefetch_bucket_size"] = 50_000_000
        # the cap the planner's DeepSpeed stack times and sizes with (state.unprefetched, footprint.prefetch_bytes)
        zero["stage3_max_live_parameters"] = int(STACKS["deepspeed"].zero3_max_live_params)
        zero["stage3_param_persistence_threshold"] = 100_000
    cfg["zero_optimization"] = zero
    if L.recompute != "none":
        cfg["activation_checkpointing"] = {"partition_activations": bool(L.tp > 1),
                                           "contiguous_memory_optimization": False,
                                           "cpu_checkpointing": False}
    if L.pp > 1:     # stages and partitioning are PipelineModule arguments, not configuration keys
        cfg["pipeline"] = {"activation_checkpoint_interval": 1 if L.recompute == "full" else 0}
    if L.cp > 1:
        cfg["sequence_parallel_size"] = L.cp
    if L.tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": L.tp}
    return cfg


def _deepspeed_notes(plan, model) -> list:
    L = plan.layout
    n = [f"DeepSpeed {DEEPSPEED_RELEASE} (checked with its DeepSpeedConfig on a fake process group)"]
    if L.pp > 1:
        n.append(f"pipeline: build deepspeed.pipe.PipelineModule(layers, topology=PipeModelDataParallelTopology("
                 f"num_pp={L.pp}, num_mp={L.tp}, num_dp={L.dp}), partition_method='parameters'); DeepSpeed runs "
                 f"its 1F1B TrainSchedule")
    if L.tp > 1:
        n.append(f"tensor parallel: tensor_parallel.autotp_size = {L.tp} (AutoTP training)")
        if deepspeed_dp(L) != L.dp:
            n.append(f"train_batch_size is left out: DeepSpeed checks it before AutoTP's groups exist, over all "
                     f"{deepspeed_dp(L)} ranks; the run's global batch is {L.micro_batch} x "
                     f"{L.global_batch // (L.micro_batch * L.dp)} x dp {L.dp} = {L.global_batch} sequences")
    if L.cp > 1:
        n.append(f"context parallel {L.cp}: DeepSpeed-Ulysses (sequence_parallel_size {L.cp}; the attention "
                 f"module is wrapped in deepspeed.sequence.layer.DistributedAttention in the model code)")
    if L.precision == "fp8":
        n.append("fp8: DeepSpeed has no fp8 switch; use Transformer Engine layers in the model (bf16 is set here)")
    return n


def _deepspeed(plan, model, cluster, out=None):
    cfg = deepspeed_config(plan, model)
    notes = _deepspeed_notes(plan, model)
    text = json.dumps(cfg, indent=2) + "\n"
    path = shlex.quote(out or "ds_config.json")
    launch = launch_line(plan.gpus, cluster, f"train.py --deepspeed --deepspeed_config {path}")
    launch = "\n".join(f"# {x}" for x in notes) + "\n" + launch
    return text, launch


# ----------------------------------------------------------------------------------- public

def emit(plan, model, fmt: str, cluster=None, out: str | None = None, capacity_factor: float = 0.0,
         pad_to_capacity: bool = False, stack=None) -> tuple:
    """(configuration text, launch line) for `plan` in `fmt` (megatron, torchtitan, deepspeed);
    `out`: the file the configuration is written to, which the launch line reads. An expert
    capacity (the plan's --capacity-factor / --pad-to-capacity) is Megatron's alone: torchtitan's
    and DeepSpeed's emitted MoE is dropless, so it is refused there. `stack`: the Stack planned
    under (None: megatron-core's defaults); bf16 gradients (plan --grad-dtype bf16) are Megatron's
    --grad-reduce-in-bf16, which the other formats do not express."""
    if plan is None:
        raise PlannerError("no layout to export")
    if fmt not in FORMATS:
        raise PlannerError(f"unknown export format '{fmt}'; valid: {', '.join(FORMATS)}")
    if capacity_factor and fmt != "megatron":
        raise PlannerError(f"--capacity-factor cannot be expressed in a {fmt} configuration (its MoE is "
                           "dropless); emit megatron, or plan without it")
    grad_bf16 = stack is not None and grad_dtype(stack) == "bf16"
    if grad_bf16 and fmt != "megatron":
        raise PlannerError(f"bf16 gradients (--grad-dtype bf16) cannot be expressed in a {fmt} configuration; "
                           "emit megatron, or plan without --grad-dtype")
    if fmt == "megatron":
        return _megatron(plan, model, cluster, out, capacity_factor, pad_to_capacity, grad_bf16)
    if plan.layout.offload_layers:
        raise PlannerError(f"activation offloading (--offload-layers {plan.layout.offload_layers}) is Megatron-Core's "
                           f"--cpu-offloading-num-layers; a {fmt} configuration cannot express it: emit megatron, or "
                           "plan with --offload-layers 0")
    from .export_torchtitan import torchtitan_emit
    if fmt == "torchtitan":
        return torchtitan_emit(plan, model, cluster, out, compiled=stack is not None and compiled(stack))
    return _deepspeed(plan, model, cluster, out)


__all__ = ["emit", "megatron_args", "deepspeed_config", "launch_line", "node_layout",
           "gpus_per_node", "MEGATRON_FLAGS", "FORMATS"]
