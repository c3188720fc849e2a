"""The mixture-of-experts block validation trains: a router, top-k routed experts (the local ones
on an EP rank), shared experts, and the all-to-all token dispatch and combine between EP ranks
(Megatron-Core MoELayer with MoEAlltoAllTokenDispatcher)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import MLP, Init, _act, _GatedFn


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


class _EtpCollective(torch.autograd.Function):
    """gather=True: the routed tokens of every expert-TP rank, in rank order (Megatron
    gather_from_sequence_parallel_region over the expert-TP group, equal sizes here); False: each
    rank's tokens summed over the ranks' partial outputs (reduce_scatter_to_sequence_parallel_region).
    Each one's backward is the other."""

    @staticmethod
    def forward(ctx, x, group, n, gather):
        import torch.distributed as dist
        ctx.meta = (group, n, gather)
        rows = x.shape[0] * n if gather else x.shape[0] // n
        out = x.new_empty((rows,) + tuple(x.shape[1:]))
        (dist.all_gather_into_tensor if gather else dist.reduce_scatter_tensor)(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        group, n, gather = ctx.meta
        return _EtpCollective.apply(g, group, n, not gather), None, None, None


class _Weight(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.weight = w


class ExpertShard(nn.Module):
    """A routed expert split over expert TP (Megatron's grouped linear fc1 column-parallel, fc2
    row-parallel over the expert-TP group): w1 and w3 by output rows, w2 by input columns, each a
    DTensor shard on the etp mesh cut from the same full weight the reference holds; the output
    is this rank's partial sum."""

    def __init__(self, init: Init, name, hidden, ffn, kind, mesh):
        super().__init__()
        from torch.distributed.tensor import DTensor, Shard
        full = MLP(init, name, hidden, ffn, kind, False)
        n, r = mesh.size(), mesh.get_local_rank()
        part = ffn // n
        self.kind, self.gated = kind, full.gated

        def shard(w, dim):
            piece = w.detach().narrow(dim, r * part, part).clone()
            return nn.Parameter(DTensor.from_local(piece, mesh, [Shard(dim)], run_check=False))
        self.w1 = _Weight(shard(full.w1.weight, 0))
        if self.gated:
            self.w3 = _Weight(shard(full.w3.weight, 0))
        self.w2 = _Weight(shard(full.w2.weight, 1))

    def forward(self, x):
        h = F.linear(x, self.w1.weight.to_local())
        y = _GatedFn.apply(h, F.linear(x, self.w3.weight.to_local()), self.kind) if self.gated else _act(self.kind, h)
        return F.linear(y, self.w2.weight.to_local())


def route(probs, top_k: int, capacity_factor: float, pad: bool, calls):
    """(gates [T, E]: the top-k probabilities, 0 elsewhere; keep [T, E]: which token goes to which
    expert). Dropless: the top-k. With a capacity factor, each router call (`calls`: the token
    indices of each; one call per rank and micro-batch) keeps per expert at most
    get_capacity(tokens x top_k, E, cf) tokens, those of highest probability; padded, exactly that
    many, tokens not routed there filling up with weight 0 (Megatron-Core
    moe_utils.topk_softmax_with_capacity, drop policy "probs")."""
    import math
    topv, topi = torch.topk(probs, top_k, dim=-1)
    gates = torch.zeros_like(probs).scatter(1, topi, topv)
    routed = torch.zeros_like(probs, dtype=torch.bool).scatter(1, topi, True)
    if capacity_factor <= 0:
        return gates, routed
    keep = torch.zeros_like(routed)
    E = probs.shape[1]
    for idx in calls:
        n = len(idx)
        cap = math.ceil((n * top_k / E) * capacity_factor)      # moe_utils.get_capacity
        if cap > n:
            mask = torch.ones((n, E), dtype=torch.bool, device=probs.device)
        else:
            top = torch.topk(gates[idx], k=cap, dim=0, sorted=False).indices
            mask = torch.zeros((n, E), dtype=torch.bool, device=probs.device).scatter(0, top, True)
        keep[idx] = mask if pad else mask & routed[idx]
    return gates, keep


class MoE(nn.Module):
    def __init__(self, init: Init, name, spec, ctx):
        super().__init__()
        m = spec.moe
        self.ctx = ctx
        self.top_k, self.experts_n = m.top_k, m.experts
        self.router = init.linear(f"{name}.router", spec.hidden, m.experts, False)
        per = m.experts // ctx.ep_size
        self.local = list(range(ctx.ep_rank * per, (ctx.ep_rank + 1) * per))
        self.etp = ctx.etp_size
        if self.etp > 1:
            self.experts = nn.ModuleDict({str(e): ExpertShard(init, f"{name}.experts.{e}", spec.hidden,
                                                              m.expert_ffn_hidden, spec.mlp, ctx.etp_mesh)
                                          for e in self.local})
        else:
            self.experts = nn.ModuleDict({str(e): MLP(init, f"{name}.experts.{e}", spec.hidden,
                                                      m.expert_ffn_hidden, spec.mlp, spec.bias)
                                          for e in self.local})
        self.shared = nn.ModuleList([MLP(init, f"{name}.shared.{i}", spec.hidden,
                                         m.shared_expert_ffn_hidden, spec.mlp, spec.bias)
                                     for i in range(m.shared_experts)])

    def forward(self, x):
        from torch.distributed.tensor import DTensor
        if isinstance(x, DTensor):
            return self._forward_sp(x)
        y = self._routed(x, torch.softmax(self.router(x), dim=-1))
        for s in self.shared:
            y = y + s(x)
        return y

    def _forward_sp(self, x):
        """Under TP the block gets this rank's sequence shard (Megatron requires SP with MoE and TP,
        moe_layer.py MoELayer.forward): the router, replicated over TP, scores the local tokens (its
        gradient partial, all-reduced over tp with the norms': router.py sets sequence_parallel on
        it); the routed experts (etp 1) take the local tokens over EP; the shared experts are split
        over TP, input all-gathered and output reduce-scattered (shared_experts.py)."""
        probs = torch.softmax(self.router(x), dim=-1).to_local()
        out = self._routed(x.to_local(), probs)        # the block's residual stream is the local shard
        for s in self.shared:
            out = out + s(x)                           # RowwiseParallel hands back the local shard
        return out

    def _routed(self, x, probs):
        """The routed experts' output for local tokens x [b, s, h] with router probabilities probs."""
        import torch.distributed as dist
        shape = x.shape
        xt = x.reshape(-1, shape[-1])
        probs = probs.reshape(-1, probs.shape[-1])
        E = self.experts_n
        gates, keep = route(probs, self.top_k, self.ctx.capacity_factor, self.ctx.pad_to_capacity,
                            self.ctx.router_calls(shape[:-1]))
        pairs = keep.t().nonzero()                               # (expert, token), expert-major
        flat_e, tok = pairs[:, 0], pairs[:, 1]
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
        ys = self._experts(xs, local_counts)
        if ep > 1:
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(len(perm))
            ys = ys.index_select(0, inv.to(ys.device))
            ys = _AllToAll.apply(ys, in_splits, out_splits, self.ctx.ep_group)
        # weight by the routing probabilities and sum each token's k copies (Megatron moe_utils
        # unpermute: probs * tokens, then scatter_add, which keeps only the index)
        w = gates[tok, flat_e].unsqueeze(-1)
        y = torch.zeros_like(xt).scatter_add(0, tok[:, None].expand(-1, xt.shape[1]), ys * w)
        return y.view(shape)

    def _experts(self, xs, local_counts):
        """The local experts' outputs for xs (tokens sorted by local expert, local_counts each). Under
        expert TP every rank of the etp group takes all of the group's tokens (equal counts: experts
        padded to capacity), computes its shard, and the partial outputs are reduce-scattered back."""
        if self.etp == 1:
            outs, p0 = [], 0
            for j, e in enumerate(self.local):
                cnt = local_counts[j]
                outs.append(self.experts[str(e)](xs[p0:p0 + cnt]))
                p0 += cnt
            return torch.cat(outs, 0)
        n, h, t = xs.shape[0], xs.shape[-1], self.etp
        g = _EtpCollective.apply(xs, self.ctx.etp_group, t, True).view(t, n, h)
        outs, p0 = [], 0
        for j, e in enumerate(self.local):
            cnt = local_counts[j]
            outs.append(self.experts[str(e)](g[:, p0:p0 + cnt].reshape(t * cnt, h)).view(t, cnt, h))
            p0 += cnt
        return _EtpCollective.apply(torch.cat(outs, 1).reshape(t * n, h), self.ctx.etp_group, t, False)
