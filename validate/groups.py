"""Process groups and device meshes in Megatron's rank order: one multi-dimensional
init_device_mesh with named dims (pp, dp, cp, tp) that every parallelism takes its groups from,
expert dims (edp, ep, etp) unflattened from its stage, and the run's --timeout on every group.

Rank order (megatron/core/parallel_state.py, order "tp-cp-ep-dp-pp"):
    rank = tp_r + tp * (cp_r + cp * (dp_r + dp * pp_r))
Expert layers re-split the tp*cp*dp ranks of a stage as etp x ep x edp, etp innermost
(initialize_model_parallel's expert rank generator, order "tp-ep-dp" with tp = etp).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist


@dataclass
class Topo:
    world: int
    rank: int
    tp: int
    cp: int
    dp: int
    pp: int
    ep: int
    vpp: int
    etp: int = 1

    def __post_init__(self):
        r = self.rank
        self.tp_r = r % self.tp
        self.cp_r = (r // self.tp) % self.cp
        self.dp_r = (r // (self.tp * self.cp)) % self.dp
        self.pp_r = r // (self.tp * self.cp * self.dp)
        inner = r % (self.tp * self.cp * self.dp)   # index inside the stage
        self.etp_r = inner % self.etp
        self.ep_r = (inner // self.etp) % self.ep
        self.edp = self.tp * self.cp * self.dp // (self.ep * self.etp)
        self.edp_r = inner // (self.ep * self.etp)

    def rank_of(self, tp_r=None, cp_r=None, dp_r=None, pp_r=None):
        tp_r = self.tp_r if tp_r is None else tp_r
        cp_r = self.cp_r if cp_r is None else cp_r
        dp_r = self.dp_r if dp_r is None else dp_r
        pp_r = self.pp_r if pp_r is None else pp_r
        return tp_r + self.tp * (cp_r + self.cp * (dp_r + self.dp * pp_r))

    def coords(self) -> dict:
        return dict(tp=self.tp_r, cp=self.cp_r, dp=self.dp_r, pp=self.pp_r, ep=self.ep_r,
                    etp=self.etp_r, edp=self.edp_r)

    def all_groups(self, tied_pp: bool) -> dict:
        """label -> list of rank lists (every group of that kind, in a fixed order)."""
        stage = self.tp * self.cp * self.dp
        R = range(self.world)
        out = {}

        def by(key):
            d = {}
            for r in R:
                d.setdefault(key(r), []).append(r)
            return [v for _, v in sorted(d.items())]

        def c(r):
            return Topo(self.world, r, self.tp, self.cp, self.dp, self.pp, self.ep, self.vpp, self.etp)
        T = [c(r) for r in R]
        if self.tp > 1:
            out["tp"] = by(lambda r: (T[r].cp_r, T[r].dp_r, T[r].pp_r))
        if self.cp > 1:
            out["cp"] = by(lambda r: (T[r].tp_r, T[r].dp_r, T[r].pp_r))
        if self.dp * self.cp > 1:
            # the dense-gradient group is dp x cp (Megatron get_data_parallel_group(with_context_parallel=True))
            out["dp"] = by(lambda r: (T[r].tp_r, T[r].pp_r))
        if self.pp > 1:
            out["pp"] = by(lambda r: r % stage)
        if self.ep > 1:
            out["ep"] = by(lambda r: (T[r].edp_r, T[r].etp_r, T[r].pp_r))
        if self.etp > 1:
            out["etp"] = by(lambda r: (T[r].edp_r, T[r].ep_r, T[r].pp_r))
        if self.edp > 1:
            # expert data-parallel group (Megatron get_expert_data_parallel_group); with ep = 1
            # it holds the same ranks as dp but is its own group
            out["edp"] = by(lambda r: (T[r].ep_r, T[r].etp_r, T[r].pp_r))
        if tied_pp and self.pp > 1:
            out["embd"] = [[i, i + (self.pp - 1) * stage] for i in range(stage)]
        return out



# dist.new_group's default timeout is the backend's (30 min for gloo and NCCL), not the one
# init_process_group was given (torch/distributed/distributed_c10d.py _new_group_with_tag), so
# every group validate makes takes the run's --timeout explicitly; a mesh's groups take it through
# backend_override (torch/distributed/device_mesh.py _init_one_process_group reads pg_options._timeout)
_GROUP_TIMEOUT = {"value": None}


def set_group_timeout(seconds: float) -> None:
    """The timeout every later group gets (the run's --timeout)."""
    _GROUP_TIMEOUT["value"] = timedelta(seconds=seconds)


def new_group(ranks):
    """dist.new_group with the run's timeout."""
    return dist.new_group(ranks, timeout=_GROUP_TIMEOUT["value"])


def _backend_config():
    """(backend, options carrying the run's timeout) for a mesh dimension's groups."""
    timeout = _GROUP_TIMEOUT["value"]
    if timeout is None:
        return None
    backend = dist.get_backend()
    cls = {"gloo": getattr(dist, "ProcessGroupGloo", None), "nccl": getattr(dist, "ProcessGroupNCCL", None)}.get(backend)
    if cls is None:
        raise RuntimeError(f"validate: no group options for backend {backend!r} (gloo or nccl)")
    opts = cls._Options() if backend == "gloo" else cls.Options()
    opts._timeout = timeout
    return (backend, opts)


def _overrides(names):
    cfg = _backend_config()
    return None if cfg is None else {n: cfg for n in names}


@dataclass(frozen=True)
class Meshes:
    """One layout's device meshes. Dims of size 1 are left out, as torchtitan's
    ParallelDims.build_mesh does (torchtitan/distributed/parallel_dims.py)."""
    dense: object | None    # (pp, dp, cp, tp) as init_device_mesh built it
    dp: object | None       # dp x cp flattened: the dense-gradient group (Megatron's data-parallel group with CP)
    expert: object | None   # (edp, ep, etp), the stage's dp x cp x tp unflattened, etp innermost


def build_meshes(topo: Topo, device_type: str, moe: bool) -> Meshes:
    """The mesh of a layout, its flattened data-parallel dim and (with MoE) its expert dims.
    Every dim's groups are new groups of their own, so a collective's group names its purpose
    even where two groups hold the same ranks (Megatron makes separate groups there too)."""
    from torch.distributed.device_mesh import init_device_mesh
    dims = [(n, s) for n, s in (("pp", topo.pp), ("dp", topo.dp), ("cp", topo.cp), ("tp", topo.tp)) if s > 1]
    if not dims:
        return Meshes(None, None, None)
    names = tuple(n for n, _ in dims)
    dense = init_device_mesh(device_type, tuple(s for _, s in dims), mesh_dim_names=names,
                             backend_override=_overrides(names))
    dpn = tuple(n for n in ("dp", "cp") if n in names)
    if dpn == ("dp",):
        dp = dense["dp"]
    else:
        dp = dense[dpn]._flatten("dp_cp", backend_override=_backend_config()) if dpn else None
    expert = None
    edims = [(n, s) for n, s in (("edp", topo.edp), ("ep", topo.ep), ("etp", topo.etp)) if s > 1]
    sn = tuple(n for n in ("dp", "cp", "tp") if n in names)
    if moe and edims:
        stage = dense[sn]._flatten("stage", backend_override=_backend_config()) if len(sn) > 1 else dense[sn]
        en = tuple(n for n, _ in edims)
        expert = stage._unflatten(0, tuple(s for _, s in edims), en, backend_override=_overrides(en))
    return Meshes(dense, dp, expert)


_MESHES = {}     # layout shape -> Meshes, kept for the life of the process
_PG_CACHE = {}   # (label, ranks) -> ProcessGroup for groups outside the mesh (tied embeddings)


class Groups:
    """This rank's process groups by label, all but the tied-embedding group taken from one
    device mesh built the same way on every rank. Meshes are kept for the life of the process
    and reused by later scenarios of the same shape: DTensor caches sharding decisions that hold
    on to meshes, so a mesh must outlive the scenario that made it."""

    def __init__(self, topo: Topo, tied_pp: bool, labeler, device_type: str = "cpu", moe: bool = False):
        key = (topo.world, topo.pp, topo.dp, topo.cp, topo.tp, topo.ep if moe else 0, topo.etp if moe else 0,
               device_type)
        if key not in _MESHES:
            _MESHES[key] = build_meshes(topo, device_type, moe)
        self.meshes = m = _MESHES[key]
        self.pg, self.ranks, self.topo = {}, {}, topo
        if m.dense is not None:
            for n in m.dense.mesh_dim_names:
                if n != "dp":
                    self._add(labeler, n, m.dense[n].get_group())
        if m.dp is not None:
            self._add(labeler, "dp", m.dp.get_group())
        for n in (m.expert.mesh_dim_names if m.expert is not None else ()):
            self._add(labeler, n, m.expert[n].get_group())
        if tied_pp and topo.pp > 1:
            # Megatron's embedding group (parallel_state._EMBEDDING_GROUP): first and last stage, not a mesh dim
            stage = topo.tp * topo.cp * topo.dp
            for ranks in ([i, i + (topo.pp - 1) * stage] for i in range(stage)):
                if ("embd", tuple(ranks)) not in _PG_CACHE:
                    _PG_CACHE[("embd", tuple(ranks))] = new_group(ranks)
                if topo.rank in ranks:
                    self._add(labeler, "embd", _PG_CACHE[("embd", tuple(ranks))])
        self._check(tied_pp)
        if "dp" not in self.pg:
            self.ranks["dp"] = [topo.rank]

    def _add(self, labeler, label, pg):
        self.pg[label], self.ranks[label] = pg, dist.get_process_group_ranks(pg)
        labeler.add(label, pg)

    def _check(self, tied_pp):
        """The mesh's groups are the ones Megatron's rank formula gives (Topo.all_groups)."""
        want = self.topo.all_groups(tied_pp)
        for label, ranks in self.ranks.items():
            if ranks not in want.get(label, []):
                raise RuntimeError(f"validate: the mesh's {label} group {ranks} is not one of Megatron's "
                                   f"{want.get(label)}")

    def get(self, label):
        return self.pg.get(label)

    def mesh(self, label):
        """The 1-D mesh of a parallel dim (tp, dp; etp: the experts') for DTensor and FSDP2."""
        m = self.meshes
        return m.dp if label == "dp" else m.expert[label] if label == "etp" else m.dense[label]

    def size(self, label):
        return len(self.ranks.get(label, [0]))

    def rank_in(self, label):
        return self.ranks[label].index(self.topo.rank) if label in self.ranks else 0


_MESH_1D = {}   # (name, group name) -> DeviceMesh


def mesh_1d(pg, device_type, name):
    """A 1-D mesh over a group made outside a layout's mesh (calibrate's TP probe)."""
    from torch.distributed.device_mesh import DeviceMesh
    key = (name, pg.group_name)
    if key not in _MESH_1D:
        _MESH_1D[key] = DeviceMesh.from_group(pg, device_type, mesh_dim_names=(name,))
    return _MESH_1D[key]
