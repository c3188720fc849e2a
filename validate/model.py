"""The transformer that validation trains: a decoder-only model built from a planner ModelSpec.

Layer structure and parameter counts match planner/model_spec.py term by term (checked by
tests/test_validate_model.py): Q/K/V/O projections with GQA, RMSNorm (LayerNorm with biases
when the spec has biases), a plain (gelu, relu2) or gated (swiglu, geglu) MLP, or an MoE block
with a router, top-k routed experts and shared experts. Rotary position embeddings carry no
parameters.

Every parameter is initialised from its global name (seed + crc32(name)), so any subset of the
model -- a pipeline stage, the local experts of an EP rank -- starts from exactly the weights the
single-process reference has. Dropout is not built: validation must be deterministic, so the
counts it is compared against use the spec with dropout=False.

Saved activations follow Megatron-Core's fused kernels so that they can be held against
planner/memory.py: the norms save their input and statistics only (TE fused RMSNorm/LayerNorm),
the gated activation saves its two inputs only (megatron/core/fusions/fused_bias_swiglu.py), and
the attention core saves q, k, v, its output (shared with the output projection's input) and the
log-sum-exp (FlashAttention-2).
"""
from __future__ import annotations

import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint, set_checkpoint_early_stop

from . import phases

aten = torch.ops.aten
INIT_STD = 0.02
ROPE_BASE = 10000.0


def checkpoint(fn, *args):
    """Activation recompute as Megatron does it: the whole region is replayed in backward
    (torch's non-reentrant checkpoint would otherwise stop replaying once the tensors backward
    needs exist, skipping the region's last GEMM and collective)."""
    with set_checkpoint_early_stop(False):
        return _checkpoint(fn, *args, use_reentrant=False, context_fn=phases.recompute_contexts)


# ---------------------------------------------------------------------------------------------
# initialisation by global name
def init_tensor(name: str, shape, kind: str, seed: int, dtype, device="cpu") -> torch.Tensor:
    """A parameter's initial value, a function of (seed, name) only."""
    if kind == "ones":
        return torch.ones(shape, dtype=dtype, device=device)
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype, device=device)
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
    return (torch.randn(shape, generator=g, dtype=torch.float64) * INIT_STD).to(dtype).to(device)


class Init:
    """Names every parameter globally and initialises it from that name."""

    def __init__(self, seed: int, dtype, device):
        self.seed, self.dtype, self.device = seed, dtype, device

    def param(self, name, shape, kind="normal") -> nn.Parameter:
        return nn.Parameter(init_tensor(name, shape, kind, self.seed, self.dtype, self.device))

    def linear(self, name, fan_in, fan_out, bias) -> nn.Linear:
        lin = nn.Linear(fan_in, fan_out, bias=bias, device="meta")
        lin.weight = self.param(f"{name}.weight", (fan_out, fan_in))
        if bias:
            lin.bias = self.param(f"{name}.bias", (fan_out,), "zeros")
        return lin


# ---------------------------------------------------------------------------------------------
# norms: save input + statistics only (Transformer Engine's fused norms)
class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, w)
        return x * rstd * w

    @staticmethod
    def backward(ctx, g):
        x, rstd, w = ctx.saved_tensors
        xhat = x * rstd
        gw = (g * xhat).sum(dim=tuple(range(g.dim() - 1)))
        gxh = g * w
        gx = rstd * (gxh - xhat * (gxh * xhat).mean(-1, keepdim=True))
        return gx, gw, None


class Norm(nn.Module):
    """RMSNorm, or LayerNorm with a bias when the model has biases (ModelSpec.norm_params)."""

    def __init__(self, init: Init, name: str, hidden: int, bias: bool, eps: float = 1e-5):
        super().__init__()
        self.eps, self.hidden = eps, hidden
        self.weight = init.param(f"{name}.weight", (hidden,), "ones")
        self.bias = init.param(f"{name}.bias", (hidden,), "zeros") if bias else None

    def forward(self, x):
        if self.bias is not None:
            return F.layer_norm(x, (self.hidden,), self.weight, self.bias, self.eps)
        return _RMSNormFn.apply(x, self.weight, self.eps)


# ---------------------------------------------------------------------------------------------
# gated activation: saves its two inputs only (Megatron SwiGLUFunction)
def _act(kind, x):
    if kind in ("swiglu",):
        return F.silu(x)
    if kind in ("geglu", "gelu"):
        return F.gelu(x)
    if kind == "relu2":
        return F.relu(x).square()
    raise ValueError(kind)


