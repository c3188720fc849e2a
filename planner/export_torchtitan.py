"""A plan as a torchtitan 0.3 configuration: a Python module whose `plan()` returns the
Trainer.Config of torchtitan's own recipe for the model with the plan's layout set on it, run with
`python -m torchtitan.train --module <module> --config plan` (torchtitan 0.3 selects Python
configurations with --module/--config, config/manager.py; it reads no TOML).

Names are those of torchtitan 0.3.0 (PyPI): torchtitan/config/configs.py ParallelismConfig and
TrainingConfig fields, distributed/activation_checkpoint.py (FullAC, SelectiveAC, None),
components/quantization Float8LinearConverter, each model's config_registry and model_registry.
What 0.3 cannot express is refused with a one-line error naming what would work."""
from __future__ import annotations

import os

from .errors import PlannerError
from .launchline import launch_line
from .rules import chunk_layers, rank_layers

TORCHTITAN_RELEASE = "0.3.0"
# torch.distributed.pipelining.schedules.get_schedule_class names; "v" schedules put two stages
# on a rank as (r, 2pp-1-r) (pipeline_parallel.py _get_pp_rank_to_stage_indices_mapping)
TORCHTITAN_SCHEDULE = {"1f1b": "1F1B", "interleaved": "Interleaved1F1B", "zbv": "ZBVZeroBubble",
                       "dualpipe": "DualPipeV"}
V_SCHEDULES = ("zbv", "dualpipe")
# catalog model -> (torchtitan model module, recipe function in its config_registry, flavor)
TORCHTITAN_MODEL = {
    "llama-3-8b": ("llama3", "llama3_8b", "8B"), "llama-3-70b": ("llama3", "llama3_70b", "70B"),
    "llama-3.1-405b": ("llama3", "llama3_405b", "405B"),
    "deepseek-v3": ("deepseek_v3", "deepseek_v3_671b", "671B"),
    "qwen3-30b-a3b": ("qwen3", "qwen3_30b_a3b", "30B-A3B"),
    "gpt-oss-120b": ("gpt_oss", "gpt_oss_120b", "120b"),
}


def _refuse(why: str):
    raise PlannerError(f"--emit torchtitan (torchtitan {TORCHTITAN_RELEASE}): {why}")


def _data_parallel(L) -> tuple:
    """(dp_replicate, dp_shard): ZeRO-0 = DDP replicas; ZeRO-3 = FSDP over dp_shard x cp
    (torchtitan folds CP into the FSDP mesh), replicas above a shard group (HSDP)."""
    if L.zero == 0:
        return L.dp, 1
    if L.zero != 3:
        _refuse(f"torchtitan has no ZeRO-{L.zero}; plan with --stack torchtitan (it runs ZeRO-0 and FSDP)")
    group = L.shard_group or L.dp * L.cp
    if group % L.cp:
        _refuse(f"--shard-group {group} must be a multiple of --cp {L.cp} (FSDP shards over dp_shard x cp)")
    return (L.dp * L.cp) // group, group // L.cp


def stage_modules(L, model) -> list:
    """module_fqns_per_model_part: the planner's split of layers over pipeline stages, in stage
    order; the embedding opens stage 0 and the final norm and output close the last."""
    chunks = 2 if L.schedule in V_SCHEDULES else L.vpp
    sizes = [0] * (L.pp * chunks)
    for r, n in enumerate(rank_layers(L, model.layers)):
        share = chunk_layers(n, chunks)
        for c in range(chunks):
            stage = (2 * L.pp - 1 - r if c else r) if L.schedule in V_SCHEDULES else c * L.pp + r
            sizes[stage] = share[c]
    if min(sizes) == 0:
        _refuse("a pipeline stage would hold no layer; use fewer stages or virtual stages")
    parts, i = [], 0
    for s, n in enumerate(sizes):
        fq = [f"layers.{j}" for j in range(i, i + n)]
        i += n
        parts.append((["tok_embeddings"] if s == 0 else []) + fq + (["norm", "lm_head"] if s == len(sizes) - 1 else []))
    return parts


