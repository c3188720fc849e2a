"""Software stacks. A stack changes how close kernels get to the hardware and which
communication it overlaps; its factors are global (fitted once over every published run of that
stack by benchmarks/fit_efficiency.py, never per run) and stated here.

The default, `megatron-core`, is Megatron-Core with Transformer Engine as run by NVIDIA's NeMo /
Megatron-Bridge performance recipes: fused kernels, distributed optimizer, overlapped gradient
reduce-scatter and parameter all-gather, TP communication overlap.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from .errors import PlannerError


class StackName(str, Enum):
    """The software stacks the planner models (--stack)."""
    MEGATRON_CORE = "megatron-core"
    MEGATRON_2021 = "megatron-2021"
    TORCHTITAN = "torchtitan"
    LLM_FOUNDRY = "llm-foundry"
    DEEPSPEED = "deepspeed"


@dataclass(frozen=True)
class Stack:
    name: str
    description: str
    gemm: float = 1.0             # multiplier on the profile's GEMM efficiency
    attention: float = 1.0        # multiplier on the profile's attention-kernel efficiency
    pooled_nics: bool = True      # DP collectives drive every NIC of a node at once (NCCL channels);
                                  # False: each rank's traffic leaves through its own NIC only
    elementwise: float = 1.0      # multiplier on memory-bound traffic counted as fused kernels (1.0 = TE's);
                                  # not applied where elementwise_ops counts a stack's ops one by one
    # how a layer's norms, RoPE, residual adds and activation run (costmodel/elementwise.py counts
    # each): "fused" TE / Apex kernels; "eager" torchtitan's Llama block op by op in eager PyTorch;
    # "compiled" that block under torch.compile (plan --compile, with_compile)
    elementwise_ops: str = "fused"
    grad_reduce_bytes: int = 4    # bytes per gradient element in the DP reduction
    grad_bytes: int = 4           # bytes per gradient element held (fp32 main grads)
    fsdp_regather_backward: bool = True   # ZeRO-3 gathers parameters again in backward
    tp_overlap: bool = True       # can overlap TP collectives with GEMMs (TE userbuffers)
    ep_overlap: bool = True       # can overlap the EP all-to-all with another micro-batch's compute
    flash_attention: bool = True  # fused attention (FlashAttention / cuDNN); False: scores materialised
    # which fused attention kernel: "te" = Transformer Engine's (cuDNN fused attention, FlashAttention-3
    # class on Hopper: the profile's attention_max); "sdpa" = PyTorch scaled_dot_product_attention's
    # flash backend, FlashAttention-2 (capped at the profile's sdpa_attention)
    attention_kernel: str = "te"
    sp_keeps_gathered_inputs: bool = False   # SP keeps the all-gathered input of column-parallel
                                  # linears for backward (PyTorch ColwiseParallel); Megatron re-gathers
    step_overhead_s: float = 0.0  # fixed per-step host overhead
    kernel_overhead_s: float = 5.10e-06   # launch + sync gap per kernel, fitted once over all runs
                                     # (benchmarks/fit_efficiency.py; above CUDA launch latency, ~3-5 us, it carries
                                     # the host and sync gaps the planner's kernel count misses)
    tp_layer_overhead_s: float = 0.0    # host seconds per TP-sharded layer forward (backward 2x) beyond
                                     # its kernels: DTensor dispatch of eager TP (validate calibrate
                                     # measures it); 0 for Megatron's hand-written TP
    # what the stack runs (planner/rules.py refuses the rest): pipeline schedules, ZeRO/FSDP stages,
    # context-parallel exchanges, the highest ZeRO stage it combines with PP, and whether plain data
    # parallelism (ZeRO-0) runs only without TP/PP/CP
    schedules: tuple = ("1f1b", "interleaved")
    zero_stages: tuple = (0, 1, 2, 3)
    cp_comms: tuple = ("p2p", "allgather", "a2a")
    max_zero_with_pp: int = 3
    replicate_only_1d: bool = False
    # hybrid sharding (--shard-group below dp x cp): Megatron --num-distributed-optimizer-instances,
    # torchtitan data_parallel_replicate_degree; DeepSpeed 0.19 has none (MiCS removed in 0.19.7)
    hybrid_shard: bool = True
    # context parallelism together with pipeline parallelism: DeepSpeed's pipeline grid has pipe,
    # data and model axes only (runtime/pipe/topology.py PipeModelDataParallelTopology), so
    # Ulysses sequence parallelism does not combine with PipelineModule
    cp_with_pp: bool = True
    # expert tensor parallelism (--etp > 1): Megatron-Core --expert-tensor-parallel-size; torchtitan
    # 0.3 has none (expert_tensor_parallel_degree removed; EP borrows from dp_shard x cp x tp)
    expert_tp: bool = True
    # how layers may be split over pipeline ranks: "layout" = any split, every virtual stage chosen
    # (Megatron-Core --pipeline-model-parallel-layout; torchtitan module_fqns_per_model_part);
    # "even" = the same number of layers on every virtual stage only (Megatron-LM of 2021)
    stage_split: str = "layout"
    # pipeline schedules whose steady-state sends overlap compute (Megatron-LM arguments.py:
    # --overlap-p2p-communication applies to the interleaved schedule only; plain 1F1B runs
    # blocking send_forward_recv_backward pairs; torch.distributed.pipelining posts its
    # sends and receives asynchronously in every schedule)
    p2p_overlap_schedules: tuple = ("interleaved", "zbv", "dualpipe")
    # ---- memory: what the stack keeps (benchmarks/memory.py holds these to PyTorch's trackers) ----
    # gradients live between steps: Megatron's DDP grad buffer is zeroed, never freed
    # (distributed/param_and_grad_buffer.py); False: optimizer.zero_grad(set_to_none=True) frees
    # them, so they never coexist with the forward's activations
    grads_persist: bool = True
    # bytes per logit live at the loss backward: Megatron's vocab-parallel cross entropy saves the
    # fp32 softmax and turns it into the gradient in place (tensor_parallel/cross_entropy.py:
    # 4 B, + 2 B bf16 gradient); eager F.cross_entropy on .float() logits keeps the fp32
    # log-softmax, the fp32 nll gradient and the fp32 log-softmax gradient at once (12 B)
    loss_bytes_per_logit: float = 6.0
    # the same with TP's vocab-parallel loss where it differs (DTensor loss_parallel: the nll
    # backward forms the log-softmax gradient from fp32 temporaries beside the saved
    # log-probabilities, torch/distributed/tensor/parallel/loss.py; 16 B as validate memory tracks)
    loss_parallel_bytes_per_logit: float = 0.0
    # bytes per element of a full (vocab x hidden) embedding gradient made at the first stage's last
    # backward under TP: DTensor's RowwiseParallel embedding backward yields a replicated
    # full-vocab bf16 gradient (embedding_dense_backward on the gathered indices; 2 B, plus its
    # fp32 copy for FSDP's reduction); Megatron's VocabParallelEmbedding keeps it sharded (0)
    tp_embedding_grad_bytes: float = 0.0
    # bytes per parameter of the FSDP unit being reduced at the end of backward: FSDP2 keeps the
    # unit's unsharded bf16 gradients beside their fp32 copy for the reduce-scatter (2 + 4 B;
    # torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py foreach_reduce, reduce_dtype fp32);
    # Megatron reduces its fp32 grad buffer in place (0)
    fsdp_reduce_bytes: float = 0.0
    # f-wide tensors a gated MLP keeps: 3 with TE/Megatron's fused SwiGLU, 4 in eager PyTorch
    gated_mlp_tensors: int = 3
    # full recompute by torch.utils.checkpoint non-reentrant (torchtitan): the replay stops once
    # backward's saved tensors exist, so a dense layer's last GEMM is not re-run (validate memory
    # counts it); Megatron's CheckpointFunction replays the whole layer
    full_recompute_skips_last_gemm: bool = False
    # what --recompute selective keeps: "core" Megatron (core attention recomputed,
    # Korthikanti sec. 5), "op" torchtitan's op-level SAC (memory.op_sac_layer_bytes)
    selective: str = "core"
    # selective recompute by module list (--recompute selective:<modules>): Megatron-Core's
    # --recompute-modules (transformer_config.py recompute_modules; MLA up-projections, the MoE
    # activation, the norms, the dense MLP); the other stacks checkpoint whole layers or ops
    recompute_modules: bool = False
    # fp8 weight bytes cached per parameter across micro-batches (TE: fp8 weight + transpose, 1 + 1;
    # torchao Float8Linear casts per use and caches none)
    fp8_weight_cache_bytes: float = 2.0
    # bytes per element of a linear layer's input saved for backward under fp8: TE keeps only the
    # fp8 cast (transformer_engine/pytorch/module/linear.py _Linear.forward: saved_inputmat is the
    # quantized input, row-wise data discarded; layernorm_linear.py likewise for ln_out), 1;
    # torchao's Float8Linear saves the bf16 input and casts again in backward
    # (torchao/float8/float8_linear.py matmul_with_hp_or_float8_args: save_for_backward(input_hp, ...)), 2
    fp8_saved_input_bytes: float = 1.0
    # how the experts' grouped GEMM launches: "per_expert" = one GEMM (and under fp8 one input
    # quantization) per local expert, as Transformer Engine's GroupedLinear (multi-stream cuBLAS)
    # and DeepSpeed's expert loop (deepspeed/moe/experts.py) run; "grouped" = one kernel for all
    # local experts (torch._grouped_mm, torchtitan models/moe GroupedExperts)
    expert_launches: str = "per_expert"
    # how fp8 GEMM operands are quantized: "fused" = Transformer Engine folds qkv's and fc1's input
    # casts into LayerNormLinear's norm, casts the other inputs in their own kernels and
    # casts-and-transposes every output gradient in one pass (elementwise.te_fp8_cast_bytes);
    # "dynamic" = torchao Float8Linear's tensorwise dynamic scaling (torchtitan): an amax pass and a
    # cast per operand and a transposed copy for the weight-gradient GEMM
    # (torchao/float8/float8_linear.py, elementwise.dynamic_fp8_cast_bytes)
    fp8_casts: str = "fused"
    # activation offloading to host memory (--offload-layers): Megatron-Core --cpu-offloading
    # --cpu-offloading-num-layers through Transformer Engine's cpu_offload (TransformerConfig
    # __post_init__: fewer layers than the model has, no pipeline parallelism, no recompute)
    activation_offload: bool = False
    # under fp8 with a sharded optimizer the weights are kept in fp8 only, their 16-bit copy gone
    # (Megatron-Core --fp8-param-gather, which NeMo's and Megatron-Bridge's fp8
    # presets set: bridge/training/mixed_precision.py bf16_with_fp8_delayed_scaling_mixed /
    # _current_scaling_mixed, fp8_param_gather = True; Megatron's arguments.py allows it only with
    # the distributed optimizer or FSDP). Memory only: its parameter all-gather is still costed in
    # 16 bits (the per-rank phase sees only whether a candidate is fp16; a conservative time)
    fp8_param_gather: bool = False
    # under --fp16 gradients are held and reduced in fp16 (Megatron-LM arguments.py sets
    # accumulate_allreduce_grads_in_fp32 only under --bf16; DDP's grad_reduce_in_fp32 follows it)
    fp16_grads: bool = False
    # ZeRO-3 as FSDP2 with MixedPrecisionPolicy: the sharded fp32 parameters are the master copy
    # (4 B weights + 8 B Adam moments per sharded element, no separate master)
    fsdp_fp32_params: bool = False
    # FSDP2 under torch.distributed.pipelining: weights stay gathered (reshard_after_forward=False)
    # and gradients unsharded in fp32 until the last micro-batch (stage.py backward_maybe_with_nosync)
    fsdp_pp_unsharded: bool = False
    # ZeRO-3 parameters gathered at once, in elements (DeepSpeed stage3_max_live_parameters, 1e9);
    # inf: two layers (FSDP's current unit and its prefetch)
    zero3_max_live_params: float = float("inf")
    # how ZeRO-3 pads each parameter for its shard group (costmodel/shapes.py): "dim0" FSDP2
    # (torchtitan, Megatron-Core --use-torch-fsdp2), "unit" FSDP1's flat parameter, "numel" DeepSpeed
    zero3_padding: str = "dim0"
    # the caching allocator's reserved bytes over allocated ones (fragmentation), fitted once per
    # stack over the reference runs that report reserved memory (benchmarks/memory.py --fit)
    allocator_overhead: float = 0.0
    # relative uncertainty of the predicted peak memory: a layout predicted above HBM by less than
    # this is 'tight' (shown, ranked after those that fit), not refused (see benchmarks/memory.py)
    memory_uncertainty: float = 0.10
    source: str = ""


STACKS = {
    "megatron-core": Stack(
        "megatron-core",
        "Megatron-Core + Transformer Engine (NeMo / Megatron-Bridge recipes)",
        schedules=("1f1b", "interleaved"),   # pipeline_parallel/schedules.py get_forward_backward_func
        cp_comms=("p2p", "allgather", "a2a"),  # --cp-comm-type p2p | all_gather | a2a
        fp8_param_gather=True,               # its fp8 recipes' setting (Stack.fp8_param_gather)
        fp16_grads=True,                     # Stack.fp16_grads (export: no --grad-reduce-in-bf16 needed)
        recompute_modules=True,              # --recompute-modules (Stack.recompute_modules)
        activation_offload=True,             # --cpu-offloading-num-layers (Stack.activation_offload)
        source="reference stack; efficiencies live in the hardware profile"),
    "megatron-2021": Stack(
        "megatron-2021",
        "Megatron-LM of Narayanan et al. 2021 / Korthikanti et al. 2022 (Apex fused kernels, no TE, "
        "no TP overlap, grads all-reduced in fp32)",
        tp_overlap=False, ep_overlap=False, flash_attention=False, schedules=("1f1b", "interleaved"), zero_stages=(0,),
        cp_comms=(), stage_split="even",     # 2021: --num-layers divisible by pp (x vpp), no uneven stages
        hybrid_shard=False,                  # no distributed optimizer in 2021
        source="Narayanan et al. 2021 sec. 5; Korthikanti et al. 2022 sec. 6"),
    "torchtitan": Stack(
        "torchtitan",
        "torchtitan (FSDP2 + DTensor TP, eager or torch.compile)",
        gemm=0.947,                    # fitted (benchmarks/fit_efficiency.py, 14 torchtitan runs)
        attention_kernel="sdpa",       # F.scaled_dot_product_attention (torchtitan models/llama/model.py, 2024)
        # elementwise: assumed 2x TE's bytes for what elementwise_ops does not count op by op -- the
        # eager loss on fp32 logits and the MoE token permutation
        elementwise=2.0, tp_overlap=False, ep_overlap=False, zero_stages=(0, 3),
        schedules=("1f1b", "interleaved", "zbv"),   # torch.distributed.pipelining schedules with one
                                                    # stage per rank, or V / interleaved stages
        cp_comms=("p2p", "allgather"),   # context_parallel_rotate_method alltoall | allgather (ring attention)
        replicate_only_1d=True,          # parallelize_llama: 'DDP has not supported > 1D parallelism'
        sp_keeps_gathered_inputs=True,   # DTensor ColwiseParallel saves the gathered input
        grads_persist=False, loss_bytes_per_logit=12.0, loss_parallel_bytes_per_logit=16.0,
        gated_mlp_tensors=4, selective="op", tp_embedding_grad_bytes=2.0, fsdp_reduce_bytes=6.0,
        full_recompute_skips_last_gemm=True, p2p_overlap_schedules=("1f1b", "interleaved", "zbv"),
        expert_tp=False, expert_launches="grouped", fp8_casts="dynamic",
        elementwise_ops="eager",         # torchtitan's default (compile.enable false); --compile
        fp8_weight_cache_bytes=0.0, fp8_saved_input_bytes=2.0, fsdp_fp32_params=True, fsdp_pp_unsharded=True,
        # reserved over allocated, fitted once over the 14 torchtitan rows that report memory
        # (benchmarks/memory.py --reference: leave-one-table-out mean |error| 5.0%, 16.8% without)
        allocator_overhead=0.22,
        source="torchtitan docs/performance.md; factors from benchmarks/fit_efficiency.py"),
    "llm-foundry": Stack(
        "llm-foundry",
        "MosaicML Composer / llm-foundry with PyTorch FSDP (FULL_SHARD)",
        gemm=1.008,                    # fitted (benchmarks/fit_efficiency.py, 11 llm-foundry runs)
        elementwise=1.5, tp_overlap=False, ep_overlap=False, zero_stages=(2, 3), schedules=("1f1b",), cp_comms=(),
        zero3_padding="unit",            # FSDP1 FULL_SHARD, one flat parameter per wrapped block
        source="llm-foundry scripts/train/benchmarking/README.md; factors from benchmarks/fit_efficiency.py"),
    "deepspeed": Stack(
        "deepspeed",
        "DeepSpeed ZeRO (data parallel only, Narayanan et al. 2021 Table 2 baseline)",
        grad_reduce_bytes=2, grad_bytes=2, tp_overlap=False, ep_overlap=False, flash_attention=False,
        schedules=("1f1b",),             # runtime/pipe/schedule.py TrainSchedule (1F1B)
        cp_comms=("a2a",),               # DeepSpeed-Ulysses sequence parallelism
        max_zero_with_pp=1,              # runtime/pipe/engine.py: ZeRO-2/3 incompatible with PP
        hybrid_shard=False,              # runtime/config.py: mics_shard_size rejected since 0.19.7
        cp_with_pp=False,                # no sequence axis in the pipeline grid
        zero3_max_live_params=1e9,       # docs: zero config stage3_max_live_parameters default
        zero3_padding="numel",
        pooled_nics=False,
        source="Rajbhandari et al. 2020 sec. 5 (fp16 gradients)"),
}


def get_stack(name: str) -> Stack:
    try:
        return STACKS[name]
    except KeyError:
        raise PlannerError(f"unknown stack '{name}'; valid: {', '.join(STACKS)}") from None


GRAD_DTYPES = ("fp32", "bf16")


def with_grad_dtype(stack: Stack, dtype: str | None) -> Stack:
    """The stack with its gradients kept and reduced in `dtype` (None: as the stack keeps them).
    Megatron-Core only: bf16 is Megatron-LM's --grad-reduce-in-bf16 (arguments.py validate_args
    turns accumulate_allreduce_grads_in_fp32 off; distributed_data_parallel.py then makes the grad
    buffer param.dtype, so the DP reduce-scatter moves 2 bytes too), as NVIDIA's Megatron-Bridge
    performance recipes run (perf_recipes/_common.py: grad_reduce_in_fp32 = False) and NeMo's
    optim.grad_sync_dtype: bf16 (NeMo-Framework-Launcher nemotron_340b.yaml); fp32 is its default
    (bf16 training accumulates and reduces gradients in fp32 unless told otherwise). The Adam
    state stays fp32 either way."""
    if dtype is None:
        return stack
    if dtype not in GRAD_DTYPES:
        raise PlannerError(f"--grad-dtype: unknown '{dtype}'; valid: {', '.join(GRAD_DTYPES)}")
    if stack.name != "megatron-core":
        raise PlannerError(f"--grad-dtype is modelled for the megatron-core stack (Megatron --grad-reduce-in-bf16); "
                           f"{stack.name} keeps its own gradient precision, drop --grad-dtype")
    nbytes = 2 if dtype == "bf16" else 4
    return replace(stack, grad_bytes=nbytes, grad_reduce_bytes=nbytes)


def grad_dtype(stack: Stack) -> str:
    """What a stack keeps its gradients in, as `plan --grad-dtype` names it (16-bit stacks: the
    training precision's own, e.g. DeepSpeed's fp16)."""
    return "fp32" if stack.grad_bytes == 4 else ("bf16" if stack.name == "megatron-core" else "16-bit")


def with_compile(stack: Stack, on: bool) -> Stack:
    """The stack under torch.compile (plan --compile): torchtitan compiles each TransformerBlock
    (distributed/compile.py apply_compile), so its norms, RoPE and activation run fused
    (costmodel/elementwise.py "compiled"). Off: the stack as it is (torchtitan's default is eager,
    config CompileConfig.enable = False)."""
    if not on:
        return stack
    if stack.elementwise_ops != "eager":
        raise PlannerError(f"--compile is modelled for torchtitan (torch.compile of each TransformerBlock); "
                           f"{stack.name} runs its own fused kernels, drop --compile")
    return replace(stack, elementwise_ops="compiled")


def compiled(stack: Stack) -> bool:
    """Whether the stack runs its blocks under torch.compile (plan --compile)."""
    return stack.elementwise_ops == "compiled"
