"""MLPs, routed experts, the transformer block and one pipeline rank's stage, on fakemodel's
linears and attention."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed import _functional_collectives as fc

from .fakemodel import MLA, Attention, Ctx, Linear, Shape, norm

_ACT = {"swiglu": F.silu, "geglu": lambda x: F.gelu(x, approximate="tanh"),
        "gelu": lambda x: F.gelu(x, approximate="tanh"), "relu2": lambda x: torch.square(F.relu(x))}


class FeedForward(nn.Module):
    """Gated (w2(act(w1 x) * w3 x), Shazeer 2020) or plain (w2(act(w1 x))) MLP."""

    def __init__(self, s: Shape, ffn: int, tp_split: bool = True):
        super().__init__()
        col, row = ("col", "row") if tp_split else ("rep", "rep")
        self.act, self.gated = _ACT[s.mlp], s.gated
        self.w1 = Linear(s.hidden, ffn, s.bias, col)
        self.w2 = Linear(ffn, s.hidden, s.bias, row)
        if s.gated:
            self.w3 = Linear(s.hidden, ffn, s.bias, col)

    def forward(self, x):
        if self.gated and Ctx.tp_mode == "megatron":
            return self.w2(_FusedGLU.apply(self.w1(x), self.w3(x)))
        if self.gated:
            return self.w2(self.act(self.w1(x)) * self.w3(x))
        return self.w2(self.act(self.w1(x)))


class _FusedGLU(torch.autograd.Function):
    """Megatron-Core's fused SwiGLU (fusions/fused_bias_swiglu.py): saves the fc1 output (gate and
    up halves) and recomputes the activation in backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.empty_like(gate)

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        return torch.empty_like(gate), torch.empty_like(up)


