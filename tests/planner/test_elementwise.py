"""costmodel/elementwise.py held to what eager PyTorch dispatches: torchtitan's 2024 Llama block
(torchtitan 9dec370: RMSNorm on .float(), complex RoPE, repeat_kv, SwiGLU) run op by op under a
TorchDispatchMode that adds up each non-view op's input storage and output bytes, and counts it."""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from planner.costmodel import elementwise as E
from planner.costmodel.knobs import LayerKnobs
from planner.layout import Precision
from planner.model_io import load_model

VIEWS = {"view", "_unsafe_view", "unsqueeze", "expand", "transpose", "view_as_complex", "view_as_real",
         "reshape", "alias", "detach", "slice", "select", "t", "permute", "_reshape_alias"}


class Traffic(TorchDispatchMode):
    """Bytes read (each input's storage once) and written, and launches, of every non-view op."""

    def __init__(self):
        super().__init__()
        self.bytes, self.ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in VIEWS:
            return out
        ins = [a for a in args if isinstance(a, torch.Tensor)]
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.bytes += sum(a.untyped_storage().nbytes() for a in ins)
        self.bytes += sum(o.numel() * o.element_size() for o in outs if isinstance(o, torch.Tensor))
        self.ops += 1
        return out


def _rms_norm(x, w):
    y = x.float()
    return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x) * w


def _rope(x, freqs):
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs).flatten(3).type_as(x)


def _repeat(x, n):
    b, s, kv, d = x.shape
    return x[:, :, :, None, :].expand(b, s, kv, n, d).reshape(b, s, kv * n, d)


def _eager_block(m, T):
    """The elementwise ops of one Llama block forward on T tokens; the GEMMs' and SDPA's outputs
    are stand-in tensors (their traffic is the GEMM model's, not this one's)."""
    h, hd, nq, nkv, f = m.hidden, m.hidden // m.heads, m.heads, m.kv_heads, m.ffn_hidden
    bf = dict(dtype=torch.bfloat16)
    x, w = torch.randn(1, T, h, **bf), torch.ones(h, **bf)
    q, k, v = (torch.randn(1, T, n, hd, **bf) for n in (nq, nkv, nkv))
    freqs = torch.polar(torch.ones(T, 1, hd // 2), torch.randn(T, 1, hd // 2))
    attn_out, mlp_out = torch.randn(1, nq, T, hd, **bf), torch.randn(1, T, h, **bf)
    g, u = torch.randn(1, T, f, **bf), torch.randn(1, T, f, **bf)
    with Traffic() as t:
        _rms_norm(x, w)
        _rope(q, freqs), _repeat(_rope(k, freqs), nq // nkv), _repeat(v, nq // nkv)
        attn_out.transpose(1, 2).contiguous()
        hres = x + mlp_out
        _rms_norm(hres, w)
        torch.nn.functional.silu(g) * u
        hres + mlp_out
    return t


def _knobs(T):
    one = np.ones(1)
    return LayerKnobs(tp=one, pp=one, dp=one, cp=one, ep=one, etp=one, b=one, s=one * T, sp=np.zeros(1, bool),
                      precision=np.array([Precision.BF16]), cp_comm=np.zeros(1), overlap_tp=np.zeros(1, bool),
                      overlap_ep=np.zeros(1, bool), shard_group=np.zeros(1))


def test_eager_llama_block_bytes_and_launches_match_dispatch():
    m = load_model("llama-3-8b")
    T = 8
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # no OpenMP workers in the test process: validate forks its ranks from it
    try:
        t = _eager_block(m, T)
    finally:
        torch.set_num_threads(threads)
    common, mlp = E.layer_bytes(m, _knobs(T), "eager")
    # what the planner leaves out: RoPE's frequency table, the norm weights, the per-row means
    assert float(common[0] + mlp[0]) == pytest.approx(t.bytes, rel=0.02)
    x_att, x_mlp = E.extra_kernels(m, "eager")
    fused = 6          # TE: two norms, RoPE, two residual adds, the activation
    assert fused + x_att + x_mlp - 1 == t.ops        # - 1: x_mlp also counts w1 and w3 as two GEMMs


def test_compiled_and_fused_move_fewer_bytes_than_eager():
    m = load_model("llama-3-8b")
    k = _knobs(4096)
    eager, compiled, fused = (sum(E.layer_bytes(m, k, mode)) for mode in ("eager", "compiled", "fused"))
    assert fused < compiled < eager
    assert sum(E.extra_kernels(m, "fused")) == 0 < sum(E.extra_kernels(m, "compiled")) \
        < sum(E.extra_kernels(m, "eager"))


def test_torchtitan_compile_is_faster_and_other_stacks_refuse_it():
    from planner.engine import evaluate_layout
    from planner.errors import PlannerError
    from planner.layout import Layout
    from planner.profiles import load_hardware
    from planner.stacks import STACKS, compiled, with_compile
    m, cl = load_model("llama-3-8b"), load_hardware("h100-sxm")
    L = Layout(tp=1, dp=8, micro_batch=2, global_batch=16, seq_len=8192, zero=3, recompute="selective")
    tt = STACKS["torchtitan"]
    assert not compiled(tt) and compiled(with_compile(tt, True))
    assert with_compile(tt, False) is tt
    eager = evaluate_layout(m, cl, L, stack=tt).step_time_s
    fast = evaluate_layout(m, cl, L, stack=with_compile(tt, True)).step_time_s
    assert 1.05 < eager / fast < 1.4
    with pytest.raises(PlannerError, match="--compile is modelled for torchtitan"):
        with_compile(STACKS["megatron-core"], True)


def test_an_unknown_elementwise_mode_is_refused():
    from planner.errors import PlannerError
    with pytest.raises(PlannerError, match="valid: fused, eager, compiled"):
        E.layer_bytes(load_model("llama-3-8b"), _knobs(8), "inductor")
