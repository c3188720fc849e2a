"""Pipeline schedules: bubble time, micro-batches in flight, and p2p crossings per step.

Inputs are per-stage, per-micro-batch times (arrays): tf forward, tb full backward (input and
weight gradient), tw the weight-gradient part of tb. Codes index layout.SCHEDULES.
"""
from __future__ import annotations

import numpy as np

ONE_F_ONE_B, INTERLEAVED, ZB_H1, ZBV, DUALPIPE = range(5)


def bubble_time(code, pp, vpp, tf, tb, tw):
    """Idle time per step of the slowest stage, by schedule.

    tb is the whole backward (input gradient B plus weight gradient W = tw), as in DeepSeek-V3's
    Table 2 notation.

    1f1b        (p-1)(tf+tb)                    Narayanan et al. 2021 sec. 2.2.1 (PipeDream-Flush)
    interleaved (p-1)(tf+tb)/v                  Narayanan et al. 2021 sec. 2.2.2
    zb-h1       (p-1)(tf+tb-2tw)                Qi et al. 2023 'Zero Bubble Pipeline Parallelism'
                                                sec. 3.1 (= (p-1)(F+B-W) with B the input gradient
                                                only); DeepSeek-V3 Table 2 'ZB1P'
    zbv         (p-1)(tf+tb-3tw)/2              Qi et al. 2023 sec. 6 (ZB-V): two chunks of half a
                                                stage per device; zero when F = B = W
    dualpipe    (p/2-1)(tf&b + tb - 3tw)        DeepSeek-V3 tech report Table 2; tf&b = tf+tb (the
                                                overlap hides communication, not compute)
    """
    p = np.asarray(pp, dtype=np.float64)
    one = (p - 1) * (tf + tb)
    inter = one / np.maximum(vpp, 1)
    zbh1 = (p - 1) * np.maximum(tf + tb - 2 * tw, 0.0)
    zbv = (p - 1) * np.maximum(tf + tb - 3 * tw, 0.0) / 2.0
    dual = np.maximum(p / 2 - 1, 0) * np.maximum((tf + tb) + tb - 3 * tw, 0.0)
    return np.select([code == ONE_F_ONE_B, code == INTERLEAVED, code == ZB_H1, code == ZBV],
                     [one, inter, zbh1, zbv], dual)


def inflight_microbatches(code, pp, vpp, m):
    """Micro-batches whose activations the first stage holds at peak, in units of one micro-batch
    through the whole stage.

    1f1b / zb-h1  min(m, p)                      Korthikanti et al. 2022 sec. 4.2.3; Qi 2023 (ZB-H1
                                                 keeps 1F1B's peak)
    interleaved   min(m*v, p*v + p - 1)/v  = p(1 + (p-1)/(pv)) for m >= p, Korthikanti eq. (6)
    zbv           min(m, p)                      Qi et al. 2024 sec. 4: ZB-V peak equals 1F1B's
    dualpipe      min(m, p+1)                    DeepSeek-V3 Table 2 (PP+1 micro-batches)
    """
    p = np.asarray(pp, dtype=np.float64)
    v = np.maximum(np.asarray(vpp, dtype=np.float64), 1)
    m = np.asarray(m, dtype=np.float64)
    base = np.minimum(m, p)
    inter = np.minimum(m * v, p * v + p - 1) / v
    dual = np.minimum(m, p + 1)
    return np.select([code == INTERLEAVED, code == DUALPIPE], [inter, dual], base)


def weight_copies(code):
    """DualPipe keeps two copies of the parameters (DeepSeek-V3 Table 2: 2x parameters)."""
    return np.where(code == DUALPIPE, 2.0, 1.0)


def p2p_crossings(code, pp, vpp, m):
    """Stage-boundary activation sends per micro-batch per direction on the busiest rank.

    1f1b/zb-h1: 1; interleaved: v (each virtual chunk hands off); zbv: 2 (the V turns back at the
    last device, Qi 2024 Fig. 3); dualpipe: 2 (micro-batches flow from both ends, DeepSeek-V3 Fig. 5).
    """
    return np.select([code == INTERLEAVED, code == ZBV, code == DUALPIPE],
                     [np.asarray(vpp, dtype=np.float64), 2.0, 2.0], 1.0)
