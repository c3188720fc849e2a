"""planner/collectives.py: the alpha-beta formulas, and per-collective fits of a calibrated level."""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import numpy as np
import pytest

from planner import collectives as C
from planner.errors import PlannerError
from planner.hardware import NetLevel
from planner.profiles import cluster_from_dict, load_hardware

ROOT = Path(__file__).resolve().parents[2]


def _one_level(fits=()):
    base = load_hardware("h100-sxm")
    lv = NetLevel(name="host", domain=0, bandwidth=1e9, latency=1e-3, fits=tuple(fits))
    return dataclasses.replace(base, levels=(lv,), efficiency=dataclasses.replace(base.efficiency, network=1.0))


def test_ring_formulas_on_one_level():
    c = _one_level()
    n, S = 4.0, 8e6
    g = C.Group(c, np.array([n]), 1.0)
    # Thakur 2005: all-reduce 2(n-1)/n S / bw + 2(n-1) alpha; all-gather, reduce-scatter (n-1)/n S / bw + (n-1) alpha
    assert g.all_reduce(S)[0] == pytest.approx(2 * 3 / 4 * S / 1e9 + 6e-3)
    assert g.all_gather(S)[0] == pytest.approx(3 / 4 * S / 1e9 + 3e-3)
    assert g.reduce_scatter(S)[0] == pytest.approx(g.all_gather(S)[0])
    assert C.p2p(c, S, np.array([1.0]))[0] == pytest.approx(S / 1e9 + 1e-3)


def _two_levels(algorithm):
    base = load_hardware("h100-sxm")
    lvs = (NetLevel(name="host", domain=4, bandwidth=1e9, latency=1e-3, algorithm=algorithm),
           NetLevel(name="link", domain=0, bandwidth=0.25e9, latency=5e-3, algorithm=algorithm))
    return dataclasses.replace(base, levels=lvs, efficiency=dataclasses.replace(base.efficiency, network=1.0))


def test_a_flat_ring_waits_for_its_slowest_hop_at_every_step():
    """8 ranks over 2 domains of 4: hierarchical rings pay 3 inner + 1 outer step per pass (NCCL);
    gloo's one ring of 8 pays 7 steps per pass, each as slow as the hop that crosses the link."""
    S = 1e6
    ring, flat = C.Group(_two_levels("ring"), np.array([8.0]), 1.0), C.Group(_two_levels("flat-ring"), np.array([8.0]), 1.0)
    bw = min(1e9, 4 * 0.25e9)              # the 4 members of a domain pool their links to the outer level
    assert ring.all_reduce(S)[0] == pytest.approx(2 * 7 / 8 * S / bw + 2 * (3 * 1e-3 + 1 * 5e-3))
    assert flat.all_reduce(S)[0] == pytest.approx(2 * 7 / 8 * S / bw + 2 * 7 * 5e-3)
    assert flat.all_gather(S)[0] == pytest.approx(7 / 8 * S / bw + 7 * 5e-3)
    # inside one domain both are one ring over the inner level
    inner = C.Group(_two_levels("flat-ring"), np.array([4.0]), 1.0)
    assert inner.all_reduce(S)[0] == pytest.approx(2 * 3 / 4 * S / 1e9 + 2 * 3 * 1e-3)


def test_a_gloo_reduce_scatter_costs_an_all_reduce():
    """Measured across two hosts, gloo's reduce_scatter_tensor took the all-reduce's time at 2 and
    8 ranks (twice the all-gather's): on flat-ring (gloo) levels it is timed as one, NCCL rings keep
    the all-gather's traffic."""
    S = 1e6
    flat, ring = C.Group(_two_levels("flat-ring"), np.array([8.0]), 1.0), C.Group(_two_levels("ring"), np.array([8.0]), 1.0)
    assert flat.reduce_scatter(S)[0] == pytest.approx(flat.all_reduce(S)[0])
    assert ring.reduce_scatter(S)[0] == pytest.approx(ring.all_gather(S)[0])
    c = _two_levels("flat-ring")
    assert C.reduce_scatter(c, S, np.array([8.0]), 1.0)[0] == pytest.approx(flat.all_reduce(S)[0])
    coef = flat.coefficients(("rs",))
    assert coef["a_rs"][0] * S + coef["b_rs"][0] == pytest.approx(flat.reduce_scatter(S)[0])


def test_each_collective_uses_its_own_fit():
    fits = [("reduce_scatter", 4e-3, 0.25e9), ("all_reduce", 2e-3, 0.5e9), ("send_recv", 5e-3, 2e9),
            ("all_to_all", 1e-4, 4e9)]
    c = _one_level(fits)
    n, S = 4.0, 8e6
    g = C.Group(c, np.array([n]), 1.0)
    assert g.reduce_scatter(S)[0] == pytest.approx(3 / 4 * S / 0.25e9 + 3 * 4e-3)
    assert g.all_reduce(S)[0] == pytest.approx(2 * 3 / 4 * S / 0.5e9 + 6 * 2e-3)
    # no all-gather fit: the level's own latency and bandwidth
    assert g.all_gather(S)[0] == pytest.approx(3 / 4 * S / 1e9 + 3e-3)
    assert C.reduce_scatter(c, S, n, 1.0) == pytest.approx(g.reduce_scatter(S)[0])
    assert C.p2p(c, S, np.array([1.0]))[0] == pytest.approx(S / 2e9 + 5e-3)
    assert C.all_to_all(c, S, np.array([n]), 1.0)[0] == pytest.approx(3 / 4 * S / 4e9 + 3 * 1e-4)
    coef = g.coefficients(("ag", "rs"))
    assert set(coef) == {"a_ag", "b_ag", "a_rs", "b_rs"}
    assert coef["a_rs"][0] * S + coef["b_rs"][0] == pytest.approx(g.reduce_scatter(S)[0])


def test_fit_of_unknown_collective_is_refused():
    with pytest.raises(PlannerError, match="op one of all_reduce"):
        NetLevel(name="x", domain=0, bandwidth=1e9, latency=0.0, fits=(("broadcast", 1e-3, 1e9),))
    d = tomllib.loads((ROOT / "hwprofiles" / "h100-sxm.toml").read_text())
    d["network"][0]["fit"] = {"gather": {"latency": {"value": 1e-3, "source": "s"},
                                         "bandwidth": {"value": 1e9, "source": "s"}}}
    with pytest.raises(PlannerError, match=r"fit\.gather: not a collective; valid: all_reduce"):
        cluster_from_dict(d, "test")
