"""Hugging Face config.json files -> ModelSpec (planner/hf_config.py)."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from planner.errors import PlannerError
from planner.hf_config import SUPPORTED_MODEL_TYPES, from_hf_config
from planner.model_io import list_models, load_model

HF = Path(__file__).resolve().parents[1] / "data" / "hf"
FILES = sorted(HF.glob("*.json"))


def _cfg(stem: str) -> dict:
    return json.loads((HF / f"{stem}.json").read_text())


def test_one_real_config_per_supported_model_type():
    types = {json.loads(p.read_text())["model_type"] for p in FILES}
    assert types == set(SUPPORTED_MODEL_TYPES)


def _shape(m):
    # what the config determines; name, provenance, training recipe and context length differ
    return dataclasses.replace(m, name="-", source="", dropout=False, seq_len=None)


@pytest.mark.parametrize("path", [p for p in FILES if p.stem in list_models()],
                         ids=lambda p: p.stem)
def test_hf_config_matches_catalog_entry(path):
    hf = load_model(str(path))
    assert hf.name == path.stem
    assert "Hugging Face config.json" in hf.source
    assert _shape(hf) == _shape(load_model(path.stem))


# Exact published counts of models without a catalog entry, and what ModelSpec leaves out.
EXACT = [
    # GPT-2 small: 124,439,808 with its 1024 x 768 learned position table
    ("gpt2", 124_439_808, 1024 * 768),
    # Mistral-7B-v0.1: 7,241,732,096
    ("mistral-7b", 7_241_732_096, 0),
    # Qwen2-7B: 7,615,616,512 including q/k/v biases (28 layers x (3584 + 2*512))
    ("qwen2-7b", 7_615_616_512, 28 * (3584 + 2 * 512)),
    # Qwen3-8B: 8,190,735,360 including per-head q/k RMSNorms (36 layers x 2 x 128)
    ("qwen3-8b", 8_190_735_360, 36 * 2 * 128),
    # bloom-7b1: 7,069,016,064 including the embedding LayerNorm (2 x 4096)
    ("bloom-7b1", 7_069_016_064, 2 * 4096),
]


@pytest.mark.parametrize("stem,published,not_modelled", EXACT)
def test_exact_published_counts(stem, published, not_modelled):
    m = load_model(str(HF / f"{stem}.json"))
    assert m.total_params() + not_modelled == published


def test_family_specifics():
    gpt2 = load_model(str(HF / "gpt2.json"))
    assert (gpt2.mlp, gpt2.bias, gpt2.tied_embeddings, gpt2.dropout) == ("gelu", True, True, True)
    assert gpt2.ffn_hidden == 3072 and gpt2.seq_len == 1024
    mistral = load_model(str(HF / "mistral-7b.json"))
    assert (mistral.sliding_window, mistral.sliding_window_layers) == (4096, 32)
    nem = load_model(str(HF / "nemotron-4-340b.json"))
    assert nem.mlp == "relu2" and nem.head_dim == 192 and not nem.bias
    bloom = load_model(str(HF / "bloom-7b1.json"))
    assert bloom.bias and bloom.tied_embeddings and bloom.ffn_hidden == 4 * 4096
    mpt = load_model(str(HF / "mpt-7b.json"))
    assert not mpt.bias and mpt.tied_embeddings and mpt.ffn_hidden == 16384
    qwen2 = load_model(str(HF / "qwen2-7b.json"))
    assert qwen2.sliding_window is None  # use_sliding_window is false


def test_seq_len_is_the_pretraining_context():
    assert load_model(str(HF / "llama-3.1-405b.json")).seq_len == 8192  # rope_scaling original
    assert load_model(str(HF / "deepseek-v3.json")).seq_len == 4096
    assert load_model(str(HF / "gpt-oss-120b.json")).seq_len == 4096
    assert load_model(str(HF / "llama-3-8b.json")).seq_len == 8192
    assert load_model(str(HF / "mpt-7b.json")).seq_len == 2048


def test_bloom_legacy_field_names():
    cfg = _cfg("bloom-7b1")
    cfg["n_embed"] = cfg.pop("hidden_size")
    cfg["num_attention_heads"] = cfg.pop("n_head")
    assert from_hf_config(cfg, "b") == from_hf_config(_cfg("bloom-7b1"), "b")


def test_qwen3_moe_layer_pattern():
    cfg = _cfg("qwen3-30b-a3b")
    cfg["decoder_sparse_step"] = 2
    m = from_hf_config(cfg, "q")
    assert m.moe_layers == 24 and m.moe.dense_layers == 24
    cfg["decoder_sparse_step"] = 1
    cfg["mlp_only_layers"] = [0, 1, 47]
    assert from_hf_config(cfg, "q").moe.dense_layers == 3
    cfg["num_experts"] = 0
    assert from_hf_config(cfg, "q").moe is None


def test_deepseek_without_q_lora():
    cfg = _cfg("deepseek-v3")
    cfg["q_lora_rank"] = None
    m = from_hf_config(cfg, "d")
    assert m.mla.q_lora_rank == 0
    assert m.attention_params() > from_hf_config(_cfg("deepseek-v3"), "d").attention_params()


def test_gpt_oss_default_layer_types():
    cfg = _cfg("gpt-oss-120b")
    del cfg["layer_types"]
    m = from_hf_config(cfg, "o")
    assert (m.sliding_window, m.sliding_window_layers) == (128, 18)


def test_mpt_grouped_query_attention():
    cfg = _cfg("mpt-7b")
    cfg["attn_config"] = {"attn_type": "grouped_query_attention", "kv_n_heads": 8}
    cfg["no_bias"] = False
    m = from_hf_config(cfg, "m")
    assert m.kv_heads == 8 and m.bias


def _hf_err(cfg, name="x") -> str:
    with pytest.raises(PlannerError) as e:
        from_hf_config(cfg, name)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unsupported_model_type_names_supported_list():
    msg = _hf_err({"model_type": "t5"})
    assert "unsupported model_type 't5'" in msg
    assert "supported: gpt2, llama, mistral, mixtral, qwen2, qwen3, qwen3_moe" in msg


def test_missing_model_type():
    assert "missing field 'model_type'" in _hf_err({"hidden_size": 8})


@pytest.mark.parametrize("stem,field", [("llama-3-8b", "num_hidden_layers"),
                                        ("gpt2", "n_embd"),
                                        ("mixtral-8x7b", "num_local_experts"),
                                        ("qwen3-30b-a3b", "moe_intermediate_size"),
                                        ("deepseek-v3", "kv_lora_rank"),
                                        ("mpt-7b", "d_model"),
                                        ("bloom-7b1", "vocab_size")])
def test_missing_field_is_named(stem, field):
    cfg = _cfg(stem)
    del cfg[field]
    msg = _hf_err(cfg, stem)
    assert f"Hugging Face config '{stem}'" in msg and f"missing field '{field}'" in msg


def test_wrong_field_type_is_named():
    cfg = _cfg("llama-3-8b")
    cfg["hidden_size"] = "4096"
    assert "field 'hidden_size' must be an integer" in _hf_err(cfg)


def test_unsupported_activation():
    cfg = _cfg("llama-3-8b")
    cfg["hidden_act"] = "tanh"
    assert "unsupported hidden_act 'tanh'" in _hf_err(cfg)


def test_inconsistent_shape_is_reported_one_line():
    cfg = _cfg("llama-3-8b")
    cfg["num_key_value_heads"] = 5
    msg = _hf_err(cfg)
    assert "Hugging Face config 'x'" in msg and "multiple of kv_heads" in msg


def test_hf_json_without_model_type_is_native(tmp_path):
    cfg = copy.deepcopy(_cfg("llama-3-8b"))
    del cfg["model_type"]
    p = tmp_path / "noisy.json"
    p.write_text(json.dumps(cfg))
    with pytest.raises(PlannerError, match="noisy.json: unknown key"):
        load_model(str(p))
