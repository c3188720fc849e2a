"""Exact counts of one training step on each rank, for one (ModelSpec, Layout): FLOPs by phase,
bytes of parameters, gradients and optimizer state held, bytes and calls of every collective by
process group and kind, and the activation bytes each layer saves for backward per micro-batch.

These are the planner's predictions in countable form, so that `python -m validate run` can
hold them against a real run. The per-term formulas are the planner's own (planner/flops.py,
planner/memory.py, planner/model_spec.py): this module calls them and adds only what a count
needs beyond a time or memory estimate -- the split over ranks, the number of calls, and the
implementation details a measurement sees (each is named in `deltas` with its source).

What is counted, and how a rank group is formed:
- Ranks are grouped by pipeline stage: every rank of a stage has the same counts, except that
  with expert parallelism the routed-token terms vary with the routing; the EP group's mean is
  exact and is what is predicted.
- FLOPs are what torch.utils.flop_counter.FlopCounterMode counts: matmuls (2mnk) and
  scaled-dot-product attention with its full (non-causal) score matrix -- its sdpa_flop
  formula ignores the causal mask -- and 5 backward matmuls for 2 forward ones (recomputing the
  scores). Elementwise work, norms, softmax, the loss, embedding lookups and the optimizer are
  not counted.
- Collective bytes follow planner/collectives.py: all-reduce the buffer, all-gather the
  gathered output, reduce-scatter the full input, all-to-all and send/recv what this rank sends.
- The implementation counted is Megatron-Core's (rank order tp-cp-ep-dp-pp, vocab-parallel
  embedding and cross entropy, sequence parallelism, ring context parallelism, all-to-all token
  dispatch, distributed optimizer) with PyTorch's tensor-parallel styles; ZeRO-3 is FSDP2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from . import flops as F
from . import memory as M
from .errors import PlannerError
from .layout import RECOMPUTE, Layout
from .model_spec import ModelSpec

# FlopCounterMode's attention backward: 5 matmuls of the forward's size for its 2
# (torch/utils/flop_counter.py sdpa_backward_flop_count); the planner's costmodel.py uses the
# same 2.5 (ATTN_BWD_FACTOR, FlashAttention-2 sec. 3.1.2)
SDPA_BWD_FACTOR = 2.5
INDEX_BYTES = 8   # int64 indices (token counts, routing order)


def tp_collectives_per_layer(model: ModelSpec, moe_layer: bool) -> int:
    """Tensor-parallel collective pairs per layer and pass: one after attention, one after the
    MLP (Shoeybi et al. 2019 fig. 4; costmodel.py tp_colls_dense)."""
    return 2


@dataclass(frozen=True)
class ElementBytes:
    """Bytes per element of each kind of state. The default is Megatron-Core mixed precision:
    bf16 weights and activations, fp32 main gradients (also reduced in fp32), fp32 master
    weights + Adam moments (12), fp32 softmax statistics."""
    act: int = 2
    stat: int = 4
    weight: int = 2
    grad: int = 4
    grad_reduce: int = 4
    param_gather: int = 2
    optimizer: int = 12

    @classmethod
    def uniform(cls, e: int, zero: int) -> "ElementBytes":
        """A run in one dtype of e bytes (validate on CPU): the optimizer holds an e-byte master
        copy and two moments (ZeRO 0-2, as Megatron's distributed optimizer), or only the two
        moments when FSDP2's sharded parameters are the master copy (ZeRO 3)."""
        return cls(act=e, stat=e, weight=e, grad=e, grad_reduce=e, param_gather=e,
                   optimizer=(2 if zero == 3 else 3) * e)


@dataclass
class Chunk:
    """A model chunk (pipeline stage or virtual stage) on a rank."""
    index: int            # virtual stage index
    layers: list
    first: bool
    last: bool


@dataclass
class StageCounts:
    stage: int
    chunks: list
    layers: list
    moe_layers: list
    flops: dict = field(default_factory=dict)          # forward / backward / recompute
    state: dict = field(default_factory=dict)          # weights / gradients / optimizer bytes
    collectives: dict = field(default_factory=dict)    # (group, kind) -> {"calls", "bytes"}
    activations: dict = field(default_factory=dict)    # layer -> bytes per micro-batch
    activation_terms: dict = field(default_factory=dict)  # layer -> {"planner": b, deltas...}
    params: dict = field(default_factory=dict)         # dense / expert elements on the rank

    def add(self, group, kind, calls, nbytes, total=None):
        """`calls` collectives of `nbytes` each (or of `total` bytes together)."""
        d = self.collectives.setdefault((group, kind), {"calls": 0, "bytes": 0})
        d["calls"] += calls
        d["bytes"] += calls * nbytes if total is None else total


# ---------------------------------------------------------------------------------------------
def check(model: ModelSpec, layout: Layout):
    """What the counts (and the validate implementation) cover; PlannerError otherwise."""
    L = model.layers
    nv = layout.pp * layout.vpp
    if model.mla is not None:
        raise PlannerError(f"counts: {model.name} uses multi-head latent attention, which is not "
                           "implemented (GQA/MHA models only)")
    if layout.first_stage_layers or layout.last_stage_layers:
        raise PlannerError("counts: uneven pipeline stages (first/last stage layers) are not supported")
    if L % nv:
        raise PlannerError(f"--pp {layout.pp}" + (f" x --vpp {layout.vpp}" if layout.vpp > 1 else "")
                           + f": the {L} layers of {model.name} do not split evenly over {nv} "
                           "stages (counts cover even stages only)")
    if layout.schedule not in ("1f1b", "interleaved"):
        raise PlannerError(f"counts: schedule {layout.schedule} is not supported (1f1b, interleaved)")
    if model.heads % layout.tp or model.kv_heads % layout.tp:
        raise PlannerError(f"--tp {layout.tp} must divide the {model.heads} attention heads and "
                           f"{model.kv_heads} KV heads of {model.name}")
    if layout.etp != 1:
        raise PlannerError("counts: --etp other than 1 is not supported")
    if layout.global_batch % (layout.dp * layout.micro_batch):
        raise PlannerError(f"--global-batch {layout.global_batch} is not divisible by "
                           f"micro-batch x dp = {layout.micro_batch * layout.dp}")
    if layout.seq_len % (2 * layout.cp) and layout.cp > 1:
        raise PlannerError(f"--cp {layout.cp} needs --seq-len divisible by 2*cp = {2 * layout.cp}")
    sp = layout.sp and layout.tp > 1
    if sp and (layout.seq_len // layout.cp) % layout.tp:
        raise PlannerError(f"--sp needs the sequence per CP rank ({layout.seq_len // layout.cp}) "
                           f"divisible by --tp {layout.tp}")
    if model.moe is not None and model.moe.experts % layout.ep:
        raise PlannerError(f"--ep {layout.ep} does not divide the {model.moe.experts} experts")
    if model.moe is None and layout.ep > 1:
        raise PlannerError(f"--ep {layout.ep} needs a mixture-of-experts model; {model.name} is dense")
    if (layout.tp * layout.cp * layout.dp) % layout.ep:
        raise PlannerError(f"--ep {layout.ep} must divide tp*cp*dp = {layout.tp * layout.cp * layout.dp}")


def chunks_of(model: ModelSpec, layout: Layout, pp_rank: int) -> list:
    nv = layout.pp * layout.vpp
    per = model.layers // nv
    out = []
    for v in range(layout.vpp):
        vs = pp_rank + v * layout.pp
        out.append(Chunk(vs, list(range(vs * per, (vs + 1) * per)), vs == 0, vs == nv - 1))
    return out


def is_moe_layer(model: ModelSpec, i: int) -> bool:
    return model.moe is not None and i >= model.moe.dense_layers


def local_params(model: ModelSpec, layout: Layout, chunk: Chunk) -> tuple[float, float]:
    """(dense, expert) parameter elements of a chunk on one rank. Column-parallel weights and
    biases and row-parallel weights are split over tp; norms and row-parallel biases are
    replicated (Megatron-Core ColumnParallelLinear/RowParallelLinear; the norm weights are
    sequence-parallel parameters, whole on every tp rank)."""
    m, tp = model, layout.tp
    h = m.hidden
    row_bias = h if m.bias else 0
    dense = expert = 0.0
    for i in chunk.layers:
        dense += (m.attention_params() - row_bias) / tp + row_bias + m.norm_params()  # model_spec.py
        if is_moe_layer(m, i):
            dense += m.moe_nonexpert_params_per_layer()        # router + shared experts (tp = 1)
            expert += m.expert_params_per_layer() / layout.ep  # model_spec.py: E experts / ep
        else:
            dense += (m.mlp_params() - row_bias) / tp + row_bias
    if chunk.first:
        dense += m.embedding_params() / tp                     # vocab-parallel embedding
    if chunk.last:
        dense += h * (2 if m.bias else 1)                      # final norm
        if not m.tied_embeddings:
            dense += m.output_params() / tp
        elif not chunk.first:
            # tied embeddings split over stages: the last stage keeps its own copy
            # (Megatron-Core shared_embedding_or_output_weight)
            dense += m.embedding_params() / tp
    return dense, expert


# ---------------------------------------------------------------------------------------------
def _tokens(layout: Layout):
    """(T, Ts): tokens of one micro-batch on a rank (sequence split by cp), and the share a rank
    holds in the sequence-parallel regions."""
    T = layout.micro_batch * layout.seq_len / layout.cp
    sp = layout.sp and layout.tp > 1
    return T, (T / layout.tp if sp else T)


def layer_flops(model: ModelSpec, layout: Layout, moe_layer: bool) -> dict:
    """Forward FLOPs of one layer and one micro-batch on a rank: {"gemm", "core"}."""
    T, _ = _tokens(layout)
    tp, cp = layout.tp, layout.cp
    a = F.attention_gemm_flops(model, T)                          # flops.py
    gemm = (a["attn_qkv"] + a["attn_out"]) / tp
    if moe_layer:
        gemm += sum(F.moe_flops(model, T).values()) / tp           # flops.py (router+experts+shared)
    else:
        gemm += F.mlp_flops(model, T) / tp                         # flops.py
    # counted attention: FlopCounterMode counts causal blocks in full; with ring CP (2cp chunks,
    # rank r holding chunks r and 2cp-1-r) a rank computes one 2c x 2c causal block and cp-1
    # blocks of 2c x c, i.e. s^2 (cp+1) / (2 cp^2) of the full score matrix (cp = 1: all of it)
    s = layout.seq_len
    core = F.attention_core_flops(model, layout.micro_batch * s, s, causal=False)  # flops.py
    core = core * (cp + 1) / (2 * cp * cp) / tp
    return {"gemm": gemm, "core": core}


def stage_flops(model: ModelSpec, layout: Layout, chunks) -> dict:
    nmb = layout.global_batch // (layout.dp * layout.micro_batch)
    T, _ = _tokens(layout)
    fwd = bwd = rec = 0.0
    for ch in chunks:
        for i in ch.layers:
            f = layer_flops(model, layout, is_moe_layer(model, i))
            fwd += f["gemm"] + f["core"]
            bwd += 2 * f["gemm"] + SDPA_BWD_FACTOR * f["core"]   # dgrad + wgrad (Narayanan 2021 sec. 5.1)
            if layout.recompute == "full":
                rec += f["gemm"] + f["core"]
            elif layout.recompute == "selective":
                rec += f["core"]
        if ch.last:
            lg = F.logits_flops(model, T) / layout.tp                # flops.py
            fwd += lg
            bwd += 2 * lg
    out = {"forward": fwd * nmb, "backward": bwd * nmb}
    if layout.recompute != "none":
        out["recompute"] = rec * nmb
    return out


def stage_state(model: ModelSpec, layout: Layout, chunks, eb: ElementBytes) -> tuple[dict, dict]:
    """Bytes of weights, gradients and optimizer state the rank holds (memory.py
    model_state_bytes, per bucket: dense over dp x cp, experts over the expert-data group)."""
    G = layout.dp * layout.cp
    Ge = layout.tp * layout.cp * layout.dp // layout.ep
    tot = {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0}
    params = {"dense": 0.0, "expert": 0.0}
    for ch in chunks:
        pd, pe = local_params(model, layout, ch)
        params["dense"] += pd
        params["expert"] += pe
        for p, g in ((pd, G), (pe, Ge)):
            if not p:
                continue
            w, gr, o = M.model_state_bytes(p, g, layout.zero, grad_bytes=eb.grad,     # memory.py
                                           weight_bytes=eb.weight, optimizer_bytes=eb.optimizer)
            tot["weights"] += float(w)
            tot["gradients"] += float(gr)
            tot["optimizer"] += float(o)
    return tot, params


def _fsdp_units(model: ModelSpec, layout: Layout, ch: Chunk):
    """FSDP2 units of a chunk: one per layer, and the chunk root (embedding, final norm, output)."""
    pd, pe = local_params(model, layout, ch)
    one = replace(layout, pp=1, vpp=1, schedule="1f1b")
    layers = []
    for i in ch.layers:
        d, e = local_params(model, one, Chunk(0, [i], False, False))
        layers.append(d + e)
    return layers, pd + pe - sum(layers)


def stage_collectives(model: ModelSpec, layout: Layout, chunks, eb: ElementBytes, st: StageCounts):
    m = model
    tp, cp, dp, pp, ep = layout.tp, layout.cp, layout.dp, layout.pp, layout.ep
    sp = layout.sp and tp > 1
    zero = layout.zero
    nmb = layout.global_batch // (dp * layout.micro_batch)
    T, Ts = _tokens(layout)
    h, e = m.hidden, eb.act
    full = layout.recompute == "full"
    act = T * h * e                       # one [micro-batch, s/cp, h] activation
    n_reduce = nmb if zero == 2 else 1    # gradient-reduction events per step and chunk
    for ch in chunks:
        nl = len(ch.layers)
        n_moe = sum(is_moe_layer(m, i) for i in ch.layers)
        # ---- tensor parallel: Megatron's f/g pairs, two per layer (Shoeybi et al. 2019 fig. 4),
        # each an all-reduce, or under SP an all-gather + reduce-scatter (Korthikanti 2022 sec. 4.2.2);
        # forward, backward, and forward again under full recompute (costmodel.py rec_comm)
        if tp > 1:
            per = sum(tp_collectives_per_layer(m, is_moe_layer(m, i)) for i in ch.layers)
            per *= nmb * (2 + (1 if full else 0))
            if sp:
                st.add("tp", "all_gather", per, act)
                st.add("tp", "reduce_scatter", per, act)
            else:
                st.add("tp", "all_reduce", per, act)
            if ch.first:   # vocab-parallel embedding: partial sums reduced (fwd); SP all-gathers the grad
                if sp:
                    st.add("tp", "reduce_scatter", nmb, act)
                    st.add("tp", "all_gather", nmb, act)
                else:
                    st.add("tp", "all_reduce", nmb, act)
            if ch.last:    # output layer input gathered (fwd) / its gradient reduced (bwd)
                if sp:
                    st.add("tp", "all_gather", nmb, act)
                    st.add("tp", "reduce_scatter", nmb, act)
                else:
                    st.add("tp", "all_reduce", nmb, act)
                # vocab-parallel cross entropy: max, sum of exponentials and target logit, one
                # value per token (Megatron fused_vocab_parallel_cross_entropy; torch loss_parallel)
                st.add("tp", "all_reduce", 3 * nmb, T * e)
            if sp:
                # sequence-parallel norm weights: gradients are partial sums over tp, all-reduced
                # once per reduction (Megatron finalize_model_grads _allreduce_layernorm_grads)
                n_norm = nl * m.norm_params() + (h * (2 if m.bias else 1) if ch.last else 0)
                st.add("tp", "all_reduce", n_reduce, n_norm * eb.grad_reduce)
        # ---- context parallel: ring of K,V (costmodel.py cp p2p: cp-1 forward, 2(cp-1) backward,
        # and the forward again when recompute replays the attention core)
        if cp > 1:
            kv = 2 * T * m.kv_heads * m.head_dim / tp * e
            n = nl * nmb * (cp - 1) * (3 + (1 if layout.recompute != "none" else 0))
            st.add("cp", "send", n, kv)
            st.add("cp", "recv", n, kv)
        # ---- expert parallel: dispatch + combine all-to-all, forward and backward (costmodel.py
        # ep_f), plus the all-gather of tokens per expert (Megatron MoEAlltoAllTokenDispatcher)
        if ep > 1 and n_moe:
            k = m.moe.top_k
            st.add("ep", "all_to_all", n_moe * nmb * (4 + (2 if full else 0)), T / tp * k * h * e)
            st.add("ep", "all_gather", n_moe * nmb * (1 + (1 if full else 0)),
                   ep * m.moe.experts * INDEX_BYTES)
        # ---- pipeline: one activation per boundary and micro-batch each way (costmodel.py p2p_bytes)
        if pp > 1:
            p2p = (Ts if sp else T) * h * e
            if not ch.first:
                st.add("pp", "recv", nmb, p2p)
                st.add("pp", "send", nmb, p2p)
            if not ch.last:
                st.add("pp", "send", nmb, p2p)
                st.add("pp", "recv", nmb, p2p)
            if m.tied_embeddings and (ch.first or ch.last):
                # the two copies of the tied embedding: gradients all-reduced between first and
                # last stage (Megatron _allreduce_embedding_grads)
                st.add("embd", "all_reduce", n_reduce, m.embedding_params() / tp * eb.grad_reduce)
        # ---- data parallel (memory.py / costmodel.py dp_times semantics)
        pd, pe = local_params(m, layout, ch)
        G = dp * cp
        Ge = tp * cp * dp // ep
        if zero == 3:
            if G > 1:
                layers, root = _fsdp_units(m, layout, ch)
                # FSDP2: each layer gathered before forward and again before backward, the root
                # once (it is not resharded after forward); every unit reduce-scattered
                st.add("dp", "all_gather", nmb * (2 * len(layers) + 1), 0,
                       total=nmb * (2 * sum(layers) + root) * eb.param_gather)
                st.add("dp", "reduce_scatter", nmb * (len(layers) + 1), 0,
                       total=nmb * (sum(layers) + root) * eb.grad_reduce)
            continue
        for p, g, label in ((pd, G, "dp"), (pe, Ge, "edp")):
            if not p or g <= 1:
                continue
            if zero == 0:
                st.add(label, "all_reduce", 1, p * eb.grad_reduce)
                continue
            padded = math.ceil(p / g) * g   # buffer padded to a multiple of the group (Megatron)
            st.add(label, "reduce_scatter", n_reduce, padded * eb.grad_reduce)
            st.add(label, "all_gather", 1, padded * eb.param_gather)


def layer_activations(model: ModelSpec, layout: Layout, moe_layer: bool, eb: ElementBytes) -> dict:
    """Bytes one layer saves for backward per micro-batch: the planner's memory.py formula
    (bf16 activations, fp32 statistics) converted to the run's element sizes, plus the terms a
    measurement sees that the formula leaves out (`deltas`, each with its source)."""
    m = replace(model, dropout=False)   # validate trains without dropout (deterministic)
    T, Ts = _tokens(layout)
    tp, sp = layout.tp, layout.sp and layout.tp > 1
    rec = RECOMPUTE.index(layout.recompute)
    a2, c4 = M.ACT_BYTES, 4.0           # memory.py's bytes per activation / per statistic
    conv = eb.act / a2
    if rec == 2:
        # full recompute keeps the layer input (memory.py layer_activation_bytes, Korthikanti 4.2.2)
        kept, _ = M.layer_activation_bytes(m, T, tp, sp, 2, moe_layer, True, layout.seq_len)
        return {"planner": float(kept) * conv, "deltas": {}}
    attn, core = M.attention_activation_bytes(m, T, tp, sp, True)                 # memory.py
    planner = float(attn) * conv + float(core) * eb.stat / c4
    if moe_layer:
        mo = M.moe_activation_bytes(m, T, tp, sp)                                  # memory.py
        # its fp32 router-probability term, taken apart from the bf16 ones
        se = m.moe.shared_experts * m.moe.shared_expert_ffn_hidden
        probs = float(M.moe_activation_bytes(m, T, tp, sp, imbalance=0.0)
                      - M.mlp_activation_bytes(m, T, tp, sp, ffn=se))
        planner += (float(mo) - probs) * conv + probs * eb.stat / c4
    else:
        planner += float(M.mlp_activation_bytes(m, T, tp, sp)) * conv           # memory.py
    if rec == 1:
        # memory.py keeps the attention core under selective recompute when flash attention is
        # on (`np.where(flash, core, 0.0)`); Megatron's selective recompute checkpoints the core
        # attention (--recompute-granularity selective, modules core_attn), so its log-sum-exp is
        # not kept. Counted here as the implementation does; reported to the planner's owner.
        planner -= float(core) * eb.stat / c4
    deltas = {}
    # norm statistics: TE's fused RMSNorm keeps rstd, LayerNorm mean and rstd (fp32), one per
    # token; Korthikanti et al. count only the norm input
    deltas["norm_statistics"] = 2 * Ts * (2 if m.bias else 1) * eb.stat
    if sp:
        # PyTorch's ColwiseParallel keeps the all-gathered input (the whole sequence) for the
        # weight gradient; Megatron keeps the shard and all-gathers again in backward
        # (megatron/core/tensor_parallel/layers.py LinearWithGradAccumulationAndAsyncCommunication)
        deltas["sp_gathered_inputs"] = (1 if moe_layer else 2) * (T - Ts) * m.hidden * eb.act
    if moe_layer:
        k = m.moe.top_k
        tk = T / tp * k
        # the expert outputs and their routing probabilities are kept for the probability
        # gradient (Megatron moe_utils.unpermute: probs * tokens)
        deltas["moe_weighted_outputs"] = tk * (m.hidden + 1) * eb.act
        # int64 routing indices: top-k choice, sort order, token of each copy; with EP also the
        # regrouping of received tokens by expert and its inverse
        deltas["moe_indices"] = (3 * tk + (2 * tk if layout.ep > 1 else 0)) * INDEX_BYTES
    return {"planner": planner, "deltas": deltas}


# ---------------------------------------------------------------------------------------------
def predict(model: ModelSpec, layout: Layout, eb: ElementBytes | None = None) -> list:
    """Counts for every pipeline stage (index = pp rank)."""
    check(model, layout)
    eb = eb or ElementBytes()
    out = []
    for r in range(layout.pp):
        chunks = chunks_of(model, layout, r)
        layers = [i for c in chunks for i in c.layers]
        st = StageCounts(stage=r, chunks=chunks, layers=layers,
                         moe_layers=[i for i in layers if is_moe_layer(model, i)])
        st.flops = stage_flops(model, layout, chunks)
        st.state, st.params = stage_state(model, layout, chunks, eb)
        stage_collectives(model, layout, chunks, eb, st)
        for i in layers:
            t = layer_activations(model, layout, is_moe_layer(model, i), eb)
            st.activation_terms[i] = t
            st.activations[i] = t["planner"] + sum(t["deltas"].values())
        out.append(st)
    return out
