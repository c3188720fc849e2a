"""What the trackers need on fake CPU tensors, and a local FLOP counter.

- MemTracker rounds to the CUDA caching allocator's 512 B blocks only for CUDA tensors; the run
  uses fake CPU tensors (fake CUDA + autograd aborts a CPU-only build), so the rounding is applied
  here.
- DTensor's sharding propagation runs each first-seen op on global-shape fake tensors under the
  active fake mode, which the tracker then counts (+2x the global size per op signature; 27x the
  optimizer state in the first AdamW step on FSDP parameters): propagation gets its own mode.
- MemTracker._update_peak_stats walks every tracked module after every op (quadratic in layers):
  an fqn index gives the same result in linear time, and records where the peak happened.
- FlopCounterMode decomposes ops it has no formula for (changing what a tracker in the same stack
  sees: 8B FSDP8 68 GiB instead of 27.6) and counts DTensor global shapes; LocalFlops counts the
  rank-local mm / grouped-mm / CPU-flash SDPA FLOPs with torch's own formulas and decomposes
  nothing. tests/validate/test_memory.py holds it to FlopCounterMode where both apply.

All patches are process-global: one layout per process (`python -m validate memory` is one)."""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _mm(a, k, o):   # 2mnk (torch.utils.flop_counter.mm_flop)
    x, w = a[0], a[1]
    return 2 * x.shape[0] * x.shape[1] * w.shape[1]


def _addmm(a, k, o):
    return _mm(a[1:], k, o)


def _bmm(a, k, o):   # 2bmnk (torch.utils.flop_counter.bmm_flop)
    x, w = a[0], a[1]
    return 2 * x.shape[0] * x.shape[1] * x.shape[2] * w.shape[2]


def _baddbmm(a, k, o):
    return _bmm(a[1:], k, o)


def _grouped(a, k, o):   # 2mnk summed over the groups (a grouped GEMM is one mm split by offsets)
    x, w = a[0], a[1]
    if x.dim() == 2 and w.dim() == 3:      # tokens x per-expert weight
        return 2 * x.shape[0] * x.shape[1] * w.shape[-1]
    if x.dim() == 2 and w.dim() == 2:      # weight gradient: (k, T) x (T, n) split by offs
        return 2 * x.shape[0] * x.shape[1] * w.shape[1]
    return 2 * x.shape[0] * x.shape[1] * x.shape[2] * w.shape[-1]


def _sdpa_cpu(a, k, o):   # torch.utils.flop_counter.sdpa_flop_count (full s^2, as torch counts causal)
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(a[0].shape, a[1].shape, a[2].shape)


def _sdpa_cpu_bw(a, k, o):   # torch.utils.flop_counter.sdpa_backward_flop_count
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(a[0].shape, a[1].shape, a[2].shape, a[3].shape)


def _flop_table():
    at = torch.ops.aten
    return {at.mm: _mm, at.addmm: _addmm, at.addmm_: _addmm, at.bmm: _bmm, at.baddbmm: _baddbmm, at._grouped_mm: _grouped,
            at._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
            at._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_bw}


class LocalFlops(TorchDispatchMode):
    """Counts matmul / grouped-mm / SDPA FLOPs of the rank-local ops. Unlike FlopCounterMode it never
    decomposes an op (FlopCounterMode calls func.decompose() on every op it has no formula for, which
    changes the op sequence, and so the memory, that a MemTracker in the same stack sees), and it
    returns NotImplemented for DTensor so it counts the local shards, not the global shapes."""

    def __init__(self):
        super().__init__()
        self.table = _flop_table()
        self.counts = defaultdict(int)

    def __enter__(self):
        from torch._guards import active_fake_mode
        self._mode_at_entry = active_fake_mode()   # skip DTensor's global-shape propagation ops
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor
        if any(t is DTensor for t in types):
            return NotImplemented
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        f = self.table.get(func._overloadpacket)
        from torch._guards import active_fake_mode
        if f is not None and active_fake_mode() is self._mode_at_entry:
            phase = "bwd" if torch._C._current_graph_task_id() != -1 else "fwd"
            self.counts[(phase, func._overloadpacket.__name__)] += f(args, kwargs, out)
        return out


