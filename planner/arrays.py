"""numpy helpers for the search's hot path."""
from __future__ import annotations

import numpy as np


def distinct(a) -> np.ndarray:
    """The sorted distinct values of a 1-D array: np.unique's result without its first-call import
    of numpy.ma (numpy 2.4's unique asks np.ma.is_masked; 14 ms of every `plan`'s start-up)."""
    a = np.sort(np.ravel(a))
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if len(a) else a
