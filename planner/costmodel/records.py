"""Typed records of numpy arrays, the cost model's currency: one value per candidate (or per
row of the per-layer table), last axis = candidates, with take/concat for gathering and merging."""
from __future__ import annotations

import numpy as np

from ..frozen import frozen

# the cost model's records: frozen, compared by identity (== between arrays is elementwise)
record = frozen


class Record:
    """Mixin for records (@record) whose fields are numpy arrays (candidates on the last axis)
    or nested Records."""

    def take(self, idx):
        """The same record for the candidates `idx` (an index array)."""
        return type(self)(**{n: _take(getattr(self, n), idx) for n in self.__record_fields__})

    @classmethod
    def concat(cls, parts):
        """Candidates of several records of this type, one after the other."""
        return cls(**{n: _concat([getattr(p, n) for p in parts]) for n in cls.__record_fields__})

    def named(self) -> dict:
        """{field: array} (the flat form reports and frames use)."""
        return {n: getattr(self, n) for n in self.__record_fields__}


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
