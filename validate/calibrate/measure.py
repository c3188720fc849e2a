"""What `python -m validate calibrate` measures, and how one rank measures it.

The plan (a list of JSON-able items) is built once, by the launcher or by rank 0 under torchrun,
and every rank walks it in the same order:

- gemm      (m, n, k, dtype): torch.mm throughput
- attention (b, heads, kv_heads, s, d, dtype): causal flash attention forward + backward (the
            kernels validate's model runs: the CPU flash kernel on CPU, SDPA on GPU)
- memory    (op, bytes): streaming elementwise kernels over a buffer (copy, add, scale)
- overhead  (layers): forward + backward + Adam step of validate's own transformer at a tiny size,
            where nothing but per-kernel host overhead costs time (and forward + backward alone)
- collective(op, level, group, bytes): all_reduce, all_gather, reduce_scatter, all_to_all,
            send_recv (a pairwise exchange, both directions at once, as the pipeline's and the
            context-parallel ring's sends are) on groups of `group` ranks

Compute, memory and overhead items run on every rank at once, as the ranks of a training run
do: on a GPU each rank owns its device; on a CPU the ranks share the cores, so what a rank
measures is its share of the machine while all ranks work, which is what it gets in a run.
Collective items run every group of the given size at once (all world/group of them), again
as in a run. Each timing is a fixed wall-clock window (compute) or an agreed repetition count
(collectives; every member must issue the same calls). A back-to-back collective also records the
CPU seconds its rank spent (every thread): on ranks that share cores that, not the wait, is what
the collective takes from a training step.
"""
from __future__ import annotations

import os
import time

KIB, MIB = 1024, 1024 * 1024
PROBE_REPS = 5          # least repetitions of a model-step probe (overhead, layer and TP probes)
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")


# ---------------------------------------------------------------------------------------------
# the plan (pure Python: built before any rank starts)
def byte_sizes(lo: int, hi: int, factor: int = 4) -> list:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= factor
    if out and out[-1] != hi and hi > lo:
        out.append(hi)
    return out


def group_sizes(world: int, local: int, spanning: bool = False) -> list:
    """(level, group size, stride) of the collective groups to measure: powers of two inside a
    host (stride 1), and for several hosts one member per host (stride = ranks per host), which
    is the planner's k_in = 1 case for the outer level; `spanning`: also the whole world as one
    group (k_in = ranks per host: every host's members share its link), for backends whose rings
    are flat (gloo), where such a group crosses hosts once per ring step."""
    out = []
    g = 2
    while g <= local:
        if local % g == 0:
            out.append((0, g, 1))
        g *= 2
    if local > 1 and local not in [x[1] for x in out]:
        out.append((0, local, 1))
    nodes = world // local
    if nodes > 1:
        out.append((1, nodes, local))
        if spanning and local > 1:
            out.append((1, world, 1))
    return out


