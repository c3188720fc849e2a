"""The per-layer terms of phases 1-3 as one typed record, and the cache a search owns so that they
are computed once per distinct row of its layer table and gathered to candidates."""
from __future__ import annotations

import numpy as np

from ..hardware import Cluster
from ..layout import Candidates
from ..model_spec import ModelSpec
from ..stacks import Stack
from .activations import LayerActivations, layer_activations
from .comm import DpGroups, LayerComm, dp_groups, layer_comm
from .compute import LayerCompute, layer_compute
from .elements import ElementBytes
from .knobs import LAYER_COLS, LayerKnobs
from .offload import HostCopy, host_copy
from .records import Record, record
from .routing import routed_load
from ..frozen import frozen


@record
class LayerTerms(Record):
    compute: LayerCompute
    comm: LayerComm
    groups: DpGroups
    acts: LayerActivations
    host: HostCopy


@frozen
class Settings:
    """Everything besides the candidates that the terms depend on."""
    model: ModelSpec
    cluster: Cluster
    stack: Stack
    moe_imbalance: float = 1.0
    capacity_factor: float = 0.0
    elements: ElementBytes | None = None     # None: the stack's (ElementBytes.of_stack)
    pad_to_capacity: bool = False            # with a capacity factor: experts padded to capacity

    def routed_load(self, k):
        """The busiest rank's routed token copies over the mean, per layer row (routing.py)."""
        moe = self.model.moe
        if moe is None:
            return self.moe_imbalance
        return routed_load(self.moe_imbalance, self.capacity_factor, self.pad_to_capacity, k.tokens / k.tp,
                           moe.top_k, moe.experts)

    @property
    def eb(self) -> ElementBytes:
        return self.elements or ElementBytes.of_stack(self.stack)


def layer_terms(st: Settings, cols: dict) -> LayerTerms:
    """Phases 1-3 for the rows `cols` (LAYER_COLS)."""
    k = LayerKnobs.of(cols)
    load = st.routed_load(k)
    lc = layer_compute(st.model, st.cluster, st.stack, k, load)
    acts = layer_activations(st.model, st.stack, k, load, st.eb)
    return LayerTerms(lc, layer_comm(st.model, st.cluster, st.stack, k, lc, load, st.eb),
                      dp_groups(st.cluster, st.stack, k), acts, host_copy(st.cluster, acts))


class Gathered:
    """A record's fields for the candidates `idx`, each gathered from the per-row table when first
    read: a ranking pass reads only the terms it needs."""

    def __init__(self, rec: Record, idx):
        self._rec, self._idx = rec, idx

    def __getattr__(self, name):
        v = getattr(self.__dict__["_rec"], name)
        v = Gathered(v, self._idx) if isinstance(v, Record) else np.take(v, self._idx, axis=-1)
        setattr(self, name, v)
        return v

    def by_row(self, name: str, codes):
        """Field `name` (rows by code, e.g. LayerActivations.dense) at each candidate's code: one
        gather of n values instead of every row's."""
        table = getattr(self.__dict__["_rec"], name)
        return table.reshape(-1)[np.asarray(codes) * table.shape[-1] + self._idx]


class LayerCache:
    """Per-layer terms of the layer tables a search's candidate chunks carry (chunks of one class
    share a table). Holds the table it computed, so identity is a safe key."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._table = None
        self._terms = None

    def table_terms(self, table) -> LayerTerms:
        """The terms of every row of a layer table."""
        if table is not self._table:
            self._table, self._terms = table, layer_terms(self.settings, table)
        return self._terms

    def for_candidates(self, c: Candidates):
        """The terms of every candidate in `c` (a LayerTerms, or a Gathered view of one)."""
        if c.deg_table is None:
            return layer_terms(self.settings, {k: c.cols[k] for k in LAYER_COLS})
        return Gathered(self.table_terms(c.deg_table), c.deg_index)
