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
from .config import spec_from_dict, torch_dtype
from .counters import ActivationMeter, CollectiveRecorder, GroupLabeler, PhaseFlopCounter
from .model import Chunk, Ctx, Init, Rope, cp_positions, cross_entropy_sum
from .parallel import FSDPOptimizer, Groups, HandOptimizer, Topo, apply_tp, mesh_1d

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


def _progress(scenario: int, step: int):
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


def run_scenario(cfg: dict, device) -> dict | None:
    """Run one layout on every rank; rank 0 returns the gathered results, others None."""
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = spec_from_dict(cfg["model"])
    lay = cfg["layout"]
    tp, pp, dp, cp, ep, vpp = (lay[k] for k in ("tp", "pp", "dp", "cp", "ep", "vpp"))
    sp, mb, gb, s = lay["sp"], lay["micro_batch"], lay["global_batch"], lay["seq_len"]
    recompute, zero = lay["recompute"], lay["zero"]
    steps, timed = cfg["steps"], cfg.get("timed_steps", 0)
    seed = cfg["seed"]
    dtype = torch_dtype(cfg["dtype"])
    if world != tp * pp * dp * cp:
        raise RuntimeError(f"world size {world} does not match tp*pp*dp*cp = {tp * pp * dp * cp}")
    topo = Topo(world, rank, tp, cp, dp, pp, ep, vpp)
    labeler = GroupLabeler()
    groups = Groups(topo, spec.tied_embeddings and pp > 1, labeler)
    dev_type = device.type

    rope = Rope(cp_positions(s, cp, topo.cp_r), spec.head_dim, dtype, device)
    ctx = Ctx(spec, recompute, rope,
              cp=(groups.get("cp"), topo.cp_r, cp, groups.ranks.get("cp", [rank])),
              ep=(groups.get("ep"), topo.ep_r, ep))
    init = Init(seed, dtype, device)
    nv = pp * vpp
    per = spec.layers // nv
    my_vs = [topo.pp_r + v * pp for v in range(vpp)]
    chunks = [Chunk(spec, range(vs * per, (vs + 1) * per), vs == 0, vs == nv - 1, ctx, init)
              for vs in my_vs]
    names = [ch.global_names() for ch in chunks]
    if tp > 1:
        tp_mesh = mesh_1d(groups.get("tp"), dev_type, "tp")
        for ch in chunks:
            apply_tp(ch, tp_mesh, sp)
    moe_names = {g for nm in names for g in nm.values() if ".experts." in g}
    if zero == 3:
        opt = FSDPOptimizer(chunks, names, groups, LR, dev_type, moe_names)
    else:
        opt = HandOptimizer(chunks, names, groups, zero, LR, dtype, moe_names)

    flop = PhaseFlopCounter()
    rec = CollectiveRecorder(labeler)
    meter = ActivationMeter([t.untyped_storage().data_ptr() for t in rope.tensors()])
    for ch in chunks:
        for blk in ch.layers.values():
            meter.attach(blk)

    # ------------------------------------------------------------------ data for this rank
    total = 1 + steps + timed
    data = make_data(spec.vocab, gb, s, total, seed)
    rows = slice(topo.dp_r * gb // dp, (topo.dp_r + 1) * gb // dp)
    pos = cp_positions(s, cp, topo.cp_r)
    inputs = data[:, rows, :-1][:, :, pos].to(device)
    targets = data[:, rows, 1:][:, :, pos].to(device)
    nmb = gb // (dp * mb)
    norm = float(gb * s)

    tp_mesh_loss = mesh_1d(groups.get("tp"), dev_type, "tp") if tp > 1 else None

    def loss_fn(out, tgt):
        if tp > 1:
            # vocab-parallel cross entropy (run_microbatches enters loss_parallel for the whole
            # step, as its backward must run inside it too)
            logits = DTensor.from_local(out, tp_mesh_loss, [Shard(-1)], run_check=False)
            l = torch.nn.functional.cross_entropy(logits.flatten(0, -2), tgt.flatten(), reduction="sum")
            return l.to_local() / norm
        return cross_entropy_sum(out, tgt) / norm

    sched = None
    if pp > 1:
        from torch.distributed.pipelining import (PipelineStage, Schedule1F1B,
                                                  ScheduleInterleaved1F1B)

        class _Stage(PipelineStage):
            """Lets ZeRO-2 reduce-scatter after each micro-batch's backward of this chunk."""
            ci = 0

            def backward_one_chunk(self, *a, **k):
                r = super().backward_one_chunk(*a, **k)
                opt.microbatch_done(self.ci)
                return r

        stages = []
        for ci, (vs, ch) in enumerate(zip(my_vs, chunks)):
            st = _Stage(ch, vs, nv, device, group=groups.get("pp"))
            st.ci = ci
            stages.append(st)
        if vpp > 1:
            sched = ScheduleInterleaved1F1B(stages, nmb, loss_fn=loss_fn, scale_grads=False)
        else:
            sched = Schedule1F1B(stages[0], nmb, loss_fn=loss_fn, scale_grads=False)

    is_last = chunks[-1].last
    is_first = chunks[0].first

    def run_microbatches(step):
        if tp > 1:
            from torch.distributed.tensor.parallel import loss_parallel
            with loss_parallel():
                return _run_microbatches(step)
        return _run_microbatches(step)

    def _run_microbatches(step):
        x, y = inputs[step], targets[step]
        tot = 0.0
        if sched is not None:
            losses = []
            if is_first and is_last:
                sched.step(x, target=y, losses=losses)
            elif is_first:
                sched.step(x)
            elif is_last:
                sched.step(target=y, losses=losses)
            else:
                sched.step()
            tot = float(sum(float(l) for l in losses))
        else:
            ch = chunks[0]
            for j in range(nmb):
                out = ch(x[j * mb:(j + 1) * mb])
                loss = loss_fn(out, y[j * mb:(j + 1) * mb])
                loss.backward()
                tot += float(loss.detach())
                opt.microbatch_done(0)
        return tot

    res = dict(rank=rank, coords=topo.coords(), losses=[], step_times=[], timed_times=[],
               flops=[], coll_calls=[], coll_bytes=[], coll_phase=[], acts=[], grads=[],
               state=None, unknown=[])
    fault = cfg.get("fault") or {}
    if fault.get("kind") == "skip_grad_sync":
        opt.reduce_hook = None   # test hook: gradients stay local (a layout computing something else)
    for step in range(total):
        _progress(cfg.get("index", 0), step)
        _inject(fault, rank, step)
        counted = 1 <= step <= steps
        opt.zero_grad()
        flop.reset(), rec.reset(), meter.reset()
        meter.enabled = counted
        phases.set_meter(meter if counted else None)
        _sync(device)
        waits = CommWait() if step > steps else None
        cpu0, pcpu0 = time.thread_time(), time.process_time()
        t0 = time.perf_counter()
        try:
            if waits is not None:
                waits.__enter__()
            if counted:
                with rec, flop, saved_tensors_hooks(meter.pack, meter.unpack):
                    phases.set_driver_phase("forward")
                    loss = run_microbatches(step)
                    phases.set_driver_phase("optimizer")
                    opt.reduce()
                    grads = opt.grad_pieces()
                    opt.step()
            else:
                phases.set_driver_phase("forward")
                loss = run_microbatches(step)
                phases.set_driver_phase("optimizer")
                opt.reduce()
                grads = opt.grad_pieces() if step == 0 or cfg.get("check_all_grads") else []
                opt.step()
        except Exception as e:
            raise RuntimeError(f"step {step}: {type(e).__name__}: {e}") from e
        finally:
            if waits is not None:
                waits.__exit__(None, None, None)
        _sync(device)
        dt = time.perf_counter() - t0
        cpu, pcpu = time.thread_time() - cpu0, time.process_time() - pcpu0
        phases.set_driver_phase("setup")
        phases.set_meter(None)
        res["losses"].append(loss if (is_last and topo.tp_r == 0) else None)
        res["grads"].append([(n, *_piece_meta(p), a, b, v.cpu()) for n, p, a, b, v in grads])
        if counted:
            res["step_times"].append(dt)
            res["flops"].append(dict(flop.by_phase))
            res.setdefault("flops_by_op", []).append({f"{a}|{b}": v for (a, b), v in flop.by_op.items()})
            res["coll_calls"].append({f"{g}|{k}": v for (g, k), v in rec.calls.items()})
            res["coll_bytes"].append({f"{g}|{k}": v for (g, k), v in rec.bytes.items()})
            res["coll_phase"].append({f"{g}|{k}|{p}": v for (g, k, p), v in rec.by_phase.items()})
            res["acts"].append({str(k): v for k, v in meter.per_layer().items()})
            if step == steps:
                res["state"] = {f"{a}|{b}": v for (a, b), v in opt.state_bytes().items()}
                if device.type == "cuda":
                    res["max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
        elif step > steps:
            res["timed_times"].append(dt)
            res.setdefault("timed_comm_wait", []).append(waits.total)
            res.setdefault("timed_comm_waits_n", []).append(waits.calls)
            if waits.trace is not None:
                res.setdefault("wait_trace", []).append((t0, waits.trace))
            res.setdefault("timed_cpu", []).append(cpu)   # this thread's CPU seconds
            res.setdefault("timed_process_cpu", []).append(pcpu)   # all threads (gloo's included)
    res["moe_layers"] = [blk.idx for ch in chunks for blk in ch.layers.values() if blk.moe_layer]
    res["layers"] = [blk.idx for ch in chunks for blk in ch.layers.values()]
    res["first"], res["last"] = is_first, is_last
    out = [None] * world if rank == 0 else None
    dist.gather_object(res, out, dst=0)
    return out


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


def init_rank(timeout_s: float):
    """This spawned rank's device and process group (NCCL on a GPU, gloo on a CPU); collectives
    give up after timeout_s, so a dead peer ends the run with an error instead of a hang."""
    from datetime import timedelta
    rank = int(os.environ["RANK"])
    device = device_for(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
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