def _settings(plan, model) -> list:
    """(dotted attribute of the Trainer.Config, Python expression) pairs."""
    L = plan.layout
    if L.etp != 1:
        _refuse("expert tensor parallelism is not a torchtitan 0.3 setting (EP borrows from dp_shard x cp x tp)")
    if L.cp > 1 and L.cp_comm == "a2a":
        _refuse("torchtitan has no all-to-all (Ulysses) context parallelism")
    rep, shard = _data_parallel(L)
    s = [("parallelism.data_parallel_replicate_degree", rep), ("parallelism.data_parallel_shard_degree", shard),
         ("parallelism.tensor_parallel_degree", L.tp), ("parallelism.enable_sequence_parallel", bool(L.sp or L.tp == 1)),
         ("parallelism.context_parallel_degree", L.cp), ("parallelism.pipeline_parallel_degree", L.pp)]
    if model.moe:
        s.append(("parallelism.expert_parallel_degree", L.ep))
    # local_batch_size: one DP rank's batch of an optimizer step under PP (split into micro-batches),
    # else one micro-batch, the rest accumulated (trainer.py: global % (local x dp) == 0)
    local = L.global_batch // L.dp if L.pp > 1 else L.micro_batch
    s += [("training.local_batch_size", local), ("training.global_batch_size", L.global_batch),
          ("training.seq_len", L.seq_len)]
    if L.pp > 1:
        if L.schedule not in TORCHTITAN_SCHEDULE:
            _refuse(f"schedule {L.schedule} has no torch.distributed.pipelining class; valid: "
                    f"{', '.join(TORCHTITAN_SCHEDULE)}")
        s += [("parallelism.pipeline_parallel_schedule", TORCHTITAN_SCHEDULE[L.schedule]),
              ("parallelism.pipeline_parallel_microbatch_size", L.micro_batch),
              ("parallelism.module_fqns_per_model_part", stage_modules(L, model))]
    if L.pp > 1 or (model.moe and L.ep > 1):
        # trainer.py _validate_cuda_graphs: CUDA graphs run neither with PP nor with the all-to-all
        # token dispatcher (it synchronises with the CPU)
        s.append(("training.disable_cuda_graphs", True))
    return s


def torchtitan_module(plan, model, cluster=None, compiled: bool = False) -> str:
    """The text of a Python configuration module for torchtitan 0.3; `compiled`: planned with
    --compile (torch.compile of each TransformerBlock), else eager as torchtitan's default."""
    L = plan.layout
    if model.name not in TORCHTITAN_MODEL:
        _refuse(f"torchtitan ships no recipe for {model.name}; it ships {', '.join(TORCHTITAN_MODEL)} "
                f"(register a model in a config_registry of your own)")
    if L.precision == "fp16":
        _refuse("torchtitan trains in bf16 or fp8, not fp16")
    module, recipe, flavor = TORCHTITAN_MODEL[model.name]
    settings = _settings(plan, model)
    # torch.compile as planned (plan --compile; eager otherwise); async TP stays off, as the
    # planner prices TP collectives unoverlapped (config/configs.py CompileConfig: async TP needs compile)
    conv = "[Float8LinearConverter.Config(filter_fqns=['lm_head'])]" if L.precision == "fp8" else "None"
    ac = {"none": "None", "selective": "SelectiveAC.Config()", "full": "FullAC.Config()"}[L.recompute]
    hw = f" x {cluster.name}" if cluster is not None else " GPUs"
    lines = [
        f'"""torchtitan {TORCHTITAN_RELEASE} configuration for {model.name} on {plan.gpus}{hw}, written by dtplanner.',
        f"layout: tp={L.tp} pp={L.pp} dp={L.dp} cp={L.cp} ep={L.ep} vpp={L.vpp} schedule={L.schedule} "
        f"mb={L.micro_batch} recompute={L.recompute} zero={L.zero} {L.precision}",
        f"predicted: step {plan.step_time_s:.3f} s, {plan.tokens_per_s_per_gpu:,.0f} tokens/s per GPU, "
        f"{plan.memory_gib:.1f} of {plan.hbm_gib:.1f} GiB per GPU",
        f"Starts from torchtitan's own {module}.{recipe} recipe (data, optimizer, checkpointing as it ships them);",
        'only the layout below is set. Run: python -m torchtitan.train --module <this module> --config plan"""',
        "from torchtitan.components.quantization import Float8LinearConverter",
        "from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC",
        f"from torchtitan.models.{module} import model_registry",
        f"from torchtitan.models.{module}.config_registry import {recipe}",
        "", "",
        "def plan():",
        f"    config = {recipe}()",
        f"    config.model_spec = model_registry({flavor!r}, converters={conv})",
        f"    config.activation_checkpoint = {ac}",
        f"    config.compile.enable = {compiled}",
        "    config.compile.enable_async_tensor_parallel = False",
    ]
    lines += [f"    config.{k} = {v!r}" for k, v in settings]
    lines += ["    return config", ""]
    return "\n".join(lines)


def torchtitan_emit(plan, model, cluster, out=None, compiled: bool = False) -> tuple:
    """(module text, launch line); the launch line imports the module from --out's folder."""
    text = torchtitan_module(plan, model, cluster, compiled)
    name = os.path.splitext(os.path.basename(out))[0] if out else "dtplanner_plan"
    folder = os.path.dirname(os.path.abspath(out)) if out else "."
    if not name.isidentifier():
        _refuse(f"--out {out}: the module name {name!r} is not a Python identifier (torchtitan imports it)")
    entry = f"-m torchtitan.train --module {name} --config plan"
    launch = launch_line(plan.gpus, cluster, entry)
    head = (f"# torchtitan {TORCHTITAN_RELEASE}: the configuration is the Python module "
            f"{out or name + '.py'}, imported from its folder\nexport PYTHONPATH=\"{folder}${{PYTHONPATH:+:$PYTHONPATH}}\"")
    return text, head + "\n" + launch
