"""planner.export: each emitted file is read back with a real parser (argparse rebuilt from the
Megatron flag list, Python's ast, json) and its values must round-trip to the layout; what a
target cannot express is refused in one line. tests/frameworks/ holds them to the frameworks' code."""
import argparse
import json
import shlex
import ast
from pathlib import Path

import pytest

from planner import evaluate_layout, load_hardware, load_model
from planner.cli import main
from planner.errors import PlannerError
from planner.export import MEGATRON_FLAGS, deepspeed_dp, emit, node_layout
from planner.layout import Layout

# Megatron-LM's parser at the exporter's target commit, recorded (tests/frameworks/)
RECORDED = Path(__file__).resolve().parents[1] / "frameworks" / "megatron_args_d98e8a64.tsv"
ARGUMENTS_PY = {o for line in RECORDED.read_text().splitlines() if not line.startswith("#")
                for o in line.split("\t")[0].split()}
# choices= of the flags that have them in arguments.py
CHOICES = {"--recompute-granularity": ["full", "selective"], "--recompute-method": ["uniform", "block"],
           "--data-parallel-sharding-strategy": ["no_shard", "optim", "optim_grads", "optim_grads_params"],
           "--ckpt-format": ["torch", "torch_dist", "zarr", "torch_dcp", "fsdp_dtensor"],
           "--fp8-format": ["e4m3", "hybrid"], "--normalization": ["LayerNorm", "RMSNorm"],
           "--position-embedding-type": ["learned_absolute", "rope", "mrope", "relative", "none"],
           "--moe-token-dispatcher-type": ["allgather", "alltoall", "flex"],
           "--lr-decay-style": ["constant", "linear", "cosine", "inverse-square-root", "WSD"]}
TORCH_SCHEDULES = {"1F1B", "Interleaved1F1B", "GPipe", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble",
                   "DualPipeV"}
DS_TOP = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
          "steps_per_print", "wall_clock_breakdown", "bf16", "fp16", "zero_optimization",
          "activation_checkpointing", "pipeline", "tensor_parallel", "sequence_parallel_size"}
DS_ZERO = {"stage", "overlap_comm", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size",
           "allgather_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
           "stage3_max_live_parameters"}

H100 = load_hardware("h100-sxm")
NVL72 = load_hardware("gb200-nvl72")

CASES = {
    # name: (model, layout, cluster)
    "dense-interleaved-fp8": ("llama-3-70b", Layout(tp=4, pp=4, dp=4, cp=2, sp=True, vpp=5, schedule="interleaved",
                                                    micro_batch=1, global_batch=256, seq_len=8192, zero=1,
                                                    precision="fp8"), H100),
    "uneven-vpp-full-rc": ("gpt-20b", Layout(tp=2, pp=3, dp=4, vpp=2, schedule="interleaved", first_stage_layers=16,
                                             last_stage_layers=14, micro_batch=2, global_batch=96, seq_len=2048,
                                             recompute="full", zero=1), H100),
    "fsdp-zero3-selective": ("llama-3-8b", Layout(dp=16, micro_batch=2, global_batch=128, seq_len=8192, zero=3,
                                                  recompute="selective"), H100),
    "ddp-fp16": ("gpt-1.7b", Layout(dp=8, micro_batch=4, global_batch=64, seq_len=2048, zero=0, precision="fp16"),
                 H100),
    "zero2-hsdp": ("llama-3-8b", Layout(tp=2, dp=8, sp=True, micro_batch=1, global_batch=64, seq_len=8192, zero=2,
                                        shard_group=4), H100),
    "fsdp-pp-interleaved": ("llama-3-70b", Layout(tp=4, pp=4, dp=4, vpp=2, schedule="interleaved", sp=True,
                                                  micro_batch=1, global_batch=256, seq_len=8192, zero=3,
                                                  recompute="full"), H100),
    "moe-mla-nvl72": ("deepseek-v3", Layout(tp=2, pp=8, dp=36, ep=8, sp=True, micro_batch=1, global_batch=576,
                                            seq_len=4096, recompute="selective", zero=1, precision="fp8",
                                            first_stage_layers=7, last_stage_layers=6), NVL72),
}


