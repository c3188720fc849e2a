"""HBM bytes and extra kernel launches of a layer's elementwise work per forward on one rank, by how
the stack runs it (Stack.elementwise_ops):

- "fused": Transformer Engine / Apex kernels, one read-write pass per norm, residual add and
  activation (Megatron-Core TransformerLayer with TE modules);
- "eager": torchtitan's Llama block op by op in eager PyTorch (torchtitan 9dec370,
  models/norms.py RMSNorm, models/llama/model.py apply_rotary_emb, repeat_kv, FeedForward);
- "compiled": that block under torch.compile (torchtitan apply_compile compiles each
  TransformerBlock; Inductor fuses each run of pointwise ops and its reduction into one kernel).

Widths are per TP rank; norms and residual adds run on the sequence-parallel shard. Bytes are
activations at 2 B, fp32 temporaries at 4 B. Also torchao's fp8 casts (Stack.fp8_casts), counted
the same way."""
from __future__ import annotations

import numpy as np

from ..errors import PlannerError
from ..layout import Precision
from ..model_spec import ModelSpec
from .knobs import LayerKnobs

MODES = ("fused", "eager", "compiled")

# eager RMSNorm per element (norms.py RMSNorm: x.float() r2 w4, pow r4 w4, mean r4, x * rsqrt r4 w4,
# type_as r4 w2, * weight r2 w2) and its launches (the six, plus + eps and rsqrt on the row means)
EAGER_NORM_BYTES, EAGER_NORM_KERNELS = 36, 8
# eager RoPE per element of q or k (apply_rotary_emb: .float() r2 w4, complex multiply r4 w4,
# type_as r4 w2; view_as_complex / view_as_real are views) and its launches per tensor
EAGER_ROPE_BYTES, EAGER_ROPE_KERNELS = 20, 3


def norm_bytes(model: ModelSpec, k: LayerKnobs):
    """HBM bytes of a layer's two fused norms forward: read + write, 2 bytes, on the SP shard (TE)."""
    return 2 * 2 * 2 * k.tokens_sp * model.hidden


def _residual_bytes(model: ModelSpec, tok_sp):
    """Two residual adds (read two, write one, 2 B each) and the dropout mask, on the SP shard."""
    return 2 * tok_sp * model.hidden * (3 + 3 + (1 if model.dropout else 0))


def _common_fused(model: ModelSpec, k: LayerKnobs, tok_sp):
    """TE: two norms r+w, two residual adds, dropout (its fp8 casts: te_fp8_cast_bytes)."""
    return norm_bytes(model, k) + _residual_bytes(model, tok_sp)


def _common_torchtitan(model: ModelSpec, k: LayerKnobs, tok_sp, eager: bool):
    """torchtitan's attention side: norms, residual adds, RoPE on q and k, repeat_kv's copies of
    K and V to every query head (expand + reshape), the output's transpose().contiguous()."""
    T, h, tp = k.tokens, model.hidden, k.tp
    q, kv, v = model.q_dim / tp, model.kv_dim / tp, model.v_dim / tp
    norm = EAGER_NORM_BYTES if eager else 4          # compiled: one pass, read 2 B + write 2 B
    repeats = model.kv_dim < model.q_dim
    rep = 2 * (2 * kv + 2 * q) if repeats else 0.0
    if eager:
        rope = EAGER_ROPE_BYTES * (q + kv)
    else:            # q in one pass; k's rotation folds into its repeat copy when there is one
        rope = 4 * q + (0.0 if repeats else 4 * kv)
    return 2 * norm * tok_sp * h + _residual_bytes(model, tok_sp) + T * (rope + rep + 4 * v)


def layer_bytes(model: ModelSpec, k: LayerKnobs, mode: str):
    """(attention-side, dense-MLP activation) HBM bytes per layer forward."""
    if mode not in MODES:
        raise PlannerError(f"Stack.elementwise_ops: unknown '{mode}'; valid: {', '.join(MODES)}")
    T, tp, tok_sp = k.tokens, k.tp, k.tokens_sp
    f = model.ffn_hidden / tp
    if mode == "fused":
        return _common_fused(model, k, tok_sp), 2 * T * f * (3 if model.gated else 2)
    eager = mode == "eager"
    common = _common_torchtitan(model, k, tok_sp, eager)
    # FeedForward w2(silu(w1 x) * w3 x): eager silu r2 w2 then mul r4 w2; compiled one pass r4 w2
    act = (10 if eager else 6) if model.gated else 4
    return common, T * f * act


