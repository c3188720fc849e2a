"""How many token copies an MoE rank routes through its experts, over the balanced mean: the
imbalance, and what an expert capacity (dropping, padding) makes of it."""
from __future__ import annotations

import numpy as np


def expert_capacity(local_tokens, top_k: int, experts: int, capacity_factor: float):
    """Token copies one expert takes from one rank's router (Megatron-Core moe_utils.get_capacity,
    called by topk_softmax_with_capacity with num_tokens = local tokens x top_k): ceil of the mean
    times the capacity factor, in the same float order; a capacity over the local tokens means no
    token is dropped (the capacity mask is all ones there), so at most the local tokens."""
    local = np.asarray(local_tokens, dtype=float)
    return np.minimum(np.ceil(local * top_k / experts * capacity_factor), local)


def routed_load(imbalance: float, capacity_factor: float, pad: bool, local_tokens, top_k: int, experts: int):
    """The busiest rank's routed token copies over the mean (local_tokens x top_k / experts per
    expert): dropless, the imbalance; with a capacity factor tokens beyond it are dropped (GShard,
    Lepikhin et al. 2020 sec. 2.2), so at most min(imbalance, cf); padded to capacity (Megatron
    --moe-pad-expert-input-to-capacity: topk_softmax_with_capacity's routing map becomes the
    capacity mask) every expert takes exactly its capacity, whatever the routing."""
    if capacity_factor <= 0:
        return imbalance
    if not pad:
        return min(imbalance, capacity_factor)
    mean = np.asarray(local_tokens, dtype=float) * top_k / experts
    return expert_capacity(local_tokens, top_k, experts, capacity_factor) / np.maximum(mean, 1e-30)