def _plan(name):
    mname, L, cluster = CASES[name]
    m = load_model(mname)
    return m, evaluate_layout(m, cluster, L), cluster


def megatron_parser():
    p = argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False)
    for flag, kind in MEGATRON_FLAGS.items():
        kw = {"choices": CHOICES[flag]} if flag in CHOICES else {}
        if kind == "flag":
            p.add_argument(flag, action="store_true")
        elif kind == "list":
            p.add_argument(flag, nargs="+")
        else:
            p.add_argument(flag, type={"int": int, "float": float, "str": str}[kind], **kw)
    return p


def megatron_argv(text):
    lines = text.splitlines()
    start = lines.index("MEGATRON_ARGS=(")
    end = lines.index(")", start)
    return shlex.split("\n".join(lines[start + 1:end]), comments=True)


def test_flag_list_matches_the_transcription_of_arguments_py():
    assert set(MEGATRON_FLAGS) <= ARGUMENTS_PY, set(MEGATRON_FLAGS) - ARGUMENTS_PY


@pytest.mark.parametrize("case", list(CASES))
def test_megatron_round_trip(case):
    m, plan, cluster = _plan(case)
    L = plan.layout
    text, launch = emit(plan, m, "megatron", cluster=cluster)
    a = megatron_parser().parse_args(megatron_argv(text))   # unknown flag or bad choice -> error
    assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.context_parallel_size) == (L.tp, L.pp, L.cp)
    assert a.micro_batch_size == L.micro_batch and a.global_batch_size == L.global_batch
    assert a.seq_length == L.seq_len and a.max_position_embeddings >= L.seq_len
    assert (a.num_layers, a.hidden_size, a.num_attention_heads, a.ffn_hidden_size) == (
        m.layers, m.hidden, m.heads, m.ffn_hidden)
    # data parallel size is what Megatron derives: world / (tp * pp * cp)
    assert plan.gpus // (a.tensor_model_parallel_size * a.pipeline_model_parallel_size * a.context_parallel_size) == L.dp
    assert a.sequence_parallel == (L.sp and L.tp > 1)
    vpp = 1
    if a.pipeline_model_parallel_layout:
        stages = a.pipeline_model_parallel_layout.split("|")
        vpp = len(stages) // L.pp
        assert "".join(stages).count("t") == m.layers and not a.decoder_first_pipeline_num_layers
    elif a.num_layers_per_virtual_pipeline_stage:
        vpp = m.layers // (L.pp * a.num_layers_per_virtual_pipeline_stage)
        assert not (a.decoder_first_pipeline_num_layers or a.decoder_last_pipeline_num_layers)
    elif a.num_virtual_stages_per_pipeline_rank:
        vpp = a.num_virtual_stages_per_pipeline_rank
    assert vpp == L.vpp
    if a.decoder_first_pipeline_num_layers:
        assert a.decoder_first_pipeline_num_layers == L.first_stage_layers
        assert a.decoder_last_pipeline_num_layers == L.last_stage_layers
        middle = m.layers - L.first_stage_layers - L.last_stage_layers
        assert L.pp == 2 and middle == 0 or middle % (L.pp - 2) == 0
    rec = {"none": None, "selective": "selective", "full": "full"}[L.recompute]
    assert a.recompute_granularity == rec
    assert a.use_distributed_optimizer == (L.zero >= 1)
    assert a.use_megatron_fsdp == (L.zero >= 2)
    if L.zero >= 2:
        assert a.data_parallel_sharding_strategy == {2: "optim_grads", 3: "optim_grads_params"}[L.zero]
        assert a.ckpt_format == "fsdp_dtensor"
    assert a.bf16 == (L.precision != "fp16") and a.fp16 == (L.precision == "fp16")
    assert a.fp8_format == ("hybrid" if L.precision == "fp8" else None)
    if m.moe:
        assert a.num_experts == m.moe.experts and a.moe_router_topk == m.moe.top_k
        assert a.expert_model_parallel_size == L.ep and a.expert_tensor_parallel_size == L.etp
        assert eval(a.moe_layer_freq).count(0) == m.moe.dense_layers   # Megatron evaluates this pattern
    if m.mla:
        assert a.multi_latent_attention and a.kv_lora_rank == m.mla.kv_lora_rank
    elif m.kv_heads != m.heads:
        assert a.group_query_attention and a.num_query_groups == m.kv_heads
    assert "pretrain_gpt.py" in launch and "torchrun" in launch


