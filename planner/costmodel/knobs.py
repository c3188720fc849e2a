"""The knobs the cost model reads, as float/bool arrays: per-layer knobs (one row of the layer
table: degrees, micro-batch, SP, precision, CP variant) and per-candidate step knobs."""
from __future__ import annotations

import numpy as np

from ..arrays import distinct
from ..layout import Candidates
from .records import record

# columns that decide the per-layer terms (everything else only changes how they add up)
LAYER_COLS = ("tp", "pp", "dp", "cp", "ep", "etp", "micro_batch", "seq_len", "sp", "precision", "cp_comm",
              "overlap_tp", "overlap_ep", "shard_group")


def _f(a):
    return np.asarray(a, dtype=np.float64)


def _values(a) -> tuple:
    """The distinct values of an integer column (cheap when it holds one, as search chunks do)."""
    a = np.asarray(a)
    if len(a) and (a == a[0]).all():
        return (int(a[0]),)
    return tuple(int(x) for x in distinct(a))


@record
class LayerKnobs:
    """One row per distinct per-layer configuration."""
    tp: np.ndarray
    pp: np.ndarray
    dp: np.ndarray
    cp: np.ndarray
    ep: np.ndarray
    etp: np.ndarray
    b: np.ndarray            # micro-batch (sequences)
    s: np.ndarray            # sequence length
    sp: np.ndarray           # sequence parallelism in effect (asked for and tp > 1)
    precision: np.ndarray    # layout.Precision codes
    cp_comm: np.ndarray      # layout.CpComm codes
    overlap_tp: np.ndarray
    overlap_ep: np.ndarray
    shard_group: np.ndarray

    @staticmethod
    def of(cols: dict) -> "LayerKnobs":
        tp = _f(cols["tp"])
        return LayerKnobs(tp=tp, pp=_f(cols["pp"]), dp=_f(cols["dp"]), cp=_f(cols["cp"]), ep=_f(cols["ep"]),
                          etp=_f(cols["etp"]), b=_f(cols["micro_batch"]), s=_f(cols["seq_len"]),
                          sp=np.asarray(cols["sp"], bool) & (tp > 1), precision=np.asarray(cols["precision"]),
                          cp_comm=np.asarray(cols["cp_comm"]), overlap_tp=np.asarray(cols["overlap_tp"], bool),
                          overlap_ep=np.asarray(cols["overlap_ep"], bool), shard_group=_f(cols["shard_group"]))

    @property
    def n(self) -> int:
        return len(self.tp)

    @property
    def tokens(self):
        """Tokens of one micro-batch on one CP rank (b*s/cp)."""
        return self.b * self.s / self.cp

    @property
    def tokens_sp(self):
        """Tokens a TP rank holds where sequence parallelism shards them (norms, residual adds,
        row-parallel outputs; Korthikanti et al. 2022 sec. 4.2.2); all of them without SP."""
        return self.tokens / np.where(self.sp, self.tp, 1)


@record
class StepKnobs:
    """Per-candidate knobs that combine the per-layer terms into a step."""
    tp: np.ndarray
    pp: np.ndarray
    dp: np.ndarray
    cp: np.ndarray
    ep: np.ndarray
    etp: np.ndarray
    vpp: np.ndarray
    b: np.ndarray
    gb: np.ndarray
    s: np.ndarray
    recompute: np.ndarray    # layout.Recompute codes (int64)
    zero: np.ndarray
    schedule: np.ndarray     # layout.Schedule codes
    precision: np.ndarray
    first_given: np.ndarray  # first/last stage layers as given (0 = even split)
    last_given: np.ndarray
    overlap_dp: np.ndarray
    overlap_pp: np.ndarray
    sp: np.ndarray           # sequence parallelism in effect (asked for and tp > 1)
    offload: np.ndarray      # layers whose activations are offloaded to host memory (pp 1 only)
    zero_values: tuple       # the ZeRO stages present (one, in a search chunk)
    recompute_values: tuple  # the recompute codes present

    @staticmethod
    def of(c: Candidates) -> "StepKnobs":
        return StepKnobs(tp=_f(c.tp), pp=_f(c.pp), dp=_f(c.dp), cp=_f(c.cp), ep=_f(c.ep), etp=_f(c.etp),
                         vpp=_f(c.vpp), b=_f(c.micro_batch), gb=_f(c.global_batch), s=_f(c.seq_len),
                         recompute=c.recompute.astype(np.int64), zero=c.zero, schedule=c.schedule,
                         precision=c.precision, first_given=_f(c.first_stage_layers),
                         last_given=_f(c.last_stage_layers), overlap_dp=c.overlap_dp, overlap_pp=c.overlap_pp,
                         sp=np.asarray(c.sp, bool) & (np.asarray(c.tp) > 1), offload=_f(c.offload_layers),
                         zero_values=_values(c.zero),
                         recompute_values=_values(c.recompute))

    @property
    def n(self) -> int:
        return len(self.tp)

    @property
    def world(self):
        return self.tp * self.pp * self.dp * self.cp

    @property
    def single_rank(self) -> bool:
        """No candidate is pipelined (pp = 1 throughout, as in a search chunk of that class)."""
        return bool((self.pp == 1).all())

    @property
    def micro_batches(self):
        """Micro-batches per step per pipeline: global batch / (dp x micro-batch)."""
        return self.gb / (self.dp * self.b)


def by_code(codes, values: tuple, options: list):
    """options[c] where codes == c (codes: an integer column whose distinct values are `values`):
    the option itself where one code is present, as search chunks hold, else a per-candidate pick."""
    if len(values) == 1:
        return options[values[0]]
    return np.select([codes == c for c in range(len(options) - 1)], options[:-1], options[-1])


def by_recompute(rec, name: str, k: StepKnobs):
    """Field `name` of `rec` (rows by Recompute code, e.g. LayerActivations.dense) at each
    candidate's code: a gather from a Gathered table (terms.Gathered.by_row), else by_code."""
    if hasattr(rec, "by_row"):
        return rec.by_row(name, k.recompute)
    return by_code(k.recompute, k.recompute_values, list(getattr(rec, name)))