def extra_kernels(model: ModelSpec, mode: str) -> tuple:
    """(attention-side, dense-MLP) launches per layer forward beyond TE's (compute.KERNELS_DENSE_FWD):
    eager norms and RoPE op by op, the repeat_kv copies, the transpose copy, and torchtitan's w1 and
    w3 as two GEMMs where TE runs one fused fc1."""
    if mode == "fused":
        return 0, 0
    rep = 2 if model.kv_dim < model.q_dim else 0
    gated = 1 if model.gated else 0
    if mode == "eager":
        return 2 * (EAGER_NORM_KERNELS - 1) + 2 * EAGER_ROPE_KERNELS - 1 + rep + 1, 2 * gated
    return max(rep, 1) + 1, gated


# bytes per element of a Transformer Engine fp8 quantization: read 2 B, write 1 B row-wise and 1 B
# column-wise (the transposed copy the weight-gradient GEMM reads; cast_transpose under delayed
# scaling, both usages of MXFP8Quantizer on Blackwell; transformer_engine/pytorch/tensor/*)
TE_CAST_BYTES = 4


def te_mlp_cast_bytes(model: ModelSpec, k: LayerKnobs, ffn, fc1_input: bool):
    """HBM bytes over forward and backward of TE's fp8 quantizations in an MLP of width ffn split
    over tp (Megatron-Core's TE linears; transformer_engine/pytorch/module/linear.py _Linear: the input
    is quantized in forward unless it arrives in fp8, base.py grad_output_preprocess quantizes the
    output gradient in backward): fc2's input (Megatron's own bias-SwiGLU writes bf16) and both
    output gradients; fc1's input only where no LayerNormLinear casts it (fc1_input: an MoE layer's
    shared experts after the separate pre-MLP TENorm). Row-parallel outputs on the SP shard."""
    T, tp, h, tok_sp = k.tokens, k.tp, model.hidden, k.tokens_sp
    f = ffn / tp
    fc1 = T * (model.mlp_matrices - 1) * f + (tok_sp * h if fc1_input else 0.0)
    return TE_CAST_BYTES * (fc1 + T * f + tok_sp * h)


def te_fp8_cast_bytes(model: ModelSpec, fp8_casts: str, k: LayerKnobs):
    """(attention, dense-MLP) HBM bytes per layer forward of Transformer Engine's fp8 quantizations
    (Stack.fp8_casts == "fused"): the attention output's cast before the projection, the qkv and
    projection output gradients (te_mlp_cast_bytes for the rest and the sources), a third counted in
    forward as the planner splits elementwise work (backward = 2x forward). The inputs of qkv and fc1
    are cast inside TE's LayerNormLinear norm kernel and cost nothing more."""
    if fp8_casts != "fused":
        return 0.0, 0.0
    T, tp, h, tok_sp = k.tokens, k.tp, model.hidden, k.tokens_sp
    att = TE_CAST_BYTES * (T * model.v_dim / tp + T * (model.q_dim + 2 * model.kv_dim) / tp + tok_sp * h)
    mlp = te_mlp_cast_bytes(model, k, model.ffn_hidden, fc1_input=False)
    fp8 = k.precision == Precision.FP8
    return np.where(fp8, att / 3.0, 0.0), np.where(fp8, mlp / 3.0, 0.0)


def dynamic_fp8_cast_bytes(model: ModelSpec, fp8_casts: str, k: LayerKnobs):
    """(attention, dense-MLP) HBM bytes per layer forward of torchao Float8Linear's tensorwise
    dynamic scaling (Stack.fp8_casts == "dynamic"; torchao/float8/float8_linear.py,
    float8_scaling_utils.hp_tensor_to_float8_dynamic). Per linear of K inputs, N outputs over T
    tokens: forward, the input's amax (read 2TK) and cast (read 2TK, write TK); backward, the output
    gradient's amax and cast (5TN), the fp8 copies _scaled_mm's layouts ask for in the gradient GEMMs
    (output gradient and input transposed, 2TN + 2TK; the weight, 2KN): 7T(K+N) + 2KN in all,
    counted a third in forward as the planner splits elementwise work (backward = 2x forward).
    Dense layers only (torchtitan's MoE experts of 2024 run in bf16)."""
    if fp8_casts != "dynamic":
        return 0.0, 0.0
    T, tp, h = k.tokens, k.tp, model.hidden
    f = model.ffn_hidden / tp
    lin = lambda K, N, m=1: m * (7 * T * (K + N) + 2 * K * N) / 3.0  # noqa: E731
    att = lin(h, (model.q_dim + 2 * model.kv_dim) / tp) + lin(model.v_dim / tp, h)
    mlp = lin(h, f, model.mlp_matrices - 1) + lin(f, h)
    fp8 = k.precision == Precision.FP8
    return np.where(fp8, att, 0.0), np.where(fp8, mlp, 0.0)
