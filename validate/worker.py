"""One rank of a validation run: build the rank's part of the model, train a few steps with the
layout, count, and hand the counts to rank 0.

A scenario is a JSON-able dict (validate/config.py). One process group serves a list of
scenarios, so tests pay the process start-up once for several layouts.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
import warnings

import torch
import torch.distributed as dist
from torch.autograd.graph import saved_tensors_hooks

from . import phases
from .config import routing_of, spec_from_dict, torch_dtype
from .counters import ActivationMeter, CollectiveRecorder, GroupLabeler, PhaseFlopCounter
from .model import Chunk, Ctx, Init, Rope, cp_positions, cross_entropy_sum
from .groups import Groups, Topo, set_group_timeout
from .parallel import FSDPOptimizer, HandOptimizer, apply_tp, local

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch < 2.4
    from torch.distributed._tensor import DTensor, Shard

LR = 1e-2
# torch 2.13 deprecates dist.reduce_scatter_tensor / all_gather_into_tensor in favour of names
# older releases lack; the run keeps the names every supported release has
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def make_data(vocab, global_batch, seq_len, steps, seed):
    """[steps, global_batch, seq_len + 1] token ids: inputs are [:, :, :-1], targets [:, :, 1:]."""
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randint(0, vocab, (steps, global_batch, seq_len + 1), generator=g)


def device_for(local_rank):
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _piece_meta(p):
    """(global shape, global offset) of a parameter's local tensor."""
    if isinstance(p, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        ls, off = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return tuple(p.shape), tuple(ls), tuple(off)
    return tuple(p.shape), tuple(p.shape), (0,) * p.dim()


def report_progress(scenario: int, step: int):
    """Where this rank is, for the launcher's error messages (a dead rank cannot say)."""
    path = os.environ.get("VALIDATE_PROGRESS")
    if path:
        try:
            with open(path, "w") as f:
                f.write(f"{scenario} {step}")
        except OSError:
            pass


class CommWait:
    """Wall time this rank spends blocked on communication: in Work.wait() (torch.distributed
    calls, FSDP2, pipelining, ring attention, the all-to-all) and in functional collectives'
    wait_tensor (DTensor). Patched in only for the timed steps; a wait includes waiting for a
    slower peer (a pipeline bubble is one)."""

    def __init__(self):
        self.total = 0.0
        self.calls = 0
        self.trace = [] if os.environ.get("VALIDATE_WAIT_TRACE") else None
        self._saved = None

    def _wrap(self, f, name):
        me = self

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                d = time.perf_counter() - t0
                me.total += d
                me.calls += 1
                if me.trace is not None:
                    me.trace.append((name, t0, d))
        return timed

    def __enter__(self):
        import torch.distributed._functional_collectives as fc
        W = torch._C._distributed_c10d.Work
        self._saved = (W.wait, fc.wait_tensor)
        W.wait = self._wrap(W.wait, "work")
        fc.wait_tensor = self._wrap(fc.wait_tensor, "funcol")
        return self

    def __exit__(self, *exc):
        import torch.distributed._functional_collectives as fc
        W = torch._C._distributed_c10d.Work
        W.wait, fc.wait_tensor = self._saved
        return False


def _inject(fault: dict, rank: int, step: int):
    """Test hooks: make a rank die, fail or hang at a given step."""
    if not fault or fault.get("rank") != rank or fault.get("step", 0) != step:
        return
    kind = fault.get("kind")
    if kind == "exit":
        os._exit(int(fault.get("status", 9)))
    if kind == "kill":     # as the OOM killer or a node failure would
        import signal
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "raise":
        raise RuntimeError("injected failure")
    if kind == "hang":
        time.sleep(10 ** 6)


class _Rank:
    """One rank's part of a scenario: its model chunks (TP applied), optimizer, pipeline schedule,
    counters and data."""

    def __init__(self, cfg: dict, device):
        rank, world = dist.get_rank(), dist.get_world_size()
        self.cfg, self.device, self.spec = cfg, device, spec_from_dict(cfg["model"])
        lay = self.lay = cfg["layout"]
        tp, pp, dp, cp, ep, vpp = (lay[k] for k in ("tp", "pp", "dp", "cp", "ep", "vpp"))
        if world != tp * pp * dp * cp:
            raise RuntimeError(f"world size {world} does not match tp*pp*dp*cp = {tp * pp * dp * cp}")
        self.topo = topo = Topo(world, rank, tp, cp, dp, pp, ep, vpp, lay["etp"])
        labeler = GroupLabeler()
        self.groups = groups = Groups(topo, self.spec.tied_embeddings and pp > 1, labeler, device.type,
                                      moe=self.spec.moe is not None)
        dtype = torch_dtype(cfg["dtype"])
        self.rope = Rope(cp_positions(lay["seq_len"], cp, topo.cp_r), self.spec.head_dim, dtype, device)
        ctx = Ctx(self.spec, lay["recompute"], self.rope, cp=(groups.get("cp"), topo.cp_r, cp, groups.ranks.get("cp", [rank])),
                  ep=(groups.get("ep"), topo.ep_r, ep))
        ctx.capacity_factor, ctx.pad_to_capacity = routing_of(cfg)
        if lay["etp"] > 1:
            ctx.etp_group, ctx.etp_size, ctx.etp_mesh = groups.get("etp"), lay["etp"], groups.mesh("etp")
        self.nv, per = pp * vpp, self.spec.layers // (pp * vpp)
        self.my_vs = [topo.pp_r + v * pp for v in range(vpp)]
        init = Init(cfg["seed"], dtype, device)
        self.chunks = [Chunk(self.spec, range(vs * per, (vs + 1) * per), vs == 0, vs == self.nv - 1, ctx, init)
                       for vs in self.my_vs]
        names = [ch.global_names() for ch in self.chunks]
        self.tp_mesh = groups.mesh("tp") if tp > 1 else None
        for ch in self.chunks if tp > 1 else ():
            apply_tp(ch, self.tp_mesh, lay["sp"])
        moe_names = {g for nm in names for g in nm.values() if ".experts." in g}
        self.opt = (FSDPOptimizer(self.chunks, names, groups, LR, device.type, moe_names) if lay["zero"] == 3 else
                    HandOptimizer(self.chunks, names, groups, lay["zero"], LR, dtype, moe_names))
        self.flop, self.rec = PhaseFlopCounter(), CollectiveRecorder(labeler)
        # weights are not activations: a parameter's local shard (an expert-TP DTensor's, used by
        # F.linear after to_local()) is no Parameter, so its storage is excluded by address
        self.meter = ActivationMeter([t.untyped_storage().data_ptr() for t in self.rope.tensors()]
                                     + [local(p).untyped_storage().data_ptr()
                                        for ch in self.chunks for p in ch.parameters()])
        for ch in self.chunks:
            for blk in ch.layers.values():
                self.meter.attach(blk)
        self._data()
        self.opt.nmb = self.nmb
        self.sched = self._schedule() if pp > 1 else None
        self.is_first, self.is_last = self.chunks[0].first, self.chunks[-1].last

    def _data(self):
        """This rank's inputs and targets: its data-parallel rows, its CP positions."""
        lay, topo, cfg = self.lay, self.topo, self.cfg
        gb, s, dp = lay["global_batch"], lay["seq_len"], lay["dp"]
        data = make_data(self.spec.vocab, gb, s, 1 + cfg["steps"] + cfg.get("timed_steps", 0), cfg["seed"])
        rows = slice(topo.dp_r * gb // dp, (topo.dp_r + 1) * gb // dp)
        pos = cp_positions(s, lay["cp"], topo.cp_r)
        self.inputs = data[:, rows, :-1][:, :, pos].to(self.device)
        self.targets = data[:, rows, 1:][:, :, pos].to(self.device)
        self.nmb = gb // (dp * lay["micro_batch"])
        self.norm = float(gb * s)

    def loss_fn(self, out, tgt):
        if self.tp_mesh is not None:
            # vocab-parallel cross entropy (microbatches() enters loss_parallel for the whole
            # step, as its backward must run inside it too)
            # in fp32 at least, as the reference and Megatron's vocab-parallel cross entropy
            logits = DTensor.from_local(out.to(torch.promote_types(out.dtype, torch.float32)), self.tp_mesh,
                                        [Shard(-1)], run_check=False)
            l = torch.nn.functional.cross_entropy(logits.flatten(0, -2), tgt.flatten(), reduction="sum")
            return l.to_local() / self.norm
        return cross_entropy_sum(out, tgt) / self.norm

    def _schedule(self):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B
        opt = self.opt

        class _Stage(PipelineStage):
            """Lets ZeRO-2 reduce-scatter after each micro-batch's backward of this chunk."""
            ci = 0

            def backward_one_chunk(self, *a, **k):
                r = super().backward_one_chunk(*a, **k)
                opt.microbatch_done(self.ci)
                return r

        stages = []
        for ci, (vs, ch) in enumerate(zip(self.my_vs, self.chunks)):
            st = _Stage(ch, vs, self.nv, self.device, group=self.groups.get("pp"))
            st.ci = ci
            stages.append(st)
        if self.lay["vpp"] > 1:
            return ScheduleInterleaved1F1B(stages, self.nmb, loss_fn=self.loss_fn, scale_grads=False)
        return Schedule1F1B(stages[0], self.nmb, loss_fn=self.loss_fn, scale_grads=False)

    def microbatches(self, step) -> float:
        """Forward and backward of every micro-batch of `step`; the summed loss."""
        if self.tp_mesh is not None:
            from torch.distributed.tensor.parallel import loss_parallel
            with loss_parallel():
                return self._microbatches(step)
        return self._microbatches(step)

    def _microbatches(self, step) -> float:
        x, y = self.inputs[step], self.targets[step]
        if self.sched is not None:
            losses = []
            kw = ({"target": y, "losses": losses} if self.is_last else {})
            self.sched.step(*((x,) if self.is_first else ()), **kw)
            return float(sum(float(l) for l in losses))
        ch, mb, tot = self.chunks[0], self.lay["micro_batch"], 0.0
        for j in range(self.nmb):
            loss = self.loss_fn(ch(x[j * mb:(j + 1) * mb]), y[j * mb:(j + 1) * mb])
            loss.backward()
            tot += float(loss.detach())
            self.opt.microbatch_done(0)
        return tot

    def train_step(self, step, counted: bool, keep_grads: bool):
        """(loss, gradient pieces) of one step: micro-batches, reduction, optimizer."""
        opt = self.opt
        phases.set_driver_phase("forward")
        loss = self.microbatches(step)
        phases.set_driver_phase("optimizer")
        opt.reduce()
        grads = opt.grad_pieces() if keep_grads else []
        opt.step()
        return loss, grads


def run_scenario(cfg: dict, device) -> dict | None:
    """Run one layout on every rank; rank 0 returns the gathered results, others None."""
    R = _Rank(cfg, device)
    steps, total = cfg["steps"], 1 + cfg["steps"] + cfg.get("timed_steps", 0)
    res = dict(rank=R.topo.rank, coords=R.topo.coords(), losses=[], step_times=[], timed_times=[],
               flops=[], coll_calls=[], coll_bytes=[], coll_phase=[], acts=[], grads=[], state=None, unknown=[])
    fault = cfg.get("fault") or {}
    if fault.get("kind") == "skip_grad_sync":
        R.opt.reduce_hook = None   # test hook: gradients stay local (a layout computing something else)
    for step in range(total):
        report_progress(cfg.get("index", 0), step)
        _inject(fault, R.topo.rank, step)
        _one_step(R, res, step, steps)
    res["moe_layers"] = [blk.idx for ch in R.chunks for blk in ch.layers.values() if blk.moe_layer]
    res["layers"] = [blk.idx for ch in R.chunks for blk in ch.layers.values()]
    res["first"], res["last"] = R.is_first, R.is_last
    out = [None] * R.topo.world if R.topo.rank == 0 else None
    dist.gather_object(res, out, dst=0)
    return out


def _one_step(R: _Rank, res: dict, step: int, steps: int) -> None:
    """Step `step`: 0 warms up, 1..steps are counted (instrumented), later ones timed plain."""
    counted, device = 1 <= step <= steps, R.device
    R.opt.zero_grad()
    R.flop.reset(), R.rec.reset(), R.meter.reset()
    R.meter.enabled = counted
    phases.set_meter(R.meter if counted else None)
    _sync(device)
    waits = CommWait() if step > steps else None
    cpu0, pcpu0 = time.thread_time(), time.process_time()
    t0 = time.perf_counter()
    try:
        if waits is not None:
            waits.__enter__()
        if counted:
            with R.rec, R.flop, saved_tensors_hooks(R.meter.pack, R.meter.unpack):
                loss, grads = R.train_step(step, True, True)
        else:
            loss, grads = R.train_step(step, False, step == 0 or R.cfg.get("check_all_grads"))
    except Exception as e:
        raise RuntimeError(f"step {step}: {type(e).__name__}: {e}") from e
    finally:
        if waits is not None:
            waits.__exit__(None, None, None)
    _sync(device)
    dt = time.perf_counter() - t0
    phases.set_driver_phase("setup")
    phases.set_meter(None)
    res["losses"].append(loss if (R.is_last and R.topo.tp_r == 0) else None)
    res["grads"].append([(n, *_piece_meta(p), a, b, v.cpu()) for n, p, a, b, v in grads])
    if counted:
        _record_counted(R, res, dt, step == steps)
    elif step > steps:
        _record_timed(res, dt, waits, t0, time.thread_time() - cpu0, time.process_time() - pcpu0)


def _record_counted(R: _Rank, res: dict, dt: float, last: bool) -> None:
    res["step_times"].append(dt)
    res["flops"].append(dict(R.flop.by_phase))
    res.setdefault("flops_by_op", []).append({f"{a}|{b}": v for (a, b), v in R.flop.by_op.items()})
    res["coll_calls"].append({f"{g}|{k}": v for (g, k), v in R.rec.calls.items()})
    res["coll_bytes"].append({f"{g}|{k}": v for (g, k), v in R.rec.bytes.items()})
    res["coll_phase"].append({f"{g}|{k}|{p}": v for (g, k, p), v in R.rec.by_phase.items()})
    res["acts"].append({str(k): v for k, v in R.meter.per_layer().items()})
    if last:
        res["state"] = {f"{a}|{b}": v for (a, b), v in R.opt.state_bytes().items()}
        if R.device.type == "cuda":
            res["max_memory_allocated"] = torch.cuda.max_memory_allocated(R.device)


def _record_timed(res: dict, dt: float, waits, t0: float, cpu: float, pcpu: float) -> None:
    res["timed_times"].append(dt)
    res.setdefault("timed_comm_wait", []).append(waits.total)
    res.setdefault("timed_comm_waits_n", []).append(waits.calls)
    if waits.trace is not None:
        res.setdefault("wait_trace", []).append((t0, waits.trace))
    res.setdefault("timed_cpu", []).append(cpu)   # this thread's CPU seconds
    res.setdefault("timed_process_cpu", []).append(pcpu)   # all threads (gloo's included)


def worker_main(config_path: str, out_path: str):
    """Entry point of a spawned rank (validate/launch.py sets RANK, WORLD_SIZE, MASTER_*)."""
    import json
    with open(config_path) as f:
        job = json.load(f)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    for i, cfg in enumerate(job["scenarios"]):
        lay = cfg["layout"]
        need = lay["tp"] * lay["pp"] * lay["dp"] * lay["cp"]
        if need != world:     # before any rendezvous or collective: a clear error, no hang
            sys.stderr.write(f"validate: rank {rank}: {world} ranks were started but scenario {i}'s "
                             f"layout needs tp*pp*dp*cp = {need}\n")
            sys.stderr.flush()
            os._exit(2)
    device = init_rank(float(job.get("timeout", 300)))
    results = []
    for i, cfg in enumerate(job["scenarios"]):
        cfg = dict(cfg, index=i)
        try:
            r = run_scenario(cfg, device)
        except Exception as e:
            sys.stderr.write(f"validate: rank {rank} failed in scenario {i}: "
                             f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            sys.stderr.flush()
            os._exit(3)
        results.append(r)
    finish_rank(results, out_path)


HOST_MMAP_THRESHOLD = 1 << 30     # above any buffer of a model validate runs on a CPU
HOST_TRIM_THRESHOLD = 2 << 30


def keep_host_buffers() -> bool:
    """A CPU rank reuses its freed buffers instead of faulting them in again every step, as the
    CUDA caching allocator does on a GPU (torch's CPU allocator is glibc malloc: a block above the
    mmap threshold -- the flat gradient and parameter buffers of ZeRO, gloo's staging copies -- is
    a fresh mmap each step, its pages zeroed by the kernel). Measured on 8 ranks over 2 cores, dp8
    ZeRO-1 at hidden 512: main-thread CPU per step 0.61 -> 0.54 s. Calibration runs under it too."""
    from planner.heap import keep_temporaries_on_heap
    return keep_temporaries_on_heap(HOST_MMAP_THRESHOLD, HOST_TRIM_THRESHOLD)


def init_rank(timeout_s: float):
    """This spawned rank's device and process group (NCCL on a GPU, gloo on a CPU); collectives
    give up after timeout_s, so a dead peer ends the run with an error instead of a hang."""
    from datetime import timedelta
    rank = int(os.environ["RANK"])
    device = device_for(int(os.environ.get("LOCAL_RANK", rank)))
    if device.type == "cpu":
        keep_host_buffers()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    set_group_timeout(timeout_s)
    return device


def finish_rank(results, out_path: str):
    """Rank 0 writes the gathered results atomically; then every rank leaves the group."""
    if dist.get_rank() == 0:
        tmp = out_path + ".tmp"
        torch.save(results, tmp)
        os.replace(tmp, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2])
