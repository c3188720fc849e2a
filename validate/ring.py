"""Ring attention for context parallelism: K/V blocks passed around the CP ring, each block's
flash attention (CPU SDPA kernels) merged by log-sum-exp, the backward replaying the ring with
dK/dV travelling back (Liu et al. 2023 'Ring Attention'; Megatron-Core context_parallel p2p)."""
from __future__ import annotations

import torch

aten = torch.ops.aten


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
    acc = torch.promote_types(o.dtype, torch.float32)      # merged in fp32 at least, as TE's CP does
    new = torch.logaddexp(lse, l)
    out = out.to(acc) * torch.exp(lse - new).unsqueeze(-1) + o.to(acc) * torch.exp(l - new).unsqueeze(-1)
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
                out = torch.cat([out[:, :, :c].to(o2.dtype), o2], 2)
                lse = torch.cat([lse[:, :, :c], l2], 2)
        o_t = out.transpose(1, 2).to(q.dtype).contiguous()
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