def _round_like_cuda(on: bool):
    """MemTracker rounds to the CUDA caching allocator's 512 B blocks only for cuda tensors; we run
    on fake cpu tensors (fake cuda + autograd aborts a CPU-only build), so apply the rounding here."""
    if not on:
        return
    import torch.distributed._tools.mem_tracker as mt

    def calc(self):
        mem = self.size * self.element_size
        return math.ceil(mem / mt._PYTORCH_MIN_ALLOCATE) * mt._PYTORCH_MIN_ALLOCATE

    mt._WeakRefInfo._calculate_mem_consumed = calc


def _isolate_dtensor_propagation(on: bool):
    """DTensor sharding propagation runs each new (op, shapes, placements) on GLOBAL-shape fake
    tensors under `detect_fake_mode() or FakeTensorMode()`, i.e. under OUR fake mode, so the tracker
    (whose filter is `active_fake_mode() is mode_at_entry`) counts those global tensors: a transient
    +2x global size per first-seen op signature (AdamW's lazy zeros_like on FSDP params: 27x the
    optimizer state in the peak). Give propagation its own FakeTensorMode so the tracker skips it."""
    if on:
        import torch.distributed.tensor._sharding_prop as sp
        sp.detect_fake_mode = lambda *a, **k: None


def _fast_peak_stats(on: bool):
    """MemTracker._update_peak_stats runs after EVERY op and loops over ALL modules tracked so far
    (memory_tracking.values()) to find the active ones: O(ops x modules), i.e. quadratic in the number
    of layers (70B tp8: 10 layers 9 s, 20 layers 33 s, 80 layers 246 s). Same result, but look up only
    the active parents through an fqn -> stats index rebuilt when the module count changes."""
    if not on:
        return
    import torch.distributed._tools.mem_tracker as mt
    from copy import deepcopy

    def _update_peak_stats(self, peak_state):
        curr_snap = self._curr_mem_snap
        n = len(self.memory_tracking)
        idx = getattr(self, "_fqn_idx", None)
        if idx is None or idx[0] != n:
            idx = (n, {st.mod_fqn: st for st in self.memory_tracking.values()})
            self._fqn_idx = idx
        for fqn in self._mod_tracker.parents:
            mod_stats = idx[1].get(fqn)
            if mod_stats is None or mod_stats.mod_fqn != fqn or peak_state not in mod_stats.snapshots:
                continue
            for dev, dev_snap in curr_snap.items():
                if mod_stats.local_peak.get(dev, 0) < dev_snap[mt._TOTAL_KEY]:
                    mod_stats.local_peak[dev] = dev_snap[mt._TOTAL_KEY]
                    mod_stats.snapshots[peak_state][-1][dev] = deepcopy(dev_snap)
        for dev, dev_snap in curr_snap.items():
            if self._peak_mem.get(dev, 0) < dev_snap[mt._TOTAL_KEY]:
                self._peak_mem[dev] = dev_snap[mt._TOTAL_KEY]
                self._peak_mem_snap[dev] = deepcopy(dev_snap)
                # where the peak happened: phase and innermost active module
                phase = "optimizer" if self._in_opt else ("backward" if self._mod_tracker.is_bw else "forward")
                inner = max(self._mod_tracker.parents, key=len, default="Global")
                self._peak_where = f"{phase} @ {inner}"

    mt.MemTracker._update_peak_stats = _update_peak_stats


def clip_grad_local(params, max_norm):
    """Grad-norm clipping on the local shards. torch.nn.utils.clip_grad_norm_ stacks per-param norms,
    which fails when grads live on different meshes (MLA's replicated wq_a/wkv_a on the dp mesh vs the
    TP'd weights on dp x tp; experts on edp): 'All operands in aten.stack must have the same mesh'.
    torchtitan works around it the same way. Memory: one fp32 scalar per param."""
    grads = [p.grad for p in params if p.grad is not None]
    loc = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    if not loc:
        return
    norms = torch._foreach_norm(loc)
    total = torch.stack([n.float() for n in norms]).norm()
    torch._foreach_mul_(loc, (max_norm / (total + 1e-6)).clamp(max=1.0))




def patch_trackers() -> None:
    """Apply the three tracker patches (see the module docstring)."""
    _round_like_cuda(True)
    _isolate_dtensor_propagation(True)
    _fast_peak_stats(True)
