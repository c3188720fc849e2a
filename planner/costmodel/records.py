"""Typed records of numpy arrays, the cost model's currency: one value per candidate (or per
row of the per-layer table), last axis = candidates, with take/concat for gathering and merging."""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

# A record of arrays compares by identity: == between arrays is elementwise, so a generated
# __eq__/__hash__ could only raise; leaving them out also halves the class's creation cost at
# import (about 1 ms a class on Python 3.11, 15 classes on every `plan`)
record = dataclass(frozen=True, eq=False)


class Record:
    """Mixin for frozen dataclasses whose fields are numpy arrays (candidates on the last axis)
    or nested Records."""

    def take(self, idx):
        """The same record for the candidates `idx` (an index array)."""
        return type(self)(**{f.name: _take(getattr(self, f.name), idx) for f in fields(self)})

    @classmethod
    def concat(cls, parts):
        """Candidates of several records of this type, one after the other."""
        return cls(**{f.name: _concat([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def named(self) -> dict:
        """{field: array} (the flat form reports and frames use)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _take(v, idx):
    if v is None:
        return None
    if isinstance(v, Record):
        return v.take(idx)
    return np.take(v, idx, axis=-1)


def _concat(vs):
    if vs[0] is None:
        return None
    if isinstance(vs[0], Record):
        return type(vs[0]).concat(vs)
    return np.concatenate(vs, axis=-1)


def full(n: int, *arrays):
    """Each array as a float64 array of n candidates (scalars and broadcastable arrays expanded)."""
    out = tuple(np.broadcast_to(np.asarray(a, dtype=np.float64), (n,)) for a in arrays)
    return out if len(out) != 1 else out[0]


def on(where, x):
    """x where `where` (a bool array, or one bool for every candidate), else 0 -- a bool skips
    the array operation (the first and last rank are known without one)."""
    if isinstance(where, (bool, np.bool_)):
        return x if where else 0.0
    return np.where(where, x, 0.0)