class GroupedExperts(nn.Module):
    """The rank's local experts as stacked weights run by torch._grouped_mm (bf16 only on CPU)."""

    def __init__(self, s: Shape, local: int):
        super().__init__()
        self.local, self.act, self.gated = local, _ACT[s.mlp], s.gated
        self.w1 = nn.Parameter(torch.empty(local, s.hidden, s.moe_ffn))
        self.w2 = nn.Parameter(torch.empty(local, s.moe_ffn, s.hidden))
        if s.gated:
            self.w3 = nn.Parameter(torch.empty(local, s.hidden, s.moe_ffn))

    def forward(self, x):
        offs = torch.arange(1, self.local + 1, dtype=torch.int32, device=x.device) * (x.shape[0] // self.local)
        h = torch._grouped_mm(x, self.w1, offs=offs)
        if self.gated and Ctx.tp_mode == "megatron":      # TEGroupedMLP with the fused SwiGLU
            h = _FusedGLU.apply(h, torch._grouped_mm(x, self.w3, offs=offs))
        elif self.gated:
            h = self.act(h) * torch._grouped_mm(x, self.w3, offs=offs)
        else:
            h = self.act(h)
        return torch._grouped_mm(h, self.w2, offs=offs)


class MoE(nn.Module):
    """Top-k routing over E experts, E/ep on this rank, on the rank's (SP-sharded) tokens. Routing
    values are fake, so data-dependent shapes are replaced by a balanced split: each rank runs
    T*k token copies after a shape-preserving all-to-all (the dropless balanced case)."""

    def __init__(self, s: Shape):
        super().__init__()
        self.s = s
        self.gate = nn.Linear(s.hidden, s.experts, bias=False)
        self.experts = GroupedExperts(s, s.experts // Ctx.ep)
        # shared experts: TP-split in Megatron-Core (on the SP shard's gathered tokens); replicated
        # here in dtensor mode, where the MoE block runs on plain local tensors
        self.shared = FeedForward(s, s.shared_ffn * s.shared_experts, tp_split=Ctx.tp_mode == "megatron") \
            if s.shared_experts else None

    def forward(self, x):
        if hasattr(x, "to_local"):
            x = x.to_local()
        shp = x.shape
        x = x.reshape(-1, shp[-1])
        logits = self.gate(x).float()
        scores = torch.sigmoid(logits) if self.s.mla else F.softmax(logits, -1)
        w, idx = torch.topk(scores, self.s.top_k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        order = torch.argsort(idx.flatten(), stable=True)
        tok = order // self.s.top_k
        xr = x.index_select(0, tok)
        if Ctx.ep > 1:
            xr = _AllToAll.apply(xr)
        y = self.experts(xr)
        if Ctx.ep > 1:
            y = _AllToAll.apply(y)
        y = y * w.flatten().index_select(0, order).unsqueeze(-1)
        # combine by scatter_add (Megatron moe_utils.unpermute, torchtitan moe.py): keeps only the
        # index (index_add would keep its source for backward)
        out = torch.zeros_like(x).scatter_add(0, tok.unsqueeze(-1).expand(-1, x.shape[-1]), y).view(shp)
        if self.shared is not None:
            out = out + self.shared(x.view(shp))
        return out


class _AllToAll(torch.autograd.Function):
    """The token dispatcher's all-to-all, saving nothing (Megatron-Core tensor_parallel/mappings.py
    _AllToAll; torch's all_to_all_single_autograd keeps a reference the real dispatchers do not)."""

    @staticmethod
    def forward(ctx, x):
        return fc.wait_tensor(fc.all_to_all_single(x.contiguous(), None, None, Ctx.ep_group))

    @staticmethod
    def backward(ctx, g):
        return fc.wait_tensor(fc.all_to_all_single(g.contiguous(), None, None, Ctx.ep_group))


class Block(nn.Module):
    def __init__(self, s: Shape, layer_id: int):
        super().__init__()
        self.attention_norm = norm(s)
        self.attention = MLA(s) if s.mla else Attention(s)
        self.ffn_norm = norm(s)
        self.moe = bool(s.experts) and layer_id >= s.dense_layers
        self.feed_forward = MoE(s) if self.moe else FeedForward(s, s.ffn)

    def forward(self, x, cs):
        h = x + self.attention(self.attention_norm(x), cs)
        return h + self.feed_forward(self.ffn_norm(h))


class Stage(nn.Module):
    """One pipeline rank's modules (torchtitan's model-part layout): its layers, the embedding on
    the first stage, final norm and output layer on the last."""

    def __init__(self, s: Shape, layer_ids, first: bool, last: bool, seq: int):
        super().__init__()
        self.s = s
        vocab_kind = "col" if Ctx.tp_mode == "megatron" and Ctx.tp > 1 else "rep"
        self.tok_embeddings = nn.Embedding(s.vocab // (Ctx.tp if vocab_kind == "col" else 1), s.hidden) \
            if first else None
        self.layers = nn.ModuleDict({str(i): Block(s, i) for i in layer_ids})
        self.norm = norm(s) if last else None
        # tied embeddings on a single stage: the output layer is the embedding (Megatron-Core
        # shares the weight; with a pipeline the last stage holds its own copy)
        self.tied = s.tied and first and last and Ctx.tp_mode == "megatron"
        self.output = Linear(s.hidden, s.vocab, False, "col") if last and not self.tied else None
        rd = s.mla.qk_rope_head_dim if s.mla else s.head_dim
        self.register_buffer("rope_cs", torch.empty(seq, rd), persistent=False)   # cos | sin halves
        self.offload = frozenset()         # layer ids whose saved activations leave the device

    def embed(self, ids):
        x = self.tok_embeddings(ids)
        if Ctx.tp_mode == "megatron" and Ctx.tp > 1:   # vocab-parallel embedding (VocabParallelEmbedding)
            from .fakemodel import _RowFn
            x = _RowFn.apply(x)
        return x

    def forward(self, x):
        if self.tok_embeddings is not None:
            x = self.embed(x)
        cs = self.rope_cs
        for i, layer in self.layers.items():
            off = int(i) in self.offload
            with torch.autograd.graph.saved_tensors_hooks(_offload, _reload) if off else nullcontext():
                x = layer(x, cs)
        if self.tied:
            from .fakemodel import _LinearFn
            return _LinearFn.apply(self.norm(x), self.tok_embeddings.weight, None, "col" if Ctx.tp > 1 else "rep")
        if self.output is not None:
            x = self.output(self.norm(x))
        return x


def _is_weight(t) -> bool:
    return isinstance(t, nn.Parameter) or isinstance(getattr(t, "_base", None), nn.Parameter)


def _offload(t):
    """Activation offloading as Transformer Engine's cpu_offload does it (a saved-tensors hook,
    weights left alone): the saved activation leaves the device; only its shape is kept, since on
    fake tensors the host copy's bytes are all that matter."""
    if _is_weight(t):
        return t
    return (tuple(t.shape), t.stride(), t.dtype, t.device)


def _reload(p):
    """Back on the device for the layer's backward: a new tensor of the saved shape."""
    if isinstance(p, torch.Tensor):
        return p
    shape, stride, dtype, device = p
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


class _VocabParallelCE(torch.autograd.Function):
    """Megatron-Core vocab-parallel cross entropy (tensor_parallel/cross_entropy.py): the bf16
    logits are cast to fp32, exponentiated in place and saved; backward turns that buffer into the
    gradient in place, which autograd casts back to the logits' dtype."""

    @staticmethod
    def forward(ctx, logits, labels):
        f = logits.float()
        ctx.save_for_backward(f)
        return f.new_empty(())

    @staticmethod
    def backward(ctx, g):
        (f,) = ctx.saved_tensors
        return f, None


def loss_of(out, labels):
    """The stack's loss on the last stage's logits."""
    if Ctx.tp_mode == "megatron":
        return _VocabParallelCE.apply(out, labels)
    return F.cross_entropy(out.float().flatten(0, 1), labels.flatten(0, 1))   # torchtitan cross_entropy_loss
