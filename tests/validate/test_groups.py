"""validate/groups.py's rank formula (no processes): the groups every mesh is checked against."""
from validate.groups import Topo


def test_expert_groups_put_expert_tp_innermost():
    """Megatron-Core's expert rank generator (order tp-ep-dp with tp = etp) re-splits a stage's
    tp*cp*dp ranks as etp x ep x edp, etp innermost: on 8 ranks of dp 8 with ep 2 and etp 2 the
    etp groups are neighbours, the ep groups 2 apart, the expert data-parallel groups 4 apart."""
    g = Topo(8, 0, 1, 1, 8, 1, 2, 1, 2).all_groups(False)
    assert g["etp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["ep"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g["edp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert "etp" not in Topo(8, 0, 1, 1, 8, 1, 2, 1).all_groups(False)        # etp 1: no group
    t = Topo(8, 6, 2, 1, 4, 1, 2, 1, 2)
    assert (t.etp_r, t.ep_r, t.edp_r, t.edp) == (0, 1, 1, 2)
