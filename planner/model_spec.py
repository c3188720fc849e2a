"""ModelSpec: the shape of a decoder-only transformer, validated at construction.

Parameter counts follow the layer structure of Megatron-Core's GPTModel
(megatron/core/models/gpt/gpt_model.py) and Hugging Face's modeling files for the
catalogued families.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import PlannerError

MAX_FIELD = 1 << 53          # largest integer shape field: exact in the float64 cost model
MLP_KINDS = ("gelu", "relu2", "swiglu", "geglu")
GATED_MLPS = ("swiglu", "geglu")


def _pos_int(owner: str, name: str, value, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise PlannerError(f"{owner}: '{name}' must be an integer, got {value!r}")
    value = int(value)
    if value < 0 or (value == 0 and not allow_zero):
        raise PlannerError(
            f"{owner}: '{name}' must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


@dataclass(frozen=True)
class MoESpec:
    """Mixture-of-experts block replacing the dense MLP in all but the leading dense layers."""
    experts: int
    top_k: int
    expert_ffn_hidden: int
    shared_experts: int = 0
    dense_layers: int = 0
    # FFN width of one shared expert; defaults to expert_ffn_hidden (DeepSeek-V3 convention)
    shared_expert_ffn_hidden: int | None = None

    def __post_init__(self):
        o = "moe"
        object.__setattr__(self, "experts", _pos_int(o, "experts", self.experts))
        object.__setattr__(self, "top_k", _pos_int(o, "top_k", self.top_k))
        object.__setattr__(self, "expert_ffn_hidden",
                           _pos_int(o, "expert_ffn_hidden", self.expert_ffn_hidden))
        object.__setattr__(self, "shared_experts",
                           _pos_int(o, "shared_experts", self.shared_experts, allow_zero=True))
        object.__setattr__(self, "dense_layers",
                           _pos_int(o, "dense_layers", self.dense_layers, allow_zero=True))
        if self.shared_expert_ffn_hidden is None:
            object.__setattr__(self, "shared_expert_ffn_hidden", self.expert_ffn_hidden)
        else:
            object.__setattr__(self, "shared_expert_ffn_hidden",
                               _pos_int(o, "shared_expert_ffn_hidden", self.shared_expert_ffn_hidden))
        if self.top_k > self.experts:
            raise PlannerError(
                f"moe: top_k ({self.top_k}) must be <= experts ({self.experts})")


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2/V3), DeepSeek-V3 paper section 2.1.1."""
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int = 0  # 0: queries are not low-rank compressed (DeepSeek-V2-Lite)

    def __post_init__(self):
        o = "mla"
        for n in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            object.__setattr__(self, n, _pos_int(o, n, getattr(self, n)))
        object.__setattr__(self, "q_lora_rank",
                           _pos_int(o, "q_lora_rank", self.q_lora_rank, allow_zero=True))


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer. Units: counts of elements (no bytes here)."""
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    vocab: int
    mlp: str = "gelu"
    head_dim: int | None = None
    tied_embeddings: bool = False
    moe: MoESpec | None = None
    mla: MLASpec | None = None
    # training-recipe facts that change cost: dropout masks are stored for backward
    # (Korthikanti et al. 2022 sec. 4.1); biases add parameters (GPT-2/3 style)
    dropout: bool = False
    bias: bool = False
    # default sequence length the model was trained with (used when --seq-len is not given)
    seq_len: int | None = None
    source: str = ""
    # sliding-window (local) attention: each query attends to at most `sliding_window` previous
    # tokens in `sliding_window_layers` of the layers (None: all layers; gpt-oss alternates
    # sliding and full layers). Changes attention-score FLOPs only, not parameters.
    sliding_window: int | None = None
    sliding_window_layers: int | None = None
    # RoPE base frequency (HF config rope_theta); None: not stated (Megatron's default is 10000).
    # Exported, not costed.
    rope_theta: float | None = None

    def __post_init__(self):
        o = f"model '{self.name}'"
        if not isinstance(self.name, str) or not self.name:
            raise PlannerError("model: 'name' must be a non-empty string")
        for n in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab"):
            object.__setattr__(self, n, _pos_int(o, n, getattr(self, n)))
        if self.mlp not in MLP_KINDS:
            raise PlannerError(f"{o}: mlp must be one of {', '.join(MLP_KINDS)}, got {self.mlp!r}")
        if self.head_dim is None:
            if self.hidden % self.heads:
                raise PlannerError(
                    f"{o}: hidden ({self.hidden}) is not divisible by heads ({self.heads}); "
                    "give head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        else:
            object.__setattr__(self, "head_dim", _pos_int(o, "head_dim", self.head_dim))
        if self.heads % self.kv_heads:
            raise PlannerError(
                f"{o}: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.seq_len is not None:
            object.__setattr__(self, "seq_len", _pos_int(o, "seq_len", self.seq_len))
        if self.sliding_window is None:
            if self.sliding_window_layers is not None:
                raise PlannerError(f"{o}: sliding_window_layers needs sliding_window")
        else:
            object.__setattr__(self, "sliding_window",
                               _pos_int(o, "sliding_window", self.sliding_window))
            n = self.layers if self.sliding_window_layers is None else _pos_int(
                o, "sliding_window_layers", self.sliding_window_layers, allow_zero=True)
            if n > self.layers:
                raise PlannerError(
                    f"{o}: sliding_window_layers ({n}) exceeds layers ({self.layers})")
            object.__setattr__(self, "sliding_window_layers", n)
        if self.rope_theta is not None and (isinstance(self.rope_theta, bool) or not isinstance(
                self.rope_theta, (int, float)) or not 0 < self.rope_theta < float("inf")):
            raise PlannerError(f"{o}: rope_theta must be a positive number, got {self.rope_theta!r}")
        if self.moe is not None and self.moe.dense_layers > self.layers:
            raise PlannerError(
                f"{o}: moe.dense_layers ({self.moe.dense_layers}) exceeds layers ({self.layers})")
        # shapes the float64 cost model holds exactly, however the spec was built (library use too)
        check_bounds(self, o)

    # ---- derived shape facts -------------------------------------------------------------
    @property
    def gated(self) -> bool:
        return self.mlp in GATED_MLPS

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.gated else 2

    @property
    def moe_layers(self) -> int:
        return 0 if self.moe is None else self.layers - self.moe.dense_layers

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    @property
    def q_dim(self) -> int:
        """Width of all query heads together (attention inner dimension for Q and K)."""
        if self.mla:
            return self.heads * (self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim)
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection as the attention GEMMs and the K/V
        exchange see it: kv_heads x head_dim; under MLA the up-projected keys are as wide as the
        queries (q_dim; DeepSeek-V2 sec. 2.1.2)."""
        return self.q_dim if self.mla else self.kv_heads * self.head_dim

    @property
    def v_dim(self) -> int:
        """Width of all value heads together (input of the output projection)."""
        if self.mla:
            return self.heads * self.mla.v_head_dim
        return self.heads * self.head_dim

    # ---- parameter counts (elements) ------------------------------------------------------
    def attention_params(self) -> int:
        h, b = self.hidden, self.bias
        if self.mla:
            m = self.mla
            qk = m.qk_nope_head_dim + m.qk_rope_head_dim
            # DeepSeek-V3 MLA (modeling_deepseek.py DeepseekV3Attention): q_a/q_b or q_proj,
            # kv_a_proj_with_mqa (h -> kv_lora + rope), kv_b_proj, o_proj, plus the two LoRA norms
            if m.q_lora_rank:
                q = h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * self.heads * qk
            else:
                q = h * self.heads * qk
            kv = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
            kv += m.kv_lora_rank * self.heads * (m.qk_nope_head_dim + m.v_head_dim)
            return q + kv + self.v_dim * h
        kv = self.kv_heads * self.head_dim
        # Q, K, V and output projections (GQA: K and V have kv_heads heads)
        qkv = h * (self.q_dim + 2 * kv) + (self.q_dim + 2 * kv if b else 0)
        return qkv + self.v_dim * h + (h if b else 0)

    def mlp_params(self, ffn: int | None = None) -> int:
        f = self.ffn_hidden if ffn is None else ffn
        w = self.mlp_matrices * self.hidden * f
        return w + ((f * (self.mlp_matrices - 1) + self.hidden) if self.bias else 0)

    def norm_params(self) -> int:
        # two norms per layer (LayerNorm has a bias too, RMSNorm has not)
        return 2 * self.hidden * (2 if self.bias else 1)

    def expert_params_per_layer(self) -> int:
        """Routed-expert parameters of one MoE layer (the part sharded by EP)."""
        if self.moe is None:
            return 0
        return self.moe.experts * self.mlp_params(self.moe.expert_ffn_hidden)

    def moe_nonexpert_params_per_layer(self) -> int:
        """Router and shared experts of one MoE layer (replicated across EP)."""
        m = self.moe
        return self.hidden * m.experts + m.shared_experts * self.mlp_params(m.shared_expert_ffn_hidden)

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def output_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    def param_counts(self) -> dict[str, int]:
        """Parameters by term. Sum is the total; see active_params() for per-token."""
        per_layer_common = self.attention_params() + self.norm_params()
        c = {
            "embedding": self.embedding_params(),
            "attention": self.layers * self.attention_params(),
            "norms": self.layers * self.norm_params() + self.hidden * (2 if self.bias else 1),
            "dense_mlp": self.dense_layers * self.mlp_params(),
            "moe_router_shared": (self.moe_layers * self.moe_nonexpert_params_per_layer()
                                  if self.moe else 0),
            "moe_experts": self.moe_layers * self.expert_params_per_layer(),
            "output": self.output_params(),
        }
        del per_layer_common
        return c

    def total_params(self) -> int:
        return sum(self.param_counts().values())

    def active_params(self) -> int:
        """Parameters touched per token (top_k routed experts instead of all)."""
        c = self.param_counts()
        total = sum(c.values())
        if self.moe:
            active_experts = self.moe_layers * self.moe.top_k * self.mlp_params(self.moe.expert_ffn_hidden)
            total += active_experts - c["moe_experts"]
        return total


def check_bounds(m: ModelSpec, origin: str) -> ModelSpec:
    """Refuse integer shape fields, and a parameter count, above MAX_FIELD: numbers the float64
    cost model cannot hold exactly and that overflow its int64 arithmetic."""
    for owner, prefix in ((m, ""), (m.moe, "moe."), (m.mla, "mla.")):
        if owner is None:
            continue
        for k, v in vars(owner).items():
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_FIELD:
                raise PlannerError(f"{origin}: '{prefix}{k}' must be at most 2^53 = {MAX_FIELD:,}, got {_short(v)}")
    n = m.total_params()
    if n > MAX_FIELD:
        raise PlannerError(f"{origin}: the model has {n:.3g} parameters; the planner handles at most "
                           f"2^53 = {MAX_FIELD:.3g}")
    return m


def _short(v, most: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= most else r[:most] + "..."
