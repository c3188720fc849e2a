"""Plots of search results. Every function returns a matplotlib Figure (Agg canvas, no pyplot
state, so it works headless and in notebooks); matplotlib is imported only when a plot is made.

    tp_pp_heatmap(model, cluster, res=... | layout=...)   tokens/s per GPU over TP x PP, other knobs fixed
    time_breakdown_bars(plans)                             stacked step-time terms for the top layouts
    memory_breakdown_bars(plans)                           stacked memory terms against the HBM line
    scaling_data(model, cluster, counts, ...) -> DataFrame the best layout per GPU count
    scaling_curve(df)                                      MFU, cost and time-to-train against GPU count
    pareto_plot(res)                                       time-to-train against cost
    plot_for_query(res, model, cluster, path)              saves the most useful of these for a query
"""
from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np

from .costmodel import MEMORY_TERMS, TIME_TERMS
from .errors import PlannerError
from .explain import MEMORY_LABEL, TIME_LABEL
from .neighbours import valid, with_pp

# one colour per term, stable across plots (tab10 / tab20 entries)
TIME_COLOR = {"compute": "#4c72b0", "recompute": "#8172b3", "tp_comm": "#dd8452", "cp_comm": "#da8bc3",
              "ep_comm": "#937860", "pp_comm": "#ccb974", "dp_comm": "#c44e52", "bubble": "#8c8c8c",
              "optimizer": "#55a868", "overhead": "#64b5cd", "offload": "#a6761d"}
MEMORY_COLOR = {"weights": "#4c72b0", "gradients": "#55a868", "optimizer": "#8172b3", "activations": "#dd8452",
                "logits": "#ccb974", "buffers": "#64b5cd", "fragmentation": "#b0b0b0",
                "reserved": "#8c8c8c"}
SHORT_TIME = {"compute": "compute", "recompute": "recompute", "tp_comm": "TP comm", "cp_comm": "CP comm",
              "ep_comm": "EP all-to-all", "pp_comm": "PP send/recv", "dp_comm": "DP comm", "bubble": "PP bubble",
              "optimizer": "optimizer", "overhead": "overhead", "offload": "activation offload"}
SHORT_MEM = {"weights": "weights", "gradients": "gradients", "optimizer": "optimizer states",
             "activations": "activations", "logits": "logits", "buffers": "comm buffers",
             "fragmentation": "allocator reserve", "reserved": "reserved"}


