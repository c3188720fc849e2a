"""costmodel/shapes.py: the parameter shapes add up to the counts the cost model shards, and
each ZeRO-3 padding rule gives what its framework allocates (FSDP2 checked against torch.chunk
and a real fully_shard)."""
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from planner.costmodel import shapes as S
from planner.costmodel.state import stage_params
from planner.model_io import list_models, load_model


def _knobs(tp, pp, ep, etp=1, zero=3):
    return NS(**{k: np.array([float(v)]) for k, v in dict(tp=tp, pp=pp, ep=ep, etp=etp, zero=zero).items()})


@pytest.mark.parametrize("name", list_models())
def test_unsharded_shapes_add_up_to_the_stage_parameters(name):
    """With a shard group of one the elements of every stage are the cost model's parameter
    counts: the shapes and LayerParams describe the same model (dense, MoE, MLA, biases, tied)."""
    m = load_model(name)
    for tp, pp, ep in ((1, 1, 1), (2, 2, 1), (4, 4, 2 if m.moe else 1)):
        k = _knobs(tp, pp, ep)
        for first, last in ((True, True), (True, False), (False, True), (False, False)):
            nd = float(min(4, m.dense_layers))
            f, l_ = np.array([first]), np.array([last])
            prm = stage_params(m, k, np.array([4.0]), np.array([nd]), f, l_)
            d, r, e = S.stage_elements(m, k, nd, 4.0 - nd, f, l_, 1, 1, S.DIM0)
            assert d == pytest.approx(prm.dense) and r == pytest.approx(prm.root) and e == pytest.approx(prm.expert)
            assert np.allclose(prm.shard_dense, prm.dense) and np.allclose(prm.shard_expert, prm.expert)


@pytest.mark.parametrize("n", [2, 3, 5, 7, 8])
def test_dim0_rule_is_torch_chunk(n):
    """FSDP2 shards with torch.chunk on dim 0: rank r holds its chunk's rows, every rank allocates
    the first chunk's (padded) rows."""
    shapes = [S.Shape(131, 40), S.Shape(100, 40), S.Shape(40), S.Shape(3, 5)]
    items = [(s, 1.0) for s in shapes]
    for r in range(n):
        rows = [torch.chunk(torch.empty(int(s.d0)), n)[r].numel() if r < len(torch.chunk(torch.empty(int(s.d0)), n))
                else 0 for s in shapes]
        assert S.rank_elements(items, 1, n, S.DIM0, r) == sum(x * s.rest for x, s in zip(rows, shapes))
    first = sum(torch.chunk(torch.empty(int(s.d0)), n)[0].numel() * s.rest for s in shapes)
    assert S.rank_elements(items, 1, n, S.DIM0) == first


def test_numel_and_unit_rules():
    """DeepSpeed pads each flattened parameter, FSDP1 the unit's flat parameter."""
    items = [(S.Shape(7, 10), 1.0), (S.Shape(7), 1.0), (S.Shape(5, 7), 1.0)]
    assert S.rank_elements(items, 1, 3, S.NUMEL) == 24 + 3 + 12
    assert S.rank_elements(items, 1, 3, S.UNIT) == 38        # ceil(112 / 3)
    assert S.rank_elements(items, 1, 1, S.UNIT) == S.rank_elements(items, 1, 1, S.NUMEL) == 112


def test_tensor_parallel_splits_the_right_side():
    col, row, whole = S.Shape(64, 32, "col"), S.Shape(32, 64, "row"), S.Shape(32)
    # column-parallel: 16 rows per TP rank, chunked over 3 -> 6 rows padded; row-parallel: 32 rows of 16
    assert S.rank_elements([(col, 1.0)], 4, 3, S.DIM0) == 6 * 32
    assert S.rank_elements([(row, 1.0)], 4, 3, S.DIM0) == 11 * 16
    assert S.rank_elements([(whole, 1.0)], 4, 3, S.DIM0) == 11
