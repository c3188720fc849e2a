"""The building blocks validation's transformer is made of: parameters initialised from their
global names, norms and gated MLPs that save what Megatron-Core's fused kernels save, and
activation checkpointing."""
from __future__ import annotations

import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint, set_checkpoint_early_stop

from . import phases

INIT_STD = 0.02


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
    # statistics in fp32 at least, saved for backward (Transformer Engine / Apex fused RMSNorm
    # compute in fp32 under bf16; planner ElementBytes.stat)
    @staticmethod
    def forward(ctx, x, w, eps):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, w)
        return (xf * rstd).to(x.dtype) * w

    @staticmethod
    def backward(ctx, g):
        x, rstd, w = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd
        gw = (g.to(rstd.dtype) * xhat).sum(dim=tuple(range(g.dim() - 1))).to(w.dtype)
        gxh = g.to(rstd.dtype) * w.to(rstd.dtype)
        gx = rstd * (gxh - xhat * (gxh * xhat).mean(-1, keepdim=True))
        return gx.to(x.dtype), gw, None


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
