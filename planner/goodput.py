"""Goodput under failures: Young/Daly checkpointing.

Young 1974 ('A first order approximation to the optimum checkpoint interval') and Daly 2006
('A higher order estimate of the optimum checkpoint interval for restart dumps', eq. 37 first
order): tau_opt = sqrt(2 * delta * M), with delta the time to write a checkpoint and M the
system MTBF. The expected share of wall time lost is delta/tau (writing) + (tau/2 + R)/M (lost
work since the last checkpoint plus restart R after each failure).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

CHECKPOINT_WRITE_BW = 2e9   # bytes/s per GPU to persistent storage (assumed: parallel file system
                            # at ~16 GB/s per 8-GPU node, e.g. DGX SuperPOD storage RA's 'better' tier)
RESTART_S = 600.0           # seconds from failure to resumed training (assumed; job reschedule,
                            # NCCL init and checkpoint load; Llama 3 paper sec. 3.3.4 reports minutes)


@dataclass(frozen=True)
class Goodput:
    system_mtbf_h: float
    checkpoint_interval_min: float
    checkpoint_write_s: float
    restart_s: float
    lost_fraction: float
    goodput: float


def system_mtbf_hours(mtbf_per_gpu_hours: float, gpus: int) -> float:
    """Independent failures: the system fails at the sum of per-GPU rates."""
    return mtbf_per_gpu_hours / gpus


def young_daly(mtbf_per_gpu_hours: float, gpus: int, write_s: float, interval_s: float | None = None,
               restart_s: float = RESTART_S) -> Goodput:
    M = system_mtbf_hours(mtbf_per_gpu_hours, gpus) * 3600.0
    tau = math.sqrt(2.0 * write_s * M) if interval_s is None else interval_s   # Young 1974 eq. (6)
    lost = write_s / tau + (tau / 2.0 + restart_s) / M
    lost = min(lost, 1.0)
    return Goodput(system_mtbf_h=M / 3600.0, checkpoint_interval_min=tau / 60.0, checkpoint_write_s=write_s,
                   restart_s=restart_s, lost_fraction=lost, goodput=1.0 - lost)


def goodput_for(res, model, mtbf_hours, interval_min=None, write_s=None, cluster=None):
    """Goodput of the best plan; checkpoint write time from its model-state bytes per GPU."""
    p = res.best
    if p is None:
        return None
    if write_s is None:
        state_gib = p.memory_breakdown_gib["weights"] + p.memory_breakdown_gib["optimizer"]
        write_s = state_gib * 2**30 / CHECKPOINT_WRITE_BW
    write_s = max(write_s, 1e-3)
    return young_daly(mtbf_hours, p.gpus, write_s, None if interval_min is None else interval_min * 60.0)
