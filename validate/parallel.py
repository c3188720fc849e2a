"""Tensor parallelism through PyTorch's parallel styles, and the data-parallel gradient
reduction and optimizer (ZeRO 0-2 by hand in Megatron-Core's manner, ZeRO-3 through FSDP2's
fully_shard); the groups and meshes they use come from groups.py."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from .groups import Groups

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # torch < 2.4
    from torch.distributed._tensor import DTensor, Replicate, Shard
    from torch.distributed._tensor.placement_types import _Partial as Partial


# ---------------------------------------------------------------------------------------------
# tensor parallel (+ sequence parallel) with torch.distributed.tensor.parallel styles
def _mlp_plan(prefix, mlp, seq) -> dict:
    """An MLP split over TP: its input gathered, fc1 (and the gate) column-parallel, fc2
    row-parallel with its output reduced (-scattered under SP): Megatron's f and g."""
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel
    plan = {prefix: PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            f"{prefix}.w1": ColwiseParallel(), f"{prefix}.w2": RowwiseParallel(output_layouts=seq)}
    if mlp.gated:
        plan[f"{prefix}.w3"] = ColwiseParallel()
    return plan


def apply_tp(chunk, tp_mesh, sp: bool):
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   RowwiseParallel, SequenceParallel,
                                                   parallelize_module)
    seq = Shard(1) if sp else Replicate()
    plan = {}
    if chunk.first:
        # vocab-parallel embedding: partial sums reduce-scattered (SP) or all-reduced
        plan["embed"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    for i in chunk.layers:
        p = f"layers.{i}"
        if sp:
            plan[f"{p}.attn_norm"] = SequenceParallel()
            plan[f"{p}.mlp_norm"] = SequenceParallel()
        # one conversion per block input, so Q/K/V (and gate/up) share one collective each way:
        # all-gather / reduce-scatter under SP, identity / all-reduce without (Megatron's f and g)
        plan[f"{p}.attn"] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),))
        for w in ("wq", "wk", "wv"):
            plan[f"{p}.attn.{w}"] = ColwiseParallel()
        plan[f"{p}.attn.wo"] = RowwiseParallel(output_layouts=seq)
        blk = chunk.layers[i]
        if blk.moe_layer:
            # sequence-parallel MoE (validate/moe.py MoE._forward_sp): router replicated, shared
            # experts split like an MLP, routed experts whole (etp 1)
            if not sp:
                raise NotImplementedError("MoE layers with --tp > 1 need --sp")
            plan[f"{p}.mlp.router"] = SequenceParallel()
            for j, sh in enumerate(blk.mlp.shared):
                plan.update(_mlp_plan(f"{p}.mlp.shared.{j}", sh, seq))
            continue
        plan.update(_mlp_plan(f"{p}.mlp", blk.mlp, seq))
    if chunk.last:
        if sp:
            plan["head.norm"] = SequenceParallel()
        if chunk.head.output is not None:
            plan["head.output"] = ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1))
    parallelize_module(chunk, tp_mesh, plan)
    if chunk.last and chunk.head.output is None:
        # tied output projection: the (vocab-sharded) embedding weight, input gathered first
        head = chunk.head

        def tied_logits(x, _mesh=tp_mesh, _head=head):
            import torch.nn.functional as F
            if isinstance(x, DTensor):
                x = x.redistribute(_mesh, [Replicate()])
            else:
                x = DTensor.from_local(x, _mesh, [Replicate()], run_check=False)
            return F.linear(x, _head.embed[0].weight).to_local()
        head.tied_logits = tied_logits


# ---------------------------------------------------------------------------------------------
def local(t):
    return t._local_tensor if isinstance(t, DTensor) else t


def _is_partial(g):
    return isinstance(g, DTensor) and any(isinstance(p, Partial) for p in g.placements)


