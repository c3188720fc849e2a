"""Pipeline schedules against the figures of their source papers."""
import numpy as np
import pytest

from planner import schedules as S
from planner.layout import SCHEDULES

CODE = {n: i for i, n in enumerate(SCHEDULES)}


def bubble(name, p, v=1, F=1.0, B=1.0, W=1.0):
    """Bubble with per-micro-batch stage times F (forward), B (input grad), W (weight grad)."""
    return float(S.bubble_time(np.array(CODE[name]), p, v, F, B + W, W))


@pytest.mark.parametrize("p,m", [(4, 8), (8, 64), (16, 32)])
def test_1f1b_bubble_fraction_is_p_minus_1_over_m(p, m):
    """Narayanan et al. 2021 sec. 2.2.1: bubble time fraction = (p-1)/m."""
    ideal = m * 3.0
    assert bubble("1f1b", p) / ideal == pytest.approx((p - 1) / m)


@pytest.mark.parametrize("p,v,m", [(4, 2, 8), (8, 4, 64)])
def test_interleaved_divides_the_bubble_by_v(p, v, m):
    """Narayanan et al. 2021 sec. 2.2.2: (1/v) (p-1)/m."""
    assert bubble("interleaved", p, v) / (m * 3.0) == pytest.approx((p - 1) / (v * m))


def test_zb_h1_is_one_third_of_1f1b_when_f_b_w_equal():
    """Qi et al. 2023 sec. 3.1: ZB-H1 shrinks the bubble to 1/3 of 1F1B's when T_F = T_B = T_W."""
    assert bubble("zb-h1", 8) == pytest.approx(bubble("1f1b", 8) / 3)


def test_zbv_reaches_zero_bubble_when_f_b_w_equal():
    """Qi et al. 2023 sec. 6: ZB-V's bubble vanishes when T_F = T_B = T_W."""
    assert bubble("zbv", 8) == pytest.approx(0.0, abs=1e-12)
    assert bubble("zbv", 8, F=2.0) > 0


def test_dualpipe_matches_deepseek_v3_table2():
    """DeepSeek-V3 Table 2: DualPipe bubble (PP/2-1)(F&B + B - 3W), ZB1P (PP-1)(F+B-2W),
    1F1B (PP-1)(F+B), with B the whole backward."""
    F, B, W, pp = 2.0, 3.0, 1.5, 8     # B here is the input-gradient part; whole backward = B + W
    whole = B + W
    assert bubble("dualpipe", pp, F=F, B=B, W=W) == pytest.approx((pp / 2 - 1) * ((F + whole) + whole - 3 * W))
    assert bubble("zb-h1", pp, F=F, B=B, W=W) == pytest.approx((pp - 1) * (F + whole - 2 * W))
    assert bubble("1f1b", pp, F=F, B=B, W=W) == pytest.approx((pp - 1) * (F + whole))


def test_activation_memory_in_flight():
    """1F1B keeps p micro-batches on the first stage (Korthikanti sec. 4.2.3); interleaving
    multiplies by 1 + (p-1)/(pv) (eq. 6); DualPipe keeps PP+1 (DeepSeek-V3 Table 2); ZB-H1 and
    ZB-V keep 1F1B's peak (Qi et al. 2023)."""
    p, v, m = 8, 4, 64
    assert S.inflight_microbatches(CODE["1f1b"], p, 1, m) == p
    assert S.inflight_microbatches(CODE["interleaved"], p, v, m) == pytest.approx(p * (1 + (p - 1) / (p * v)))
    assert S.inflight_microbatches(CODE["dualpipe"], p, 1, m) == p + 1
    assert S.inflight_microbatches(CODE["zb-h1"], p, 1, m) == p
    assert S.inflight_microbatches(CODE["zbv"], p, 1, m) == p
    assert S.inflight_microbatches(CODE["1f1b"], p, 1, 3) == 3       # fewer micro-batches than stages
    assert float(S.weight_copies(CODE["dualpipe"])) == 2.0


def test_p2p_crossings_by_schedule():
    assert S.p2p_crossings(CODE["interleaved"], 8, 4, 64) == 4
    assert S.p2p_crossings(CODE["1f1b"], 8, 1, 64) == 1
    assert S.p2p_crossings(CODE["zbv"], 8, 1, 64) == 2
