"""planner.export: each emitted file is read back with a real parser (argparse rebuilt from the
Megatron flag list, tomllib, json) and its values must round-trip to the layout."""
import argparse
import json
import shlex
import tomllib

import pytest

from planner import evaluate_layout, load_hardware, load_model
from planner.cli import main
from planner.errors import PlannerError
from planner.export import MEGATRON_FLAGS, emit, node_layout
from planner.layout import Layout

# Transcribed by hand from NVIDIA/Megatron-LM megatron/training/arguments.py (commit 000c4ac24f61,
# group.add_argument(...) calls) and kept apart from planner/export.py, so a typo in one shows.
ARGUMENTS_PY = set("""
--tensor-model-parallel-size --pipeline-model-parallel-size --context-parallel-size --cp-comm-type
--num-layers-per-virtual-pipeline-stage --num-virtual-stages-per-pipeline-rank
--decoder-first-pipeline-num-layers --decoder-last-pipeline-num-layers --use-distributed-optimizer
--num-distributed-optimizer-instances --overlap-grad-reduce --overlap-param-gather
--no-overlap-p2p-communication --use-megatron-fsdp --data-parallel-sharding-strategy --ckpt-format
--expert-model-parallel-size --expert-tensor-parallel-size --num-experts --moe-router-topk
--moe-ffn-hidden-size --moe-shared-expert-intermediate-size --moe-layer-freq --moe-token-dispatcher-type
--moe-grouped-gemm --multi-latent-attention --q-lora-rank --kv-lora-rank --qk-head-dim --qk-pos-emb-head-dim
--v-head-dim --micro-batch-size --global-batch-size --sequence-parallel --recompute-granularity
--recompute-method --recompute-num-layers --tp-comm-overlap --no-gradient-accumulation-fusion
--disable-bias-linear --train-iters --log-interval --num-layers --hidden-size --ffn-hidden-size
--num-attention-heads --kv-channels --group-query-attention --num-query-groups --max-position-embeddings
--position-embedding-type --normalization --swiglu --squared-relu --quick-geglu
--untie-embeddings-and-output-weights --attention-dropout --hidden-dropout --weight-decay --clip-grad --lr
--min-lr --lr-decay-style --lr-warmup-iters --seq-length --mock-data --tokenizer-type --vocab-size
--log-throughput --eval-iters --eval-interval --bf16 --fp16 --fp8-format
""".split())
# choices= of the flags that have them in arguments.py
CHOICES = {"--recompute-granularity": ["full", "selective"], "--recompute-method": ["uniform", "block"],
           "--data-parallel-sharding-strategy": ["no_shard", "optim", "optim_grads", "optim_grads_params"],
           "--ckpt-format": ["torch", "torch_dist", "zarr", "torch_dcp", "fsdp_dtensor"],
           "--fp8-format": ["e4m3", "hybrid"], "--normalization": ["LayerNorm", "RMSNorm"],
           "--position-embedding-type": ["learned_absolute", "rope", "mrope", "relative", "none"],
           "--moe-token-dispatcher-type": ["allgather", "alltoall", "flex"],
           "--lr-decay-style": ["constant", "linear", "cosine", "inverse-square-root", "WSD"]}
# torchtitan JobConfig fields (torchtitan/config/job_config.py), per section
TITAN_KEYS = {
    "job": {"dump_folder", "description"},
    "model": {"name", "flavor", "converters"},
    "training": {"local_batch_size", "global_batch_size", "seq_len", "steps", "mixed_precision_param", "compile"},
    "parallelism": {"data_parallel_replicate_degree", "data_parallel_shard_degree", "fsdp_reshard_after_forward",
                    "tensor_parallel_degree", "enable_async_tensor_parallel", "pipeline_parallel_degree",
                    "pipeline_parallel_schedule", "pipeline_parallel_microbatch_size",
                    "pipeline_parallel_layers_per_stage", "context_parallel_degree",
                    "context_parallel_rotate_method", "expert_parallel_degree", "expert_tensor_parallel_degree"},
    "activation_checkpoint": {"mode", "selective_ac_option"},
    "float8": {"enable_fsdp_float8_all_gather", "precompute_float8_dynamic_scale_for_fsdp"},
}
TORCH_SCHEDULES = {"1F1B", "Interleaved1F1B", "GPipe", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble",
                   "DualPipeV"}
