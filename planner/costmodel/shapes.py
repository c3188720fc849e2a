"""Parameter shapes as one TP rank holds them, and how each ZeRO-3 implementation pads them for
its shard group: what one rank of the group allocates and what the group gathers."""
from __future__ import annotations

import numpy as np

from ..model_spec import ModelSpec
from ..frozen import frozen

# ZeRO-3 padding rules (Stack.zero3_padding):
DIM0 = "dim0"     # FSDP2: each parameter chunked on dim 0 (torch.chunk), every rank allocates the first
#                   rank's padded chunk (torch/distributed/fsdp/_fully_shard/_fsdp_param.py _init_sharded_param)
NUMEL = "numel"   # DeepSpeed ZeRO-3: each flattened parameter padded to a multiple of the group
#                   (deepspeed/runtime/zero/partition_parameters.py _partition_param: ceil(numel / world))
UNIT = "unit"     # FSDP1: the flat parameter of a wrapped unit padded to a multiple of the group
#                   (torch/distributed/fsdp/_flat_param.py FlatParamHandle._get_shard)
RULES = (DIM0, NUMEL, UNIT)


@frozen(eq=True)
class Shape:
    """A parameter [d0, rest] and which side tensor parallelism splits: "col" d0 (column-parallel
    weights and their biases, the vocab-parallel embedding), "row" rest (row-parallel weights),
    "" neither (norms, row-parallel biases, the router)."""
    d0: float
    rest: float = 1.0
    split: str = ""


def _mlp(model: ModelSpec, ffn: int) -> list:
    """Megatron-Core MLP: fc1 (and the gate) column-parallel, fc2 row-parallel."""
    h, b = model.hidden, model.bias
    out = [Shape(ffn, h, "col") for _ in range(model.mlp_matrices - 1)]
    out += [Shape(ffn, 1, "col") for _ in range(model.mlp_matrices - 1) if b]
    return out + [Shape(h, ffn, "row")] + ([Shape(h)] if b else [])


def _attention(model: ModelSpec) -> list:
    """Q, K, V column-parallel, the output projection row-parallel (validate/model.py Attention).
    MLA's projections and LoRA norms are all split over TP, as LayerParams counts them."""
    h, b = model.hidden, model.bias
    if model.mla:
        m = model.mla
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        q = ([Shape(m.q_lora_rank, h, "col"), Shape(m.q_lora_rank, 1, "col"),
              Shape(model.heads * qk, m.q_lora_rank, "col")] if m.q_lora_rank else [Shape(model.heads * qk, h, "col")])
        kv = [Shape(m.kv_lora_rank + m.qk_rope_head_dim, h, "col"), Shape(m.kv_lora_rank, 1, "col"),
              Shape(model.heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank, "col")]
        return q + kv + [Shape(h, model.v_dim, "row")]
    kv = model.kv_heads * model.head_dim
    out = [Shape(model.q_dim, h, "col"), Shape(kv, h, "col"), Shape(kv, h, "col")]
    out += [Shape(model.q_dim, 1, "col"), Shape(kv, 1, "col"), Shape(kv, 1, "col")] if b else []
    return out + [Shape(h, model.v_dim, "row")] + ([Shape(h)] if b else [])


def _norms(model: ModelSpec, count: int) -> list:
    return [Shape(model.hidden) for _ in range(count * (2 if model.bias else 1))]


def dense_layer(model: ModelSpec) -> list:
    return _attention(model) + _norms(model, 2) + _mlp(model, model.ffn_hidden)


def moe_layer(model: ModelSpec) -> list:
    """An MoE layer less its routed experts: attention, norms, router, shared experts."""
    m = model.moe
    shared = [s for _ in range(m.shared_experts) for s in _mlp(model, m.shared_expert_ffn_hidden)]
    return _attention(model) + _norms(model, 2) + [Shape(m.experts, model.hidden)] + shared


def expert(model: ModelSpec) -> list:
    """One routed expert; expert tensor parallelism splits all of it (LayerParams counts so)."""
    return [Shape(s.d0, s.rest, s.split or "col") for s in _mlp(model, model.moe.expert_ffn_hidden)]


def root(model: ModelSpec, first, last, tied_copy) -> list:
    """(shape, count) of the root unit: the embedding on the first stage, the output layer (or a
    tied copy of the embedding with pp > 1) and the final norm on the last."""
    h = model.hidden
    out = [(Shape(model.vocab, h, "col"), first * 1.0),
           (Shape(model.vocab, h, "col"), last * (tied_copy | (not model.tied_embeddings)) * 1.0)]
    return out + [(s, last * 1.0) for s in _norms(model, 1)]


def _local(s: Shape, tp):
    """(d0, rest) on one rank of a tp-way split."""
    return (s.d0 / tp, s.rest) if s.split == "col" else ((s.d0, s.rest / tp) if s.split == "row" else (s.d0, s.rest))


def _numel(s: Shape, tp):
    d0, rest = _local(s, tp)
    return d0 * rest


def rank_elements(items, tp, n, rule: str, r=0):
    """Elements shard-rank r of an n-way ZeRO-3 group allocates for one unit, `items` its
    (Shape, count) pairs on a tp-way split. FSDP2: rank r's rows of each dim-0 chunk (the
    optimizer's moments), rank 0's padded chunk (weights and gradients: every rank allocates it);
    DeepSpeed and FSDP1: a padded equal share on every rank. n x rank 0's is what the group gathers."""
    n = np.maximum(n, 1)
    if rule == UNIT:
        return np.ceil(sum(c * _numel(s, tp) for s, c in items) / n)
    out = 0.0
    for s, c in items:
        d0, rest = _local(s, tp)
        if rule == NUMEL:
            out = out + c * np.ceil(d0 * rest / n)
        else:
            ch = np.ceil(d0 / n)
            out = out + c * np.clip(d0 - r * ch, 0.0, ch) * rest
    return out


def stage_elements(model: ModelSpec, k, ndense, nmoe, first, last, n, ne, rule: str, r=0):
    """(dense, root, expert) elements shard-rank r of the ZeRO-3 groups (n dense, ne expert)
    allocates on a pipeline rank: each layer one unit, the root one unit, a layer's local experts
    one unit over the expert group."""
    one = lambda shapes: [(s, 1.0) for s in shapes]  # noqa: E731
    tied_copy = k.pp > 1
    rt = rank_elements(root(model, first, last, tied_copy), k.tp, n, rule, r)
    dense = ndense * rank_elements(one(dense_layer(model)), k.tp, n, rule, r) + rt
    if model.moe is None:
        return dense, rt, np.zeros_like(dense)
    dense = dense + nmoe * rank_elements(one(moe_layer(model)), k.tp, n, rule, r)
    local = model.moe.experts / k.ep
    ex = nmoe * rank_elements([(s, local) for s in expert(model)], k.etp, ne, rule, r)
    return dense, rt, ex
