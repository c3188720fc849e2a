"""Phase 4 per pipeline rank, on its own small table: what a rank holds and moves between data-
parallel replicas depends only on the degrees, the stage split, SP and the ZeRO stage, so it is
computed once per distinct (degree row, pipeline knobs, SP, ZeRO) row and gathered to candidates
(as phases 1-3 are per layer row): the layers each rank holds (stages.stage_split), its
parameters (state.stage_params), their DP traffic seconds (state.dp_flows) and model-state bytes
(footprint.model_states)."""
from __future__ import annotations

import numpy as np

from ..layout import Precision
from .elements import ElementBytes, with_grads_of
from .footprint import layer_elements, model_states, prefetch_bytes
from .records import Record, record
from .stages import StageSplit, stage_split
from .state import DpTimes, StageParams, dp_times, stage_params

# columns a rank-table row is made of (with `layer_row`, its row in the layer table)
RANK_COLS = ("tp", "pp", "dp", "cp", "ep", "etp", "vpp", "sp", "zero", "first_stage_layers", "last_stage_layers")


@record
class RankState(Record):
    """One pipeline rank: parameters, DP seconds, and weights / gradients / optimizer bytes (before
    fp8 weight copies, DualPipe's second copy and the ZeRO-3 prefetch)."""
    params: StageParams
    dp: DpTimes
    weights: np.ndarray
    gradients: np.ndarray
    optimizer: np.ndarray


@record
class RankTerms(Record):
    split: StageSplit
    first: RankState
    mid: RankState
    last: RankState
    prefetch: np.ndarray      # ZeRO-3: two layers' gathered weights in flight
    unit: np.ndarray          # elements of the largest layer on a TP rank (an FSDP unit)


@record
class RankKnobs:
    """The knobs phase 4 reads (columns of a rank table, or of the candidates themselves)."""
    tp: np.ndarray
    pp: np.ndarray
    ep: np.ndarray
    etp: np.ndarray
    vpp: np.ndarray
    sp: np.ndarray
    fp16: np.ndarray           # in fp16: gradients may be 16-bit (elements.with_grads_of)
    zero: np.ndarray
    zero_values: tuple
    first_given: np.ndarray
    last_given: np.ndarray

    @staticmethod
    def of(cols: dict) -> "RankKnobs":
        from .knobs import _values
        f = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
        tp = f(cols["tp"])
        return RankKnobs(tp=tp, pp=f(cols["pp"]), ep=f(cols["ep"]), etp=f(cols["etp"]), vpp=f(cols["vpp"]),
                         sp=np.asarray(cols["sp"], bool) & (tp > 1),
                         fp16=np.asarray(cols["precision"]) == Precision.FP16,
                         zero=np.asarray(cols["zero"]),
                         zero_values=_values(cols["zero"]), first_given=f(cols["first_stage_layers"]),
                         last_given=f(cols["last_stage_layers"]))


def rank_terms(model, stack, eb: ElementBytes, groups, k: RankKnobs) -> RankTerms:
    """Phase 4 for the first, a middle and the last pipeline rank of every row."""
    split = stage_split(model, k)
    eb = with_grads_of(eb, stack, k.fp16)
    only = k.pp == 1
    spec = ((split.first, split.dense_first, True, only), (split.mid, split.dense_mid, False, False),
            (split.last, split.dense_last, False, k.pp > 1))
    out = []
    for layers, ndense, first, last in spec:
        first, last = np.broadcast_to(first, layers.shape), np.broadcast_to(last, layers.shape)
        prm = stage_params(model, k, layers, ndense, first, last, (groups.shard, groups.eshard), stack.zero3_padding)
        w, g, o = model_states(prm, groups, k.zero, eb)
        out.append(RankState(prm, dp_times(model, groups, k, stack, eb, prm, layers, layers - ndense, first, last),
                             w, g, o))
    layer, _ = layer_elements(model, k)
    return RankTerms(split, *out, prefetch_bytes(model, groups, k, stack.zero3_max_live_params),
                     np.broadcast_to(layer, k.tp.shape))


class RankCache:
    """Phase 4 of the rank tables a search's candidate chunks carry (chunks of one class share
    one), gathered to candidates; without a table, computed on the candidates' own columns."""

    def __init__(self, settings):
        self.settings = settings
        self._table = None
        self._terms = None

    def for_candidates(self, c, layer_cache, lt):
        """RankTerms (or a Gathered view) of every candidate in `c`; lt: their layer terms."""
        from .terms import Gathered
        st = self.settings
        if c.rank_table is None:
            return rank_terms(st.model, st.stack, st.eb, lt.groups, RankKnobs.of(c.cols))
        if c.rank_table is not self._table:
            groups = Gathered(layer_cache.table_terms(c.deg_table).groups, c.rank_table["layer_row"])
            self._table = c.rank_table
            self._terms = rank_terms(st.model, st.stack, st.eb, groups, RankKnobs.of(c.rank_table))
        return Gathered(self._terms, c.rank_index)
