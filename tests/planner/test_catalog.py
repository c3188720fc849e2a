"""The model catalog and the native model-file loader (planner/model_io.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner import model_io
from planner.errors import PlannerError
from planner.model_io import (catalog_table, list_models, load_model, model_from_dict,
                              model_to_dict)

NATIVE = Path(__file__).resolve().parents[1] / "data" / "native"

REQUIRED = [
    "gpt-1.7b", "gpt-3.6b", "gpt-7.5b", "gpt-18b", "gpt-39b", "gpt-76b", "gpt-145b", "gpt-310b",
    "gpt-530b", "gpt-1t", "gpt-20b", "gpt-175b", "llama-3-8b", "llama-3-70b", "llama-3.1-405b",
    "mixtral-8x7b", "mixtral-8x22b", "qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v3",
    "gpt-oss-120b", "nemotron-4-340b", "llama-2-7b", "llama-2-13b", "llama-2-70b", "mpt-7b",
    "mpt-30b", "mpt-70b",
]


# ---- the catalog --------------------------------------------------------------------------
def test_catalog_has_required_models_sorted():
    names = list_models()
    assert names == sorted(names)
    assert set(REQUIRED) <= set(names)


@pytest.mark.parametrize("name", list_models())
def test_every_catalog_model_loads(name):
    m = load_model(name)
    assert m.name == name
    assert m.source, "every catalog entry cites where its shape comes from"
    assert m.seq_len is not None
    assert m.total_params() >= m.active_params() > 0
    # the native dict round-trips
    assert model_from_dict(model_to_dict(m), "round trip") == m


def test_catalog_names_are_case_insensitive():
    assert load_model("Llama-3-8B") == load_model("llama-3-8b")
    assert load_model("  DeepSeek-V3 ") == load_model("deepseek-v3")


# Published sizes, in billions: (name, total, active or None, relative tolerance, where from).
# active counts include the input embedding unless noted.
PUBLISHED = [
    ("llama-2-7b", 6.74, None, 0.002, "Llama 2 HF model card 6.74B (6,738,415,616)"),
    ("llama-2-13b", 13.02, None, 0.002, "HF 13,015,864,320"),
    ("llama-2-70b", 68.98, None, 0.002, "HF 68,976,648,192"),
    ("llama-3-8b", 8.03, None, 0.002, "HF 8,030,261,248"),
    ("llama-3-70b", 70.55, None, 0.002, "HF 70,553,706,496"),
    ("llama-3.1-405b", 405.85, None, 0.002, "HF 405,853,388,800"),
    ("mixtral-8x7b", 46.7, 12.9, 0.005, "Mixtral paper: 47B total / 13B active; HF 46.7B"),
    ("mixtral-8x22b", 141.0, 39.0, 0.01, "Mistral: 141B total, 39B active"),
    ("qwen3-30b-a3b", 30.5, 3.3, 0.02, "Qwen3 report Table 2: 30B/3B; HF 30.5B, 3.3B activated"),
    ("qwen3-235b-a22b", 235.0, 22.0, 0.01, "Qwen3 report: 235B total, 22B activated"),
    ("deepseek-v3", 671.0, 37.0, 0.02, "DeepSeek-V3 report: 671B total, 37B activated (no MTP)"),
    ("gpt-oss-120b", 116.83, 5.71, 0.002,
     "gpt-oss model card Table 1: 116.83B total, 5.13B active without the 0.58B input embedding"),
    ("nemotron-4-340b", 341.0, None, 0.005, "Nemotron-4 340B report: 9.4B embedding + 331.6B"),
    ("gpt-175b", 175.0, None, 0.005, "GPT-3 175B (Brown et al. 2020)"),
    ("gpt-20b", 20.0, None, 0.015, "NeMo GPT-3 20B (nominal size; 20.2B counted)"),
    ("mpt-7b", 6.7, None, 0.01, "MPT-7B model card 6.7B (HF 6,649,286,656)"),
    ("mpt-30b", 29.95, None, 0.005, "MPT-30B: 29.95B (HF)"),
    ("mpt-70b", 64.86, None, 0.005, "llm-foundry benchmark table: MPT-70B 64.86B"),
]


# Exact counts Hugging Face reports for the checkpoints (no parameters ModelSpec leaves out).
EXACT = [("llama-2-7b", 6_738_415_616), ("llama-2-13b", 13_015_864_320),
         ("llama-2-70b", 68_976_648_192), ("llama-3-8b", 8_030_261_248),
         ("llama-3-70b", 70_553_706_496), ("llama-3.1-405b", 405_853_388_800),
         ("mixtral-8x7b", 46_702_792_704), ("mpt-7b", 6_649_286_656)]


@pytest.mark.parametrize("name,count", EXACT)
def test_exact_checkpoint_parameter_counts(name, count):
    assert load_model(name).total_params() == count


@pytest.mark.parametrize("name,total,active,tol,where", PUBLISHED)
def test_published_parameter_counts(name, total, active, tol, where):
    m = load_model(name)
    assert m.total_params() / 1e9 == pytest.approx(total, rel=tol), where
    if active is not None:
        assert m.active_params() / 1e9 == pytest.approx(active, rel=max(tol, 0.02)), where
    else:
        assert m.active_params() == m.total_params()


def test_gpt_oss_active_excluding_embedding_matches_model_card():
    # the model card's 5.13B "active" counts the unembedding but not the input embedding
    m = load_model("gpt-oss-120b")
    assert (m.active_params() - m.embedding_params()) / 1e9 == pytest.approx(5.13, rel=0.003)


# Narayanan et al. 2021, Table 1: (name, printed size in B). The paper counts
# P = 12*l*h^2 * (1 + 13/(12h) + (V+s)/(12*l*h)): learned position embeddings (s*h) included,
# the final LayerNorm not. ModelSpec counts the final LayerNorm (2h) but no position table.
NARAYANAN = [("gpt-1.7b", 1.7), ("gpt-3.6b", 3.6), ("gpt-7.5b", 7.5), ("gpt-18b", 18.4),
             ("gpt-39b", 39.1), ("gpt-76b", 76.1), ("gpt-145b", 145.6), ("gpt-310b", 310.1),
             ("gpt-530b", 529.6), ("gpt-1t", 1008.0)]


@pytest.mark.parametrize("name,printed", NARAYANAN)
def test_narayanan_table1_parameter_counts(name, printed):
    m = load_model(name)
    l, h, v, s = m.layers, m.hidden, m.vocab, m.seq_len
    assert (v, s, m.ffn_hidden, m.mlp) == (51200, 2048, 4 * h, "gelu")
    assert m.tied_embeddings and m.bias and m.dropout
    paper = 12 * l * h * h * (1 + 13 / (12 * h) + (v + s) / (12 * l * h))
    ours_with_positions = m.total_params() + s * h
    assert ours_with_positions - 2 * h == pytest.approx(paper, rel=1e-9)
    # the table prints one decimal: agree to within that rounding
    assert abs(ours_with_positions / 1e9 - printed) <= 0.05 + 1e-3 * printed
    # without the position table the counts are still within 0.3% of the paper's
    assert m.total_params() == pytest.approx(paper, rel=3e-3)


def test_moe_and_mla_shapes():
    ds = load_model("deepseek-v3")
    assert ds.moe.experts == 256 and ds.moe.top_k == 8 and ds.moe.shared_experts == 1
    assert ds.moe.dense_layers == 3 and ds.moe_layers == 58
    assert ds.moe.expert_ffn_hidden == 2048 and ds.ffn_hidden == 18432
    assert ds.mla.q_lora_rank == 1536 and ds.mla.kv_lora_rank == 512
    oss = load_model("gpt-oss-120b")
    assert (oss.head_dim, oss.q_dim, oss.kv_heads) == (64, 4096, 8)
    assert (oss.sliding_window, oss.sliding_window_layers) == (128, 18)
    assert load_model("llama-3-8b").sliding_window is None


def test_catalog_table():
    pytest.importorskip("pandas")
    df = catalog_table()
    assert list(df.columns) == ["name", "layers", "hidden", "heads", "kv_heads", "ffn_hidden",
                                "vocab", "mlp", "experts", "top_k", "total_params_B",
                                "active_params_B"]
    assert list(df["name"]) == list_models()
    row = df.set_index("name").loc["mixtral-8x7b"]
    assert row["experts"] == 8 and row["top_k"] == 2
    assert row["total_params_B"] == pytest.approx(46.7, rel=0.005)
    assert df.set_index("name")["experts"].isna()["llama-3-8b"]


def test_catalog_is_read_lazily(monkeypatch):
    reads = []
    real = model_io._read_toml
    monkeypatch.setattr(model_io, "_read_toml", lambda p, o: reads.append(p.name) or real(p, o))
    list_models()
    assert reads == []
    load_model("llama-3-8b")
    assert reads == ["llama-3-8b.toml"]


# ---- model files and their errors ----------------------------------------------------------
def test_native_toml_file_with_every_optional_key():
    m = load_model(str(NATIVE / "tiny-moe.toml"))
    assert m.name == "tiny-moe" and m.head_dim == 64 and m.q_dim == 1024
    assert m.moe.shared_expert_ffn_hidden == 1024 and m.moe.dense_layers == 1
    assert (m.sliding_window, m.sliding_window_layers) == (1024, 4)


def test_native_json_file():
    m = load_model(NATIVE / "tiny-mla.json")  # a Path works too
    assert m.mla.q_lora_rank == 0 and m.mla.v_head_dim == 32
    assert m.moe.experts == 4 and not m.tied_embeddings


def test_json_and_toml_describe_the_same_model(tmp_path):
    m = load_model("deepseek-v3")
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(model_to_dict(m)))
    assert load_model(str(p)) == m


def _err(spec: str) -> str:
    with pytest.raises(PlannerError) as e:
        load_model(spec)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_model_name():
    msg = _err("foo")
    assert msg.startswith("unknown model 'foo'; give a catalog name (")
    assert "gpt-1.7b" in msg and "a path to a .json/.toml model file" in msg


def test_unknown_model_name_suggests_close_match():
    assert "did you mean 'llama-3-8b'?" in _err("llama3-8b")


def test_missing_file():
    msg = _err("no/such/model.toml")
    assert "no/such/model.toml" in msg and "no such file" in msg


def test_unsupported_extension(tmp_path):
    p = tmp_path / "model.yaml"
    p.write_text("layers: 2\n")
    assert "must end in .json or .toml" in _err(str(p))


def test_directory_is_not_a_model_file(tmp_path):
    d = tmp_path / "m.toml"
    d.mkdir()
    assert "not a regular file" in _err(str(d))


def test_broken_toml():
    msg = _err(str(NATIVE / "broken.toml"))
    assert "broken.toml" in msg and "invalid TOML" in msg


def test_broken_json():
    msg = _err(str(NATIVE / "broken.json"))
    assert "broken.json" in msg and "invalid JSON" in msg and "line" in msg


def test_json_must_be_an_object(tmp_path):
    p = tmp_path / "list.json"
    p.write_text("[1, 2]")
    assert "expected a JSON object" in _err(str(p))


def test_unknown_key_names_file_key_and_valid_keys():
    msg = _err(str(NATIVE / "typo-key.toml"))
    assert "typo-key.toml: unknown key 'hiden' (did you mean 'hidden'?)" in msg
    assert "valid keys are: name, layers, hidden" in msg


def test_missing_required_key():
    msg = _err(str(NATIVE / "missing-key.toml"))
    assert "missing-key.toml: missing required key 'vocab'" in msg


def test_wrong_type():
    msg = _err(str(NATIVE / "wrong-type.toml"))
    assert "wrong-type.toml: 'layers' must be an integer, got '2'" in msg


def test_bad_mlp_lists_valid_kinds():
    msg = _err(str(NATIVE / "bad-mlp.toml"))
    assert "bad-mlp.toml: 'mlp' must be one of gelu, relu2, swiglu, geglu, got 'silu'" in msg


def test_unknown_moe_key():
    msg = _err(str(NATIVE / "bad-moe-key.toml"))
    assert msg.count("bad-moe-key.toml") == 1
    assert "unknown key 'moe.topk' (did you mean 'moe.top_k'?)" in msg
    assert "valid keys in [moe] are: experts, top_k" in msg


def test_shape_inconsistency_names_the_file():
    msg = _err(str(NATIVE / "bad-gqa.toml"))
    assert msg.startswith("model file ") and "bad-gqa.toml" in msg
    assert "must be a multiple of kv_heads" in msg


def test_model_from_dict_checks():
    base = {"name": "x", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 4,
            "ffn_hidden": 256, "vocab": 100, "mlp": "gelu"}
    assert model_from_dict(base, "t").layers == 2
    assert model_from_dict({**base, "layers": 2.0}, "t").layers == 2
    for bad, needle in [({"layers": True}, "'layers' must be an integer"),
                        ({"bias": 1}, "'bias' must be true or false"),
                        ({"moe": 3}, "'moe' must be a table"),
                        ({"moe": {"experts": 4, "top_k": 8, "expert_ffn_hidden": 8}},
                         "top_k (8) must be <= experts (4)"),
                        ({"mla": {"kv_lora_rank": 8}}, "missing required keys 'mla.qk_nope"),
                        ({"sliding_window_layers": 1}, "needs sliding_window"),
                        ({"sliding_window": 16, "sliding_window_layers": 3}, "exceeds layers")]:
        with pytest.raises(PlannerError, match="^t: ") as e:
            model_from_dict({**base, **bad}, "t")
        assert needle in str(e.value)
    with pytest.raises(PlannerError, match="expected a table"):
        model_from_dict([1], "t")


def test_a_model_built_in_code_is_bounds_checked_too():
    """The constructor refuses what the float64 cost model cannot hold, not only the loaders."""
    from planner.errors import PlannerError
    from planner.model_spec import ModelSpec
    with pytest.raises(PlannerError, match=r"model 'huge': 'hidden' must be at most 2\^53"):
        ModelSpec(name="huge", layers=2, hidden=2 ** 60, heads=2, kv_heads=2, ffn_hidden=8, vocab=8)
    with pytest.raises(PlannerError, match="parameters; the planner handles at most"):
        ModelSpec(name="wide", layers=2 ** 40, hidden=2 ** 14, heads=2, kv_heads=2, ffn_hidden=8, vocab=8)