def build_plan(*, world: int, local: int, device: str, quick: bool, max_bytes: int | None = None,
               precisions=None, loaded_max: int | None = None, loaded: bool = True) -> list:
    """The measurement items in the order every rank runs them."""
    cuda = device == "cuda"
    items = []
    if precisions is None:
        precisions = ["bfloat16", "float32"] if cuda else ["float32", "bfloat16"]
    if cuda:
        dims = [64, 128, 256, 512, 1024, 2048, 4096, 8192] if not quick else [128, 512, 2048, 8192]
        big = 8192 if not quick else 4096
    else:
        dims = [8, 16, 32, 64, 128, 256, 512, 1024] if not quick else [16, 64, 256, 512]
        big = 1024 if not quick else 512
    for dt in precisions:
        slow = (not cuda) and dt != "float32"
        if slow:
            # no bf16 matrix units on most CPUs (emulated): a few shapes say so, a grid would take minutes
            shapes = [(256, 256, 256)] if quick else [(64, 64, 64), (256, 256, 256), (512, 512, 512)]
        else:
            shapes = set()
            for x in dims:
                shapes |= {(x, big, big), (big, x, big), (big, big, x), (x, x, x)}
            shapes = sorted(shapes)
        for m, n, k in shapes:
            items.append(dict(kind="gemm", m=m, n=n, k=k, dtype=dt))
    att_dt = precisions[0] if cuda else "float32"
    if cuda:
        att = [(4, 16, 16, 1024, 128), (2, 16, 16, 2048, 128), (1, 32, 8, 4096, 128), (1, 32, 8, 8192, 128)]
        if quick:
            att = att[:2]
    else:
        att = [(1, 4, 2, 128, 64), (1, 4, 2, 256, 64), (1, 8, 4, 512, 64), (2, 8, 4, 1024, 64)]
        if quick:
            att = att[1:3]
    for b, h, kvh, s, d in att:
        items.append(dict(kind="attention", b=b, heads=h, kv_heads=kvh, s=s, d=d, dtype=att_dt))
    mem = [1 * MIB, 16 * MIB, 64 * MIB] if not cuda else [64 * MIB, 256 * MIB, 1024 * MIB]
    if quick:
        mem = mem[1:]
    for nbytes in mem:
        for op in ("copy", "add", "scale"):
            items.append(dict(kind="memory", op=op, bytes=nbytes, dtype="float32"))
    for layers in (1, 3):
        items.append(dict(kind="overhead", layers=layers, dtype="float32"))
    # the tiny step again with DTensor tensor parallelism (+ SP) over pairs of ranks: its host cost
    # per sharded layer, beyond the kernels and the TP collectives
    if local >= 2 and local % 2 == 0:
        for layers in (1, 3):
            items.append(dict(kind="overhead", layers=layers, dtype="float32", tp=2))
    # the same step at a training-like size: what the planner's terms leave over is elementwise
    lh, ls = ((2048, 2048) if cuda else (512, 256)) if not quick else ((1024, 1024) if cuda else (256, 128))
    for layers in (1, 3):
        items.append(dict(kind="overhead", layers=layers, dtype="float32", hidden=lh, seq=ls))
    hi = max_bytes or ((4 * MIB if cuda else 1 * MIB) if quick else 256 * MIB)
    sizes = byte_sizes(4 * KIB, hi, 4 if not quick else 16)
    groups = group_sizes(world, local, spanning=not cuda)
    loaded_hi = min(hi, (4 * MIB if quick else 16 * MIB)) if loaded_max is None else min(hi, loaded_max)
    for loaded in ((False, True) if loaded else (False,)):
        for level, g, stride in groups:
            for op in COLLECTIVES:
                if op == "send_recv" and any(x[0] == level and x[1] < g for x in groups):
                    continue     # pairs exchange alike in any group size: measured once per level
                if op == "all_to_all" and level > 0 and stride == 1:
                    continue     # the planner does not pool links for all-to-all (one per host is its case)
                for nbytes in sizes:
                    if loaded and nbytes > loaded_hi:
                        continue
                    items.append(dict(kind="collective", op=op, level=level, group=g, stride=stride,
                                      bytes=nbytes, loaded=loaded))
    return items


def describe(item: dict) -> str:
    k = item["kind"]
    if k == "gemm":
        return f"gemm {item['m']}x{item['n']}x{item['k']} {item['dtype']}"
    if k == "attention":
        return f"attention b{item['b']} h{item['heads']} s{item['s']} d{item['d']}"
    if k == "memory":
        return f"memory {item['op']} {_size(item['bytes'])}"
    if k == "overhead":
        return (f"{item['layers']}-layer step" + (f" at hidden {item['hidden']}, seq {item['seq']}"
                                                  if item.get("hidden") else " at a tiny size")
                + (f" with tp {item['tp']}" if item.get("tp", 1) > 1 else ""))
    return (f"{item['op']} {_size(item['bytes'])} in groups of {item['group']}"
            + (" between GEMMs" if item.get("loaded") else ""))


def _size(n: int) -> str:
    for unit, f in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= f and n % f == 0:
            return f"{n // f} {unit}"
    return f"{n} B"


