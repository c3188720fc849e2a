"""Hugging Face config.json -> ModelSpec for the decoder-only families the planner models.

Field names follow the transformers configuration classes (GPT2Config, LlamaConfig, MixtralConfig,
Qwen3MoeConfig, DeepseekV3Config, GptOssConfig, NemotronConfig, BloomConfig) and MosaicML's
MPTConfig. What the ModelSpec cannot express is approximated and said so below:

* linear biases are all-or-nothing (ModelSpec.bias): Qwen2's q/k/v-only biases are dropped;
  gpt-oss (biased attention and experts) counts as biased;
* per-head q/k norms (Qwen3), BLOOM's embedding LayerNorm, DeepSeek-V3's multi-token-prediction
  module and learned position embeddings (GPT-2) are not counted;
* MoE layers need not be the trailing ones (Qwen3-MoE decoder_sparse_step / mlp_only_layers,
  DeepSeek moe_layer_freq): moe.dense_layers is the number of non-MoE layers.

seq_len is the pre-training context the config declares: rope_scaling's
original_max_position_embeddings when the context was extended afterwards, else the maximum
position count (n_positions, max_position_embeddings, max_seq_len).
"""
from __future__ import annotations

import math

from .errors import PlannerError
from .model_spec import MLASpec, ModelSpec, MoESpec, check_bounds

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe",
                         "deepseek_v3", "gpt_oss", "nemotron", "bloom", "mpt")

_MISSING = object()
_DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "emb_pdrop", "attn_pdrop", "hidden_dropout",
                 "attention_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob")


class _Cfg:
    """A config dict plus the words for error messages."""

    def __init__(self, cfg: dict, name: str, model_type: str):
        self.cfg, self.name, self.mt = cfg, name, model_type
        self.where = f"Hugging Face config '{name}' (model_type {model_type})"

    def get(self, *keys, default=None):
        for k in keys:
            v = self.cfg.get(k)
            if v is not None:
                return v
        return default

    def req(self, *keys):
        v = self.get(*keys, default=_MISSING)
        if v is _MISSING:
            alt = f" (or {', '.join(repr(k) for k in keys[1:])})" if len(keys) > 1 else ""
            raise PlannerError(f"{self.where}: missing field '{keys[0]}'{alt}")
        return v

    def int(self, *keys, required: bool = True, default=None):
        v = self.req(*keys) if required else self.get(*keys, default=_MISSING)
        if v is _MISSING:
            return default
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            key = next(k for k in keys if self.cfg.get(k) is not None)
            raise PlannerError(f"{self.where}: field '{key}' must be an integer, got {v!r}")
        return v

    def fail(self, msg: str):
        raise PlannerError(f"{self.where}: {_text(msg, 10 ** 6)}")


