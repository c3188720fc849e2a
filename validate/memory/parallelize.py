"""A stack's parallelism on the fake model, with the real APIs: DTensor TP/SP as torchtitan's
parallelize_llama applies it, activation checkpointing as each stack defines it, FSDP2
fully_shard, and Megatron-Core's distributed optimizer (fp32 main-grad buffer, sharded fp32
master weights and Adam moments; megatron/core/distributed/param_and_grad_buffer.py,
megatron/core/optimizer/distrib_optimizer.py)."""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn

from .blocks import Stage
from .fakemodel import MLA


def apply_dtensor_tp(stage: Stage, tp_mesh, sp: bool) -> None:
    """torchtitan's TP plan: vocab-parallel embedding and output (loss_parallel), SequenceParallel
    norms, Colwise q/k/v and w1/w3, Rowwise wo and w2 back to the SP shard."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                                   parallelize_module)
    seq = Shard(1) if sp else Replicate()
    top = {}
    if stage.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if stage.output is not None:
        if sp:
            top["norm"] = SequenceParallel()
        top["output"] = ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False)
    if top:
        parallelize_module(stage, tp_mesh, top)
    for blk in stage.layers.values():
        parallelize_module(blk, tp_mesh, _block_plan(blk, sp, seq))
        if not sp:   # norms replicated as DTensors (torchtitan NoParallel): foreach never mixes kinds
            for n in (blk.attention_norm, blk.ffn_norm):
                _replicate(n, tp_mesh)
    if not sp and stage.norm is not None:
        _replicate(stage.norm, tp_mesh)


def _block_plan(blk, sp, seq) -> dict:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)
    plan = {}
    if sp:
        plan["attention_norm"] = SequenceParallel()
        plan["ffn_norm"] = SequenceParallel(use_local_output=blk.moe)
    mla = isinstance(blk.attention, MLA)
    plan["attention"] = PrepareModuleInput(input_layouts=(seq, None), desired_input_layouts=(Replicate(), None),
                                           use_local_output=mla)
    if mla:
        plan["attention.wq_b" if hasattr(blk.attention, "wq_b") else "attention.wq"] = ColwiseParallel()
        plan["attention.wkv_b"] = ColwiseParallel()
    else:
        plan.update({f"attention.{w}": ColwiseParallel() for w in ("wq", "wk", "wv")})
    plan["attention.wo"] = RowwiseParallel(output_layouts=seq)
    if not blk.moe:
        plan["feed_forward"] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),))
        plan["feed_forward.w1"] = ColwiseParallel()
        plan["feed_forward.w2"] = RowwiseParallel(output_layouts=seq)
        if blk.feed_forward.gated:
            plan["feed_forward.w3"] = ColwiseParallel()
    return plan


def _replicate(mod, mesh):
    from torch.distributed.tensor import DTensor, Replicate, distribute_module
    distribute_module(
        mod, mesh,
        input_fn=lambda m, inputs, msh: tuple(
            DTensor.from_local(x, msh, [Replicate()], run_check=False)
            if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs),
        output_fn=lambda m, out, msh: out.to_local() if isinstance(out, DTensor) else out)


# ------------------------------------------------------------------------------ recomputation
def _op_sac_policy():
    """torchtitan's op-level selective AC (activation_checkpoint.py _apply_op_sac, the pre-2025
    save list): keep mm outputs except every second mm, SDPA outputs, reduce-scatter outputs and
    max; recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
    a = torch.ops.aten
    save = {a.mm.default, a._scaled_dot_product_efficient_attention.default,
            a._scaled_dot_product_flash_attention.default,
            a._scaled_dot_product_flash_attention_for_cpu.default,
            torch.ops._c10d_functional.reduce_scatter_tensor.default, a.max.default}
    count = defaultdict(int)

    def policy(ctx, func, *args, **kwargs):
        mode = "recompute" if ctx.is_recompute else "forward"
        if func == a.mm.default:
            count[mode] += 1
        keep = func in save and not (func == a.mm.default and count[mode] % 2 == 0)
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_recompute(stage: Stage, recompute: str, selective: str) -> None:
    """full: every block checkpointed (Megatron --recompute-granularity full --recompute-method
    uniform --recompute-num-layers 1; torchtitan mode full); selective "op": torchtitan's op SAC
    per block; selective "core" is applied inside the attention (fakemodel.core_attention)."""
    if recompute == "none" or (recompute == "selective" and selective == "core"):
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    kw = {"context_fn": _op_sac_policy} if recompute == "selective" else {}
    for k, blk in list(stage.layers.items()):
        stage.layers[k] = checkpoint_wrapper(blk, preserve_rng_state=False, **kw)


# ------------------------------------------------------------------------------- data parallel
def apply_fsdp(stage: Stage, mesh, reshard_after_forward: bool, ep_mesh=None) -> None:
    """FSDP2 per block and on the root, bf16 compute and fp32 reduction (torchtitan
    parallelize_llama apply_fsdp; the last block is not resharded after forward). Routed experts
    get their own group over the expert-data-parallel mesh, sharded on dim 1 when there are fewer
    local experts than its ranks (torchtitan's shard_placement_fn)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = list(stage.layers.values())
    for i, blk in enumerate(blocks):
        inner = getattr(blk, "_checkpoint_wrapped_module", blk)
        if ep_mesh is not None and inner.moe:
            ex = inner.feed_forward.experts
            spf = (lambda p: Shard(1)) if ex.local < ep_mesh.size() else None
            fully_shard(ex, mesh=ep_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                        shard_placement_fn=spf)
        fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(stage, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)


class DistributedOptimizer:
    """Megatron-Core's DDP + distributed optimizer in memory terms: bf16 parameters, one
    contiguous fp32 main-grad buffer that every backward accumulates into (gradient-accumulation
    fusion writes main_grad; .grad is never kept), an fp32 master copy of this rank's 1/shard of
    the parameters and its two Adam moments (fused Adam: no step temporaries). shard = 1 is
    ZeRO-0 (the plain optimizer on fp32 masters)."""

    def __init__(self, model: nn.Module, shard: int, expert_shard: int):
        params = [p for p in model.parameters() if p.requires_grad]
        n = sum(p.numel() for p in params)
        self.buffer = torch.zeros(n, dtype=torch.float32)
        off = 0
        for p in params:
            p.main_grad = self.buffer[off: off + p.numel()].view_as(p)
            off += p.numel()
            p.register_post_accumulate_grad_hook(_into_main_grad)
        n_exp = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
        local = (n - n_exp) // shard + n_exp // expert_shard
        self.master = nn.Parameter(torch.zeros(local, dtype=torch.float32))
        self.master.grad = self.buffer[:local]
        self.opt = torch.optim.AdamW([self.master], lr=1e-4, fused=True)

    def prefill(self) -> None:
        self.opt.step()          # creates the moments once, outside the tracker

    def step(self) -> None:
        self.master.grad = self.buffer[: self.master.numel()]   # the rank's reduce-scattered shard
        self.opt.step()

    def zero_grad(self) -> None:
        self.buffer.zero_()


def _into_main_grad(p):
    """Parameters outside the fused linears (norms, embedding, router, experts): their .grad is
    added into main_grad and dropped, as Megatron's DDP hook does."""
    if p.grad is not None:
        p.main_grad.add_(p.grad)
        p.grad = None
