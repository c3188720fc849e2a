"""What a rank measures during a step: FLOPs by phase, collectives by group and kind, saved
activations per layer and micro-batch, and the bytes of parameters, gradients and optimizer
state it holds.

Both dispatch modes return NotImplemented for DTensor arguments, so DTensor's own dispatch runs
and the *local* operations it issues -- the real per-rank matmuls, and the collectives that
DTensor, loss_parallel, FSDP2 and torch.distributed.pipelining issue -- come back through the
mode and are seen. Operations on FakeTensors (DTensor's sharding propagation) are run but not
counted.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import (FlopCounterMode, _FlopCounterMode, sdpa_backward_flop_count,
                                      sdpa_flop_count)

from . import phases

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.4
    from torch.distributed._tensor import DTensor

aten = torch.ops.aten


def _subclass_args(args, kwargs):
    """(any DTensor, any other tensor subclass) among the arguments."""
    dt = other = False
    for a in tree_flatten((args, kwargs))[0]:
        if isinstance(a, torch.Tensor) and type(a) not in (torch.Tensor, nn.Parameter):
            if isinstance(a, DTensor):
                dt = True
            else:
                other = True
    return dt, other


# ---------------------------------------------------------------------------------------------
# FLOPs
def _cpu_sdpa_flop(query, key, value, *args, out_val=None, **kwargs):
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_sdpa_bwd_flop(grad_out, query, key, value, *args, out_val=None, **kwargs):
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_cpu_sdpa_flop._get_raw = True
_cpu_sdpa_bwd_flop._get_raw = True

# torch's flop registry knows the CUDA flash/efficient/cudnn SDPA kernels but not the CPU flash
# kernel (torch/utils/flop_counter.py flop_registry); count it with the same formulas.
CPU_SDPA_MAPPING = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_bwd_flop,
}


class _LocalFlopMode(_FlopCounterMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dt, other = _subclass_args(args, kwargs or {})
        if other and not dt:   # FakeTensors of sharding propagation: run, do not count
            return func(*args, **(kwargs or {}))
        if dt:
            # DTensor: count registered ops here, let DTensor run everything else undecomposed
            out = func(*args, **(kwargs or {}))
            if func._overloadpacket in self.counter.flop_registry:
                self.counter._count_flops(func._overloadpacket, out, args, kwargs or {})
            return out
        return super().__torch_dispatch__(func, types, args, kwargs)


def _to_local(x):
    return x._local_tensor if isinstance(x, DTensor) else x


class PhaseFlopCounter(FlopCounterMode):
    """torch.utils.flop_counter.FlopCounterMode with counts split by phase (forward, backward,
    recompute) and per-rank (local) shapes under DTensor (ops on DTensors are counted at the
    DTensor level from the local shards of their operands). It counts what the registry knows:
    mm/addmm/bmm/baddbmm, convolutions and scaled-dot-product attention (without regard to the
    causal mask: torch/utils/flop_counter.py sdpa_flop); it does not count elementwise ops,
    norms, softmax, embedding lookups or the optimizer."""

    def __init__(self):
        super().__init__(display=False, custom_mapping=CPU_SDPA_MAPPING)
        self.by_phase = defaultdict(int)
        self.by_op = defaultdict(int)

    def reset(self):
        self.by_phase.clear()
        self.by_op.clear()

    def __enter__(self):
        self.mode = _LocalFlopMode(self)
        self.mode.__enter__()
        return self

    def __exit__(self, *args):
        self.mode.__exit__(*args)
        self.mode = None
        return False

    def _count_flops(self, func_packet, out, args, kwargs):
        f = self.flop_registry.get(func_packet)
        if f is not None:
            # a DTensor matmul is counted from its operands' local shards: the shapes this rank
            # multiplies (DTensor's C++ dispatch runs the local kernel out of reach of modes)
            args, kwargs, out = tree_map(_to_local, (args, kwargs, out))
            n = int(f(*args, **kwargs, out_val=out))
            ph = phases.current()
            self.by_phase[ph] += n
            self.by_op[(ph, func_packet.__name__)] += n
        return out


# ---------------------------------------------------------------------------------------------
# collectives
def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


# op name -> (kind, function(args) -> bytes). Bytes follow planner/collectives.py: all-reduce the
# buffer, all-gather the gathered output, reduce-scatter the full input, all-to-all what this rank
# sends, send/recv the message.
_C10D = {
    "allreduce_": ("all_reduce", lambda a: _nbytes(a[0])),
    "allreduce_coalesced_": ("all_reduce", lambda a: _nbytes(a[0])),
    "allgather_": ("all_gather", lambda a: _nbytes(a[0])),
    "_allgather_base_": ("all_gather", lambda a: _nbytes(a[0])),
    "allgather_coalesced_": ("all_gather", lambda a: _nbytes(a[0])),
    "allgather_into_tensor_coalesced_": ("all_gather", lambda a: _nbytes(a[0])),
    "reduce_scatter_": ("reduce_scatter", lambda a: _nbytes(a[1])),
    "_reduce_scatter_base_": ("reduce_scatter", lambda a: _nbytes(a[1])),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", lambda a: _nbytes(a[1])),
    "alltoall_base_": ("all_to_all", lambda a: _nbytes(a[1])),
    "alltoall_": ("all_to_all", lambda a: _nbytes(a[1])),
    "send": ("send", lambda a: _nbytes(a[0])),
    "recv_": ("recv", lambda a: _nbytes(a[0])),
    "recv_any_source_": ("recv", lambda a: _nbytes(a[0])),
    "broadcast_": ("broadcast", lambda a: _nbytes(a[0])),
    "reduce_": ("reduce", lambda a: _nbytes(a[0])),
    "gather_": ("gather", lambda a: _nbytes(a[1])),
    "scatter_": ("scatter", lambda a: _nbytes(a[0])),
    "barrier": ("barrier", lambda a: 0),
    "monitored_barrier_": ("barrier", lambda a: 0),
}
_FUNCTIONAL = {
    "all_reduce": ("all_reduce", lambda a: _nbytes(a[0]), 2),
    "all_reduce_": ("all_reduce", lambda a: _nbytes(a[0]), 2),
    "all_reduce_coalesced": ("all_reduce", lambda a: _nbytes(a[0]), 2),
    "all_reduce_coalesced_": ("all_reduce", lambda a: _nbytes(a[0]), 2),
    "all_gather_into_tensor": ("all_gather", lambda a: _nbytes(a[0]) * a[1], 2),
    "all_gather_into_tensor_out": ("all_gather", lambda a: _nbytes(a[0]) * a[1], 2),
    "all_gather_into_tensor_coalesced": ("all_gather", lambda a: _nbytes(a[0]) * a[1], 2),
    "reduce_scatter_tensor": ("reduce_scatter", lambda a: _nbytes(a[0]), 3),
    "reduce_scatter_tensor_out": ("reduce_scatter", lambda a: _nbytes(a[0]), 3),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", lambda a: _nbytes(a[0]), 3),
    "all_to_all_single": ("all_to_all", lambda a: _nbytes(a[0]), 3),
    "broadcast": ("broadcast", lambda a: _nbytes(a[0]), 2),
    "broadcast_": ("broadcast", lambda a: _nbytes(a[0]), 2),
}


class CollectiveRecorder(TorchDispatchMode):
    """Records every c10d collective and point-to-point op by (group label, kind): calls and
    bytes, split by phase. It sees the dispatcher ops that torch.distributed's Python API
    (dist.all_reduce, batch_isend_irecv, ...) and the functional collectives (DTensor, FSDP2,
    pipelining) both lower to, not a Python wrapper."""

    def __init__(self, labeler):
        super().__init__()
        self.labeler = labeler
        self.enabled = True
        self.calls = defaultdict(int)     # (label, kind) -> calls
        self.bytes = defaultdict(int)     # (label, kind) -> bytes
        self.by_phase = defaultdict(int)  # (label, kind, phase) -> bytes
        self.unknown = []

    def reset(self):
        self.calls.clear()
        self.bytes.clear()
        self.by_phase.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dt, other = _subclass_args(args, kwargs)
        if dt:
            return NotImplemented
        if self.enabled and not other:
            ns = func.namespace
            name = func._overloadpacket.__name__
            if ns == "c10d" and name in _C10D:
                kind, nb = _C10D[name]
                pg = next((a for a in args if isinstance(a, torch.ScriptObject)), None)
                self._add(self.labeler.label_pg(pg), kind, nb(args))
            elif ns in ("_c10d_functional", "_c10d_functional_autograd") and name in _FUNCTIONAL:
                kind, nb, gi = _FUNCTIONAL[name]
                g = args[gi] if len(args) > gi else kwargs.get("group_name")
                label = (self.labeler.label_pg(g) if isinstance(g, torch.ScriptObject)
                         else self.labeler.label_name(g))
                self._add(label, kind, nb(args))
        return func(*args, **kwargs)

    def _add(self, label, kind, nbytes):
        self.calls[(label, kind)] += 1
        self.bytes[(label, kind)] += int(nbytes)
        self.by_phase[(label, kind, phases.current())] += int(nbytes)


class GroupLabeler:
    """Names process groups: by the identity of the groups this run created (tp, cp, dp, ...),
    else by the smallest named group holding the same ranks (e.g. pipelining's 2-rank
    sub-communicators count as pp)."""

    def __init__(self):
        self.by_name = {}      # group_name -> label
        self.rank_sets = []    # (ranks frozenset, label)

    def add(self, label, pg):
        import torch.distributed as dist
        if pg is None:
            return
        self.by_name[pg.group_name] = label
        self.rank_sets.append((frozenset(dist.get_process_group_ranks(pg)), label))

    def label_pg(self, script_obj):
        import torch.distributed as dist
        if script_obj is None:
            return "?"
        try:
            pg = dist.ProcessGroup.unbox(script_obj)
        except Exception:
            return "?"
        if pg.group_name in self.by_name:
            return self.by_name[pg.group_name]
        return self._by_ranks(frozenset(dist.get_process_group_ranks(pg)))

    def label_name(self, name):
        if name in self.by_name:
            return self.by_name[name]
        try:
            from torch.distributed.distributed_c10d import _resolve_process_group
            import torch.distributed as dist
            pg = _resolve_process_group(name)
            return self._by_ranks(frozenset(dist.get_process_group_ranks(pg)))
        except Exception:
            return "?"

    def _by_ranks(self, ranks):
        best = None
        for rs, label in self.rank_sets:
            if ranks <= rs and (best is None or len(rs) < len(best[0])):
                best = (rs, label)
        return best[1] if best else "world"


# ---------------------------------------------------------------------------------------------
# saved activations
class ActivationMeter:
    """Bytes each transformer layer saves for backward per micro-batch: unique storages packed
    by saved-tensor hooks while the layer runs forward (parameters, their views and constant
    buffers excluded), plus checkpoint inputs (phases.note_checkpoint_inputs)."""

    def __init__(self, exclude_ptrs=()):
        self.exclude = set(exclude_ptrs)
        self.cur = None                 # (layer, micro-batch) being run forward
        self.mb = defaultdict(int)      # layer -> forward calls so far
        self.seen = defaultdict(dict)   # (layer, mb) -> {storage ptr: nbytes}
        self.enabled = True

    def reset(self):
        self.mb.clear()
        self.seen.clear()
        self.cur = None

    def attach(self, block):
        def pre(mod, args):
            if phases.current() in ("forward",) and self.enabled:
                self.cur = (mod.idx, self.mb[mod.idx])
                self.mb[mod.idx] += 1

        def post(mod, args, out):
            if phases.current() in ("forward",):
                self.cur = None
        return [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]

    def _record(self, t, key):
        if isinstance(t, nn.Parameter) or isinstance(getattr(t, "_base", None), nn.Parameter):
            return
        while type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            # DTensor -> its local tensor; AsyncCollectiveTensor -> the collective's output
            attrs, _ = t.__tensor_flatten__()
            t = getattr(t, attrs[0])
        if isinstance(t, nn.Parameter) or isinstance(getattr(t, "_base", None), nn.Parameter):
            return
        if t.device.type == "meta":
            return
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in self.exclude:
            return
        self.seen[key][ptr] = st.nbytes()

    def pack(self, t):
        if self.enabled and self.cur is not None and phases.current() == "forward":
            self._record(t, self.cur)
        return t

    @staticmethod
    def unpack(t):
        return t

    def note(self, tensors, layer=None):
        if not self.enabled:
            return
        key = self.cur
        if layer is not None:
            key = (layer, self.mb[layer] - 1)
        if key is None:
            return
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._record(t, key)

    def per_layer(self) -> dict:
        """layer -> list of bytes per micro-batch."""
        out = defaultdict(list)
        for (layer, mb), d in sorted(self.seen.items()):
            out[layer].append(sum(d.values()))
        return dict(out)
