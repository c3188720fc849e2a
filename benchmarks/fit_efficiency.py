"""Fit the planner's global parameters once, over every published run, and print them.

    python benchmarks/fit_efficiency.py [--iters N]

The fit itself is benchmarks/fitting.py (one owner; accuracy.py --cross-validate refits the same
parameters with each source left out): GEMM efficiency per GPU generation and Ampere's attention
efficiency (Hopper's and Blackwell's are published kernel figures, fitting.PUBLISHED_ATTN) (fp8
tied to 0.9 x bf16, the cuBLAS ratio on large H100 GEMMs), the MoE grouped-GEMM factor, the
per-kernel launch cost and the factors of the non-default stacks. The loss is the mean absolute
log error of predicted vs measured tokens/s per GPU, each run's contribution capped at
log(1.65); a refused run costs the cap. Prints the values to paste into hwprofiles/*.toml
([efficiency]) and planner/stacks.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import fitting  # noqa: E402


ROOT = Path(__file__).resolve().parent.parent


def _set(text: str, key: str, value: float, after: str = "") -> str:
    """Replace `key = { value = X` (the first one after the line `after`) with the new value."""
    import re
    start = text.index(after) if after else 0
    pat = re.compile(rf"^({re.escape(key)} = {{ value = )[0-9.eE+-]+", re.M)
    m = pat.search(text, start)
    return text[:m.start()] + f"{m.group(1)}{value:.3f}" + text[m.end():]


def write(p: dict) -> None:
    """The fitted values into every profile of a fitted generation and into planner/stacks.py."""
    import re
    for name, fam in fitting.FAMILY.items():
        path = ROOT / "hwprofiles" / f"{name}.toml"
        t = path.read_text()
        if f"{fam}.attn" in fitting.PARAMS:       # Hopper's and Blackwell's are published (fitting.PUBLISHED_ATTN)
            t = _set(t, "attention_max", p[f"{fam}.attn"])
        t = _set(t, "grouped_gemm", p["grouped_gemm"])
        for dt, v in (("bf16", p[f"{fam}.gemm16"]), ("fp16", p[f"{fam}.gemm16"]),
                      ("fp8", fitting.FP8_RATIO * p[f"{fam}.gemm16"])):
            if re.search(rf"^{dt} = {{ value", t[t.index("[efficiency.gemm_max]"):], re.M):
                t = _set(t, dt, v, "[efficiency.gemm_max]")
        path.write_text(t)
    st = ROOT / "planner" / "stacks.py"
    t = st.read_text()
    t = re.sub(r"kernel_overhead_s: float = [0-9.e-]+", f"kernel_overhead_s: float = {p['kernel_overhead_us'] * 1e-5:.2e}", t)
    t = re.sub(r"gemm=[0-9.]+,( +)# fitted \(benchmarks/fit_efficiency.py, 14 torchtitan runs\)",
               lambda m: f"gemm={p['torchtitan.gemm']:.3f},{m.group(1)}# fitted (benchmarks/fit_efficiency.py, "
                         f"14 torchtitan runs)", t)
    t = re.sub(r"gemm=[0-9.]+,( +)# fitted \(benchmarks/fit_efficiency.py, 11 llm-foundry runs\)",
               lambda m: f"gemm={p['llm-foundry.gemm']:.3f},{m.group(1)}# fitted (benchmarks/fit_efficiency.py, "
                         f"11 llm-foundry runs)", t)
    st.write_text(t)
    print("wrote hwprofiles/*.toml [efficiency] and planner/stacks.py")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=150)
    ap.add_argument("--write", action="store_true", help="write the values into the profiles and stacks.py")
    a = ap.parse_args(argv)
    rows = fitting.load_rows()
    names = fitting.identified(rows)
    start = fitting.current()
    print(f"fitting {len(names)} global parameters over {len(rows)} published runs")
    print(f"start loss {fitting.loss(start, rows, names):.4f}")
    p = fitting.fit(rows, start, a.iters, log=print)
    pred = fitting.predict(p, rows)
    meas = np.array([r.measured for r in rows])
    err = np.where(np.isfinite(pred), np.abs(pred / meas - 1), 1.0)
    print(f"final loss {fitting.loss(p, rows, names):.4f}; median |err| {np.median(err):.1%}, "
          f"mean {np.mean(err):.1%}, refused {int(np.sum(~np.isfinite(pred)))}")
    for k in fitting.PARAMS:
        print(f"{k:24s} {p[k]:.3f}{'' if k in names else '  (not identified: kept)'}")
    if a.write:
        write(p)


if __name__ == "__main__":
    main()
