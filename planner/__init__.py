"""dtplanner: an analytical planner for distributed transformer training.

Library entry points (imported lazily so `plan` starts fast):
    load_model, load_hardware, search, evaluate_layout, ModelSpec, Cluster, Layout, Plan
"""
from __future__ import annotations

__all__ = ["load_model", "load_hardware", "search", "evaluate_layout", "ModelSpec", "Cluster", "Layout",
           "Plan", "SearchResult", "PlannerError"]

_WHERE = {"load_model": "model_io", "load_hardware": "profiles", "search": "engine",
          "evaluate_layout": "engine", "ModelSpec": "model_spec", "Cluster": "hardware", "Layout": "layout",
          "Plan": "results", "SearchResult": "results", "PlannerError": "errors"}


def __getattr__(name):
    if name in _WHERE:
        import importlib
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'planner' has no attribute {name!r}")
