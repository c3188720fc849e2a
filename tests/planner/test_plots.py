"""planner.plots: every figure has labelled axes, files are written, --plot works."""
import pytest

pytest.importorskip("matplotlib")

from planner import load_hardware, load_model, search  # noqa: E402
from planner import plots  # noqa: E402
from planner.cli import main  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def single():
    m, c = load_model("llama-3-8b"), load_hardware("h100-sxm")
    return m, c, search(m, c, 32, top=5)


@pytest.fixture(scope="module")
def ranged():
    m, c = load_model("llama-3-8b"), load_hardware("h100-sxm")
    return m, c, search(m, c, (16, 64), top=3, tokens=1e12)


def _labelled(fig):
    """Every axis that draws data has an x label and a y label or named y ticks."""
    axes = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    assert axes
    for ax in axes:
        if not (ax.lines or ax.patches or ax.collections or ax.images):
            continue
        assert ax.get_xlabel(), "x label missing"
        assert ax.get_ylabel() or any(t.get_text() for t in ax.get_yticklabels()), "y label missing"
    return axes


def test_heatmap(single):
    m, c, res = single
    fig = plots.tp_pp_heatmap(m, c, res=res)
    ax = fig.axes[0]
    assert "TP" in ax.get_ylabel() and "PP" in ax.get_xlabel()
    assert any("tokens/s" in a.get_ylabel() for a in fig.axes[1:])   # colour bar
    assert ax.images


def test_breakdown_bars(single):
    _, _, res = single
    f1 = plots.time_breakdown_bars(res)
    assert "(s)" in f1.axes[0].get_xlabel()
    f2 = plots.memory_breakdown_bars(res.plans[:3])
    assert "GiB" in f2.axes[0].get_xlabel()
    assert any("HBM" in t.get_text() for t in f2.axes[0].texts)
    _labelled(plots.summary_figure(res))


def test_scaling_curve():
    m, c = load_model("gpt-1.7b"), load_hardware("h100-sxm")
    df = plots.scaling_data(m, c, [8, 16, 32], tokens=1e11, series="strong")
    assert list(df["gpus"]) == [8, 16, 32] and df["feasible"].all()
    fig = plots.scaling_curve(df)
    a1, a2 = fig.axes[:2]
    assert "MFU" in a1.get_ylabel() and "GPUs" == a2.get_xlabel()
    assert "USD" in a2.get_ylabel() and "days" in fig.axes[2].get_ylabel()


def test_pareto(ranged):
    _, _, res = ranged
    fig = plots.pareto_plot(res)
    ax = fig.axes[0]
    assert "days" in ax.get_xlabel() and "USD" in ax.get_ylabel()


def test_plot_for_query_writes_png(tmp_path, single, ranged):
    for name, (m, c, res) in (("one", single), ("range", ranged)):
        p = tmp_path / f"{name}.png"
        fig = plots.plot_for_query(res, m, c, p)
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 10_000
        _labelled(fig)
    # the range query draws the time/cost front
    assert "days" in plots.figure_for_query(ranged[2], ranged[0], ranged[1]).axes[0].get_xlabel()
    assert not list(tmp_path.glob(".*.tmp")), "atomic write left a temporary file"


def test_nothing_fits_still_plots(tmp_path):
    m, c = load_model("llama-3.1-405b"), load_hardware("h100-sxm")
    res = search(m, c, 8, top=1)
    p = tmp_path / "none.png"
    plots.plot_for_query(res, m, c, p)
    assert p.read_bytes()[:8] == PNG


def test_cli_plot(tmp_path, capsys):
    p = tmp_path / "q.png"
    assert main(["--model", "gpt-20b", "--gpus", "64", "--top", "3", "--plot", str(p)]) == 0
    assert p.read_bytes()[:8] == PNG