def from_hf_config(cfg: dict, name: str) -> ModelSpec:
    """Build a ModelSpec named `name` from a Hugging Face config.json dict."""
    name = _text(str(name))
    if not isinstance(cfg, dict):
        raise PlannerError(f"Hugging Face config '{name}': expected a JSON object")
    mt = cfg.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise PlannerError(f"Hugging Face config '{name}': missing field 'model_type'; "
                           f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    key = mt.lower()
    if key not in _PARSERS:
        raise PlannerError(f"Hugging Face config '{name}': unsupported model_type '{_text(mt)}'; "
                           f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    c = _Cfg(cfg, name, key)
    fields = _PARSERS[key](c)
    origin = cfg.get("_name_or_path")
    src = f"Hugging Face config.json (model_type {key}"
    src += f", {origin})" if isinstance(origin, str) and origin else ")"
    fields.setdefault("dropout", _has_dropout(cfg))
    try:
        return check_bounds(ModelSpec(name=name, source=src, **fields), c.where)
    except PlannerError as e:
        if str(e).startswith(c.where):
            raise
        raise PlannerError(f"{c.where}: {e}") from None


# ---- shared pieces --------------------------------------------------------------------------
def _text(t: str, most: int = 200) -> str:
    """Text from the config for a one-line message: escaped unless printable, long ones cut."""
    t = t if t.isprintable() else repr(t)[1:-1]
    return t if len(t) <= most else t[:most] + "..."


def _has_dropout(cfg: dict) -> bool:
    vals = [cfg.get(k) for k in _DROPOUT_KEYS]
    attn = cfg.get("attn_config")
    if isinstance(attn, dict):
        vals.append(attn.get("attn_pdrop"))
    return any(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in vals)


MAX_DEFAULT_SEQ = 8192   # cap on a default taken from a declared context limit


def _context(c: _Cfg, *keys) -> int | None:
    """Default training length: rope_scaling's original context when the config was extended;
    else the declared maximum, capped at 8,192 - a config's position limit is often the
    long-context extension (Qwen3 declares 40,960, pre-trained at 4,096), not the length most of
    training ran at. --seq-len overrides."""
    for rk in ("rope_scaling", "rope_parameters"):
        rs = c.cfg.get(rk)
        if isinstance(rs, dict) and rs.get("original_max_position_embeddings") is not None:
            return _Cfg(rs, c.name, c.mt).int("original_max_position_embeddings")
    v = c.int(*keys, required=False)
    return None if v is None else min(v, MAX_DEFAULT_SEQ)


def _gated_mlp(c: _Cfg) -> str:
    act = str(c.get("hidden_act", "hidden_activation", default="silu")).lower()
    if act in ("silu", "swish"):
        return "swiglu"
    if act.startswith("gelu"):
        return "geglu"
    c.fail(f"unsupported hidden_act '{_text(act, 60)}' for a gated MLP; supported: silu, gelu")


def _sliding(c: _Cfg, layers: int, default_layers: int) -> dict:
    """sliding_window / sliding_window_layers from layer_types, or the family's default."""
    window = c.get("sliding_window")
    types = c.cfg.get("layer_types")
    if isinstance(types, list):
        n = sum(1 for t in types if t == "sliding_attention")
    else:
        n = default_layers
    if not window or n <= 0:
        return {}
    if isinstance(window, bool) or not isinstance(window, int):
        c.fail(f"field 'sliding_window' must be an integer, got {window!r}")
    return {"sliding_window": window, "sliding_window_layers": min(n, layers)}


def _llama_like(c: _Cfg, *, mlp: str | None = None, head_dim: bool = True) -> dict:
    layers = c.int("num_hidden_layers")
    heads = c.int("num_attention_heads")
    d = {
        "layers": layers,
        "hidden": c.int("hidden_size"),
        "heads": heads,
        "kv_heads": c.int("num_key_value_heads", required=False, default=heads),
        "ffn_hidden": c.int("intermediate_size"),
        "vocab": c.int("vocab_size"),
        "mlp": mlp or _gated_mlp(c),
        "tied_embeddings": bool(c.get("tie_word_embeddings", default=False)),
        "bias": bool(c.get("attention_bias", default=False)) and bool(c.get("mlp_bias", default=False)),
        "seq_len": _context(c, "max_position_embeddings"),
    }
    theta = c.get("rope_theta")
    if theta is not None:
        d["rope_theta"] = theta      # checked by ModelSpec (a positive number)
    if head_dim:
        hd = c.int("head_dim", required=False)
        if hd is not None:
            d["head_dim"] = hd
    return d


# ---- families -------------------------------------------------------------------------------
def _gelu_mha(c: _Cfg, hidden: int, ffn_hidden, seq_len) -> dict:
    """GPT-2-style models (GPT-2, BLOOM): multi-head attention, GELU MLP, biases, tied embeddings
    by default."""
    heads = c.int("n_head", "num_attention_heads")
    return {
        "layers": c.int("n_layer", "num_hidden_layers"),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": heads,
        "ffn_hidden": ffn_hidden or 4 * hidden,
        "vocab": c.int("vocab_size"),
        "mlp": "gelu",
        "tied_embeddings": bool(c.get("tie_word_embeddings", default=True)),
        "bias": True,
        "seq_len": seq_len,
    }


def _gpt2(c: _Cfg) -> dict:
    return _gelu_mha(c, c.int("n_embd", "hidden_size"), c.int("n_inner", required=False),
                     c.int("n_positions", "n_ctx", "max_position_embeddings", required=False))


def _llama(c: _Cfg) -> dict:
    d = _llama_like(c)
    return d | _sliding(c, d["layers"], 0)


def _mistral(c: _Cfg) -> dict:
    d = _llama_like(c)
    return d | _sliding(c, d["layers"], d["layers"])


def _mixtral(c: _Cfg) -> dict:
    d = _mistral(c)
    d["moe"] = MoESpec(experts=c.int("num_local_experts"), top_k=c.int("num_experts_per_tok"),
                       expert_ffn_hidden=d["ffn_hidden"])
    return d


def _qwen_sliding(c: _Cfg, layers: int) -> dict:
    n = 0
    if c.get("use_sliding_window", default=False):
        n = layers - c.int("max_window_layers", required=False, default=0)
    return _sliding(c, layers, n)


def _qwen2(c: _Cfg) -> dict:
    d = _llama_like(c)
    d["bias"] = False  # biases on q/k/v only (not o_proj or the MLP): not representable, dropped
    return d | _qwen_sliding(c, d["layers"])


def _qwen3(c: _Cfg) -> dict:
    d = _llama_like(c)
    d["bias"] = bool(c.get("attention_bias", default=False))
    return d | _qwen_sliding(c, d["layers"])


def _qwen3_moe(c: _Cfg) -> dict:
    d = _qwen3(c)
    layers = d["layers"]
    experts = c.int("num_experts")
    step = c.int("decoder_sparse_step", required=False, default=1)
    only_mlp = c.get("mlp_only_layers", default=[])
    if not isinstance(only_mlp, list):
        c.fail(f"field 'mlp_only_layers' must be a list of layer indices, got {only_mlp!r}")
    if step < 1:
        c.fail(f"field 'decoder_sparse_step' must be >= 1, got {step}")
    # layers i with (i + 1) % step == 0 that mlp_only_layers does not list (counted, not looped:
    # num_hidden_layers may be absurdly large); a listed 3.0 or True matches i == 3 or 1 as `in` would
    listed = {int(x) for x in only_mlp if isinstance(x, (int, float)) and math.isfinite(x) and x == int(x)}
    n_moe = 0 if experts <= 0 or layers <= 0 else (
        layers // step - sum(1 for i in listed if 0 <= i < layers and (i + 1) % step == 0))
    if n_moe:
        d["moe"] = MoESpec(experts=experts, top_k=c.int("num_experts_per_tok"),
                           expert_ffn_hidden=c.int("moe_intermediate_size"),
                           dense_layers=layers - n_moe)
    return d


def _deepseek_v3(c: _Cfg) -> dict:
    d = _llama_like(c, head_dim=False)  # MLA head sizes come from the mla fields
    layers = d["layers"]
    first_dense = c.int("first_k_dense_replace", required=False, default=0)
    freq = c.int("moe_layer_freq", required=False, default=1)
    if freq < 1:
        c.fail(f"field 'moe_layer_freq' must be >= 1, got {freq}")
    start = max(first_dense, 0)       # multiples of freq in [start, layers), counted not looped
    n_moe = (layers - 1) // freq - (start - 1) // freq if layers > start else 0
    experts = c.int("n_routed_experts", required=False, default=0)
    if experts and n_moe:
        d["moe"] = MoESpec(experts=experts, top_k=c.int("num_experts_per_tok"),
                           expert_ffn_hidden=c.int("moe_intermediate_size"),
                           shared_experts=c.int("n_shared_experts", required=False, default=0),
                           dense_layers=layers - n_moe)
    d["mla"] = MLASpec(q_lora_rank=c.int("q_lora_rank", required=False, default=0),
                       kv_lora_rank=c.int("kv_lora_rank"),
                       qk_nope_head_dim=c.int("qk_nope_head_dim"),
                       qk_rope_head_dim=c.int("qk_rope_head_dim"),
                       v_head_dim=c.int("v_head_dim"))
    return d


def _gpt_oss(c: _Cfg) -> dict:
    d = _llama_like(c)
    # attention projections carry biases (attention_bias) and the experts always do
    d["bias"] = bool(c.get("attention_bias", default=True))
    d["seq_len"] = c.int("initial_context_length", required=False) or d["seq_len"]
    d["moe"] = MoESpec(experts=c.int("num_local_experts", "num_experts"),
                       top_k=c.int("num_experts_per_tok", "experts_per_token"),
                       expert_ffn_hidden=d["ffn_hidden"])
    # GptOssConfig's default layer_types alternate sliding / full, starting with sliding
    return d | _sliding(c, d["layers"], (d["layers"] + 1) // 2)


def _nemotron(c: _Cfg) -> dict:
    act = str(c.get("hidden_act", default="relu2")).lower()
    if act == "relu2":
        mlp = "relu2"
    elif act.startswith("gelu"):
        mlp = "gelu"
    else:
        c.fail(f"unsupported hidden_act '{_text(act, 60)}'; supported: relu2, gelu")
    return _llama_like(c, mlp=mlp)


def _bloom(c: _Cfg) -> dict:
    return _gelu_mha(c, c.int("hidden_size", "n_embed"), None,
                     c.int("seq_length", required=False))   # ALiBi: no position table


def _mpt(c: _Cfg) -> dict:
    hidden = c.int("d_model")
    heads = c.int("n_heads")
    ffn_cfg = c.cfg.get("ffn_config") if isinstance(c.cfg.get("ffn_config"), dict) else {}
    attn_cfg = c.cfg.get("attn_config") if isinstance(c.cfg.get("attn_config"), dict) else {}
    ratio = c.get("expansion_ratio", default=ffn_cfg.get("expansion_ratio"))
    ffn = ffn_cfg.get("ffn_hidden_size")
    if ffn is None:
        if ratio is None:
            c.fail("missing field 'expansion_ratio'")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
                or not 0 < ratio * hidden <= 1 << 53:
            c.fail(f"field 'expansion_ratio' must be a positive finite number, got {ratio!r}")
        ffn = int(ratio * hidden)
    ffn_type = str(ffn_cfg.get("ffn_type", "mptmlp")).lower()
    act = str(ffn_cfg.get("ffn_act_fn", {}).get("name", "gelu")
              if isinstance(ffn_cfg.get("ffn_act_fn"), dict) else "gelu").lower()
    if ffn_type == "mptglu":
        mlp = "swiglu" if act in ("silu", "swish") else "geglu"
    elif ffn_type in ("mptmlp", "te_ln_mlp"):
        mlp = "gelu"
    else:
        c.fail(f"unsupported ffn_config.ffn_type '{_text(ffn_type, 60)}'; supported: mptmlp, mptglu")
    attn_type = str(attn_cfg.get("attn_type", "multihead_attention"))
    kv = heads
    if attn_type == "multiquery_attention":
        kv = 1
    elif attn_type == "grouped_query_attention":
        kv = attn_cfg.get("kv_n_heads", heads)
    return {
        "layers": c.int("n_layers"),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": kv,
        "ffn_hidden": ffn,
        "vocab": c.int("vocab_size"),
        "mlp": mlp,
        "tied_embeddings": bool(c.get("tie_word_embeddings", default=True)),
        "bias": not bool(c.get("no_bias", default=False)),
        "seq_len": c.int("max_seq_len", required=False),
    }


_PARSERS = {
    "gpt2": _gpt2,
    "llama": _llama,
    "mistral": _mistral,
    "mixtral": _mixtral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "qwen3_moe": _qwen3_moe,
    "deepseek_v3": _deepseek_v3,
    "gpt_oss": _gpt_oss,
    "nemotron": _nemotron,
    "bloom": _bloom,
    "mpt": _mpt,
}
assert tuple(_PARSERS) == SUPPORTED_MODEL_TYPES