class _GatedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u, kind):
        ctx.save_for_backward(g, u)
        ctx.kind = kind
        return _act(kind, g) * u

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        with torch.enable_grad():
            gg = g.detach().requires_grad_(True)
            a = _act(ctx.kind, gg)
            (da,) = torch.autograd.grad(a, gg, grad * u)
        return da, grad * a.detach(), None


class MLP(nn.Module):
    def __init__(self, init: Init, name, hidden, ffn, kind, bias):
        super().__init__()
        self.kind = kind
        self.gated = kind in ("swiglu", "geglu")
        self.w1 = init.linear(f"{name}.w1", hidden, ffn, bias)
        if self.gated:
            self.w3 = init.linear(f"{name}.w3", hidden, ffn, bias)
        self.w2 = init.linear(f"{name}.w2", ffn, hidden, bias)

    def forward(self, x):
        if self.gated:
            y = _GatedFn.apply(self.w1(x), self.w3(x), self.kind)
        else:
            y = _act(self.kind, self.w1(x))
        return self.w2(y)


# ---------------------------------------------------------------------------------------------
# rotary embeddings for the positions this rank holds (no parameters)
class Rope:
    def __init__(self, positions: torch.Tensor, head_dim: int, dtype, device):
        half = head_dim // 2
        inv = 1.0 / (ROPE_BASE ** (torch.arange(half, dtype=torch.float64) / half))
        ang = positions.to(torch.float64)[:, None] * inv[None, :]
        self.cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype).to(device)
        self.sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype).to(device)
        self.half = half

    def tensors(self):
        return (self.cos, self.sin)

    def __call__(self, x):  # x [b, s, heads, d]
        if self.half * 2 != x.shape[-1]:
            return x
        c, s = self.cos[None, :, None, :], self.sin[None, :, None, :]
        x1, x2 = x[..., :self.half], x[..., self.half:]
        return x * c + torch.cat([-x2, x1], -1) * s


# ---------------------------------------------------------------------------------------------
# attention core: flash attention on CPU (aten kernel), ring attention over CP ranks
def _flash_fwd(q, k, v, causal):
    return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)


def _flash_bwd(g, q, k, v, out, lse, causal):
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        g.contiguous(), q, k, v, out, lse, 0.0, causal)


def _merge(out, lse, o, l):
    """Combine two partial softmax results over disjoint key sets (log-sum-exp weights)."""
    if out is None:
        return o, l
    new = torch.logaddexp(lse, l)
    out = out * torch.exp(lse - new).unsqueeze(-1) + o * torch.exp(l - new).unsqueeze(-1)
    return out, new


class RingAttention(torch.autograd.Function):
    """Causal attention over a sequence split into 2*cp chunks, rank r holding chunks r and
    2cp-1-r (Megatron-Core context parallelism, load-balanced). K and V travel around the ring
    cp-1 times forward; backward sends K,V around again and the partial dK,dV of each block back
    to its owner: 2(cp-1) transfers (megatron/core/transformer/dot_product_attention +
    TE AttnFuncWithCPAndKVP2P). With cp = 1 it is plain causal flash attention.

    Inputs q [b, hq, 2c, d], k/v [b, hkv, 2c, d]; returns o [b, 2c, hq, d] (contiguous, so the
    output projection's input is this very tensor)."""

    @staticmethod
    def forward(ctx, q, k, v, cp_group, cp_rank, cp_size, ranks):
        c = q.shape[2] // 2
        out = lse = None
        kv = torch.cat([k, v], 1).contiguous()
        nk = k.shape[1]
        for j, src, kc, vc in _ring_kv(kv, nk, cp_group, cp_rank, cp_size, ranks):
            if j == 0:
                out, lse = _flash_fwd(q, kc, vc, True)
            elif src < cp_rank:
                o, l = _flash_fwd(q, kc[:, :, :c], vc[:, :, :c], False)
                out, lse = _merge(out, lse, o, l)
            else:
                o, l = _flash_fwd(q[:, :, c:], kc, vc, False)
                o2, l2 = _merge(out[:, :, c:], lse[:, :, c:], o, l)
                out = torch.cat([out[:, :, :c], o2], 2)
                lse = torch.cat([lse[:, :, :c], l2], 2)
        o_t = out.transpose(1, 2).contiguous()
        ctx.save_for_backward(q, k, v, o_t, lse)
        ctx.cp = (cp_group, cp_rank, cp_size, ranks)
        return o_t

    @staticmethod
    def backward(ctx, g):
        q, k, v, o_t, lse = ctx.saved_tensors
        cp_group, cp_rank, cp_size, ranks = ctx.cp
        g = g.transpose(1, 2)
        out = o_t.transpose(1, 2)
        c = q.shape[2] // 2
        nk = k.shape[1]
        kv = torch.cat([k, v], 1).contiguous()
        dq = torch.zeros_like(q)
        own = None
        acc_in = None
        for j, src, kc, vc in _ring_kv(kv, nk, cp_group, cp_rank, cp_size, ranks):
            if j == 0:
                dq_, dk_, dv_ = _flash_bwd(g, q, kc, vc, out, lse, True)
                dq += dq_
                own = torch.cat([dk_, dv_], 1)
            else:
                blk = torch.zeros_like(kv)
                if src < cp_rank:
                    dq_, dk_, dv_ = _flash_bwd(g, q, kc[:, :, :c], vc[:, :, :c], out, lse, False)
                    dq += dq_
                    blk[:, :nk, :c] = dk_
                    blk[:, nk:, :c] = dv_
                else:
                    dq_, dk_, dv_ = _flash_bwd(g[:, :, c:], q[:, :, c:], kc, vc, out[:, :, c:],
                                               lse[:, :, c:], False)
                    dq[:, :, c:] += dq_
                    blk[:, :nk] = dk_
                    blk[:, nk:] = dv_
                acc = blk if acc_in is None else acc_in + blk
                # this block's dK,dV travel on with K,V; after the last step they reach the owner
                acc_in = torch.empty_like(kv)
                for r in _ring_exchange(acc, acc_in, cp_group, cp_rank, cp_size, ranks):
                    r.wait()
        dkv = own if acc_in is None else own + acc_in
        return dq, dkv[:, :nk], dkv[:, nk:], None, None, None, None


