"""planner/layout.py: Layout validates its own fields, the knob enums name the codes the candidate
columns hold, and Candidates round-trip layouts."""
import pytest

from planner.errors import PlannerError
from planner.layout import CP_COMM, RECOMPUTE, SCHEDULES, Candidates, CpComm, Layout, Recompute, Schedule


def test_enums_match_the_labels():
    assert [s.label for s in Schedule] == list(SCHEDULES)
    assert [r.label for r in Recompute] == list(RECOMPUTE)
    assert [c.label for c in CpComm] == list(CP_COMM)
    assert Schedule.of("zbv") == Schedule.ZBV == 3


@pytest.mark.parametrize("kw,msg", [(dict(tp=0), "tp must be >= 1"), (dict(zero=4), "zero must be one of"),
                                    (dict(schedule="gpipe"), "schedule must be one of"),
                                    (dict(tp=2.0), "tp must be an integer"),
                                    (dict(schedule="interleaved"), "needs vpp >= 2")])
def test_layout_refuses_bad_fields(kw, msg):
    with pytest.raises(PlannerError, match=msg):
        Layout(**kw)


def test_vpp_implies_the_interleaved_schedule():
    assert Layout(pp=2, vpp=2).schedule == "interleaved"


def test_candidates_round_trip():
    ls = [Layout(tp=2, sp=True, recompute="full"), Layout(pp=4, vpp=2, cp=2, cp_comm="a2a", precision="fp8")]
    c = Candidates.from_layouts(ls)
    assert [c.layout(i) for i in range(len(c))] == ls
    assert c.take([1]).layout(0) == ls[1]
