"""Which phase of a training step an operation belongs to, and per-layer activation tracking.

forward / backward / recompute are told apart without wrapping the schedules:
- backward: the autograd engine is executing a node (torch._C._current_autograd_node());
- recompute: a torch.utils.checkpoint region is being replayed (its recompute context,
  passed as context_fn, is entered);
- otherwise the phase the driver set ("forward" while running the step's micro-batches,
  "optimizer" during gradient reduction and the optimizer step).
"""
from __future__ import annotations

import contextlib

import torch

_driver_phase = "setup"
_recomputing = 0
_meter = None  # the active ActivationMeter, if any


def set_driver_phase(name: str):
    global _driver_phase
    _driver_phase = name


def current() -> str:
    if _recomputing:
        return "recompute"
    if torch._C._current_autograd_node() is not None:
        return "backward"
    return _driver_phase


class _Recompute:
    def __enter__(self):
        global _recomputing
        _recomputing += 1

    def __exit__(self, *a):
        global _recomputing
        _recomputing -= 1


def recompute_contexts():
    """context_fn for torch.utils.checkpoint: (forward context, recompute context)."""
    return contextlib.nullcontext(), _Recompute()


def note_checkpoint_inputs(tensors, layer=None):
    """torch.utils.checkpoint keeps the region's inputs by reference, outside saved-tensor
    hooks; tell the meter that they are held for backward."""
    if _meter is not None and not _recomputing:
        _meter.note(tensors, layer)


def set_meter(meter):
    global _meter
    _meter = meter
