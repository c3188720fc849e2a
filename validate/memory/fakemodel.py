"""The transformer one pipeline rank holds, built from a planner ModelSpec for the memory run:
embedding on the first stage, norm, output layer and loss on the last, RMSNorm or LayerNorm, GQA
or MLA attention (DeepSeek-V3 sec. 2.1.1), gelu / relu2 / gated MLPs, and routed + shared experts.

Two tensor-parallel forms, chosen by the stack the run emulates (Ctx.tp_mode):
- "dtensor": global-shape nn.Linear layers that parallelize.apply_dtensor_tp shards with
  torch.distributed.tensor.parallel, as torchtitan does (ColwiseParallel keeps the all-gathered
  input of each column-parallel linear under SP);
- "megatron": local-shape layers that gather the sequence-parallel input in forward and again in
  backward, keeping only the shard (Megatron-Core tensor_parallel/layers.py
  LinearWithGradAccumulationAndAsyncCommunication), and Megatron's vocab-parallel cross entropy
  (tensor_parallel/cross_entropy.py: fp32 softmax saved, gradient computed in place).

Values are never read (fake tensors have none); only shapes, dtypes and lifetimes matter."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed import _functional_collectives as fc

from planner.model_spec import ModelSpec


class Ctx:
    """Run-time facts the modules read, set once per process by measure.build."""
    tp_mode = "dtensor"        # dtensor (torchtitan) | megatron
    tp = 1
    tp_group = None
    sp = False
    cp = 1
    cp_group = None
    ep = 1
    ep_group = None
    selective = "none"         # "core": Megatron selective (core attention recomputed); else none


@dataclass(frozen=True)
class Shape:
    """What the fake model needs of a ModelSpec."""
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    mlp: str
    bias: bool
    tied: bool
    experts: int = 0
    top_k: int = 0
    moe_ffn: int = 0
    shared_experts: int = 0
    shared_ffn: int = 0
    dense_layers: int = 0
    mla: object = None         # planner.model_spec.MLASpec

    @staticmethod
    def of(m: ModelSpec) -> "Shape":
        moe = m.moe
        return Shape(m.layers, m.hidden, m.ffn_hidden, m.heads, m.kv_heads, m.head_dim, m.vocab, m.mlp, m.bias,
                     m.tied_embeddings, experts=moe.experts if moe else 0, top_k=moe.top_k if moe else 0,
                     moe_ffn=moe.expert_ffn_hidden if moe else 0, shared_experts=moe.shared_experts if moe else 0,
                     shared_ffn=moe.shared_expert_ffn_hidden if moe else 0,
                     dense_layers=moe.dense_layers if moe else m.layers, mla=m.mla)

    @property
    def gated(self) -> bool:
        return self.mlp in ("swiglu", "geglu")


# ------------------------------------------------------------------------------------ collectives
def _gather_seq(t):
    return fc.wait_tensor(fc.all_gather_tensor(t.contiguous(), 1, Ctx.tp_group))


def _scatter_seq(t):
    return fc.wait_tensor(fc.reduce_scatter_tensor(t.contiguous(), "sum", 1, Ctx.tp_group))


def _all_reduce(t):
    return fc.wait_tensor(fc.all_reduce(t, "sum", Ctx.tp_group))


class _LinearFn(torch.autograd.Function):
    """Megatron-Core's linear (tensor_parallel/layers.py LinearWithGradAccumulationAndAsync-
    Communication): a column-parallel one all-gathers its SP shard in forward and again in
    backward, keeping only the shard, and reduce-scatters (all-reduces without SP) the input
    gradient; the weight gradient is accumulated straight into the fp32 main_grad buffer
    (gradient-accumulation fusion: no bf16 .grad is made)."""

    @staticmethod
    def forward(ctx, x, w, b, kind):
        full = _gather_seq(x) if kind == "col" and Ctx.sp else x
        ctx.save_for_backward(x, w)
        ctx.has_bias, ctx.kind = b is not None, kind
        return F.linear(full, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        col = ctx.kind == "col"
        full = _gather_seq(x) if col and Ctx.sp else x
        gx = g @ w
        g2, f2 = g.flatten(0, -2), full.flatten(0, -2)
        if hasattr(w, "main_grad"):
            w.main_grad.addmm_(g2.t(), f2)      # in place: bf16 operands, fp32 accumulation
            gw = None
        else:
            gw = g2.t() @ f2
        if col:
            gx = _scatter_seq(gx) if Ctx.sp else _all_reduce(gx)
        return gx, gw, (g2.sum(0) if ctx.has_bias else None), None


class _RowFn(torch.autograd.Function):
    """Megatron row-parallel linear's reduction: reduce-scatter to the SP shard (or all-reduce)."""

    @staticmethod
    def forward(ctx, y):
        return _scatter_seq(y) if Ctx.sp else _all_reduce(y)

    @staticmethod
    def backward(ctx, g):
        return _gather_seq(g) if Ctx.sp else g