def _figure(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _count(n) -> str:
    n = int(n)
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return f"{n:,}"


def layout_label(p, gpus=False) -> str:
    """Compact layout name for axis labels: 'tp8sp pp4 dp2 cp2 v2 mb1 sel-rc z1 fp8' (sp = sequence
    parallelism on, v = virtual stages, rc = activation recompute, z = ZeRO stage)."""
    L = p.layout
    parts = [f"{_count(p.gpus)} GPUs"] if gpus else []
    parts += [f"tp{L.tp}" + ("sp" if L.sp and L.tp > 1 else ""), f"pp{L.pp}", f"dp{L.dp}"]
    if L.cp > 1:
        parts.append(f"cp{L.cp}" + {"p2p": "", "allgather": "-ag", "a2a": "-a2a"}[L.cp_comm])
    if L.ep > 1:
        parts.append(f"ep{L.ep}")
    if L.vpp > 1:
        parts.append(f"v{L.vpp}")
    if L.pp > 1 and L.schedule not in ("1f1b", "interleaved"):
        parts.append(L.schedule)
    parts.append(f"mb{L.micro_batch}")
    if L.recompute != "none":
        parts.append({"selective": "sel-rc", "full": "full-rc"}.get(L.recompute, L.recompute.replace("selective", "rc")))
    parts += [f"z{L.zero}", L.precision]
    return " ".join(parts)


def _distinct(plans, n):
    out, seen = [], set()
    for p in plans:
        if p.layout in seen:
            continue
        seen.add(p.layout)
        out.append(p)
        if len(out) >= n:
            break
    return out


def _plans_of(x):
    if x is None:
        return []
    if hasattr(x, "plans"):
        return list(x.plans)
    if hasattr(x, "layout"):
        return [x]
    return list(x)


# ----------------------------------------------------------------------------------- breakdowns

def time_breakdown_bars(plans, top: int = 8, title: str | None = None, ax=None, labels=None):
    """Stacked horizontal bars of the step-time terms (seconds) of up to `top` distinct layouts,
    best at the top. `labels` (one per plan) replaces the layout names and keeps every plan."""
    plans = _distinct(_plans_of(plans), top) if labels is None else _plans_of(plans)[:top]
    fig = ax.figure if ax is not None else _figure(9, 1.2 + 0.45 * max(len(plans), 1))
    ax = ax or fig.add_subplot()
    multi = len({p.gpus for p in plans}) > 1
    y = np.arange(len(plans))[::-1]
    used = [k for k in TIME_TERMS if any(p.time_breakdown_s[k] > 0 for p in plans)]
    left = np.zeros(len(plans))
    for k in used:
        v = np.array([p.time_breakdown_s[k] for p in plans])
        ax.barh(y, v, left=left, color=TIME_COLOR[k], label=SHORT_TIME[k], height=0.65)
        left += v
    names = list(labels)[:len(plans)] if labels is not None else \
        [f"#{i + 1} {layout_label(p, multi)}" for i, p in enumerate(plans)]
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("time per training step (s)")
    for yi, p in zip(y, plans):
        ax.text(p.step_time_s, yi, f" {p.step_time_s:.2f} s, MFU {p.mfu:.0%}", va="center", fontsize=7.5)
    ax.set_xlim(0, max((p.step_time_s for p in plans), default=1) * 1.28)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_title(title or "Where the step time goes (exposed communication only)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


def memory_breakdown_bars(plans, top: int = 8, title: str | None = None, ax=None, labels=None):
    """Stacked horizontal bars of the memory terms per GPU (GiB) of up to `top` layouts, with the
    GPU's HBM capacity as a dashed line. `labels` (one per plan) replaces the layout names."""
    plans = _distinct(_plans_of(plans), top) if labels is None else _plans_of(plans)[:top]
    fig = ax.figure if ax is not None else _figure(9, 1.2 + 0.45 * max(len(plans), 1))
    ax = ax or fig.add_subplot()
    multi = len({p.gpus for p in plans}) > 1
    y = np.arange(len(plans))[::-1]
    left = np.zeros(len(plans))
    used = [k for k in MEMORY_TERMS if any(p.memory_breakdown_gib[k] > 0.01 for p in plans)]
    for k in used:
        v = np.array([p.memory_breakdown_gib[k] for p in plans])
        ax.barh(y, v, left=left, color=MEMORY_COLOR[k], label=SHORT_MEM[k], height=0.65)
        left += v
    hbm = plans[0].hbm_gib if plans else 0
    ax.axvline(hbm, color="#c00000", ls="--", lw=1.4)
    ax.text(hbm, y.max() + 0.45 if len(y) else 0.5, f" HBM {hbm:.1f} GiB", color="#c00000", fontsize=8,
            va="bottom", ha="left")
    if labels is None:
        labels = [f"#{i + 1} {layout_label(p, multi)}" if len(plans) > 1 else layout_label(p, multi)
                  for i, p in enumerate(plans)]
    ax.set_yticks(y, list(labels)[:len(plans)], fontsize=8)
    for yi, p in zip(y, plans):
        txt = f" {p.memory_gib:.1f} GiB" + ("" if p.feasible else " (does not fit)")
        ax.text(max(p.memory_gib, 0), yi, txt, va="center", fontsize=7.5)
    xmax = max([hbm] + [p.memory_gib for p in plans]) * 1.25
    ax.set_xlim(0, xmax)
    ax.set_ylim(-0.6, (y.max() if len(y) else 0) + 0.9)
    ax.set_xlabel("memory per GPU (GiB)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_title(title or "Where the memory goes (peak pipeline stage)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


def summary_figure(res, model=None, cluster=None, top: int = 6):
    """Time and memory breakdowns of the top layouts of one search, one above the other."""
    plans = _distinct(_plans_of(res), top)
    n = max(len(plans), 1)
    fig = _figure(10, 2.6 + 0.9 * n)
    a1, a2 = fig.subplots(2, 1)
    head = f"{getattr(model, 'name', res.model)} on {_count(res.gpus)} x {getattr(cluster, 'name', res.hardware)}"
    time_breakdown_bars(plans, top=top, ax=a1, title=f"{head}: where the step time goes (top layouts)")
    memory_breakdown_bars(plans, top=top, ax=a2, title="memory per GPU against HBM")
    return fig


# ----------------------------------------------------------------------------------- heatmap

def _pow2_divisors(n, cap):
    out, d = [], 1
    while d <= min(n, cap):
        if n % d == 0:
            out.append(d)
        d *= 2
    return out


def tp_pp_heatmap(model, cluster, res=None, layout=None, stack=None, tp_values=None, pp_values=None,
                  title: str | None = None):
    """Tokens/s per GPU over TP x PP with every other knob held at `layout` (default: the best
    layout of `res`); dp absorbs the rest of the GPU count. Cells that do not fit in memory say
    OOM; combinations the model cannot split are left blank. The base layout is outlined."""
    from .costmodel import evaluate
    from .results import plan_from_eval
    from .layout import Candidates
    base = layout if layout is not None else res.best.layout
    gpus = base.gpus
    rest = gpus // base.cp
    tps = sorted(set(tp_values or [t for t in _pow2_divisors(rest, 64) if model.heads % t == 0]) | {base.tp})
    pps = sorted(set(pp_values or [p for p in _pow2_divisors(rest, 64) if p <= model.layers]) | {base.pp})
    cells, layouts = [], []
    for i, tp in enumerate(tps):
        for j, pp in enumerate(pps):
            if rest % (tp * pp):
                continue
            dp = rest // (tp * pp)
            L = replace(base, tp=tp, dp=dp, etp=tp if base.etp == base.tp else base.etp,
                        sp=(tp > 1) and (base.sp or base.tp == 1))
            try:
                L, _ = with_pp(model, L, pp, dp, stack, cluster) if pp != base.pp or tp != base.tp else (L, "")
            except PlannerError:   # a split Layout rejects
                continue
            if L is None or not valid(model, L, stack, cluster):
                continue
            cells.append((i, j))
            layouts.append(L)
    val = np.full((len(tps), len(pps)), np.nan)
    fits = np.zeros_like(val, dtype=bool)
    if layouts:
        c = Candidates.from_layouts(layouts)
        ev = evaluate(model, cluster, c, stack)
        for n, (i, j) in enumerate(cells):
            p = plan_from_eval(ev, c, n, cluster)
            val[i, j] = p.tokens_per_s_per_gpu
            fits[i, j] = p.feasible
    # drop TP rows and PP columns the model cannot use at all
    rows = [i for i in range(len(tps)) if np.isfinite(val[i]).any()]
    cols = [j for j in range(len(pps)) if np.isfinite(val[:, j]).any()]
    tps, pps = [tps[i] for i in rows], [pps[j] for j in cols]
    val, fits = val[np.ix_(rows, cols)], fits[np.ix_(rows, cols)]
    fig = _figure(max(5.5, 2.2 + 0.9 * len(pps)), 1.9 + 0.55 * len(tps))
    ax = fig.add_subplot()
    shown = np.where(fits, val, np.nan)
    finite = shown[np.isfinite(shown)]
    vmin, vmax = (finite.min(), finite.max()) if finite.size else (0, 1)
    im = ax.imshow(np.ma.masked_invalid(shown), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto",
                   origin="lower")
    ax.set_facecolor("#eeeeee")
    for i in range(len(tps)):
        for j in range(len(pps)):
            if np.isnan(val[i, j]):
                continue
            if fits[i, j]:
                frac = (val[i, j] - vmin) / (vmax - vmin) if vmax > vmin else 1
                ax.text(j, i, f"{val[i, j]:,.0f}", ha="center", va="center", fontsize=7.5,
                        color="black" if frac > 0.55 else "white")
            else:
                ax.text(j, i, "OOM", ha="center", va="center", fontsize=7.5, color="#c00000")
    bi, bj = tps.index(base.tp), pps.index(base.pp)
    from matplotlib.patches import Rectangle
    ax.add_patch(Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, ec="#c00000", lw=2.2))
    ax.set_xticks(range(len(pps)), [str(p) for p in pps])
    ax.set_yticks(range(len(tps)), [str(t) for t in tps])
    ax.set_xlabel("pipeline-parallel degree (PP)")
    ax.set_ylabel("tensor-parallel degree (TP)")
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    cb.set_label("tokens/s per GPU")
    rc = "no" if base.recompute == "none" else base.recompute
    fixed = (f"cp={base.cp} mb={base.micro_batch} {rc} recompute, ZeRO-{base.zero}, "
             f"{base.precision}; dp = rest")
    ax.set_title(title or f"{model.name} on {_count(gpus)} x {cluster.name}: tokens/s per GPU\n({fixed}; "
                          f"red box = base layout)", fontsize=9)
    return fig


# ----------------------------------------------------------------------------------- scaling

def scaling_data(model, cluster, counts, seq_len=None, global_batch=None, tokens=None, stack=None,
                 fixed=None, precisions=None, series=None, top=1):
    """The best layout for each GPU count as a DataFrame (one row per count). `global_batch` is a
    number of sequences (strong scaling), a callable gpus -> sequences (weak scaling), or None
    for the planner's default."""
    import pandas as pd

    from .engine import search
    rows = []
    for g in counts:
        gb = global_batch(g) if callable(global_batch) else global_batch
        res = search(model, cluster, int(g), seq_len=seq_len, global_batch=gb, fixed=dict(fixed or {}), top=top,
                     stack=stack, tokens=tokens, precisions=precisions)
        b = res.best
        row = {"gpus": int(g), "feasible": b is not None}
        if series is not None:
            row["series"] = series
        if b is not None:
            L = b.layout
            row.update(tp=L.tp, pp=L.pp, dp=L.dp, cp=L.cp, ep=L.ep, vpp=L.vpp, micro_batch=L.micro_batch,
                       recompute=L.recompute, zero=L.zero, precision=L.precision, global_batch=L.global_batch,
                       step_time_s=b.step_time_s, tokens_per_s_per_gpu=b.tokens_per_s_per_gpu, mfu=b.mfu,
                       memory_gib=b.memory_gib, time_to_train_days=(b.time_to_train_s / 86400
                                                                    if b.time_to_train_s else np.nan),
                       cost_usd=b.cost_usd if b.cost_usd is not None else np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def _log2_gpu_axis(ax, counts):
    ax.set_xscale("log", base=2)
    counts = sorted(set(int(c) for c in counts))
    if len(counts) > 9:   # keep tick labels legible
        step = int(np.ceil(len(counts) / 9))
        counts = counts[::step] + ([counts[-1]] if counts[-1] not in counts[::step] else [])
    ax.set_xticks(counts, [_count(c) for c in counts])
    ax.minorticks_off()


def scaling_curve(df, title: str | None = None):
    """MFU (top) and cost with time-to-train (bottom) against GPU count, one line per `series`
    (if the frame has that column)."""
    fig = _figure(8, 6.2)
    a1, a2 = fig.subplots(2, 1, sharex=True)
    groups = list(df.groupby("series", sort=False)) if "series" in df else [(None, df)]
    has_cost = "cost_usd" in df and np.isfinite(df["cost_usd"].astype(float)).any()
    a3 = a2.twinx() if has_cost else None
    markers = "osD^v<>"
    for n, (name, g) in enumerate(groups):
        g = g[g["feasible"]] if "feasible" in g else g
        lab = str(name) if name is not None else None
        a1.plot(g["gpus"], 100 * g["mfu"], marker=markers[n % 7], label=lab)
        if has_cost:
            a2.plot(g["gpus"], g["cost_usd"] / 1e6, marker=markers[n % 7], label=lab)
            a3.plot(g["gpus"], g["time_to_train_days"], marker=markers[n % 7], ls=":", alpha=0.8,
                    color=a2.lines[-1].get_color())
        else:
            a2.plot(g["gpus"], g["tokens_per_s_per_gpu"] * g["gpus"] / 1e6, marker=markers[n % 7], label=lab)
    a1.set_ylabel("MFU (% of bf16 peak)")
    a1.set_ylim(bottom=0)
    a1.grid(alpha=0.3)
    if has_cost:
        a2.set_ylabel("cost to train (million USD), solid")
        a3.set_ylabel("time to train (days), dotted")
        a3.set_ylim(bottom=0)
    else:
        a2.set_ylabel("cluster throughput (M tokens/s)")
    a2.set_ylim(bottom=0)
    a2.grid(alpha=0.3)
    a2.set_xlabel("GPUs")
    _log2_gpu_axis(a2, df["gpus"])
    if groups[0][0] is not None:
        a1.legend(fontsize=8, loc="lower left")
    a1.set_title(title or "Scaling: best layout per GPU count", fontsize=10)
    return fig


# ----------------------------------------------------------------------------------- pareto

def pareto_plot(res_or_plans, title: str | None = None, annotate: int = 12, span: float = 4.0):
    """Time-to-train (days) against cost (million USD), both on log scales: the search's Pareto
    points coloured by GPU count, with the time/cost front drawn through them and labelled with
    GPU counts. Points more than `span` times the front's extent in either axis (layouts that
    are only Pareto-optimal for memory) are left out so the front stays readable."""
    pts = list(res_or_plans.pareto) if hasattr(res_or_plans, "pareto") and res_or_plans.pareto else \
        _plans_of(res_or_plans)
    pts = [p for p in pts if p.time_to_train_s is not None and p.cost_usd is not None]
    fig = _figure(8, 5)
    ax = fig.add_subplot()
    if not pts:
        ax.text(0.5, 0.5, "no layouts with a time-to-train (give tokens)", ha="center", transform=ax.transAxes)
        return fig
    days = np.array([p.time_to_train_s / 86400 for p in pts])
    cost = np.array([p.cost_usd / 1e6 for p in pts])
    g = np.array([p.gpus for p in pts])
    order = np.lexsort((cost, days))
    front, best_cost = [], np.inf
    for i in order:
        if cost[i] < best_cost * (1 - 1e-9):
            front.append(i)
            best_cost = cost[i]
    keep = (days <= span * days[front].max()) & (cost <= span * cost[front].max())
    sc = ax.scatter(days[keep], cost[keep], c=np.log2(g[keep]), cmap="plasma", s=26, alpha=0.8,
                    edgecolors="none", vmin=np.log2(g.min()), vmax=np.log2(g.max()) + 1e-9)
    ax.plot(days[front], cost[front], color="black", lw=1, alpha=0.7, marker="o", ms=3,
            label="time/cost front")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.4g}"))
        axis.set_minor_locator(NullLocator())
    # label the front with GPU counts: the first point of each count, at most `annotate` labels
    firsts = [i for k, i in enumerate(front) if k == 0 or g[i] != g[front[k - 1]]]
    step = max(1, int(np.ceil(len(firsts) / annotate)))
    for k, i in enumerate(firsts[::step]):
        ax.annotate(f"{_count(g[i])} GPUs", (days[i], cost[i]), textcoords="offset points",
                    xytext=(7, 7 if k % 2 == 0 else -13), fontsize=7.5)
    ticks = sorted(set(int(np.log2(x)) for x in g))
    if len(ticks) > 8:
        ticks = ticks[:: int(np.ceil(len(ticks) / 8))]
    cb = fig.colorbar(sc, ax=ax, ticks=ticks)
    cb.ax.set_yticklabels([_count(2 ** t) for t in ticks])
    cb.set_label("GPUs")
    ax.set_xlabel("time to train (days, log scale)")
    ax.set_ylabel("cost to train (million USD, log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right")
    name = getattr(res_or_plans, "model", "")
    ax.set_title(title or f"{name} time to train against cost".strip(), fontsize=10)
    return fig


# ----------------------------------------------------------------------------------- query

def figure_for_query(res, model, cluster, stack=None):
    """The most useful single figure for a search: the time/cost front for a GPU range, the
    time and memory breakdowns of the top layouts for one GPU count, and the memory of the
    closest layout when nothing fits."""
    if not res.plans:
        cl = res.closest_infeasible
        return memory_breakdown_bars([cl] if cl else [], title=(
            f"{model.name} on {_count(res.gpus)} x {cluster.name}: nothing fits; closest layout's memory"))
    if len({p.gpus for p in res.pareto}) > 1:
        return pareto_plot(res, title=f"{model.name} on {cluster.name}: time to train against cost")
    return summary_figure(res, model, cluster)


def save_figure(fig, path) -> Path:
    """Write `fig` to `path` atomically (format from the suffix, PNG by default)."""
    from .atomic import atomic_write_bytes
    path = Path(path)
    fmt = (path.suffix[1:] or "png").lower()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=150 if fmt == "png" else None)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_for_query(res, model, cluster, path, stack=None):
    """Save the most useful plot for this query (figure_for_query) to `path`; returns the Figure."""
    fig = figure_for_query(res, model, cluster, stack)
    save_figure(fig, path)
    return fig


__all__ = ["tp_pp_heatmap", "time_breakdown_bars", "memory_breakdown_bars", "summary_figure", "scaling_data",
           "scaling_curve", "pareto_plot", "figure_for_query", "plot_for_query", "save_figure", "layout_label",
           "TIME_LABEL", "MEMORY_LABEL"]