# torchtitan 0.3 cannot express these: ZeRO-1/2, fp16, models it ships no recipe for
TT_REFUSED = {"dense-interleaved-fp8": "ZeRO-1", "uneven-vpp-full-rc": "no recipe", "ddp-fp16": "no recipe",
              "zero2-hsdp": "ZeRO-2", "moe-mla-nvl72": "ZeRO-1"}


def _settings(text):
    """{'parallelism.x': value} of the `config.<a>.<b> = literal` lines of an emitted module."""
    out = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]).startswith("config."):
            try:
                out[ast.unparse(node.targets[0])[len("config."):]] = ast.literal_eval(node.value)
            except ValueError:
                out[ast.unparse(node.targets[0])[len("config."):]] = ast.unparse(node.value)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_torchtitan_round_trip(case):
    m, plan, cluster = _plan(case)
    L = plan.layout
    if case in TT_REFUSED:
        with pytest.raises(PlannerError, match=TT_REFUSED[case]):
            emit(plan, m, "torchtitan", cluster=cluster)
        return
    text, launch = emit(plan, m, "torchtitan", cluster=cluster)
    d = _settings(text)
    assert d["parallelism.tensor_parallel_degree"] == L.tp and d["parallelism.pipeline_parallel_degree"] == L.pp
    assert d["parallelism.context_parallel_degree"] == L.cp
    rep, shard = d["parallelism.data_parallel_replicate_degree"], d["parallelism.data_parallel_shard_degree"]
    assert L.tp * L.pp * L.cp * rep * shard == plan.gpus
    assert d["activation_checkpoint"] == {"none": "None", "selective": "SelectiveAC.Config()",
                                          "full": "FullAC.Config()"}[L.recompute]
    assert d["training.seq_len"] == L.seq_len and d["training.global_batch_size"] == L.global_batch
    assert d["training.global_batch_size"] % (d["training.local_batch_size"] * L.dp) == 0
    assert ("Float8LinearConverter" in d["model_spec"]) == (L.precision == "fp8")
    assert "--module dtplanner_plan --config plan" in launch


@pytest.mark.parametrize("case", list(CASES))
def test_deepspeed_round_trip(case):
    m, plan, cluster = _plan(case)
    L = plan.layout
    text, launch = emit(plan, m, "deepspeed", cluster=cluster)
    d = json.loads(text)
    assert set(d) <= DS_TOP and set(d["zero_optimization"]) <= DS_ZERO
    assert d["train_micro_batch_size_per_gpu"] * d["gradient_accumulation_steps"] * L.dp == L.global_batch
    assert d["train_micro_batch_size_per_gpu"] == L.micro_batch
    # given only where DeepSpeed checks it against the layout's dp (AutoTP counts every rank)
    assert ("train_batch_size" in d) == (deepspeed_dp(L) == L.dp)
    assert d.get("train_batch_size", L.global_batch) == L.global_batch
    assert d["zero_optimization"]["stage"] == L.zero
    assert ("fp16" in d) == (L.precision == "fp16") and ("bf16" in d) == (L.precision != "fp16")
    assert ("pipeline" in d) == (L.pp > 1) and d.get("sequence_parallel_size", 1) == L.cp
    assert d.get("tensor_parallel", {}).get("autotp_size", 1) == L.tp
    assert ("activation_checkpointing" in d) == (L.recompute != "none")
    assert "--deepspeed_config" in launch


