"""Published runs (../shared/reference/published_runs.csv) with their stated layout fixed: every
one that ran is predicted to fit (or to be tight), never refused; where a row reports memory,
the prediction is near what it reports."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

published = pytest.importorskip("published")
if not published.DEFAULT_CSV.exists():
    pytest.skip(f"reference runs not present ({published.DEFAULT_CSV})", allow_module_level=True)

ROWS = published.read_runs()


def _plan(row):
    from planner.engine import search
    from planner.profiles import load_hardware
    ri = published.inputs_of(row)
    res = search(ri.model, load_hardware(ri.hardware), ri.gpus, seq_len=ri.seq_len, global_batch=ri.global_batch,
                 fixed=ri.fixed, top=1, precisions=[ri.fixed["precision"]], stack=published.stack_for(ri))
    return res


@pytest.mark.parametrize("row", ROWS, ids=[r["row_id"] for r in ROWS])
def test_no_published_run_is_refused(row):
    res = _plan(row)
    assert res.best is not None, (f"row {row['row_id']} ({row['model']}, {row['framework']}) refused: "
                                  f"{res.closest_infeasible.overflow() if res.closest_infeasible else res.empty_reason}")
    assert res.best.fit in ("yes", "tight")


MEM_ROWS = [r for r in ROWS if (r.get("mem_gib_per_gpu") or "").strip()]


@pytest.mark.parametrize("row", MEM_ROWS, ids=[r["row_id"] for r in MEM_ROWS])
def test_reported_memory_is_predicted_within_a_fifth(row):
    """Reported figures are the allocator's reserved peak; the prediction includes the fitted
    allocator overhead (benchmarks/memory.py --reference), not the profile's context reserve."""
    plan = _plan(row).best
    b = plan.memory_breakdown_gib
    pred = plan.memory_gib - b["reserved"]
    rep = float(row["mem_gib_per_gpu"])
    assert abs(pred - rep) / rep < 0.20, (row["row_id"], pred, rep)


def test_torchtitan_2024_pipeline_splits_each_rank_batch_into_pp_micro_batches():
    """torchtitan 9dec370's default: as many micro-batches as pipeline ranks (Table 5: local batch
    32 over pp 8 runs micro-batches of 4); other stacks and pipeline-free runs leave it to the search."""
    row = {"global_batch": "256"}
    assert published.default_micro_batch("torchtitan", row, pp=8, dp=8) == 4
    assert published.default_micro_batch("torchtitan", row, pp=1, dp=8) is None
    assert published.default_micro_batch("megatron-core", row, pp=8, dp=8) is None
    assert published.default_micro_batch("torchtitan", {"global_batch": "36"}, pp=8, dp=1) is None   # not divisible
    assert published.default_micro_batch("torchtitan", {"global_batch": "260"}, pp=2, dp=8) is None  # nor by dp
    rows = {r["row_id"]: r for r in ROWS}
    if "64" in rows:
        assert published.inputs_of(rows["64"]).fixed["micro_batch"] == 4


def test_rows_are_read_with_their_recipes_compile_and_gradient_dtype():
    """torchtitan rows under torch.compile where the framework text says so; bf16 gradients where
    the recipe keeps them (Megatron-Bridge's performance recipes; NeMo 24.07's Nemotron-340B)."""
    from planner.stacks import compiled, grad_dtype
    assert published.compiled_of("torchtitan", "torchtitan: FSDP + torch.compile")
    assert not published.compiled_of("torchtitan", "torchtitan: FSDP (eager)")
    assert not published.compiled_of("megatron-core", "NeMo + compile")
    assert published.grad_dtype_of({"framework": "Megatron-Bridge (Megatron-Core) 25.11", "model": "x"}) == "bf16"
    assert published.grad_dtype_of({"framework": "NeMo 24.07 (Megatron-Core, TE)", "model": "Nemotron-340B"}) == "bf16"
    assert published.grad_dtype_of({"framework": "NeMo 24.07 (Megatron-Core, TE)", "model": "GPT3-175B"}) is None
    assert published.grad_dtype_of({"framework": "Megatron-Core r0.8.0", "model": "GPT 1.7B"}) is None
    ri = published.RunInputs("x", None, "h100-sxm", 8, 8192, 16, {}, "torchtitan", None, compiled=True)
    assert compiled(published.stack_for(ri))
    ri = published.RunInputs("x", None, "h100-sxm", 8, 8192, 16, {}, "megatron-core", None, grad_dtype="bf16")
    assert grad_dtype(published.stack_for(ri)) == "bf16"


def test_facts_the_csv_lacks_come_from_the_catalog_entry_of_the_same_shape():
    """Qwen3's head_dim is 128 (config.json), twice hidden / heads: a row of it is read with the
    catalog's; a row whose heads differ from its namesake entry's (MPT-30B: the CSV's 56 x 128 vs
    the config's 64 x 112) keeps hidden / heads rather than mixing the two."""
    row = dict(row_id="x", model="Qwen3 30B-A3B", hidden="2048", heads="32", kv_heads="4", layers="48",
               ffn_hidden="", vocab="151936", mlp="swiglu", moe_experts="128", moe_topk="8",
               moe_ffn_hidden="768", attention="gqa", seq_len="4096", framework="Megatron-Bridge")
    m = published.model_of(row)
    assert m.head_dim == 128 and m.q_dim == 4096 and m.kv_dim == 512
    assert published._family("Qwen3 235B-A22B", "gqa") == "qwen3-235b-a22b"
    assert published._family("GPT-OSS 120B", "gqa") == "gpt-oss-120b"
    assert published._family("Some 7B", "gqa") is None
    mpt = dict(row, model="MPT-30b", hidden="7168", heads="56", kv_heads="56", ffn_hidden="28672", mlp="gelu",
               moe_experts="", moe_topk="", moe_ffn_hidden="", attention="mha")
    assert published._family("MPT-30b", "mha") == "mpt-30b"
    assert published.model_of(mpt).head_dim == 128
