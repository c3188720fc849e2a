"""Phase 3, activation memory: bytes one layer keeps for backward per micro-batch under each
recompute policy (planner/memory.py formulas), the embedding output and the fp32 logits."""
from __future__ import annotations

import numpy as np

from .. import memory as M
from ..layout import Precision, Recompute
from ..model_spec import ModelSpec
from ..stacks import Stack
from .elements import ElementBytes
from .knobs import LayerKnobs
from .records import Record, record, full


@record
class LayerActivations(Record):
    dense: np.ndarray          # rows by layout.Recompute code: bytes a dense layer keeps
    moe: np.ndarray            # the same for an MoE layer
    live: np.ndarray           # rows by code: what a layer re-makes while its backward runs
    emb: np.ndarray            # embedding output kept by the first stage
    emb_grad: np.ndarray       # elements of a full-vocab embedding gradient under TP (Stack.tp_embedding_grad_bytes)
    logits: np.ndarray         # the loss's vocab-wide tensors of one micro-batch at its backward
                               # (Korthikanti sec. 4.3 count fp32 logits, 4sbv/t; Stack.loss_bytes_per_logit)


def _layer(model, stack, k: LayerKnobs, rec, moe_layer, imb, eb: ElementBytes, gemm_in):
    """(kept, full) bytes of one layer under the Recompute code `rec`: the Korthikanti terms
    (memory.py; linear inputs in fp8 where the stack saves them so, Stack.fp8_saved_input_bytes),
    the norms' statistics, and the gathered linear inputs of a stack that keeps them -- all but the
    layer input are dropped under full recompute, and op-level SAC and a recomputed layernorm make
    the norms' statistics again (neither keeps them); a Megatron-Core module list drops what
    memory.recompute_module_bytes says."""
    T, tp, sp = k.tokens, k.tp, k.sp
    mods = Recompute(rec).modules if rec > Recompute.FULL else ()
    kept, full_layer = M.layer_activation_bytes(model, T, tp, sp, np.full(k.n, 0 if mods else rec), moe_layer,
                                                stack.flash_attention, k.s, k.etp, imb, eb.act, eb.stat,
                                                stack.gated_mlp_tensors, stack.selective, gemm_in)
    if mods:
        kept = kept - M.recompute_module_bytes(model, T, tp, sp, mods, moe_layer, k.etp, imb, eb.act,
                                               stack.gated_mlp_tensors, gemm_in)
    extra = M.norm_statistics_bytes(model, T, tp, sp, eb.stat)
    if stack.sp_keeps_gathered_inputs:
        extra = extra + M.gathered_inputs_bytes(model, T, tp, sp, moe_layer, eb.act)
    dropped = rec == Recompute.FULL or (rec == Recompute.SELECTIVE and stack.selective == "op") or "layernorm" in mods
    return (kept if dropped else kept + extra), full_layer + extra


def _live(stack, rec, kept, full_layer):
    """What a layer re-makes while its backward runs, beside what it kept: a full recompute (and
    op-level SAC, as validate's trackers see it) the whole layer, a Megatron-Core module list the
    part it dropped."""
    if rec == Recompute.NONE:
        return 0.0 * full_layer
    if rec == Recompute.FULL or stack.selective == "op":
        return full_layer
    return full_layer - kept


def layer_activations(model: ModelSpec, stack: Stack, k: LayerKnobs, moe_load, eb: ElementBytes) -> LayerActivations:
    """Phase 3 over the rows of the layer table, one row per Recompute code; moe_load: routed
    tokens over the mean (routing.routed_load)."""
    n, T, tp, sp = k.n, k.tokens, k.tp, k.sp
    imb = moe_load
    gemm_in = np.where(k.precision == Precision.FP8, stack.fp8_saved_input_bytes, eb.act)
    dense, moe, live = [], [], []
    for r in Recompute:
        d, full_dense = _layer(model, stack, k, r, False, imb, eb, gemm_in)
        m, full_moe = _layer(model, stack, k, r, True, imb, eb, gemm_in) if model.moe else (np.zeros(n),) * 2
        dense.append(d)
        moe.append(m)
        live.append(np.maximum(_live(stack, r, d, full_dense) if model.dense_layers else 0.0,
                               _live(stack, r, m, full_moe) if model.moe else 0.0))
    emb_grad = np.where(tp > 1, 1.0 * model.vocab * model.hidden, 0.0)
    return LayerActivations(np.stack(full(n, *dense)), np.stack(full(n, *moe)), np.stack(full(n, *live)),
                            *full(n, eb.act * T * model.hidden / np.where(sp, tp, 1), emb_grad,
                                  _loss_bytes(stack, tp) * T * model.vocab / tp))


def _loss_bytes(stack: Stack, tp):
    """Bytes per logit live at the loss backward (Stack.loss_bytes_per_logit)."""
    par = stack.loss_parallel_bytes_per_logit or stack.loss_bytes_per_logit
    return np.where(tp > 1, par, stack.loss_bytes_per_logit)