def _ring_kv(kv, nk, group, rank, size, ranks):
    """The K/V blocks around the ring: yields (step, source rank, K, V) for step 0 .. size-1, the
    next block's exchange in flight while the caller works on this one (Liu et al. 2023 'Ring
    Attention' sec. 3: communication overlapped with the block's attention)."""
    for j in range(size):
        reqs, nxt = None, None
        if j < size - 1:
            nxt = torch.empty_like(kv)
            reqs = _ring_exchange(kv, nxt, group, rank, size, ranks)
        yield j, (rank - j) % size, kv[:, :nk], kv[:, nk:]
        if reqs is not None:
            for r in reqs:
                r.wait()
            kv = nxt


def _ring_exchange(send, recv, group, rank, size, ranks):
    import torch.distributed as dist
    ops = [dist.P2POp(dist.isend, send, ranks[(rank + 1) % size], group),
           dist.P2POp(dist.irecv, recv, ranks[(rank - 1) % size], group)]
    return dist.batch_isend_irecv(ops)


class Attention(nn.Module):
    def __init__(self, init: Init, name, spec, ctx):
        super().__init__()
        h, d = spec.hidden, spec.head_dim
        kv = spec.kv_heads * d
        self.head_dim = d
        self.ctx = ctx
        self.wq = init.linear(f"{name}.wq", h, spec.heads * d, spec.bias)
        self.wk = init.linear(f"{name}.wk", h, kv, spec.bias)
        self.wv = init.linear(f"{name}.wv", h, kv, spec.bias)
        self.wo = init.linear(f"{name}.wo", spec.heads * d, h, spec.bias)

    def core(self, q, k, v):
        cx = self.ctx
        if q.device.type != "cpu":
            # GPU: PyTorch's SDPA kernels (flash / memory-efficient), whose output transposes to
            # a contiguous [b, s, heads, d]; ring attention runs on the CPU kernels only
            if cx.cp_size > 1:
                raise NotImplementedError("context parallelism on GPU")
            rep = q.shape[1] // k.shape[1]
            if rep > 1:
                k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        return RingAttention.apply(q, k, v, cx.cp_group, cx.cp_rank, cx.cp_size, cx.cp_ranks)

    def forward(self, x):
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        b, s = q.shape[0], q.shape[1]
        d = self.head_dim
        q = self.ctx.rope(q.view(b, s, -1, d)).transpose(1, 2)
        k = self.ctx.rope(k.view(b, s, -1, d)).transpose(1, 2)
        v = v.view(b, s, -1, d).transpose(1, 2)
        if self.ctx.recompute == "selective":
            o = checkpoint(self.core, q, k, v)
            phases.note_checkpoint_inputs((q, k, v))
        else:
            o = self.core(q, k, v)
        return self.wo(o.reshape(o.shape[0], o.shape[1], -1))