DS_TOP = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
          "steps_per_print", "wall_clock_breakdown", "bf16", "fp16", "zero_optimization",
          "activation_checkpointing", "pipeline", "tensor_parallel"}
DS_ZERO = {"stage", "overlap_comm", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size",
           "allgather_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
           "mics_shard_size"}

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
    if a.num_layers_per_virtual_pipeline_stage:
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


@pytest.mark.parametrize("case", list(CASES))
def test_torchtitan_round_trip(case):
    m, plan, cluster = _plan(case)
    L = plan.layout
    text, launch = emit(plan, m, "torchtitan", cluster=cluster)
    d = tomllib.loads(text)
    for sec, kv in d.items():
        assert sec in TITAN_KEYS and set(kv) <= TITAN_KEYS[sec], (sec, set(kv) - TITAN_KEYS.get(sec, set()))
    p, t = d["parallelism"], d["training"]
    assert p["tensor_parallel_degree"] == L.tp and p["pipeline_parallel_degree"] == L.pp
    assert p["context_parallel_degree"] == L.cp
    assert p["data_parallel_replicate_degree"] * p["data_parallel_shard_degree"] == L.dp
    assert L.tp * L.pp * L.cp * p["data_parallel_replicate_degree"] * p["data_parallel_shard_degree"] == plan.gpus
    if L.zero == 0:
        assert p["data_parallel_shard_degree"] == 1
    if L.shard_group and L.zero:
        assert p["data_parallel_shard_degree"] == L.shard_group
    assert d["activation_checkpoint"]["mode"] == L.recompute
    assert t["seq_len"] == L.seq_len and t["global_batch_size"] == L.global_batch
    # global = local x dp x accumulation; with PP, local splits into micro-batches of the PP size
    assert t["global_batch_size"] % (t["local_batch_size"] * L.dp) == 0
    if L.pp > 1:
        assert p["pipeline_parallel_schedule"] in TORCH_SCHEDULES
        assert t["local_batch_size"] // p["pipeline_parallel_microbatch_size"] == L.global_batch // (L.dp * L.micro_batch)
        if "pipeline_parallel_layers_per_stage" in p:
            assert p["pipeline_parallel_layers_per_stage"] * L.pp * L.vpp == m.layers
    else:
        assert t["local_batch_size"] == L.micro_batch
    if m.moe:
        assert p["expert_parallel_degree"] == L.ep
    assert ("float8" in d.get("model", {}).get("converters", [])) == (L.precision == "fp8")
    assert "-m torchtitan.train --job.config_file" in launch


@pytest.mark.parametrize("case", list(CASES))
def test_deepspeed_round_trip(case):
    m, plan, cluster = _plan(case)
    L = plan.layout
    text, launch = emit(plan, m, "deepspeed", cluster=cluster)
    d = json.loads(text)
    assert set(d) <= DS_TOP and set(d["zero_optimization"]) <= DS_ZERO
    assert d["train_batch_size"] == d["train_micro_batch_size_per_gpu"] * d["gradient_accumulation_steps"] * L.dp
    assert d["train_batch_size"] == L.global_batch and d["train_micro_batch_size_per_gpu"] == L.micro_batch
    assert d["zero_optimization"]["stage"] == L.zero
    assert ("fp16" in d) == (L.precision == "fp16") and ("bf16" in d) == (L.precision != "fp16")
    assert (d.get("pipeline", {}).get("stages", 1)) == L.pp
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
    out = tmp_path / "plan.toml"
    assert main(["--model", "llama-3-8b", "--gpus", "16", "--emit", "torchtitan", "--out", str(out)]) == 0
    d = tomllib.loads(out.read_text())
    assert d["parallelism"]["tensor_parallel_degree"] >= 1
    assert "torchrun" in capsys.readouterr().out
