"""Hardware profiles: schema, sources, topology graph and group bandwidth."""
import tomllib

import numpy as np
import pytest

from planner import collectives as C
from planner.errors import PlannerError
from planner.hardware import PROFILE_DIR, topology_graph
from planner.profiles import cluster_from_dict, list_hardware, load_hardware

REQUIRED = {"a100-sxm-40gb", "a100-sxm-80gb", "h100-sxm", "h100-sxm-96gb", "h200-sxm", "h800-sxm", "b200", "gb200-nvl72", "mi300x"}


def test_required_profiles_ship():
    assert REQUIRED <= set(list_hardware())


def _numeric_leaves(d, path=""):
    for k, v in d.items():
        p = f"{path}.{k}" if path else k
        if isinstance(v, dict):
            if "value" in v:
                yield p, v
            else:
                yield from _numeric_leaves(v, p)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                if isinstance(x, dict):
                    yield from _numeric_leaves(x, f"{p}[{i}]")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield p, {"value": v}


def check_profile_schema(d: dict, name: str):
    """The schema checks every profile passes, bundled or calibrated (tests/test_calibrate.py
    imports this): every number has a source, every peak is dense."""
    for path, leaf in _numeric_leaves(d):
        assert str(leaf.get("source", "")).strip(), f"{name}: {path} has no source"
    for prec, ent in d["gpu"]["peak_flops"].items():
        assert ent["sparsity"] == "dense", (name, prec)


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_number_has_a_source_and_flops_are_dense(name):
    d = tomllib.load(open(PROFILE_DIR / f"{name}.toml", "rb"))
    check_profile_schema(d, name)
    c = load_hardware(name)
    assert c.gpu.peak("bf16") > 1e14 and c.price_per_gpu_hour > 0


def test_domain_sizes_come_from_the_graph():
    assert load_hardware("h100-sxm").domain_sizes == (8, 0)
    assert load_hardware("gb200-nvl72").domain_sizes == (72, 0)
    g = topology_graph(load_hardware("h100-sxm"), 16)
    assert sum(1 for n in g if n[0] == "gpu") == 16


def test_group_bandwidth_depends_on_levels_spanned():
    h = load_hardware("h100-sxm")
    nv = C.ring_bandwidth(h, 8, 1)          # inside one NVLink domain
    one_nic = C.ring_bandwidth(h, 8, 8)     # one member per node: one NIC each
    pooled = C.ring_bandwidth(h, 16, 1)     # 8 members per node: 8 NICs
    assert nv > pooled > one_nic
    assert one_nic == pytest.approx(50e9 * h.efficiency.network)
    nvl = load_hardware("gb200-nvl72")
    assert C.ring_bandwidth(nvl, 64, 1) > C.ring_bandwidth(h, 64, 1)   # NVL72 keeps 64 GPUs on NVLink


def test_all_reduce_is_twice_all_gather_bandwidth_term():
    h = load_hardware("h100-sxm")
    big = 1e10
    assert C.all_reduce(h, big, 8, 1) == pytest.approx(2 * C.all_gather(h, big, 8, 1), rel=1e-3)
    assert C.all_reduce(h, big, 1, 1) == 0


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["network"][0].__setitem__("bandwidth", {"value": -5, "source": "x"}), "must be >= 0"),
    (lambda d: d.pop("gpu"), "missing 'gpu'"),
    (lambda d: d["gpu"]["peak_flops"]["bf16"].pop("source"), "needs a non-empty 'source'"),
    (lambda d: d["gpu"]["peak_flops"]["bf16"].__setitem__("sparsity", "2:4"), "only dense"),
    (lambda d: d["network"][0].__setitem__("algorithm", "magic"), "algorithm must be one of"),
    (lambda d: d["gpu"]["host_bandwidth"].__setitem__("value", -1), "host_bandwidth"),
    (lambda d: d["gpu"]["host_bandwidth"].pop("source"), "needs a non-empty 'source'"),
    (lambda d: d["efficiency"]["overlap_slowdown"].__setitem__("value", 1.0), r"overlap_slowdown: must be in \[0, 1\)"),
])
def test_bad_profiles_rejected(mutate, needle):
    d = tomllib.load(open(PROFILE_DIR / "h100-sxm.toml", "rb"))
    mutate(d)
    with pytest.raises(PlannerError, match=needle):
        cluster_from_dict(d, "x.toml")


def test_domain_cache_matches_graph(tmp_path, monkeypatch):
    """The on-disk cache of graph-derived domain sizes returns what the graph gives."""
    from planner import hardware as H
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    H._DOMAINS.clear()
    c = load_hardware("gb200-nvl72")
    assert H._domain_sizes_cached(c.levels) == (72, 0)
    assert c.domain_sizes == (72, 0)                       # computed and written
    H._DOMAINS.clear()
    assert c.domain_sizes == (72, 0)                       # read back
    assert list(tmp_path.rglob("domains-*.json"))


def test_cp_ring_step_is_bounded_by_its_slowest_hop():
    h = load_hardware("h100-sxm")
    inside = C.ring_step(h, 1e8, 4, 2)      # ranks 0,2,4,6: one NVLink domain
    across = C.ring_step(h, 1e8, 8, 2)      # ranks 0..14: the ring leaves the node
    assert inside == pytest.approx(C.p2p(h, 1e8, 1)) and across > 5 * inside