# ---------------------------------------------------------------------------------------------
# MoE: router, top-k routed experts (EP all-to-all dispatch/combine), shared experts
class _AllToAll(torch.autograd.Function):
    """all_to_all_single with split sizes; backward is the reverse all-to-all (Megatron
    megatron/core/tensor_parallel/mappings.py _AllToAll)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        import torch.distributed as dist
        ctx.meta = (out_splits, in_splits, group)
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits, group = ctx.meta
        return _AllToAll.apply(g, in_splits, out_splits, group), None, None, None


class MoE(nn.Module):
    def __init__(self, init: Init, name, spec, ctx):
        super().__init__()
        m = spec.moe
        self.ctx = ctx
        self.top_k, self.experts_n = m.top_k, m.experts
        self.router = init.linear(f"{name}.router", spec.hidden, m.experts, False)
        per = m.experts // ctx.ep_size
        self.local = list(range(ctx.ep_rank * per, (ctx.ep_rank + 1) * per))
        self.experts = nn.ModuleDict({str(e): MLP(init, f"{name}.experts.{e}", spec.hidden,
                                                  m.expert_ffn_hidden, spec.mlp, spec.bias)
                                      for e in self.local})
        self.shared = nn.ModuleList([MLP(init, f"{name}.shared.{i}", spec.hidden,
                                         m.shared_expert_ffn_hidden, spec.mlp, spec.bias)
                                     for i in range(m.shared_experts)])

    def forward(self, x):
        import torch.distributed as dist
        shape = x.shape
        xt = x.reshape(-1, shape[-1])
        E, k = self.experts_n, self.top_k
        probs = torch.softmax(self.router(xt), dim=-1)
        topv, topi = torch.topk(probs, k, dim=-1)
        flat_e = topi.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        tok = order // k
        permuted = xt.index_select(0, tok)                       # token copies sorted by expert
        counts = torch.bincount(flat_e, minlength=E)
        ep, per = self.ctx.ep_size, E // self.ctx.ep_size
        if ep > 1:
            g = self.ctx.ep_group
            # every rank learns every rank's tokens per expert (Megatron MoEAlltoAllTokenDispatcher
            # gathers num_local_tokens_per_expert over the EP group)
            allc = counts.new_empty(ep * E)
            dist.all_gather_into_tensor(allc, counts, group=g)
            allc = allc.view(ep, E).tolist()
            in_splits = [sum(counts.tolist()[r * per:(r + 1) * per]) for r in range(ep)]
            mine = [row[self.ctx.ep_rank * per:(self.ctx.ep_rank + 1) * per] for row in allc]
            out_splits = [sum(r) for r in mine]
            recv = _AllToAll.apply(permuted, out_splits, in_splits, g)
            # regroup received tokens (source-major) by local expert
            pos = 0
            blocks = []
            for r in range(ep):
                for j in range(per):
                    blocks.append((j, pos, mine[r][j]))
                    pos += mine[r][j]
            idx_by_e = [[] for _ in range(per)]
            for j, p0, cnt in blocks:
                idx_by_e[j].append(torch.arange(p0, p0 + cnt))
            perm = torch.cat([torch.cat(l) if l else torch.empty(0, dtype=torch.long) for l in idx_by_e])
            local_counts = [sum(mine[r][j] for r in range(ep)) for j in range(per)]
            xs = recv.index_select(0, perm.to(recv.device))
        else:
            local_counts = counts.tolist()
            xs = permuted
        outs, p0 = [], 0
        for j, e in enumerate(self.local):
            cnt = local_counts[j]
            outs.append(self.experts[str(e)](xs[p0:p0 + cnt]))
            p0 += cnt
        ys = torch.cat(outs, 0)
        if ep > 1:
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(len(perm))
            ys = ys.index_select(0, inv.to(ys.device))
            ys = _AllToAll.apply(ys, in_splits, out_splits, self.ctx.ep_group)
        # weight by the routing probabilities and sum each token's k copies (Megatron moe_utils
        # unpermute: probs * tokens, then scatter_add, which keeps only the index)
        w = topv.reshape(-1).index_select(0, order).unsqueeze(-1)
        y = torch.zeros_like(xt).scatter_add(0, tok[:, None].expand(-1, xt.shape[1]), ys * w)
        for s in self.shared:
            y = y + s(xt)
        return y.view(shape)


# ---------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, init: Init, idx: int, spec, ctx):
        super().__init__()
        name = f"layers.{idx}"
        self.idx = idx
        self.moe_layer = spec.moe is not None and idx >= spec.moe.dense_layers
        self.attn_norm = Norm(init, f"{name}.attn_norm", spec.hidden, spec.bias)
        self.attn = Attention(init, f"{name}.attn", spec, ctx)
        self.mlp_norm = Norm(init, f"{name}.mlp_norm", spec.hidden, spec.bias)
        self.mlp = (MoE(init, f"{name}.mlp", spec, ctx) if self.moe_layer else
                    MLP(init, f"{name}.mlp", spec.hidden, spec.ffn_hidden, spec.mlp, spec.bias))

    def forward(self, x):
        h = x + self.attn(self.attn_norm(x))
        return h + self.mlp(self.mlp_norm(h))


class Head(nn.Module):
    """Final norm and output projection (the embedding's weight when tied)."""

    def __init__(self, init: Init, spec, embed: nn.Embedding | None):
        super().__init__()
        self.norm = Norm(init, "norm", spec.hidden, spec.bias)
        self.tied = spec.tied_embeddings
        self.embed = [embed]  # not a submodule: the embedding owns its weight
        if self.tied and embed is None:
            # pipeline: the last stage keeps its own copy of the embedding (Megatron-Core
            # shared_embedding_or_output_weight), its gradient all-reduced with the first stage's
            self.output = init.linear("embed", spec.hidden, spec.vocab, False)
        elif not self.tied:
            self.output = init.linear("output", spec.hidden, spec.vocab, False)
        else:
            self.output = None

    def forward(self, x):
        x = self.norm(x)
        if self.output is not None:
            return self.output(x)
        return self.tied_logits(x)

    def tied_logits(self, x):  # replaced under TP (validate/parallel.py)
        return F.linear(x, self.embed[0].weight)


class Chunk(nn.Module):
    """A contiguous run of layers: the whole model, a pipeline stage or a virtual stage."""

    def __init__(self, spec, layer_ids, first: bool, last: bool, ctx, init: Init):
        super().__init__()
        self.first, self.last = first, last
        self.ctx = ctx
        if first:
            self.embed = nn.Embedding(spec.vocab, spec.hidden, device="meta")
            self.embed.weight = init.param("embed.weight", (spec.vocab, spec.hidden))
        self.layers = nn.ModuleDict({str(i): Block(init, i, spec, ctx) for i in layer_ids})
        if last:
            self.head = Head(init, spec, self.embed if first else None)

    def forward(self, x):
        if self.first:
            x = self.embed(x)
        for blk in self.layers.values():
            if self.ctx.recompute == "full":
                inp = x
                x = checkpoint(blk, inp)
                phases.note_checkpoint_inputs((inp,), layer=blk.idx)
            else:
                x = blk(x)
        if self.last:
            x = self.head(x)
        return x

    def global_names(self):
        """Local parameter name -> global (reference) name."""
        out = {}
        for n, _ in self.named_parameters():
            g = n
            if n == "head.output.weight" and self.head.tied:
                g = "embed.weight"
            elif n.startswith("head.output."):
                g = "output." + n[len("head.output."):]
            elif n.startswith("head.norm."):
                g = "norm." + n[len("head.norm."):]
            out[n] = g
        return out


class Ctx:
    """What a rank's modules need to know about the layout (set before the model is built)."""

    def __init__(self, spec, recompute="none", rope=None, cp=(None, 0, 1, [0]), ep=(None, 0, 1)):
        self.spec = spec
        self.recompute = recompute
        self.rope = rope
        self.cp_group, self.cp_rank, self.cp_size, self.cp_ranks = cp
        self.ep_group, self.ep_rank, self.ep_size = ep


def cross_entropy_sum(logits, targets):
    """Sum of token cross-entropies (the caller divides by the global token count)."""
    return F.cross_entropy(logits.flatten(0, -2).float() if logits.dtype == torch.bfloat16 else
                           logits.flatten(0, -2), targets.flatten(), reduction="sum")


def cp_positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Token positions a CP rank holds: chunks r and 2cp-1-r of 2cp (Megatron load balancing)."""
    c = seq_len // (2 * cp_size)
    a = torch.arange(cp_rank * c, (cp_rank + 1) * c)
    b = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c)
    return torch.cat([a, b]) if cp_size > 1 else torch.arange(seq_len)


def build_reference(spec, seq_len, seed, dtype, device="cpu", recompute="none"):
    """The whole model in one process (the ground truth for losses and gradients)."""
    ctx = Ctx(spec, recompute, Rope(torch.arange(seq_len), spec.head_dim, dtype, device))
    init = Init(seed, dtype, device)
    return Chunk(spec, range(spec.layers), True, True, ctx, init)
