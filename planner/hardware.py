"""Hardware profiles: GPU, network levels and price, loaded from hwprofiles/*.toml.

A profile is data with a source for every number (see hwprofiles/README.md). At load time the
cluster topology is built as a networkx graph (GPU -> level-0 switch -> level-1 switch ...), and
the domain sizes used by the collective cost model are read off that graph, not assumed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .errors import PlannerError

PROFILE_DIR = Path(__file__).resolve().parent.parent / "hwprofiles"
# ring: hierarchical rings (NCCL), a level's steps cost its own latency; flat-ring: one ring
# through the group's ranks in rank order whose every step waits for its slowest hop (gloo's ring
# collectives, gloo/allreduce_ring.h); tree / nvls: log2 steps; mesh: a full mesh (NVSwitch-less)
ALGORITHMS = ("ring", "flat-ring", "tree", "nvls", "mesh")
COLLECTIVE_OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")
PRECISIONS = ("bf16", "fp16", "fp8", "tf32", "fp32")
MAX_DOMAIN = 1 << 14     # GPUs in one bounded network domain (NVL72: 72; a 16K-GPU pod at most)


@dataclass(frozen=True)
class NetLevel:
    """One level of the interconnect, innermost first. Bandwidth is per GPU, per direction."""
    name: str
    domain: int              # GPUs per domain; 0 = the whole cluster (last level only)
    bandwidth: float         # bytes/s per GPU per direction
    latency: float           # seconds per collective step (alpha)
    algorithm: str = "ring"
    oversubscription: float = 1.0
    # per-collective fits, ((op, latency s per step, bandwidth bytes/s), ...), as written by
    # `python -m validate calibrate`; planner/collectives.py times an op with its own fit when the
    # level has one, else with the two above
    fits: tuple = field(default=(), compare=False)

    def params(self, op: str | None = None) -> tuple:
        """(latency s per step, bandwidth bytes/s) for collective `op` (COLLECTIVE_OPS)."""
        for name, lat, bw in self.fits:
            if name == op:
                return lat, bw
        return self.latency, self.bandwidth

    def __post_init__(self):
        w = f"network level '{self.name}'"
        if not isinstance(self.domain, int) or isinstance(self.domain, bool) or self.domain < 0:
            raise PlannerError(f"{w}: domain must be an integer >= 0 (0 = whole cluster), got {self.domain!r}")
        for n in ("bandwidth", "latency", "oversubscription"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                    or (v == 0 and n != "latency"):
                raise PlannerError(f"{w}: {n} must be a positive finite number, got {v!r}")
        if self.oversubscription < 1:
            raise PlannerError(f"{w}: oversubscription must be >= 1.0, got {self.oversubscription}")
        if self.algorithm not in ALGORITHMS:
            raise PlannerError(f"{w}: algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        for ent in self.fits:
            if len(ent) != 3 or ent[0] not in COLLECTIVE_OPS:
                raise PlannerError(f"{w}: a fit is (op, latency, bandwidth) with op one of "
                                   f"{', '.join(COLLECTIVE_OPS)}, got {ent!r}")
            if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in ent[1:]) or ent[2] <= 0:
                raise PlannerError(f"{w}: fit '{ent[0]}' needs latency >= 0 and bandwidth > 0, got {ent[1:]!r}")


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: dict            # precision -> dense FLOP/s
    hbm_bytes: float
    hbm_bandwidth: float        # bytes/s
    reserved_bytes: float = 0.0  # context, NCCL buffers, fragmentation headroom
    # ranks that time-share one device's processors (a CPU: ranks per core); 1 = a rank owns its
    # device. Above 1 the rates above are one rank's share while every rank works, and the cost
    # model composes a step as a work-conserving shared processor does (planner/costmodel.py)
    shared_by: float = 1.0
    # bytes/s per direction between the GPU and its host's memory (PCIe, NVLink-C2C), what
    # activation offloading moves over; 0 = not given, offloading refused
    host_bandwidth: float = 0.0

    def __post_init__(self):
        v = self.shared_by
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 1:
            raise PlannerError(f"GPU {self.name}: shared_by (ranks sharing one device) must be a number "
                               f">= 1, got {v!r}")
        h = self.host_bandwidth
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h) or h < 0:
            raise PlannerError(f"GPU {self.name}: host_bandwidth (bytes/s to host memory) must be a number "
                               f">= 0, got {h!r}")

    def peak(self, precision: str) -> float:
        try:
            return self.peak_flops[precision]
        except KeyError:
            raise PlannerError(
                f"GPU {self.name} has no {precision} peak in its profile; it has "
                f"{', '.join(sorted(self.peak_flops))}") from None


@dataclass(frozen=True)
class Efficiency:
    """Achievable fractions of peak, fitted once per GPU (benchmarks/fit_efficiency.py) or
    measured by `python -m validate calibrate`.

    GEMM efficiency: eff(m, n, k) = gemm_max[prec] * x / (x + gemm_half_dim), x = min(m, n, k):
    a saturating curve in the smallest GEMM dimension (tile under-fill and wave quantisation
    shrink small GEMMs; see NVIDIA 'Matrix Multiplication Background User's Guide').
    """
    gemm_max: dict = field(default_factory=lambda: {"bf16": 0.75, "fp16": 0.75, "fp8": 0.55,
                                                    "tf32": 0.7, "fp32": 0.9})
    gemm_half_dim: float = 96.0
    attention_max: float = 0.55     # flash-attention fwd+bwd fraction of bf16 peak
    hbm: float = 0.8                # achievable fraction of HBM bandwidth for elementwise kernels
    network: float = 0.85           # achievable fraction of link bandwidth (NCCL busbw / line rate)
    grouped_gemm: float = 1.0       # MoE grouped-GEMM efficiency relative to a dense GEMM of the same shape
    # compute time lost per second of a collective that runs hidden beside it: NCCL's kernels hold
    # SMs and HBM bandwidth the GEMMs would use (Lee et al. 2025, 'Characterizing Compute-Communication
    # Overlap in GPU-Accelerated Distributed Deep Learning', arXiv 2507.03114: compute overlapped with
    # communication on A100/H100 runs 18.9% slower on average than alone, 40% at most)
    overlap_slowdown: float = 0.189
    # fraction of the bf16 peak PyTorch SDPA's flash backend (FlashAttention-2) reaches on this GPU,
    # where it is below attention_max (stacks whose attention_kernel is "sdpa"); None: no lower
    sdpa_attention: float | None = None
    source: str = "planner default (benchmarks/fit_efficiency.py)"
    # measured by `python -m validate calibrate` (absent from datasheet profiles):
    attention_by_precision: dict = field(default_factory=dict)   # precision -> fraction of its own peak
    kernel_overhead: float | None = None    # host seconds per kernel (the planner's kernel count), eager PyTorch
    step_overhead: float | None = None      # host seconds per training step outside the layers
    tp_layer_overhead: float | None = None  # host seconds per TP-sharded layer forward, eager DTensor TP
    optimizer: float | None = None          # fraction of HBM bandwidth the optimizer step's bytes reach
                                            # (None: hbm above)


@dataclass(frozen=True)
class Cluster:
    """A hardware profile: one GPU type and the network levels that join GPUs, innermost first."""
    name: str
    gpu: GPU
    levels: tuple
    price_per_gpu_hour: float
    efficiency: Efficiency = field(default_factory=Efficiency)
    description: str = ""
    path: str = ""

    def __post_init__(self):
        if not self.levels:
            raise PlannerError(f"hardware '{self.name}': needs at least one [[network]] level")
        for lv in self.levels[:-1]:
            if lv.domain == 0:
                raise PlannerError(f"hardware '{self.name}': only the last network level may have domain 0")
        doms = [lv.domain for lv in self.levels if lv.domain]
        for a, b in zip(doms, doms[1:]):
            if b % a:
                raise PlannerError(
                    f"hardware '{self.name}': domain {b} is not a multiple of the inner domain {a}")
        if not (self.price_per_gpu_hour >= 0 and math.isfinite(self.price_per_gpu_hour)):
            raise PlannerError(f"hardware '{self.name}': price_per_gpu_hour must be >= 0")

    # Domain sizes are read off the topology graph (see topology_graph); last level unbounded.
    @property
    def domain_sizes(self) -> tuple:
        got = _DOMAINS.get(self.levels)
        if got is None:
            got = _DOMAINS[self.levels] = _domain_sizes_from_graph(self)
        return got


# --------------------------------------------------------------------------------------------
# topology graph

def topology_graph(cluster: Cluster, gpus: int):
    """The cluster as a networkx graph: GPU nodes, one switch node per domain per level.

    Edges carry the per-GPU bandwidth and latency of the level they belong to.
    """
    import networkx as nx
    g = nx.Graph()
    prev = [("gpu", i) for i in range(gpus)]
    for i in range(gpus):
        g.add_node(("gpu", i), kind="gpu")
    size = 1
    for li, lv in enumerate(cluster.levels):
        dom = lv.domain if lv.domain else max(gpus, size)
        # one switch per domain of this level; attach each member of the previous level
        per = max(dom // size, 1)
        nxt = []
        for j, node in enumerate(prev):
            sw = (lv.name, j // per)
            if sw not in g:
                g.add_node(sw, kind="switch", level=li)
                nxt.append(sw)
            g.add_edge(node, sw, level=li, bandwidth=lv.bandwidth, latency=lv.latency)
        prev, size = nxt, dom
    return g


_DOMAINS: dict = {}


@lru_cache(maxsize=64)
def _domain_sizes_cached(levels: tuple) -> tuple:
    import networkx as nx
    probe = Cluster.__new__(Cluster)
    object.__setattr__(probe, "levels", levels)
    # one representative slice: two domains of the outermost bounded level (enough to read sizes)
    bounded = [lv.domain for lv in levels if lv.domain]
    n = 2 * (bounded[-1] if bounded else 1)
    g = topology_graph(probe, n)
    sizes = []
    for li, lv in enumerate(levels):
        if lv.domain == 0:
            sizes.append(0)
            continue
        # a domain at level li = the GPUs connected through edges of level <= li
        sub = g.edge_subgraph([(u, v) for u, v, d in g.edges(data=True) if d["level"] <= li])
        comp = nx.node_connected_component(sub, ("gpu", 0))
        sizes.append(sum(1 for x in comp if x[0] == "gpu"))
    return tuple(sizes)


def _cache_path(levels: tuple):
    """The sizes are a function of the levels' domains alone (topology_graph reads nothing else
    that shapes a domain), so the domains name the file."""
    import os
    key = "-".join(str(lv.domain) for lv in levels)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "dtplanner", f"domains-{key}.json")


def _domain_sizes_from_graph(cluster: Cluster) -> tuple:
    """Domain sizes read off the topology graph. networkx takes ~0.2 s to import, so the result is
    cached on disk per distinct level structure (a pure function of it); the graph is built the
    first time a structure is seen. A cache that cannot be read or written is ignored."""
    import json
    path = _cache_path(cluster.levels)
    try:
        with open(path) as fh:
            got = tuple(json.load(fh))
        if len(got) == len(cluster.levels):
            return got
    except (OSError, ValueError, TypeError):
        pass
    sizes = _domain_sizes_cached(cluster.levels)
    try:
        import os
        os.makedirs(os.path.dirname(path), exist_ok=True)
        from .atomic import atomic_write_text
        atomic_write_text(path, json.dumps(list(sizes)))
    except OSError:
        pass
    return sizes
