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

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import phases
from .layers import MLP, Init, Norm, checkpoint
from .moe import MoE
from .ring import RingAttention

aten = torch.ops.aten
ROPE_BASE = 10000.0


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

    def __call__(self, x):  # x [b, s, heads, d] (api.supported refuses an odd d)
        c, s = self.cos[None, :, None, :], self.sin[None, :, None, :]
        x1, x2 = x[..., :self.half], x[..., self.half:]
        return x * c + torch.cat([-x2, x1], -1) * s


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
        self.capacity_factor, self.pad_to_capacity = 0.0, False     # experts' capacity (moe.route)
        self.etp_group, self.etp_size, self.etp_mesh = None, 1, None  # expert TP (moe.ExpertShard)
        self.calls = None       # reference: (rows, seq) -> token indices of each rank's router call

    def router_calls(self, shape) -> list:
        """Token indices (of the flattened [rows, seq]) of each router call an input of this shape
        is routed in: a rank routes its micro-batch's tokens at once; the reference splits its
        whole batch as the ranks did (reference_calls)."""
        rows, seq = shape
        return [torch.arange(rows * seq)] if self.calls is None else self.calls(rows, seq)


def reference_calls(lay: dict):
    """The router calls of a run with layout `lay`, as token indices of the reference's [gb, s]:
    one per data-parallel rank, micro-batch, CP rank and (under SP) TP rank, each over that
    rank's rows and positions in its own order, so a capacity drops what the ranks drop."""
    dp, mb, cp = lay["dp"], lay["micro_batch"], lay["cp"]
    tps = lay["tp"] if lay["sp"] and lay["tp"] > 1 else 1

    def calls(rows: int, seq: int) -> list:
        per, out = rows // dp, []
        for d in range(dp):
            for m in range(per // mb):
                r = torch.arange(d * per + m * mb, d * per + (m + 1) * mb)
                for c in range(cp):
                    pos = cp_positions(seq, cp, c)
                    n = len(pos) // tps
                    for t in range(tps):
                        out.append((r[:, None] * seq + pos[None, t * n:(t + 1) * n]).reshape(-1))
        return out
    return calls


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
