"""One rank's training step on fake tensors under PyTorch's memory trackers.

The recipe (torchtitan scripts/estimate/estimation.py, extended to TP, PP, CP and EP): a fake
process group of the whole world in this process; the device meshes and the parallelism applied
to a meta-device model outside fake mode (fully_shard over a 2-D mesh runs nonzero() on the real
rank map, which fake mode refuses); then to_empty() on fake CPU tensors, one forward of the
micro-batches the rank's schedule keeps in flight, their backwards, and the optimizer step, under
FSDPMemTracker (FSDP2) or MemTracker. The optimizer's lazy states are created before tracking so
one tracked step is the steady state."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import tracking
from .blocks import Stage, loss_of
from .fakemodel import Ctx, Shape
from .parallelize import DistributedOptimizer, apply_dtensor_tp, apply_fsdp, apply_recompute


@dataclass(frozen=True)
class RankSpec:
    """The rank to run: the world's degrees, which pipeline stage and layers it holds, how many
    micro-batches its schedule keeps in flight, and how the stack shards and recomputes."""
    shape: Shape
    world: int
    tp: int
    pp: int
    dp: int
    cp: int
    ep: int
    sp: bool
    micro_batch: int
    seq_len: int
    recompute: str             # none | selective | full
    selective: str             # "op" (torchtitan op SAC) | "core" (Megatron core attention)
    tp_mode: str               # dtensor | megatron
    zero: int
    stage: int                 # pipeline coordinate of the rank
    layer_ids: tuple
    first: bool
    last: bool
    inflight: int
    offload_layers: int = 0    # its first layers' saved activations off the device (pp 1 only)

    @property
    def rank(self) -> int:
        """Global rank with this pipeline coordinate and 0 elsewhere (the largest FSDP shard)."""
        return self.stage * (self.world // self.pp)


@dataclass
class Measured:
    peak_bytes: float
    peak_by_category: dict           # tracker category -> bytes at the peak
    category_max: dict               # tracker category -> largest bytes seen in the step snapshots
    where: str                       # phase @ module of the peak
    flops: dict = field(default_factory=dict)    # "fwd.mm" ... -> FLOPs of this rank's step
    params_local: int = 0
    seconds: float = 0.0


def _meshes(spec: RankSpec):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (spec.pp, spec.dp, spec.cp, spec.tp), mesh_dim_names=("pp", "dp", "cp", "tp"))
    Ctx.tp_mode, Ctx.tp, Ctx.sp, Ctx.cp, Ctx.ep = spec.tp_mode, spec.tp, spec.sp and spec.tp > 1, spec.cp, spec.ep
    Ctx.tp_group = mesh["tp"].get_group() if spec.tp > 1 else None
    Ctx.cp_group = mesh["cp"].get_group() if spec.cp > 1 else None
    Ctx.selective = "core" if spec.recompute == "selective" and spec.selective == "core" else "none"
    shard_mesh = mesh["dp", "cp"]._flatten("dp_cp") if spec.cp > 1 else mesh["dp"]
    ep_mesh = None
    if spec.ep > 1:   # experts re-split a stage's dp*cp*tp ranks as (edp, ep) (torchtitan dp_shard_mod_ep x ep)
        rest = spec.world // spec.pp
        em = init_device_mesh("cpu", (spec.pp, rest // spec.ep, spec.ep), mesh_dim_names=("pp", "edp", "ep"))
        Ctx.ep_group, ep_mesh = em["ep"].get_group(), em["edp"]
    return mesh, shard_mesh, ep_mesh


def _build(spec: RankSpec):
    """The rank's stage with the stack's parallelism, on fake tensors; (model, optimizer)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    mesh, shard_mesh, ep_mesh = _meshes(spec)
    with torch.device("meta"):
        model = Stage(spec.shape, spec.layer_ids, spec.first, spec.last, spec.seq_len // spec.cp)
    if spec.zero != 3:
        model.to(torch.bfloat16)             # Megatron: bf16 parameters, fp32 masters in the optimizer
    if spec.tp > 1 and spec.tp_mode == "dtensor":
        apply_dtensor_tp(model, mesh["tp"], spec.sp)
    apply_recompute(model, spec.recompute, spec.selective)
    model.offload = frozenset(spec.layer_ids[:spec.offload_layers])
    if spec.zero == 3:
        # torchtitan: reshard after forward without PP; with PP the stage keeps its gathered weights
        apply_fsdp(model, shard_mesh, reshard_after_forward=spec.pp == 1, ep_mesh=ep_mesh)
    fake = FakeTensorMode(allow_non_fake_inputs=True)    # to_empty reads the real meta tensors
    with fake:
        model.to_empty(device="cpu")
        model.train()
        if spec.zero == 3:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()                       # the lazy moments, created outside the tracker
            opt.zero_grad(set_to_none=True)
        else:
            shard = spec.dp * spec.cp if spec.zero >= 1 else 1
            eshard = (spec.world // spec.pp // spec.ep) if spec.zero >= 1 else 1
            opt = DistributedOptimizer(model, shard, eshard)
            opt.prefill()
    return model, opt, fake


def _inputs(spec: RankSpec):
    b, s = spec.micro_batch, spec.seq_len // spec.cp
    if spec.first:
        xs = [torch.randint(0, spec.shape.vocab, (b, s)) for _ in range(spec.inflight)]
    else:
        sl = s // (spec.tp if spec.sp and spec.tp > 1 else 1)
        xs = [torch.randn(b, sl, spec.shape.hidden, dtype=torch.bfloat16, requires_grad=True)
              for _ in range(spec.inflight)]
    return xs, torch.randint(0, spec.shape.vocab, (b, s))


def _tracker(spec: RankSpec, model, opt, xs, labels):
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
    if spec.zero == 3:
        t = FSDPMemTracker(model, opt)
        t.track_inputs(tuple(xs) + (labels,))
        return t
    t = MemTracker()
    t.track_external(model, opt.opt, *xs, labels)
    # the grad buffer and the master shard are made before tracking: name their categories
    t._update_and_maybe_create_winfos(opt.buffer, _MemRefType.GRAD)
    t._update_and_maybe_create_winfos(opt.master, _MemRefType.OPT)
    return t


def _forward(spec: RankSpec, model, x, labels):
    """One micro-batch's forward: on the last stage the loss, the logits dropped at once (torchtitan
    train.py `del pred`; Megatron computes the loss inside the model), else the stage output kept
    for the gradient the next stage sends back."""
    out = model(x)
    if not spec.last:
        return out
    lp = nullcontext
    if spec.tp > 1 and spec.tp_mode == "dtensor":
        from torch.distributed.tensor.parallel import loss_parallel as lp
    with lp():
        return loss_of(out, labels)


def _backward(spec: RankSpec, model, out, last_mb: bool):
    """One micro-batch's backward. FSDP2 under a pipeline keeps gradients unsharded (fp32) and
    weights gathered until the last micro-batch (pipelining stage.py backward_maybe_with_nosync)."""
    if spec.zero == 3 and spec.pp > 1:
        model.set_requires_gradient_sync(last_mb)
        model.set_reshard_after_backward(last_mb)
    if spec.last:
        lp = nullcontext
        if spec.tp > 1 and spec.tp_mode == "dtensor":
            from torch.distributed.tensor.parallel import loss_parallel as lp
        with lp():
            out.backward()
    else:
        out.backward(torch.empty_like(out))


class InFlight(torch.nn.Module):
    """The micro-batches in flight as one call: the trackers refuse a second root-level forward
    in one iteration (FSDPMemTracker: 'multiple iterative calls')."""

    def __init__(self, spec: RankSpec, model):
        super().__init__()
        self.spec, self.model = spec, model

    def forward(self, xs, labels):
        return [_forward(self.spec, self.model, x, labels) for x in xs]


def _step(spec: RankSpec, model, opt, xs, labels, tracker, flops) -> dict:
    """Forward the micro-batches in flight, their backwards, the optimizer step. FSDP2 under a
    pipeline first runs one earlier micro-batch (not counted in FLOPs): in the steady state of a
    step its unsharded gradients and gathered weights are already held when the peak comes."""
    snaps = {}
    staged = spec.zero == 3 and spec.pp > 1
    run = InFlight(spec, model)
    with tracker:
        if staged:
            _backward(spec, model, run(xs[:1], labels)[0], False)
            tracker.reset_mod_stats()
        with flops:
            outs = run(xs, labels)
            snaps["after_forward"] = tracker.get_tracker_snapshot("current")
            while outs:
                _backward(spec, model, outs.pop(), not outs)
            del outs
        snaps["after_backward"] = tracker.get_tracker_snapshot("current")
        if spec.zero == 3:
            tracking.clip_grad_local(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)   # torchtitan: grads freed between steps
        else:
            opt.step()
            opt.zero_grad()                   # Megatron: the grad buffer is zeroed, kept
        snaps["after_step"] = tracker.get_tracker_snapshot("current")
    return snaps


def measure(spec: RankSpec) -> Measured:
    """Build and run the rank once; the tracked peak and its categories."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    t0 = time.process_time()
    tracking.patch_trackers()
    dist.init_process_group("fake", rank=spec.rank, world_size=spec.world, store=FakeStore())
    try:
        model, opt, fake = _build(spec)
        with fake:
            xs, labels = _inputs(spec)
            tracker = _tracker(spec, model, opt, xs, labels)
            counter = tracking.LocalFlops()
            snaps = _step(spec, model, opt, xs, labels, tracker, counter)
        n_local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    finally:
        dist.destroy_process_group()
    peak = tracker.get_tracker_snapshot("peak")
    dev = next(iter(peak))
    name = lambda k: getattr(k, "value", str(k))  # noqa: E731
    by_cat = {name(k): float(v) for k, v in peak[dev].items() if name(k) != "Total"}
    cat_max = {}
    for snap in [peak] + list(snaps.values()):
        for k, v in snap.get(dev, {}).items():
            cat_max[name(k)] = max(cat_max.get(name(k), 0.0), float(v))
    flops = {f"{ph}.{op}": float(v) for (ph, op), v in sorted(counter.counts.items())}
    return Measured(peak_bytes=float(peak[dev]["Total"]) if "Total" in peak[dev] else sum(by_cat.values()),
                    peak_by_category=by_cat, category_max=cat_max, where=getattr(tracker, "_peak_where", "?"),
                    flops=flops, params_local=int(n_local), seconds=time.process_time() - t0)
