"""benchmarks/fitting.py: a leave-one-source-out fold never sees the left-out source's fit."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import fitting  # noqa: E402


def test_parameters_no_training_run_identifies_are_not_left_at_the_shipped_fit():
    """Without torchtitan, MoE and Blackwell runs (a fold leaving out the only source that has
    them), those parameters are neutral or transferred from the fitted generations -- the shipped
    values were fitted with the left-out source's runs."""
    shipped = fitting.current()
    fitted = dict(shipped, **{"ampere.gemm16": 0.70, "hopper.gemm16": 0.60, "ampere.attn": 0.8})
    names = [k for k in fitting.PARAMS if k.split(".")[0] not in ("torchtitan", "blackwell") and k != "grouped_gemm"]
    p = fitting.without_unseen(fitted, names)
    assert p["torchtitan.gemm"] == p["grouped_gemm"] == 1.0
    # Blackwell (ridge 292 FLOP/B) borrows Hopper's fraction (295), not Ampere's (153) or a mean
    assert p["blackwell.gemm16"] == 0.60
    # Blackwell's attention is a published kernel figure, not a fit: it stays as published
    assert p["blackwell.attn"] == shipped["blackwell.attn"] != shipped["hopper.attn"]
    assert p["llm-foundry.gemm"] == fitted["llm-foundry.gemm"]         # identified: kept as fitted
    assert p["hopper.gemm16"] == 0.60


def test_an_unseen_generation_takes_the_nearest_in_machine_balance():
    shipped = fitting.current()
    names = [k for k in fitting.PARAMS if not k.startswith("ampere.")]
    p = fitting.without_unseen(dict(shipped, **{"ampere.attn": 0.99, "ampere.gemm16": 0.99}), names)
    near = fitting.nearest_generation("ampere", ["hopper", "blackwell"])
    assert p["ampere.attn"] == shipped[f"{near}.attn"] and p["ampere.gemm16"] == shipped[f"{near}.gemm16"]
    # the ridge points come from the profiles' datasheet peaks and bandwidths
    assert fitting.machine_balance("ampere") < 200 < fitting.machine_balance("blackwell")
    assert fitting.nearest_generation("blackwell", ["ampere", "hopper"]) == "hopper"


def test_published_attention_is_not_a_fitted_parameter():
    from planner.profiles import load_hardware
    assert not {f"{f}.attn" for f in fitting.PUBLISHED_ATTN} & set(fitting.PARAMS)
    assert fitting.current()["hopper.attn"] == load_hardware("h100-sxm").efficiency.attention_max == 0.53


def test_with_every_parameter_identified_nothing_changes():
    p = fitting.current()
    assert fitting.without_unseen(p, fitting.PARAMS) == p


def test_the_neutral_start_is_the_planners_defaults_not_a_fit():
    from planner.hardware import Efficiency
    p = fitting.neutral()
    assert set(p) == set(fitting.PARAMS) | {f"{f}.attn" for f in fitting.PUBLISHED_ATTN}
    assert p["hopper.gemm16"] == Efficiency().gemm_max["bf16"] and p["ampere.attn"] == Efficiency().attention_max
    assert p["blackwell.attn"] == fitting.current()["blackwell.attn"]        # published, not a default
    assert p["torchtitan.gemm"] == p["llm-foundry.gemm"] == p["grouped_gemm"] == 1.0


def test_a_fit_restarts_from_its_best_point_until_it_stops_improving(monkeypatch):
    """One short simplex stops far from the minimum of a smooth loss; restarting it from its best
    point walks on, and the rounds end once a round gains less than tol."""
    monkeypatch.setattr(fitting, "identified", lambda rows: ["hopper.gemm16"])
    calls = []

    def loss(p, rows, names):
        calls.append(1)
        return (p["hopper.gemm16"] - 0.30) ** 2
    monkeypatch.setattr(fitting, "loss", loss)
    start = dict(fitting.current(), **{"hopper.gemm16": 0.90})
    one = fitting.fit([], start, iters=3, rounds=1)["hopper.gemm16"]
    many = fitting.fit([], start, iters=3, rounds=50, tol=1e-9)["hopper.gemm16"]
    assert abs(many - 0.30) < 0.01 < abs(one - 0.30)
    calls.clear()
    fitting.fit([], start, iters=3, rounds=50, tol=1.0)      # the 2nd round gains < 1: no 3rd
    assert len(calls) <= 2 * (2 + 3 * 3)