def Linear(fan_in: int, fan_out: int, bias: bool, kind: str = "rep") -> nn.Module:
    """nn.Linear in dtensor mode (global shape, sharded later by parallelize_module); a Megatron
    linear (local shard, fused weight-gradient accumulation) in megatron mode."""
    if Ctx.tp_mode == "megatron":
        return MegatronLinear(fan_in, fan_out, bias, kind if Ctx.tp > 1 else "rep")
    return nn.Linear(fan_in, fan_out, bias=bias)


class MegatronLinear(nn.Module):
    """kind "col" splits the output features over tp, "row" the input features, "rep" neither."""

    def __init__(self, fan_in: int, fan_out: int, bias: bool, kind: str):
        super().__init__()
        self.kind = kind
        out = fan_out // Ctx.tp if kind == "col" else fan_out
        inp = fan_in // Ctx.tp if kind == "row" else fan_in
        self.weight = nn.Parameter(torch.empty(out, inp))
        self.bias = nn.Parameter(torch.empty(out)) if bias else None

    def forward(self, x):
        if self.kind != "row":
            return _LinearFn.apply(x, self.weight, self.bias, self.kind)
        y = _RowFn.apply(_LinearFn.apply(x, self.weight, None, "row"))
        return y + self.bias if self.bias is not None else y


# -------------------------------------------------------------------------------------- norms
class _FusedRMSNormFn(torch.autograd.Function):
    """The fused RMSNorm kernel's saved tensors (input + fp32 rstd per row; torch._fused_rms_norm,
    Transformer Engine, Apex). On fake tensors F.rms_norm always decomposes (x.float(), pow, mean,
    rsqrt, mul, to) and keeps two fp32 copies of the input that a GPU run does not."""

    @staticmethod
    def forward(ctx, x, w, eps):
        rstd = torch.empty(x.shape[:-1] + (1,), dtype=torch.float32, device=x.device)
        ctx.save_for_backward(x, w, rstd)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, g):
        x, w, _ = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(w), None


class RMSNorm(nn.RMSNorm):
    def forward(self, x):
        from torch.distributed.tensor import DTensor
        if isinstance(x, DTensor):     # SequenceParallel: the stand-in on the local shards
            w = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight
            loc = _FusedRMSNormFn.apply(x.to_local(), w, self.eps)
            return DTensor.from_local(loc, x.device_mesh, x.placements, run_check=False)
        return _FusedRMSNormFn.apply(x, self.weight, self.eps)


def norm(s: Shape, dim: int | None = None):
    d = dim or s.hidden
    return nn.LayerNorm(d, bias=True) if s.bias else RMSNorm(d, eps=1e-5)


# ------------------------------------------------------------------------------------ attention
class _RopeFn(torch.autograd.Function):
    """Rotary embedding (Su et al. 2021 eq. 34) as the fused kernels run it (TE
    fused_apply_rotary_pos_emb; torchtitan's complex multiply by a constant): nothing of the input
    is saved, backward rotates the gradient back with the same table."""

    @staticmethod
    def forward(ctx, x, cs):
        ctx.save_for_backward(cs)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, g):
        return torch.empty_like(g), None


def rope(x, cs):
    return _RopeFn.apply(x, cs)


def _cp_gather(t):
    """Context parallelism: K/V of the whole sequence, all-gathered over the cp group (Llama 3
    sec. 3.3.2 all-gather CP; the ring's peak keeps the same K/V bytes in flight)."""
    if Ctx.cp == 1:
        return t
    return fc.all_gather_tensor_autograd(t.contiguous(), gather_dim=1, group=Ctx.cp_group)


