"""Bytes each rank sends and receives in the collective algorithms the cost model assumes.

Derived by playing each algorithm step by step over a group of n ranks and recording every
message -- not from the closed forms in collectives.py, which tests/planner/test_invariants.py holds
against these. Each play also tracks which ranks' contributions every chunk holds, and checks
the algorithm's end state (every rank ends with the whole buffer, or with its fully reduced
chunk), so a wrong step pattern cannot pass.

Buffers follow collectives.py / costmodel/traffic.py: all-reduce `nbytes` is the buffer, all-gather the
gathered output, reduce-scatter the full input, all-to-all what one rank sends in total, p2p
the message.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Traffic:
    """Messages of one collective over ranks 0..n-1: (step, src, dst, bytes)."""
    n: int
    messages: list = field(default_factory=list)

    def send(self, step: int, src: int, dst: int, nbytes: float):
        if src == dst:
            raise ValueError("a rank does not send to itself")
        self.messages.append((step, src, dst, nbytes))

    def _per_rank(self, end: int) -> list:
        out = [0.0] * self.n
        for m in self.messages:
            out[m[end]] += m[3]
        return out

    @property
    def sent(self) -> list:
        return self._per_rank(1)

    @property
    def received(self) -> list:
        return self._per_rank(2)

    @property
    def steps(self) -> int:
        return len({m[0] for m in self.messages})


def _ring_pass(t: Traffic, have: list, chunk: float, first_step: int, reduce: bool) -> None:
    """n-1 ring steps: at step k rank r passes chunk (r - k - reduce) mod n to rank r+1, which
    merges (reduce-scatter: adds its own contribution) or stores (all-gather) it."""
    n = t.n
    for k in range(n - 1):
        moves = []
        for r in range(n):
            c = (r - k - (1 if reduce else 0)) % n
            moves.append((r, (r + 1) % n, c, set(have[r][c])))   # what r sends, as of the step start
        for src, dst, c, got in moves:
            t.send(first_step + k, src, dst, chunk)
            have[dst][c] = have[dst][c] | got


def reduce_scatter(n: int, nbytes: float) -> Traffic:
    """Ring reduce-scatter of an nbytes input on every rank (Thakur et al. 2005 sec. 4): rank r
    ends with chunk r reduced over all n ranks."""
    t = Traffic(n)
    have = [[{r} for _ in range(n)] for r in range(n)]    # have[rank][chunk] = contributors
    _ring_pass(t, have, nbytes / n, 0, reduce=True)
    if any(len(have[r][r]) != n for r in range(n)):
        raise AssertionError("ring reduce-scatter did not leave rank r its chunk r reduced")
    return t


def all_gather(n: int, nbytes: float) -> Traffic:
    """Ring all-gather producing an nbytes buffer from n chunks of nbytes/n: every rank ends with
    every chunk."""
    t = Traffic(n)
    have = [[({r} if c == r else set()) for c in range(n)] for r in range(n)]
    _ring_pass(t, have, nbytes / n, 0, reduce=False)
    if any(have[r][c] != {c} for r in range(n) for c in range(n)):
        raise AssertionError("ring all-gather did not give every rank every chunk")
    return t


def all_reduce(n: int, nbytes: float) -> Traffic:
    """Ring all-reduce = ring reduce-scatter then ring all-gather of the reduced chunks (Thakur
    et al. 2005 sec. 4.4): every rank ends with the whole buffer reduced over all ranks."""
    t = Traffic(n)
    have = [[{r} for _ in range(n)] for r in range(n)]
    _ring_pass(t, have, nbytes / n, 0, reduce=True)
    _ring_pass(t, have, nbytes / n, n - 1, reduce=False)
    if any(len(have[r][c]) != n for r in range(n) for c in range(n)):
        raise AssertionError("ring all-reduce did not reduce every chunk on every rank")
    return t


def all_to_all(n: int, nbytes: float) -> Traffic:
    """Pairwise-exchange all-to-all: every rank holds nbytes split into n blocks, block j for
    rank j; at step k rank r sends its block for rank (r + k) mod n. The block for itself stays."""
    t = Traffic(n)
    got = [{r} for r in range(n)]          # got[dst] = ranks whose block for dst arrived (or is own)
    for k in range(1, n):
        for r in range(n):
            dst = (r + k) % n
            t.send(k - 1, r, dst, nbytes / n)
            got[dst].add(r)
    if any(g != set(range(n)) for g in got):
        raise AssertionError("all-to-all did not deliver every block")
    return t


def p2p(nbytes: float, src: int = 0, dst: int = 1) -> Traffic:
    """One send/recv pair (pipeline stage boundary, context-parallel ring step)."""
    t = Traffic(max(src, dst) + 1)
    t.send(0, src, dst, nbytes)
    return t


COLLECTIVES = {"all_reduce": all_reduce, "all_gather": all_gather, "reduce_scatter": reduce_scatter,
               "all_to_all": all_to_all}


def play(kind: str, n: int, nbytes: float) -> Traffic:
    """The messages of collective `kind` over a group of n ranks (a group of one sends nothing)."""
    if n < 1:
        raise ValueError(f"group size must be >= 1, got {n}")
    if n == 1:
        return Traffic(1)
    return COLLECTIVES[kind](n, nbytes)
