"""Typed records of numpy arrays, the cost model's currency: one value per candidate (or per
row of the per-layer table), last axis = candidates, with take/concat for gathering and merging."""
from __future__ import annotations

from dataclasses import FrozenInstanceError

import numpy as np


def record(cls):
    """A frozen record class: its annotated names are its fields, in order (a class attribute is a
    default), set once by the constructor, positionally or by name; assigning later raises
    FrozenInstanceError, as a frozen dataclass does. Written out rather than
    dataclass(frozen=True), which compiles __init__, __repr__ and __setattr__ with exec: 1.85 ms a
    class on Python 3.11, about 40 ms of every `plan` for the cost model's 21 records. A record of
    arrays compares by identity (== between arrays is elementwise, so no __eq__ or __hash__)."""
    names = tuple(cls.__dict__.get("__annotations__", {}))
    defaults = {n: cls.__dict__[n] for n in names if n in cls.__dict__}

    def __init__(self, *args, **kw):
        if len(args) > len(names):
            raise TypeError(f"{cls.__name__}() takes {len(names)} fields, got {len(args)} values")
        vals = dict(zip(names, args))
        for k, v in kw.items():
            if k not in names or k in vals:
                raise TypeError(f"{cls.__name__}() got an unexpected or repeated field {k!r}")
            vals[k] = v
        for n in names:
            if n not in vals and n not in defaults:
                raise TypeError(f"{cls.__name__}() missing field {n!r}")
            object.__setattr__(self, n, vals[n] if n in vals else defaults[n])

    def __setattr__(self, name, value):
        raise FrozenInstanceError(f"cannot assign to field {name!r} of a {cls.__name__}")

    def __delattr__(self, name):
        raise FrozenInstanceError(f"cannot delete field {name!r} of a {cls.__name__}")

    def __repr__(self):
        return f"{cls.__name__}(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in names) + ")"

    cls.__init__, cls.__setattr__, cls.__delattr__, cls.__repr__ = __init__, __setattr__, __delattr__, __repr__
    cls.__record_fields__ = names
    return cls


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