def probe_spec(it: dict):
    """The model of an overhead item: validate's transformer, tiny unless sized."""
    from planner.model_spec import ModelSpec
    h = it.get("hidden", 16)
    heads = max(h // 64, 2)
    return ModelSpec(name="overhead-probe", layers=it["layers"], hidden=h, heads=heads,
                     kv_heads=max(heads // 2, 1) if h > 16 else heads, ffn_hidden=2 * h,
                     vocab=max(2 * h, 32), mlp="swiglu")


def available_bytes(device) -> int | None:
    """Free memory a rank may use for one collective's buffers."""
    try:
        import torch
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free)
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
                    return int(line.split()[1]) * 1024 // max(local, 1)
    except Exception:
        return None
    return None


# ---------------------------------------------------------------------------------------------
# one rank
class Rank:
    def __init__(self, device, window: float, progress=None):
        import torch
        import torch.distributed as dist
        self.torch, self.dist = torch, dist
        self.device = device
        self.window = window
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        self.groups = {}
        self._chunk = None
        self.progress = progress
        self.cap = available_bytes(device)
        self.last_cpu = self.last_thread_cpu = None   # every thread's; the calling thread's alone

    # ---------------------------------------------------------------- timing
    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def agreed_estimate(self, fn, warmup=1, probe: float = 0.0) -> float:
        """Warm fn up, then time one call (or as many as fit in `probe` seconds); the slowest
        rank's time per call, agreed by every rank."""
        t, dist = self.torch, self.dist
        for _ in range(warmup):
            fn()
        self.sync()
        dist.barrier()
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            self.sync()
            n += 1
            el = time.perf_counter() - t0
            if el >= probe:
                break
        est = t.tensor([el / n], device=self.device)
        dist.all_reduce(est, op=dist.ReduceOp.MAX)
        return est.item()

    def agreed_reps(self, est: float, cap: int = 200, least: int = 2) -> int:
        return int(min(max(self.window / max(est, 1e-6), least), cap))

    def agreed_time(self, fn, warmup=1, cap: int = 200, probe: float = 0.0, least: int = 2):
        """Seconds per call of fn when every rank makes the same number of calls (fn may issue
        collectives: a window ended by each rank's own clock would leave a peer waiting in one).
        The clock stops when the slowest rank is done: on ranks that share cores, one that finished
        early would give its share to the others and make them look faster than a training step,
        where all of them work to the end, lets them be."""
        reps = self.agreed_reps(self.agreed_estimate(fn, warmup, probe), cap, least)
        self.dist.barrier()
        c0, h0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
        for _ in range(reps):
            fn()
        self.sync()
        self.last_cpu = (time.process_time() - c0) / reps
        self.last_thread_cpu = (time.thread_time() - h0) / reps
        self.dist.barrier()
        return (time.perf_counter() - t0) / reps, reps

    def window_time(self, fn, warmup=1, min_reps: int = 1):
        """Seconds per call of fn, all ranks running it at once for a fixed window (fn must not
        issue collectives: each rank ends the window by its own clock). Also records the CPU
        seconds per call of this rank (every thread) in self.last_cpu: on ranks that share cores,
        the wall clock of one rank depends on when the others stop; its CPU seconds do not."""
        for _ in range(warmup):
            fn()
        self.sync()
        self.dist.barrier()
        reps, c0, h0, t0 = 0, time.process_time(), time.thread_time(), time.perf_counter()
        batch = 1
        while True:
            for _ in range(batch):
                fn()
            self.sync()
            reps += batch
            el = time.perf_counter() - t0
            if el >= self.window and reps >= min_reps:
                break
            if self.device.type == "cuda":
                batch = min(batch * 2, 64)
        self.last_cpu = (time.process_time() - c0) / reps
        self.last_thread_cpu = (time.thread_time() - h0) / reps
        return el / reps, reps

    # ---------------------------------------------------------------- items
    def run(self, item: dict) -> dict:
        k = item["kind"]
        return getattr(self, f"_{k}")(item)

    def _dtype(self, name):
        return getattr(self.torch, name)

    def _gemm(self, it):
        t = self.torch
        dt = self._dtype(it["dtype"])
        a = t.randn(it["m"], it["k"], dtype=dt, device=self.device)
        b = t.randn(it["k"], it["n"], dtype=dt, device=self.device)
        out = t.empty(it["m"], it["n"], dtype=dt, device=self.device)
        sec, reps = self.window_time(lambda: t.mm(a, b, out=out))
        return dict(seconds=sec, reps=reps, cpu_s=self.last_cpu, flops=2.0 * it["m"] * it["n"] * it["k"])

    def _attention(self, it):
        t = self.torch
        dt = self._dtype(it["dtype"])
        b, h, kvh, s, d = it["b"], it["heads"], it["kv_heads"], it["s"], it["d"]
        q = t.randn(b, h, s, d, dtype=dt, device=self.device)
        k = t.randn(b, kvh, s, d, dtype=dt, device=self.device)
        v = t.randn(b, kvh, s, d, dtype=dt, device=self.device)
        g = t.randn(b, h, s, d, dtype=dt, device=self.device)
        if self.device.type == "cpu":
            aten = t.ops.aten

            def fn():
                o, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
                aten._scaled_dot_product_flash_attention_for_cpu_backward(g, q, k, v, o, lse, 0.0, True)
        else:
            qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
            rep = h // kvh

            def fn():
                kr = kk.repeat_interleave(rep, 1) if rep > 1 else kk
                vr = vv.repeat_interleave(rep, 1) if rep > 1 else vv
                o = t.nn.functional.scaled_dot_product_attention(qq, kr, vr, is_causal=True)
                o.backward(g)
        sec, reps = self.window_time(fn)
        # the planner's count: causal forward = half of 2*s*s*(dq + dv) per head and sequence
        fwd = 2.0 * b * s * s * 2 * d * h * 0.5
        return dict(seconds=sec, reps=reps, forward_flops=fwd)

    def _memory(self, it):
        t = self.torch
        n = it["bytes"] // 4
        x = t.randn(n, device=self.device)
        y = t.randn(n, device=self.device)
        z = t.empty(n, device=self.device)
        op = it["op"]
        if op == "copy":
            fn, moved = (lambda: z.copy_(x)), 2 * n * 4
        elif op == "add":
            fn, moved = (lambda: t.add(x, y, out=z)), 3 * n * 4
        else:
            fn, moved = (lambda: t.mul(x, 1.0001, out=z)), 2 * n * 4
        sec, reps = self.window_time(fn)
        return dict(seconds=sec, reps=reps, cpu_s=self.last_cpu, bytes_moved=moved)

    def _overhead(self, it):
        """A training step of validate's own model with `layers` layers at a tiny size: the
        difference between layer counts is the host cost of one layer's kernels."""
        t = self.torch
        from ..model import Chunk, Ctx, Init, Rope, cross_entropy_sum
        spec = probe_spec(it)
        dt = self._dtype(it["dtype"])
        s = it.get("seq", 16)
        ctx = Ctx(spec, "none", Rope(t.arange(s), spec.head_dim, dt, self.device))
        model = Chunk(spec, range(spec.layers), True, True, ctx, Init(0, dt, self.device))
        x = t.randint(0, spec.vocab, (1, s), device=self.device)
        y = t.randint(0, spec.vocab, (1, s), device=self.device)
        tp = it.get("tp", 1)
        if tp > 1:
            # as validate's worker runs TP: parallel styles with SP, vocab-parallel loss
            from torch.distributed.tensor import DTensor, Shard
            from torch.distributed.tensor.parallel import loss_parallel
            from ..groups import mesh_1d
            from ..parallel import apply_tp
            g, _ = self._group(0, tp, 1)
            mesh = mesh_1d(g, self.device.type, "tp")
            apply_tp(model, mesh, True)

            def loss_of():
                with loss_parallel():
                    logits = DTensor.from_local(model(x), mesh, [Shard(-1)], run_check=False)
                    loss = t.nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="sum")
                    loss.backward()
        else:
            def loss_of():
                cross_entropy_sum(model(x), y).backward()
        opt = t.optim.Adam(model.parameters(), lr=1e-3)

        def fwd_bwd():
            opt.zero_grad(set_to_none=True)
            loss_of()

        def fn():
            fwd_bwd()
            opt.step()
        # a probe step is long (a second at the layer size on a shared CPU): at least PROBE_REPS
        # of it, whatever the window, or the difference of two differences below is noise
        if tp == 1:
            def timer(f, warmup):
                return self.window_time(f, warmup, min_reps=PROBE_REPS)
        else:                                    # TP issues collectives: an agreed count
            def timer(f, warmup):
                return self.agreed_time(f, warmup, least=PROBE_REPS)
        sec, reps = timer(fn, warmup=2)
        cpu = self.last_cpu
        # forward + backward alone: what the layer probe fits (the optimizer step apart)
        sec_fb, _ = timer(fwd_bwd, warmup=1)
        cpu_fb, thread_fb = self.last_cpu, self.last_thread_cpu
        # and the optimizer step alone (the gradients of the last backward stay in place): timed
        # directly, not as the difference of two noisy step times
        sec_opt, _ = timer(opt.step, warmup=1)
        return dict(seconds=sec, reps=reps, cpu_s=cpu, fwd_bwd_s=sec_fb, fwd_bwd_cpu_s=cpu_fb,
                    fwd_bwd_thread_cpu_s=thread_fb, opt_s=sec_opt, opt_cpu_s=self.last_cpu)

    # ---------------------------------------------------------------- collectives
    def _group(self, level, size, stride):
        key = (size, stride)
        if key not in self.groups:
            from ..groups import new_group
            mine = None
            if stride == 1:
                lists = [list(range(i, i + size)) for i in range(0, self.world, size)]
            else:
                lists = [list(range(i, self.world, stride)) for i in range(stride)]
            for ranks in lists:      # every rank creates every group, in the same order
                g = new_group(ranks)
                if self.rank in ranks:
                    mine = (g, ranks)
            self.groups[key] = mine
        return self.groups[key]

    def _collective(self, it):
        t, dist = self.torch, self.dist
        g, ranks = self._group(it["level"], it["group"], it["stride"])
        n = len(ranks)
        op = it["op"]
        elems = max(it["bytes"] // 4, n)
        elems -= elems % n
        need = {"all_reduce": 1, "all_gather": 1 + 1 / n, "reduce_scatter": 1 + 1 / n,
                "all_to_all": 2, "send_recv": 2}[op] * elems * 4
        # every rank decides alike whether the buffers fit (a split decision would hang a group)
        ok = t.tensor([0.0 if (self.cap is None or need * 3 < self.cap) else 1.0], device=self.device)
        dist.all_reduce(ok)
        if ok.item() > 0:
            return dict(skipped="not enough free memory", seconds=None)
        x = t.ones(elems, device=self.device)
        me = ranks.index(self.rank)
        if op == "all_reduce":
            fn = lambda: dist.all_reduce(x, group=g)  # noqa: E731
        elif op == "all_gather":
            shard = x[: elems // n].clone()
            fn = lambda: dist.all_gather_into_tensor(x, shard, group=g)  # noqa: E731
        elif op == "reduce_scatter":
            out = t.empty(elems // n, device=self.device)
            fn = lambda: dist.reduce_scatter_tensor(out, x, group=g)  # noqa: E731
        elif op == "all_to_all":
            y = t.empty_like(x)
            fn = lambda: dist.all_to_all_single(y, x, group=g)  # noqa: E731
        else:
            # pairwise exchange: ranks 2i and 2i+1 of the group swap buffers
            peer = ranks[me ^ 1] if (me ^ 1) < n else ranks[me]
            y = t.empty_like(x)

            def fn():
                if peer == self.rank:
                    return
                reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, peer, g),
                                               dist.P2POp(dist.irecv, y, peer, g)])
                for r in reqs:
                    r.wait()
        # warm-up (connections, buffers), then one timed call to agree on a repetition count
        est = self.agreed_estimate(fn)
        if it.get("loaded"):
            return self._loaded(fn, est, ranks)
        reps = self.agreed_reps(est)
        dist.barrier()
        c0 = time.process_time()       # CPU of every thread of this rank (gloo's I/O threads too)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        self.sync()
        sec = (time.perf_counter() - t0) / reps
        cpu = (time.process_time() - c0) / reps
        return dict(seconds=sec, reps=reps, group_ranks=ranks, cpu_s=cpu)

    def _loaded(self, fn, est, ranks):
        """The collective as a training step meets it: between GEMMs, every rank alternating
        compute and communication. A chunk of GEMM work (the same on every rank, about four times
        the collective's own time) runs alone, then followed by the collective; the difference
        per repetition is the collective's cost amid compute. On a GPU about the collective's own
        time; on ranks that share CPU cores, its copies and wake-ups wait behind the other ranks'
        compute."""
        t, dist = self.torch, self.dist
        if self._chunk is None:
            a = t.randn(256, 256, device=self.device)
            b = t.randn(256, 256, device=self.device)
            self._chunk_ops = (a, b)
            per, _ = self.window_time(lambda: t.mm(a, b), warmup=2)
            per_t = t.tensor([per], device=self.device)
            dist.all_reduce(per_t, op=dist.ReduceOp.MAX)
            self._chunk = per_t.item()
        a, b = self._chunk_ops
        k = int(min(max(4 * est / self._chunk, 20), 20000))   # same on every rank (agreed est)
        reps = int(min(max(self.window / (k * self._chunk + est), 3), 50))

        def chunk():
            for _ in range(k):
                t.mm(a, b)
        chunk()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            chunk()
            self.sync()
        base = (time.perf_counter() - t0) / reps
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            chunk()
            fn()
            self.sync()
        both = (time.perf_counter() - t0) / reps
        return dict(seconds=max(both - base, 1e-7), reps=reps, group_ranks=ranks, chunk_s=base,
                    alone_s=est)


def measure(plan: list, device, window: float, progress=None) -> list:
    """Walk the plan on this rank; returns [result dict] in plan order."""
    r = Rank(device, window)
    out = []
    for i, item in enumerate(plan):
        if progress is not None:
            progress(i)
        res = r.run(item)
        res["rank"] = r.rank
        out.append(res)
    return out
