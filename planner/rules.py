"""The one owner of layout validity: every constraint on a layout, stated once with the framework
check it mirrors, evaluated over numpy columns (the search masks millions of candidates with it)
or on one Layout (explain, export, the CLI and validate ask it the same questions).

A rule names the knobs it reads (columns of candidates: layout.INT_KNOBS, BOOL_KNOBS,
CODE_KNOBS) and is applied wherever all of them are known: on a divisor axis, on the table of
degrees, on (degrees x pipeline knobs), on whole candidates, or on the knobs a user fixed.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .arrays import distinct
from .errors import PlannerError
from .layout import INT_KNOBS, RECOMPUTE, Layout, Candidates, CpComm, Recompute, Schedule
from .model_spec import ModelSpec
from .stacks import STACKS, Stack
from .frozen import frozen

MAX_GPUS = 1 << 24           # 16,777,216 GPUs: 16x the largest clusters built (~10^6 GPUs)
MAX_MICRO_BATCH = 32


@frozen
class Context:
    """What a layout is valid against besides its own knobs."""
    model: ModelSpec
    gpus: int | None = None           # None: the layout's own tp*pp*dp*cp
    seq_len: int | None = None        # None: the layout's own column
    global_batch: int | None = None
    stack: Stack = STACKS["megatron-core"]
    precisions: tuple = ("bf16", "fp8", "fp16")   # what the hardware has a peak for
    hardware: str = "the hardware"
    host_bandwidth: float = 1.0       # bytes/s from a GPU to host memory (0: unknown, no offloading;
                                      # without a cluster, nonzero: no link to refuse offloading for)


@frozen
class Rule:
    name: str
    knobs: tuple                       # columns it reads
    holds: Callable                    # (Cols, Context) -> bool array
    says: Callable                     # (dict of scalars, Context) -> one-line reason
    source: str                        # the framework check it mirrors


class Cols:
    """Knob columns by name, with the derived quantities rules share (stage layers, micro-batches)."""

    def __init__(self, cols: dict, ctx: Context):
        self.c, self.ctx = cols, ctx

    def __getattr__(self, k):
        c = self.__dict__["c"]
        if k in c:
            return np.asarray(c[k])
        ctx = self.__dict__["ctx"]
        if k == "seq_len" and ctx.seq_len is not None:
            return np.asarray(ctx.seq_len)
        if k == "global_batch" and ctx.global_batch is not None:
            return np.asarray(ctx.global_batch)
        if k in ("first_stage_layers", "last_stage_layers"):
            return np.asarray(0)                 # not given: an even split
        if k == "dp" and ctx.gpus is not None and all(x in c for x in ("tp", "pp", "cp")):
            return ctx.gpus // (np.asarray(c["tp"]) * np.asarray(c["pp"]) * np.asarray(c["cp"]))
        raise AttributeError(k)

    @property
    def nmb(self):
        """Micro-batches per step per pipeline."""
        return self.global_batch // (self.dp * self.micro_batch)

    @property
    def stages(self):
        """(first, middle, last) layers per pipeline rank (stage_layers)."""
        return stage_layers(self.ctx.model.layers, self.pp, self.first_stage_layers, self.last_stage_layers)


def stage_layers(L: int, pp, first, last):
    """(first, middle, last) rank layer counts for L layers over pp ranks with the given first and
    last rank counts (0 = not given): the rest splits evenly over the other ranks (Megatron
    --decoder-first/last-pipeline-num-layers). A middle count of -1 means the rest does not split
    evenly; with pp = 1 the only rank is the first (last = middle = 0)."""
    pp, fl, ll = np.asarray(pp), np.asarray(first), np.asarray(last)
    given = (fl > 0).astype(np.int64) + (ll > 0)
    others = np.maximum(pp - given, 1)
    rest = L - fl - ll
    even = np.where(rest % others == 0, rest // others, -1)
    first_n = np.where(pp == 1, L, np.where(fl > 0, fl, even))
    last_n = np.where(pp == 1, 0, np.where(ll > 0, ll, even))
    mid = np.where(pp > 2, even, 0)
    return first_n, mid, last_n


def rank_layers(L, layers: int) -> list:
    """Layers on each pipeline rank of layout L, first to last (stage_layers for one layout)."""
    first, mid, last = (int(x) for x in stage_layers(layers, L.pp, L.first_stage_layers, L.last_stage_layers))
    return [first] + [mid] * (L.pp - 2) + [last] if L.pp > 1 else [first]


def chunk_layers(n: int, chunks: int) -> list:
    """A rank's n layers over its virtual stages, as even as possible, the larger ones first (the
    cost model paces an interleaved schedule by the largest, costmodel/pipeline.py)."""
    return [n // chunks + (1 if i < n % chunks else 0) for i in range(chunks)]


def _degree_divides(name):
    return Rule(f"{name}_divides_gpus", (name,),
                lambda c, x: (x.gpus is None) | (x.gpus % getattr(c, name) == 0),
                lambda v, x: f"--{name} {v[name]} does not divide --gpus {x.gpus}; valid: {listing(divisors(x.gpus))}",
                "Megatron-Core parallel_state.initialize_model_parallel (world size divisible by each degree); "
                "torchtitan ParallelDims._validate")


def _stages_ok(c):
    first, mid, last = c.stages
    pp, L = c.pp, c.ctx.model.layers
    ok = (first >= 1) & np.where(pp > 1, last >= 1, True) & np.where(pp > 2, mid >= 1, True)
    ok &= np.where(pp == 2, first + last == L, True)
    if c.ctx.stack.stage_split == "even":
        ok &= (c.first_stage_layers == 0) & (c.last_stage_layers == 0)
    return ok


def _vpp_ok(c):
    """Stacks with free pipeline layouts: every virtual stage holds a layer, or the embedding (first
    rank) or the loss (last rank). Stacks with even splits only: L divisible by pp x vpp."""
    first, mid, last = c.stages
    v, pp = c.vpp, c.pp
    if c.ctx.stack.stage_split == "even":
        return (c.first_stage_layers == 0) & (c.last_stage_layers == 0) & (c.ctx.model.layers % (pp * v) == 0)
    return (first + 1 >= v) & np.where(pp > 2, mid >= v, True) & np.where(pp > 1, last + 1 >= v, True)


def _zbv_ok(c):
    first, mid, last = c.stages
    even = (first % 2 == 0) & np.where(c.pp > 2, mid % 2 == 0, True) & np.where(c.pp > 1, last % 2 == 0, True)
    return (c.schedule != Schedule.ZBV) | even


def _stack_allows(attr, code_of=None):
    def holds(c, x):
        allowed = [code_of(v) if code_of else v for v in getattr(x.stack, attr)]
        return np.isin(getattr(c, {"schedules": "schedule", "zero_stages": "zero", "cp_comms": "cp_comm"}[attr]),
                       allowed)
    return holds


def _module_misfit(code, model) -> str:
    """Why a selective module list does not apply to `model` ('' where it does)."""
    mods = Recompute(int(code)).modules
    if "mla_up_proj" in mods and model.mla is None:
        return "mla_up_proj recomputes multi-latent attention's up-projections; this model has none"
    if "moe_act" in mods and model.moe is None:
        return "moe_act recomputes the experts' activation; this model has no MoE layers"
    return ""


def _modules_fit_model(c, x):
    codes = np.asarray(c.recompute)
    bad = [r for r in Recompute if _module_misfit(r, x.model)]
    return ~np.isin(codes, bad)


RULES: tuple = (
    *(_degree_divides(k) for k in ("tp", "pp", "cp", "dp")),
    Rule("world", ("tp", "pp", "cp", "dp"),
         lambda c, x: (x.gpus is None) | (c.tp * c.pp * c.cp * c.dp == x.gpus),
         lambda v, x: f"tp*pp*cp*dp = {v['tp'] * v['pp'] * v['cp'] * v['dp']} but --gpus is {x.gpus}",
         "Megatron-Core parallel_state.initialize_model_parallel; torchtitan ParallelDims._validate "
         "(product of degrees == WORLD_SIZE)"),
    Rule("heads_tp", ("tp",), lambda c, x: x.model.heads % c.tp == 0,
         lambda v, x: f"--tp {v['tp']} does not divide the {x.model.heads} attention heads of {x.model.name}",
         "Megatron-Core TransformerConfig.__post_init__: num_attention_heads % tensor_model_parallel_size"),
    Rule("kv_heads_tp", ("tp",),
         lambda c, x: bool(x.model.mla) | (x.model.kv_heads % c.tp == 0) | (c.tp % x.model.kv_heads == 0),
         lambda v, x: f"--tp {v['tp']} does not divide the {x.model.kv_heads} KV heads of {x.model.name} and is not "
                      "a multiple of them (Megatron replicates KV heads only when tp is)",
         "Megatron-Core TransformerConfig.__post_init__ (core/transformer/transformer_config.py:1462 at d98e8a64): "
         "num_query_groups a multiple or a divisor of tensor_model_parallel_size"),
    Rule("pp_layers", ("pp",), lambda c, x: c.pp <= x.model.layers,
         lambda v, x: f"--pp {v['pp']} exceeds the {x.model.layers} layers of {x.model.name}",
         "Megatron-Core TransformerConfig: every pipeline stage holds at least one layer"),
    Rule("cp_seq", ("cp", "seq_len"), lambda c, x: (c.cp == 1) | (c.seq_len % (2 * c.cp) == 0),
         lambda v, x: f"--cp {v['cp']} needs --seq-len divisible by 2*cp = {2 * v['cp']}, got {v['seq_len']}",
         "Megatron-LM training/utils.py get_batch_on_this_cp_rank: the sequence is cut into 2*cp chunks"),
    Rule("sp_seq", ("sp", "tp", "cp", "seq_len"),
         lambda c, x: ~(c.sp & (c.tp > 1)) | ((c.seq_len // np.maximum(c.cp, 1)) % c.tp == 0),
         lambda v, x: f"--sp needs the sequence per CP rank ({v['seq_len'] // v['cp']}) divisible by --tp {v['tp']}",
         "Megatron-Core tensor_parallel/mappings.py _split_along_first_dim: first dimension divisible by tp"),
    Rule("ep_dense", ("ep",), lambda c, x: (x.model.moe is not None) | (c.ep == 1),
         lambda v, x: f"--ep {v['ep']} needs a mixture-of-experts model; {x.model.name} is dense",
         "Megatron-LM arguments.py: expert parallelism needs --num-experts"),
    Rule("moe_tp_sp", ("tp", "sp"), lambda c, x: (x.model.moe is None) | (c.tp == 1) | np.asarray(c.sp, bool),
         lambda v, x: f"--tp {v['tp']} with the experts of {x.model.name} needs --sp (sequence parallelism)",
         "Megatron-Core moe/moe_layer.py MoELayer.forward: MoE with tensor parallelism and without "
         "sequence parallelism raises in training"),
    Rule("etp_dense", ("etp",), lambda c, x: (x.model.moe is not None) | (c.etp == 1),
         lambda v, x: f"--etp {v['etp']} needs a mixture-of-experts model; {x.model.name} is dense",
         "Megatron-LM arguments.py: expert tensor parallelism needs --num-experts"),
    Rule("ep_experts", ("ep",), lambda c, x: (x.model.moe is None) or (x.model.moe.experts % c.ep == 0),
         lambda v, x: f"--ep {v['ep']} does not divide the {x.model.moe.experts} experts of {x.model.name}",
         "Megatron-Core MoELayer: num_moe_experts % expert_model_parallel_size == 0"),
    Rule("etp_ffn", ("etp",), lambda c, x: (x.model.moe is None) or (x.model.moe.expert_ffn_hidden % c.etp == 0),
         lambda v, x: f"--etp {v['etp']} does not divide the expert FFN width {x.model.moe.expert_ffn_hidden} "
                      f"of {x.model.name}",
         "Megatron-Core TEGroupedMLP / ColumnParallelLinear: output size divisible by the TP size"),
    Rule("etp_bias", ("etp",), lambda c, x: (x.model.moe is None) | (not x.model.bias) | (c.etp == 1)
         | (x.stack.name != "megatron-core"),
         lambda v, x: f"--etp {v['etp']}: {x.model.name} has linear biases, with which Megatron-Core shards "
                      f"experts only with --etp 1",
         "Megatron-Core transformer_config.py __post_init__: MoE with add_bias_linear requires "
         "expert_tensor_parallel_size 1"),
    Rule("stack_etp", ("etp",), lambda c, x: (c.etp == 1) | np.asarray(x.stack.expert_tp),
         lambda v, x: f"--etp {v['etp']}: {x.stack.name} has no expert tensor parallelism; it runs --etp 1"
                      f"{_who_runs('expert_tp', True)}",
         "torchtitan 0.3 config/configs.py ParallelismConfig: no expert_tensor_parallel_degree"),
    *(_degree_divides(k) for k in ("ep", "etp")),
    Rule("ep_etp_gpus", ("ep", "etp"), lambda c, x: (x.gpus is None) | (x.gpus % (c.ep * c.etp) == 0),
         lambda v, x: f"--ep {v['ep']} x --etp {v['etp']} = {v['ep'] * v['etp']} does not divide --gpus {x.gpus} "
                      "(expert parallelism is carved out of tp x cp x dp)",
         "Megatron-Core parallel_state.initialize_model_parallel: world size divisible by etp*ep*pp"),
    Rule("ep_group", ("tp", "cp", "dp", "ep", "etp"), lambda c, x: (c.tp * c.cp * c.dp) % (c.ep * c.etp) == 0,
         lambda v, x: f"ep x etp = {v['ep'] * v['etp']} must divide tp x cp x dp = {v['tp'] * v['cp'] * v['dp']}",
         "Megatron-Core parallel_state: expert groups re-split the tp*cp*dp ranks of a stage"),
    Rule("batch_mb_dp", ("dp", "micro_batch", "global_batch"),
         lambda c, x: c.global_batch % (c.dp * c.micro_batch) == 0,
         lambda v, x: f"--global-batch {v['global_batch']} is not divisible by micro-batch x dp = "
                      f"{v['micro_batch'] * v['dp']}",
         "Megatron-Core num_microbatches_calculator: 'global batch size is not divisible by micro batch size "
         "times data parallel size'"),
    Rule("batch_dp", ("dp", "global_batch"), lambda c, x: c.global_batch % c.dp == 0,
         lambda v, x: f"--global-batch {v['global_batch']} is not divisible by dp = {v['dp']}",
         "Megatron-Core num_microbatches_calculator: global batch divisible by micro-batch x dp"),
    Rule("batch_mb", ("micro_batch", "global_batch"), lambda c, x: c.global_batch % c.micro_batch == 0,
         lambda v, x: f"--global-batch {v['global_batch']} is not divisible by --micro-batch {v['micro_batch']}; "
                      f"valid micro-batches up to {MAX_MICRO_BATCH}: "
                      f"{listing([d for d in range(1, MAX_MICRO_BATCH + 1) if v['global_batch'] % d == 0])}",
         "Megatron-Core num_microbatches_calculator"),
    Rule("stage_layers_total", ("first_stage_layers", "last_stage_layers"),
         lambda c, x: ((c.first_stage_layers + c.last_stage_layers
                        < x.model.layers + ((c.first_stage_layers > 0) & (c.last_stage_layers > 0)))),
         lambda v, x: _stage_message(v, x),
         "Megatron-Core TransformerConfig.__post_init__: the first and last stages leave layers for the others"),
    Rule("stage_layers", ("pp", "first_stage_layers", "last_stage_layers"), lambda c, x: _stages_ok(c),
         lambda v, x: _stage_message(v, x),
         "Megatron-Core TransformerConfig.__post_init__ (num_layers_in_first/last_pipeline_stage; the rest "
         "divisible over the middle stages)"),
    Rule("vpp_pp", ("vpp", "pp"), lambda c, x: (c.vpp == 1) | (c.pp > 1),
         lambda v, x: f"--vpp {v['vpp']} needs pipeline parallelism (--pp 2 or more), got --pp {v['pp']}",
         "Megatron-LM arguments.py: virtual pipeline stages need pipeline_model_parallel_size > 1"),
    Rule("vpp_schedule", ("vpp", "schedule"), lambda c, x: (c.schedule == Schedule.INTERLEAVED) == (c.vpp > 1),
         lambda v, x: (f"--vpp {v['vpp']} needs --schedule interleaved, not {Schedule(v['schedule']).label}"
                       if v["vpp"] > 1 else "--schedule interleaved needs --vpp 2 or more (virtual stages per "
                                            f"rank), got --vpp {v['vpp']}"),
         "Megatron-Core get_forward_backward_func: the interleaved schedule runs exactly when vpp > 1"),
    Rule("vpp_layers", ("vpp",), lambda c, x: (c.vpp == 1) | (2 * c.vpp <= x.model.layers),
         lambda v, x: f"--vpp {v['vpp']}: each pipeline stage must hold a multiple of {v['vpp']} layers, and "
                      f"{x.model.name} has {x.model.layers} layers (vpp must be below that)",
         "Megatron-Core TransformerConfig: a virtual stage holds at least one layer on each of >= 2 ranks"),
    Rule("vpp_stage_layers", ("pp", "vpp", "first_stage_layers", "last_stage_layers"), lambda c, x: _vpp_ok(c),
         lambda v, x: (f"--vpp {v['vpp']}: {x.stack.name} splits layers evenly only: {x.model.layers} layers must "
                       f"divide by pp x vpp = {v['pp'] * v['vpp']}" if x.stack.stage_split == "even" else
                       f"--vpp {v['vpp']}: every virtual stage must hold a layer (stages of {_stage_text(v, x)})"),
         "Megatron-Core pipeline_parallel_layout (--pipeline-model-parallel-layout: a list of layers per "
         "virtual stage, the embedding and loss as stage members); Megatron-LM 2021 arguments.py: "
         "num_layers % (pp * vpp) == 0"),
    Rule("interleaved_microbatches", ("schedule", "pp", "dp", "micro_batch", "global_batch"),
         lambda c, x: (c.schedule != Schedule.INTERLEAVED) | (c.nmb % c.pp == 0),
         lambda v, x: f"the interleaved schedule needs the micro-batches per step ({_nmb(v)}) divisible by "
                      f"--pp {v['pp']}",
         "Megatron-Core pipeline_parallel/schedules.py forward_backward_pipelining_with_interleaving: "
         "'number of microbatches is not divisible by pipeline-model-parallel-size'"),
    Rule("zbv_chunks", ("schedule", "pp", "first_stage_layers", "last_stage_layers"), lambda c, x: _zbv_ok(c),
         lambda v, x: "ZB-V runs two chunks per rank: every stage needs an even number of layers",
         "torch.distributed.pipelining ScheduleZBVZeroBubble: two stages per rank in a V"),
    Rule("dualpipe", ("schedule", "pp", "dp", "micro_batch", "global_batch"),
         lambda c, x: (c.schedule != Schedule.DUALPIPE) | ((c.pp % 2 == 0) & (c.nmb >= 2 * c.pp)),
         lambda v, x: f"DualPipe needs an even --pp and at least 2 x pp = {2 * v['pp']} micro-batches per step "
                      f"(got pp {v['pp']}, {_nmb(v)} micro-batches)",
         "DeepSeek-V3 DualPipe (deepseek-ai/DualPipe dualpipe.py: num_chunks >= num_ranks * 2, even ranks); "
         "torch ScheduleDualPipeV"),
    Rule("shard_group_gpus", ("shard_group",),
         lambda c, x: (c.shard_group == 0) | (x.gpus is None) | (x.gpus % np.maximum(c.shard_group, 1) == 0),
         lambda v, x: f"--shard-group {v['shard_group']} must divide the data-parallel ranks dp x cp "
                      f"(a divisor of --gpus {x.gpus})",
         "a shard group tiles the data-parallel ranks, hence divides the GPU count"),
    Rule("shard_group", ("shard_group", "dp", "cp"),
         lambda c, x: (c.shard_group == 0) | ((c.dp * c.cp) % np.maximum(c.shard_group, 1) == 0),
         lambda v, x: f"--shard-group {v['shard_group']} must divide the data-parallel ranks dp x cp "
                      f"({v['dp'] * v['cp']})",
         "torchtitan ParallelDims (dp_shard x dp_replicate = dp); Megatron-LM --num-distributed-optimizer-"
         "instances divides the data-parallel group"),
    Rule("shard_group_zero", ("shard_group", "zero"), lambda c, x: (c.shard_group == 0) | (c.zero >= 1),
         lambda v, x: "--shard-group needs --zero 1, 2 or 3 (it is the ZeRO/FSDP shard group size)",
         "a shard group shards something: optimizer states (ZeRO-1) and more"),
    Rule("stack_hsdp", ("shard_group",),
         lambda c, x: (c.shard_group == 0) | np.asarray(x.stack.hybrid_shard),
         lambda v, x: f"{x.stack.name} has no hybrid sharding (--shard-group); drop it to shard over every "
                      f"data-parallel rank, or choose a stack that has it{_who_runs('hybrid_shard', True)}",
         "DeepSpeed runtime/config.py _reject_removed_config_keys: mics_shard_size removed in 0.19.7"),
    Rule("stack_schedule", ("schedule",), _stack_allows("schedules", lambda s: Schedule.of(s)),
         lambda v, x: f"--schedule {Schedule(v['schedule']).label} is not run by {x.stack.name}; "
                      f"it runs {', '.join(x.stack.schedules)}{_who_runs('schedules', Schedule(v['schedule']).label)}",
         "stacks.py: the schedules each framework implements"),
    Rule("stack_zero", ("zero",), _stack_allows("zero_stages"),
         lambda v, x: f"--zero {v['zero']} is not run by {x.stack.name}; it runs "
                      f"{', '.join(map(str, x.stack.zero_stages))}{_who_runs('zero_stages', v['zero'])}",
         "stacks.py: the ZeRO/FSDP stages each framework implements"),
    Rule("stack_cp_comm", ("cp", "cp_comm"), lambda c, x: (c.cp == 1) | _stack_allows("cp_comms", CpComm.of)(c, x),
         lambda v, x: f"--cp-comm {CpComm(v['cp_comm']).label} is not run by {x.stack.name}; it runs "
                      f"{', '.join(x.stack.cp_comms)}",
         "stacks.py: the context-parallel exchanges each framework implements"),
    Rule("stack_zero_pp", ("zero", "pp"), lambda c, x: (c.pp == 1) | (c.zero <= x.stack.max_zero_with_pp),
         lambda v, x: f"{x.stack.name} does not combine --zero {v['zero']} with pipeline parallelism "
                      f"(at most ZeRO-{x.stack.max_zero_with_pp} with --pp > 1)",
         "DeepSpeed runtime/pipe/engine.py: 'ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism'"),
    Rule("stack_cp_pp", ("cp", "pp"), lambda c, x: (c.cp == 1) | (c.pp == 1) | np.asarray(x.stack.cp_with_pp),
         lambda v, x: f"{x.stack.name} does not combine context parallelism (--cp {v['cp']}) with pipeline "
                      f"parallelism (--pp {v['pp']})",
         "DeepSpeed runtime/pipe/topology.py: PipeModelDataParallelTopology has pipe, data and model axes only"),
    Rule("stack_replicate_1d", ("zero", "tp", "pp", "cp"),
         lambda c, x: ~np.asarray(x.stack.replicate_only_1d) | (c.zero != 0) | ((c.tp == 1) & (c.pp == 1) & (c.cp == 1)),
         lambda v, x: f"{x.stack.name} runs plain data parallelism (--zero 0) only without TP, PP or CP",
         "torchtitan parallelize: 'DDP has not supported > 1D parallelism'"),
    Rule("stack_recompute_modules", ("recompute",),
         lambda c, x: (c.recompute <= Recompute.FULL) | np.asarray(x.stack.recompute_modules),
         lambda v, x: f"--recompute {RECOMPUTE[v['recompute']]} names Megatron-Core recompute modules, which "
                      f"{x.stack.name} does not have; it runs none, selective, full"
                      f"{_who_runs('recompute_modules', True)}",
         "Megatron-Core transformer_config.py recompute_modules (--recompute-modules)"),
    Rule("recompute_modules_model", ("recompute",), _modules_fit_model,
         lambda v, x: f"--recompute {RECOMPUTE[v['recompute']]}: {_module_misfit(v['recompute'], x.model)}",
         "Megatron-Core transformer_config.py __post_init__: mla_up_proj only with multi_latent_attention, "
         "moe_act only with moe_grouped_gemm"),
    Rule("offload_layers", ("offload_layers",), lambda c, x: c.offload_layers < x.model.layers,
         lambda v, x: f"--offload-layers {v['offload_layers']}: {x.model.name} has {x.model.layers} layers; "
                      f"at most {x.model.layers - 1} can be offloaded",
         "Megatron-Core transformer_config.py __post_init__: offloading only for layers less than num_layers"),
    Rule("offload_pp", ("offload_layers", "pp"), lambda c, x: (c.offload_layers == 0) | (c.pp == 1),
         lambda v, x: f"--offload-layers runs with --pp 1 only (got --pp {v['pp']})",
         "Megatron-Core transformer_config.py __post_init__: no CPU offloading with pipeline parallelism"),
    Rule("offload_recompute", ("offload_layers", "recompute"),
         lambda c, x: (c.offload_layers == 0) | (c.recompute == Recompute.NONE),
         lambda v, x: f"--offload-layers runs with --recompute none only (got {RECOMPUTE[v['recompute']]})",
         "Megatron-Core transformer_config.py __post_init__: no CPU offloading with activation recomputation"),
    Rule("offload_where", ("offload_layers",),
         lambda c, x: (c.offload_layers == 0) | (np.asarray(x.stack.activation_offload) & (x.host_bandwidth > 0)),
         lambda v, x: (f"{x.stack.name} has no activation offloading (--offload-layers){_who_runs('activation_offload', True)}"
                       if not x.stack.activation_offload else f"--offload-layers: {x.hardware} has no gpu.host_bandwidth "
                       "in its profile to time the copies; drop it"),
         "stacks.py Stack.activation_offload (Megatron-Core --cpu-offloading-num-layers); hwprofiles gpu.host_bandwidth"),
    Rule("precision_on_gpu", ("precision",), lambda c, x: np.isin(c.precision, [_PREC[p] for p in x.precisions]),
         lambda v, x: f"--precision {['bf16', 'fp8', 'fp16'][v['precision']]}: {x.hardware} has no "
                      f"{['bf16', 'fp8', 'fp16'][v['precision']]} peak; valid: {', '.join(x.precisions)}",
         "hwprofiles: a precision is runnable where the GPU has a dense peak for it"),
)
_PREC = {"bf16": 0, "fp8": 1, "fp16": 2}
BY_NAME = {r.name: r for r in RULES}


def _nmb(v):
    return v["global_batch"] // max(v["dp"] * v["micro_batch"], 1)


def _stage_text(v, x) -> str:
    f, m, last = (int(a) for a in stage_layers(x.model.layers, v["pp"], v.get("first_stage_layers", 0),
                                                 v.get("last_stage_layers", 0)))
    return f"{f}" + (f", {m}" if v["pp"] > 2 else "") + (f", {last}" if v["pp"] > 1 else "") + " layers"


def _stage_message(v, x) -> str:
    fl, ll, L, pp = v.get("first_stage_layers", 0), v.get("last_stage_layers", 0), x.model.layers, v.get("pp")
    if pp is None:
        return (f"--first-stage-layers/--last-stage-layers ({fl}/{ll}) leave no layers for the other stages: "
                f"{x.model.name} has {L} layers")
    ngiven = (fl > 0) + (ll > 0)
    if fl + ll >= L or (pp == 1 and (fl or ll)):
        return (f"--first-stage-layers/--last-stage-layers ({fl}/{ll}) leave no layers for the other stages: "
                f"{x.model.name} has {L} layers over --pp {pp}")
    if not ngiven:
        return (f"the {L} layers of {x.model.name} do not split evenly over --pp {pp}; give "
                "--first-stage-layers/--last-stage-layers")
    return f"the {L - fl - ll} layers left after --first/--last-stage-layers do not divide over the other " \
           f"{pp - ngiven} stages"


def _who_runs(attr, value) -> str:
    names = [s.name for s in STACKS.values()
             if (value in getattr(s, attr) if isinstance(getattr(s, attr), tuple) else getattr(s, attr) == value)]
    return f" ({', '.join(names)} {'runs' if len(names) == 1 else 'run'} it: --stack)" if names else ""


# ----------------------------------------------------------------------------------- applying

def mask(cols: dict, ctx: Context, involving=None) -> np.ndarray:
    """True where every rule whose knobs are all among `cols` (or derivable) holds; with
    `involving`, only rules that read at least one of those knobs."""
    c = Cols(cols, ctx)
    n = len(next(iter(cols.values())))
    ok = np.ones(n, bool)
    for r in applicable(cols, ctx, involving):
        ok &= np.broadcast_to(np.asarray(r.holds(c, ctx), bool), (n,))
    return ok


def applicable(cols, ctx: Context, involving=None, derive_dp: bool = True) -> list:
    known = set(cols) | {k for k, v in (("seq_len", ctx.seq_len), ("global_batch", ctx.global_batch)) if v}
    if derive_dp and ctx.gpus is not None and {"tp", "pp", "cp"} <= known:
        known.add("dp")
    out = []
    for r in RULES:
        if not set(r.knobs) <= known:
            continue
        if involving is not None and not set(r.knobs) & set(involving):
            continue
        out.append(r)
    return out


def violations(layout: Layout, ctx: Context) -> list:
    """[(rule, reason)] for every rule the layout breaks."""
    c = Candidates.from_layouts([layout]).cols
    cc = Cols(c, ctx)
    v = {k: (int(a[0]) if a.dtype != bool else bool(a[0])) for k, a in c.items()}
    return [(r, r.says(v, ctx)) for r in RULES if not bool(np.all(r.holds(cc, ctx)))]


def check_layout(layout: Layout, ctx: Context) -> Layout:
    """The layout, or a one-line PlannerError naming the first rule it breaks."""
    bad = violations(layout, ctx)
    if bad:
        raise PlannerError(bad[0][1])
    return layout


def context_for(model: ModelSpec, layout: Layout, stack: Stack | None = None, cluster=None) -> Context:
    """The context of one fully specified layout (its own GPU count, batch and sequence)."""
    return Context(model, layout.gpus, layout.seq_len, layout.global_batch, stack or STACKS["megatron-core"],
                   *hardware_facts(cluster))


def hardware_facts(cluster) -> tuple:
    """(precisions with a peak, name, host bandwidth) of a cluster, for Context."""
    if cluster is None:
        return ("bf16", "fp8", "fp16"), "the hardware", 1.0
    return (tuple(p for p in ("bf16", "fp8", "fp16") if p in cluster.gpu.peak_flops), cluster.name,
            cluster.gpu.host_bandwidth)


# ----------------------------------------------------------------------------------- fixed knobs

def check_fixed(ctx: Context, fixed: dict) -> None:
    """Explain, in one line, why the user's fixed knobs admit no layout, where the rules that read
    only fixed knobs (and the GPU count, batch and sequence) already fail."""
    if ctx.gpus is not None and ctx.gpus > MAX_GPUS:
        raise PlannerError(f"--gpus {ctx.gpus} is more than the planner searches (at most {MAX_GPUS:,})")
    fx = {k: v for k, v in fixed.items() if v is not None and not isinstance(v, (list, tuple))}
    fx = {k: (CODES[k].index(v) if k in CODES else int(v)) for k, v in fx.items()}
    _partial_product(ctx, fx)
    cols = {k: np.array([v]) for k, v in fx.items()}
    split_given = bool(fx.get("first_stage_layers") or fx.get("last_stage_layers"))
    if split_given:       # the other one, not given, is an even split of the rest
        cols = {"first_stage_layers": np.array([0]), "last_stage_layers": np.array([0]), **cols}
    c = Cols(cols, ctx)
    v = dict(fx)
    v.setdefault("first_stage_layers", 0)
    v.setdefault("last_stage_layers", 0)
    for k in ("seq_len", "global_batch"):
        if getattr(ctx, k) is not None:
            v[k] = getattr(ctx, k)
    # dp is checked only where given: a dp the other fixed degrees imply is the search's to report
    # (candidates.explain_empty names the knobs that clash)
    for r in applicable(cols, ctx, derive_dp=False):
        if not bool(np.all(r.holds(c, ctx))):
            raise PlannerError(r.says(v, ctx))



CODES = {"schedule": ("1f1b", "interleaved", "zb-h1", "zbv", "dualpipe"), "cp_comm": ("p2p", "allgather", "a2a"),
         "precision": ("bf16", "fp8", "fp16"), "recompute": RECOMPUTE}


def _partial_product(ctx: Context, fx: dict) -> None:
    if ctx.gpus is None:
        return
    prod = math.prod(fx.get(k, 1) for k in ("tp", "pp", "cp", "dp"))
    if all(ctx.gpus % fx.get(k, 1) == 0 for k in ("tp", "pp", "cp", "dp")) and ctx.gpus % prod:
        raise PlannerError(f"the fixed degrees multiply to {prod}, which does not divide --gpus {ctx.gpus}")


# ----------------------------------------------------------------------------------- helpers

def divisors(n: int) -> np.ndarray:
    n = int(n)
    if not 1 <= n <= 1 << 40:   # trial division up to sqrt(n): 2^20 candidates at most
        raise PlannerError(f"cannot enumerate the divisors of {n}: expected 1 to {1 << 40}")
    small = np.arange(1, math.isqrt(n) + 1, dtype=np.int64)
    small = small[n % small == 0]
    return distinct(np.concatenate([small, n // small]))


def listing(values, most: int = 24) -> str:
    """'1, 2, 4' -- or the first and last few of a long list, with the count."""
    v = [str(int(x)) for x in values]
    if len(v) <= most:
        return ", ".join(v)
    return f"{', '.join(v[:most - 4])}, ..., {', '.join(v[-3:])} ({len(v)} values)"


def rule_table() -> list:
    """[(name, knobs, source)] of every rule (README and tests list them)."""
    return [(r.name, r.knobs, r.source) for r in RULES]


__all__ = ["RULES", "Rule", "Context", "mask", "violations", "check_layout", "check_fixed", "stage_layers",
           "context_for", "divisors", "listing", "rule_table", "MAX_GPUS", "MAX_MICRO_BATCH", "INT_KNOBS"]
