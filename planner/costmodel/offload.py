"""Activation offloading to host memory (Megatron-Core --cpu-offloading --cpu-offloading-num-layers,
through Transformer Engine's cpu_offload): which layers a rank offloads, the seconds one layer's
activations take over the GPU's host link, and what of that a micro-batch cannot hide."""
from __future__ import annotations

import numpy as np

from ..hardware import Cluster
from ..layout import Recompute
from .activations import LayerActivations
from .knobs import StepKnobs
from .records import Record, record, full


@record
class HostCopy(Record):
    """Seconds to move one layer's saved activations (no recompute: offloading refuses it) one
    way between the GPU and host memory, and the HBM seconds that copy's reads or writes take."""
    link_dense: np.ndarray
    link_moe: np.ndarray
    hbm_dense: np.ndarray
    hbm_moe: np.ndarray


def host_copy(cluster: Cluster, acts: LayerActivations) -> HostCopy:
    """Per layer row: bytes kept without recompute over the host link (gpu.host_bandwidth, per
    direction) and over HBM (the copy engine reads them out, later writes them back)."""
    d, m = acts.dense[Recompute.NONE], acts.moe[Recompute.NONE]
    host = cluster.gpu.host_bandwidth
    hbm = cluster.gpu.hbm_bandwidth * cluster.efficiency.hbm
    link = (lambda b: b / host) if host > 0 else (lambda b: np.where(b > 0, np.inf, 0.0))
    return HostCopy(*full(len(d), link(d), link(m), d / hbm, m / hbm))


def offloaded_layers(k: StepKnobs, layers, ndense) -> tuple:
    """(dense, MoE) layers of a rank whose activations are on the host: the first --offload-layers
    of the model (TE's cpu_offload hands the first num_layers layers to its offload handler;
    Megatron-Core allows it with pp 1 only, so the rank holds the whole model)."""
    n = np.where(k.pp == 1, np.minimum(k.offload, np.maximum(layers - 1, 0)), 0.0)
    od = np.minimum(n, ndense)
    return od, n - od


def exposed_seconds(hc: HostCopy, k: StepKnobs, layers, ndense, f_dense, f_moe, b_dense, b_moe):
    """Seconds per micro-batch offloading adds: each offloaded layer's copy out runs beside the
    next layer's forward and its copy back in beside the backward of the layer after it (TE's
    double-buffered handler), so what exceeds that compute is exposed; and the copies' HBM
    reads and writes, charged in full (an upper bound on their contention with the kernels)."""
    od, om = offloaded_layers(k, layers, ndense)
    per = lambda n, link, f, b, hbm: np.where(  # noqa: E731  (no layer offloaded: 0, even over no link)
        n > 0, n * (np.maximum(link - f, 0.0) + np.maximum(link - b, 0.0) + 2 * hbm), 0.0)
    return (per(od, hc.link_dense, f_dense, b_dense, hc.hbm_dense)
            + per(om, hc.link_moe, f_moe, b_moe, hc.hbm_moe))
