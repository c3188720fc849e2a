"""Scenario dicts: what a validation run is told (model, layout, steps), JSON-able so it can be
handed to spawned ranks."""
from __future__ import annotations

import dataclasses

from planner.model_spec import MLASpec, ModelSpec, MoESpec

DTYPES = ("float32", "float64", "bfloat16")
DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2}
LAYOUT_KEYS = ("tp", "pp", "dp", "cp", "ep", "vpp", "sp", "micro_batch", "global_batch", "seq_len",
               "recompute", "zero", "etp")


def spec_to_dict(spec: ModelSpec) -> dict:
    return dataclasses.asdict(spec)


def spec_from_dict(d: dict) -> ModelSpec:
    d = dict(d)
    if d.get("moe"):
        d["moe"] = MoESpec(**d["moe"])
    if d.get("mla"):
        d["mla"] = MLASpec(**d["mla"])
    return ModelSpec(**d)


def torch_dtype(name: str):
    import torch
    return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[name]


def scenario(spec: ModelSpec, layout, steps=1, timed_steps=0, seed=1234, dtype="float32",
             check_all_grads=False, fault=None, capacity_factor=0.0, pad_to_capacity=False) -> dict:
    """A run's JSON-able description; `routing`: the experts' capacity factor (0: dropless) and
    whether their inputs are padded to it (planner --capacity-factor / --pad-to-capacity)."""
    return {"fault": fault, "model": spec_to_dict(spec),
            "layout": {k: getattr(layout, k) for k in LAYOUT_KEYS},
            "steps": int(steps), "timed_steps": int(timed_steps), "seed": int(seed),
            "dtype": dtype, "check_all_grads": bool(check_all_grads),
            "routing": {"capacity_factor": float(capacity_factor), "pad": bool(pad_to_capacity)}}


def routing_of(cfg: dict) -> tuple:
    """(capacity factor, pad) of a scenario (dropless where it predates routing)."""
    r = cfg.get("routing") or {}
    return float(r.get("capacity_factor", 0.0)), bool(r.get("pad", False))