class Bucket:
    """One chunk's parameters of one kind (dense or expert) and their gradient-reduction group,
    laid out flat as in Megatron-Core's DistributedDataParallel buffers, padded to a multiple of
    the group size (megatron/core/distributed/param_and_grad_buffer.py) for ZeRO >= 1."""

    def __init__(self, items, group, gsize, grank, zero, dtype):
        self.items = items           # [(global name, param)]
        self.group, self.G, self.g = group, gsize, grank
        self.zero = zero
        self.N = sum(local(p).numel() for _, p in items)
        self.Np = (math.ceil(self.N / self.G) * self.G) if zero >= 1 else self.N
        self.shard = self.Np // self.G if zero >= 1 else self.N
        self.lo = self.g * self.shard if zero >= 1 else 0
        flat = self.flat_params()
        self.master = nn.Parameter(flat[self.lo:self.lo + self.shard].clone())
        self.acc = torch.zeros_like(self.master) if zero == 2 else None
        self.dtype = dtype

    def flat_params(self):
        v = [local(p).detach().reshape(-1) for _, p in self.items]
        pad = self.Np - self.N
        if pad:
            v.append(torch.zeros(pad, dtype=v[0].dtype, device=v[0].device))
        return torch.cat(v)

    def flat_grads(self):
        v = []
        for _, p in self.items:
            g = p.grad
            v.append(torch.zeros(local(p).numel(), dtype=local(p).dtype, device=local(p).device)
                     if g is None else local(g).reshape(-1))
        pad = self.Np - self.N
        if pad:
            v.append(torch.zeros(pad, dtype=v[0].dtype, device=v[0].device))
        return torch.cat(v)

    def _reduce(self):
        flat = self.flat_grads()
        self.grad_buffer_bytes = flat.numel() * flat.element_size()   # what the reduction read
        if self.zero == 0:
            if self.G > 1:
                dist.all_reduce(flat, group=self.group)
            return flat
        if self.G > 1:
            out = torch.empty(self.shard, dtype=flat.dtype, device=flat.device)
            dist.reduce_scatter_tensor(out, flat, group=self.group)
            return out
        return flat

    def reduce_step(self):
        """ZeRO 0: all-reduce; ZeRO 1: reduce-scatter, once per step (ZeRO 2: the micro-batch
        reductions accumulated)."""
        if self.zero == 2:
            self.master.grad = self.acc.clone()
            self.acc.zero_()
        else:
            self.master.grad = self._reduce()

    def reduce_microbatch(self):
        """ZeRO 2: reduce-scatter this micro-batch's gradients and free them (DeepSpeed stage 2)."""
        self.acc += self._reduce()
        for _, p in self.items:
            p.grad = None

    def gather_params(self):
        if self.zero >= 1 and self.G > 1:
            full = torch.empty(self.Np, dtype=self.master.dtype, device=self.master.device)
            dist.all_gather_into_tensor(full, self.master.data.contiguous(), group=self.group)
        else:
            full = self.master.data
        off = 0
        with torch.no_grad():
            for _, p in self.items:
                t = local(p)
                t.copy_(full[off:off + t.numel()].view_as(t))
                off += t.numel()

    def grad_pieces(self):
        """(global name, flat start, flat stop, values) of the reduced gradient this rank holds."""
        g = self.master.grad
        out, off = [], 0
        for name, p in self.items:
            n = local(p).numel()
            a, b = max(off, self.lo), min(off + n, self.lo + self.shard)
            if a < b:
                out.append((name, p, a - off, b - off, g[a - self.lo:b - self.lo].detach().clone()))
            off += n
        return out

    def state_bytes(self, opt):
        e = self.master.element_size()
        st = opt.state.get(self.master, {})
        o = sum(v.numel() * v.element_size() for k, v in st.items()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
        # read from the tensors: ZeRO-2's reduced shard, else the flat (padded under ZeRO-1)
        # gradient buffer the step reduced (Megatron-Core's grad buffer, param_and_grad_buffer.py)
        grads = (self.acc.numel() * self.acc.element_size() if self.zero == 2 else
                 getattr(self, "grad_buffer_bytes", self.Np * e))
        return dict(weights=sum(local(p).numel() * local(p).element_size() for _, p in self.items),
                    gradients=grads,
                    optimizer=o + self.master.numel() * e)   # master copy + Adam moments


class HandOptimizer:
    """ZeRO 0-2 for a rank's chunks: tensor-parallel partial gradients (sequence-parallel norms
    and biases) all-reduced over tp, the tied embedding's gradient all-reduced between the first
    and last stage, then each bucket reduced over its data-parallel group, Adam on the master
    shard, parameters all-gathered (megatron/core/distributed/finalize_model_grads.py,
    distributed_optimizer.py)."""

    def __init__(self, chunks, names, groups: Groups, zero, lr, dtype, moe_names):
        self.zero = zero
        self.groups = groups
        self.chunks = chunks
        self.buckets = {}   # chunk index -> [buckets]
        masters = []
        for ci, ch in enumerate(chunks):
            dense, expert = [], []
            for n, p in ch.named_parameters():
                gname = names[ci][n]
                (expert if gname in moe_names else dense).append((gname, p))
            bl = []
            for items, label in ((dense, "dp"), (expert, "edp")):
                if not items:
                    continue
                g = groups.get(label)
                size = groups.size(label) if g is not None else 1
                bl.append(Bucket(items, g, size, groups.rank_in(label) if g is not None else 0, zero, dtype))
            self.buckets[ci] = bl
            masters += [b.master for b in bl]
        self.opt = torch.optim.Adam(masters, lr=lr)
        self.nmb = 1                  # micro-batches per step (the worker sets it)
        self.seen, self.held, self.deferred = {}, {}, []   # ZeRO 2's tied-embedding bookkeeping

    def _tp_reduce(self, cis):
        """TP-partial gradients (SP norms and biases) of chunks `cis` all-reduced over tp in one
        coalesced call (finalize_model_grads _allreduce_layernorm_grads gathers every model
        chunk's); replicated gradients of sharded parameters cut to this rank's shard."""
        params = [p for ci in cis for p in self.chunks[ci].parameters()]
        tp = self.groups.get("tp")
        for p in params:
            g = p.grad
            if (isinstance(g, DTensor) and isinstance(p, DTensor) and not _is_partial(g)
                    and tuple(g.placements) != tuple(p.placements)):
                # e.g. the vocab-parallel embedding's gradient comes back Replicate (every tp
                # rank computes all of it from the replicated tokens): keep this rank's shard
                p.grad = g.redistribute(p.device_mesh, p.placements)
        if tp is not None:
            part = [p for p in params if p.grad is not None and _is_partial(p.grad)]
            if part:
                flat = torch.cat([local(p.grad).reshape(-1) for p in part])
                dist.all_reduce(flat, group=tp)
                off = 0
                for p in part:
                    lt = local(p.grad)
                    lt.copy_(flat[off:off + lt.numel()].view_as(lt))
                    off += lt.numel()
    def _tied(self, ci):
        """The tied embedding weight of chunk ci, if its gradient is summed with another stage's."""
        if self.groups.get("embd") is None:
            return None
        return next((p for b in self.buckets[ci] for name, p in b.items if name == "embed.weight"), None)

    def _tied_reduce(self, ci):
        """The tied embedding's gradient all-reduced between the first and last stage, once per
        step after the pipeline drains (megatron/core/distributed/finalize_model_grads.py
        _allreduce_embedding_grads): per micro-batch it would deadlock, the two stages reaching
        their backwards at different points of the schedule."""
        p = self._tied(ci)
        if p is not None and p.grad is not None:
            dist.all_reduce(local(p.grad), group=self.groups.get("embd"))

    def microbatch_done(self, ci):
        """ZeRO 2: reduce-scatter this chunk's gradients after each micro-batch's backward. A tied
        embedding's gradient is held back (zeros in its place) and summed over micro-batches; the
        last micro-batch's reduction of its bucket waits for the once-per-step tied all-reduce."""
        if self.zero != 2:
            return
        self._tp_reduce([ci])
        self.seen[ci] = self.seen.get(ci, 0) + 1
        p = self._tied(ci)
        if p is not None and p.grad is not None:
            g = local(p.grad)
            self.held[ci] = g.clone() if ci not in self.held else self.held[ci] + g
            if self.seen[ci] < self.nmb:
                p.grad = None
            else:
                g.copy_(self.held.pop(ci))
        for b in self.buckets[ci]:
            if p is not None and self.seen[ci] == self.nmb and any(q is p for _, q in b.items):
                self.deferred.append((ci, b))
            else:
                b.reduce_microbatch()

    reduce_hook = True   # None: skip the data-parallel reduction (a planted bug for tests)

    def reduce(self):
        if self.zero != 2 and self.reduce_hook is not None:
            self._tp_reduce(list(self.buckets))
        for ci, bl in self.buckets.items():
            if self.reduce_hook is None:
                for b in bl:
                    b.master.grad = b.flat_grads()[b.lo:b.lo + b.shard].clone()
                continue
            if self.zero != 2 or any(c == ci for c, _ in self.deferred):
                self._tied_reduce(ci)
        for _, b in self.deferred:
            b.reduce_microbatch()
        self.deferred, self.seen = [], {}
        for bl in self.buckets.values():
            for b in bl:
                if self.reduce_hook is not None:
                    b.reduce_step()

    def step(self):
        self.opt.step()
        for bl in self.buckets.values():
            for b in bl:
                b.gather_params()

    def zero_grad(self):
        for ch in self.chunks:
            for p in ch.parameters():
                p.grad = None
        self.opt.zero_grad(set_to_none=True)

    def grad_pieces(self):
        out = []
        for bl in self.buckets.values():
            for b in bl:
                out += b.grad_pieces()
        return out

    def state_bytes(self):
        tot = {}
        for ci, bl in self.buckets.items():
            for b in bl:
                kind = "expert" if any(".experts." in n for n, _ in b.items) else "dense"
                for k, v in b.state_bytes(self.opt).items():
                    tot[(kind, k)] = tot.get((kind, k), 0) + v
        return tot


class FSDPOptimizer:
    """ZeRO-3 through FSDP2 (fully_shard per transformer layer and per chunk): parameters
    all-gathered before forward and again before backward, gradients reduce-scattered every
    micro-batch, Adam on the sharded parameters."""

    def __init__(self, chunks, names, groups: Groups, lr, device_type, moe_names):
        from torch.distributed.fsdp import fully_shard
        self.chunks = chunks
        self.groups = groups
        mesh = groups.mesh("dp")
        for ch in chunks:
            for blk in ch.layers.values():
                fully_shard(blk, mesh=mesh)
            fully_shard(ch, mesh=mesh)
            for m in [*ch.layers.values(), ch]:
                m.set_gradient_divide_factor(1.0)   # sum semantics: the loss is already a global mean
                if hasattr(m, "set_force_sum_reduction_for_comms"):
                    # float32/bf16 would otherwise reduce with PREMUL_SUM(1/factor), which gloo lacks
                    m.set_force_sum_reduction_for_comms(True)
        self.opt = torch.optim.Adam([p for ch in chunks for p in ch.parameters()], lr=lr)
        self.names = names

    def microbatch_done(self, ci):
        pass

    def reduce(self):
        pass

    def step(self):
        self.opt.step()

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)

    def grad_pieces(self):
        out = []
        for ci, ch in enumerate(self.chunks):
            for n, p in ch.named_parameters():
                if p.grad is not None:
                    out.append((self.names[ci][n], p, 0, local(p.grad).numel(),
                                local(p.grad).detach().reshape(-1).clone()))
        return out

    def state_bytes(self):
        """What FSDP2 allocates: each parameter's padded dim-0 chunk (the local tensor is a view
        of it, _fsdp_param.py _init_sharded_param), gradients in the padded reduce-scatter output
        they are views of (_fsdp_collectives.py foreach_reduce), each storage counted once; Adam's
        moments are shaped like the unpadded local rows."""
        def storages(ts):
            return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}.values())
        params = [p for ch in self.chunks for p in ch.parameters()]
        moments = [local(x) for p in params for x in self.opt.state.get(p, {}).values()
                   if isinstance(x, torch.Tensor) and x.dim() > 0]
        return {("dense", "weights"): storages(local(p) for p in params),
                ("dense", "gradients"): storages(local(p.grad) for p in params if p.grad is not None),
                ("dense", "optimizer"): sum(v.numel() * v.element_size() for v in moments)}
