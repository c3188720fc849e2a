"""Goodput under failures (Young 1974 / Daly 2006), with Llama 3's reported failure rate."""
import math

import pytest

from planner.goodput import system_mtbf_hours, young_daly

# Llama 3 paper (Dubey et al. 2024, sec. 3.3.4): 419 unexpected interruptions in a 54-day
# snapshot of pre-training on 16,384 H100 GPUs.
LLAMA3_GPUS, LLAMA3_DAYS, LLAMA3_FAILS = 16384, 54, 419
PER_GPU_MTBF_H = LLAMA3_DAYS * 24 / LLAMA3_FAILS * LLAMA3_GPUS


def test_llama3_system_mtbf_is_about_three_hours():
    m = system_mtbf_hours(PER_GPU_MTBF_H, LLAMA3_GPUS)
    assert m == pytest.approx(54 * 24 / 419)          # one failure every ~3.1 hours
    assert 3.0 < m < 3.2


def test_young_daly_interval_and_loss_for_llama3():
    write_s = 60.0
    g = young_daly(PER_GPU_MTBF_H, LLAMA3_GPUS, write_s, restart_s=600.0)
    M = 54 * 24 / 419 * 3600
    assert g.checkpoint_interval_min * 60 == pytest.approx(math.sqrt(2 * write_s * M))   # ~19 min
    expected_lost = write_s / math.sqrt(2 * write_s * M) + (math.sqrt(2 * write_s * M) / 2 + 600) / M
    assert g.lost_fraction == pytest.approx(expected_lost)
    assert 0.80 < g.goodput < 0.90


@pytest.mark.parametrize("factor", [0.5, 0.8, 1.25, 2.0])
def test_young_daly_interval_is_optimal(factor):
    best = young_daly(PER_GPU_MTBF_H, LLAMA3_GPUS, 60.0)
    other = young_daly(PER_GPU_MTBF_H, LLAMA3_GPUS, 60.0, interval_s=best.checkpoint_interval_min * 60 * factor)
    assert other.lost_fraction > best.lost_fraction


def test_goodput_in_cli_json(capsys):
    import json
    from planner.cli import main
    code = main(["--model", "llama-3-70b", "--gpus", "1024", "--tokens", "15T", "--mtbf-hours", str(PER_GPU_MTBF_H),
                 "--format", "json", "--top", "1"])
    d = json.loads(capsys.readouterr().out)
    assert code == 0 and 0 < d["goodput"]["goodput"] < 1
    assert d["goodput"]["time_to_train_s"] > d["layouts"][0]["time_to_train_s"]