def _torchrun_args(launch):
    line = next(x for x in launch.splitlines() if x.startswith("torchrun"))
    p = argparse.ArgumentParser()
    p.add_argument("--nnodes", type=int)
    p.add_argument("--nproc-per-node", type=int)
    p.add_argument("--standalone", action="store_true")
    for f in ("--rdzv-id", "--rdzv-backend", "--rdzv-endpoint"):
        p.add_argument(f)
    a, rest = p.parse_known_args(shlex.split(line)[1:])
    return a, rest


def test_launch_line_node_counts():
    m = load_model("gpt-20b")
    plan = evaluate_layout(m, H100, Layout(dp=64, micro_batch=1, global_batch=128, seq_len=2048, zero=3))
    a, rest = _torchrun_args(emit(plan, m, "megatron", cluster=H100)[1])
    assert a.nnodes * a.nproc_per_node == 64 and a.nproc_per_node == H100.domain_sizes[0]
    assert a.rdzv_backend == "c10d" and rest[0] == "pretrain_gpt.py"
    small = evaluate_layout(m, H100, Layout(dp=4, micro_batch=1, global_batch=16, seq_len=2048, zero=3))
    a, _ = _torchrun_args(emit(small, m, "megatron", cluster=H100)[1])
    assert a.standalone and a.nnodes == 1 and a.nproc_per_node == 4
    # NVL72: 72-GPU NVLink domain split into 4-GPU trays, said in the output
    nodes, gpn, note = node_layout(576, NVL72)
    assert (nodes, gpn) == (144, 4) and "tray" in note
    assert node_layout(64, None)[1] == 8
    with pytest.raises(PlannerError):
        node_layout(12, H100)


def test_emit_rejects_unknown_format():
    m, plan, cluster = _plan("ddp-fp16")
    with pytest.raises(PlannerError):
        emit(plan, m, "jax", cluster)


def test_cli_emit_writes_file(tmp_path, capsys):
    out = tmp_path / "my_plan.py"
    assert main(["--model", "llama-3-8b", "--gpus", "16", "--stack", "torchtitan", "--emit", "torchtitan",
                 "--out", str(out)]) == 0
    d = _settings(out.read_text())
    assert d["parallelism.tensor_parallel_degree"] >= 1
    printed = capsys.readouterr().out
    assert "torchrun" in printed and "--module my_plan --config plan" in printed and str(tmp_path) in printed
    # --out is what every launch line reads
    ds = tmp_path / "cfg dir" / "ds.json"
    ds.parent.mkdir()
    assert main(["--model", "gpt-1.7b", "--gpus", "8", "--stack", "deepspeed", "--emit", "deepspeed",
                 "--out", str(ds)]) == 0
    assert shlex.quote(str(ds)) in capsys.readouterr().out


@pytest.mark.parametrize("extra, overlapped", [
    (dict(), True),
    (dict(recompute="full"), False),                           # Megatron: not with full recompute
    (dict(pp=2, dp=2, ep=2), False),                           # pp > 1 without virtual stages
    (dict(pp=2, dp=2, ep=2, vpp=2, schedule="interleaved"), True),
    (dict(overlap_ep=False), False),
])
def test_the_ep_overlap_the_plan_times_is_the_one_megatron_is_told(extra, overlapped):
    """--overlap-moe-expert-parallel-comm is emitted exactly where the cost model hid the EP
    all-to-all: Megatron-Core accepts it only with virtual stages when pp > 1 and never with full
    recompute (TransformerConfig), and without it the all-to-all is exposed in the prediction too."""
    m = load_model("mixtral-8x7b")
    base = dict(tp=1, pp=1, dp=4, ep=4, micro_batch=1, global_batch=32, seq_len=4096, recompute="selective", zero=1)
    L = Layout(**{**base, **extra})
    plan = evaluate_layout(m, H100, L)
    text, _ = emit(plan, m, "megatron", cluster=H100)
    a = megatron_parser().parse_args(megatron_argv(text))
    assert a.overlap_moe_expert_parallel_comm == overlapped
    no = evaluate_layout(m, H100, Layout(**{**base, **extra, "overlap_ep": False}))
    hidden = no.time_breakdown_s["ep_comm"] - plan.time_breakdown_s["ep_comm"]
    assert (hidden > 0) == overlapped and hidden >= 0