def _core(q, k, v, scale):
    """SDPA on [b, s, heads, d]: the CPU flash kernel on fake CPU tensors keeps out + fp32
    logsumexp like FlashAttention-2. MLA's v head dim differs from q's, which would send SDPA to
    the math kernel (s x s scores): v is padded to q's head dim, as flash-attn users do."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    dv = v.shape[-1]
    if dv != q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1], scale=scale)
    return o[..., :dv].transpose(1, 2).contiguous().flatten(2)


class _FlashFn(torch.autograd.Function):
    """Megatron's attention through TE / flash-attn: the kernel reads and writes [b, s, heads, d]
    and saves q, k, v, its output and the fp32 log-sum-exp (FlashAttention-2 alg. 1); the output
    projection's input is that same output tensor, with no layout copy."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype).flatten(2)
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attend(q, k, v, scale):
    if Ctx.tp_mode == "megatron":
        return _FlashFn.apply(q, k, v)
    return _core(q, k, v, scale)


def core_attention(q, k, v, scale=None):
    if Ctx.selective == "core":       # Megatron --recompute-granularity selective (core_attn)
        from torch.utils.checkpoint import checkpoint
        return checkpoint(_attend, q, k, v, scale, use_reentrant=False)
    return _attend(q, k, v, scale)


class Attention(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.s, hd = s, s.head_dim
        self.wq = Linear(s.hidden, s.heads * hd, s.bias, "col")
        self.wk = Linear(s.hidden, s.kv_heads * hd, s.bias, "col")
        self.wv = Linear(s.hidden, s.kv_heads * hd, s.bias, "col")
        self.wo = Linear(s.heads * hd, s.hidden, s.bias, "row")

    def forward(self, x, cs):
        hd = self.s.head_dim
        q, k, v = (w(x) for w in (self.wq, self.wk, self.wv))
        b, n = q.shape[0], q.shape[1]
        q, k, v = q.view(b, n, -1, hd), k.view(b, n, -1, hd), v.view(b, n, -1, hd)
        q, k = rope(q, cs), rope(k, cs)
        return self.wo(core_attention(q, _cp_gather(k), _cp_gather(v)))


class MLA(nn.Module):
    """DeepSeek-V3 multi-head latent attention in its training form (no weight absorption)."""

    def __init__(self, s: Shape):
        super().__init__()
        m, self.s = s.mla, s
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank:
            self.wq_a = Linear(s.hidden, m.q_lora_rank, False)
            self.q_norm = RMSNorm(m.q_lora_rank, eps=1e-6)
            self.wq_b = Linear(m.q_lora_rank, s.heads * qk, False, "col")
        else:
            self.wq = Linear(s.hidden, s.heads * qk, False, "col")
        self.wkv_a = Linear(s.hidden, m.kv_lora_rank + m.qk_rope_head_dim, False)
        self.kv_norm = RMSNorm(m.kv_lora_rank, eps=1e-6)
        self.wkv_b = Linear(m.kv_lora_rank, s.heads * (m.qk_nope_head_dim + m.v_head_dim), False, "col")
        self.wo = Linear(s.heads * m.v_head_dim, s.hidden, False, "row")

    def forward(self, x, cs):
        # Megatron-Core multi_latent_attention.py: the down-projections run on the SP shard, the
        # column-parallel up-projections gather the compressed latents, the rope part of the
        # keys is gathered whole, and q, k, v are made contiguous for the attention kernel
        m = self.s.mla
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        q = self.wq_b(self.q_norm(self.wq_a(x))) if m.q_lora_rank else self.wq(x)
        b, n = q.shape[0], q.shape[1]
        q_nope, q_pe = torch.split(q.view(b, n, -1, qk), [m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        q = torch.cat([q_nope, rope(q_pe, cs)], dim=-1)
        kv, k_pe = torch.split(self.wkv_a(x), [m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        if Ctx.tp_mode == "megatron" and Ctx.sp:
            k_pe = _GatherOnce.apply(k_pe)
        k_pe = rope(k_pe.unsqueeze(2), cs)
        kv = self.wkv_b(self.kv_norm(kv)).view(b, n, -1, m.qk_nope_head_dim + m.v_head_dim)
        k_nope, v = torch.split(kv, [m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        if Ctx.tp_mode == "megatron":
            v = v.contiguous()
        k = torch.cat([k_nope, k_pe.expand(-1, -1, k_nope.shape[2], -1)], dim=-1)
        return self.wo(core_attention(q, _cp_gather(k), _cp_gather(v), scale=qk ** -0.5))


class _GatherOnce(torch.autograd.Function):
    """All-gather an SP-sharded tensor needed whole (MLA's rope keys); backward reduce-scatters;
    nothing saved."""

    @staticmethod
    def forward(ctx, x):
        return _gather_seq(x)

    @staticmethod
    def backward(ctx, g):
        return _scatter_seq(g)
