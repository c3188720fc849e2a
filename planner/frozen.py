"""Light frozen classes: dataclass(frozen=True)'s behaviour without its exec-compiled methods,
for the planner's internal records and keys (the three inputs and the results stay dataclasses)."""
from __future__ import annotations

import inspect
from dataclasses import FrozenInstanceError


def frozen(cls=None, *, eq: bool = False):
    """A frozen class: its annotated names are its fields, in order (a class attribute is a
    default), set once by the constructor, positionally or by name; assigning or deleting later
    raises FrozenInstanceError, as for a frozen dataclass. eq=True: equal and hashed by the tuple
    of its fields (a frozen dataclass's eq); else by identity (records of numpy arrays, whose ==
    is elementwise). Written out rather than dataclass(frozen=True), which compiles __init__,
    __repr__, __setattr__, __eq__ and __hash__ with exec: 1.85 ms a class on Python 3.11, about
    60 ms of every `plan` for the 30 such classes it imports."""
    if cls is None:
        return lambda c: frozen(c, eq=eq)
    names = tuple(inspect.get_annotations(cls))    # its own annotations, as dataclasses reads them
    if not names:
        raise TypeError(f"@frozen class {cls.__name__} declares no fields")
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

    def _values(self):
        return tuple(getattr(self, n) for n in names)

    def __eq__(self, other):
        return _values(self) == _values(other) if type(other) is cls else NotImplemented

    def __hash__(self):
        return hash(_values(self))

    cls.__init__, cls.__setattr__, cls.__delattr__, cls.__repr__ = __init__, __setattr__, __delattr__, __repr__
    if eq:
        cls.__eq__, cls.__hash__ = __eq__, __hash__
    cls.__record_fields__ = names
    return cls
