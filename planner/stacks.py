"""Software stacks. A stack changes how close kernels get to the hardware and which
communication it overlaps; its factors are global (fitted once over every published run of that
stack by benchmarks/fit_efficiency.py, never per run) and stated here.

The default, `megatron-core`, is Megatron-Core with Transformer Engine as run by NVIDIA's NeMo /
Megatron-Bridge performance recipes: fused kernels, distributed optimizer, overlapped gradient
reduce-scatter and parameter all-gather, TP communication overlap.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import PlannerError


@dataclass(frozen=True)
class Stack:
    name: str
    description: str
    gemm: float = 1.0             # multiplier on the profile's GEMM efficiency
    attention: float = 1.0        # multiplier on the profile's attention-kernel efficiency
    pooled_nics: bool = True      # DP collectives drive every NIC of a node at once (NCCL channels);
                                  # False: each rank's traffic leaves through its own NIC only
    elementwise: float = 1.0      # multiplier on memory-bound traffic (1.0 = fused kernels)
    grad_reduce_bytes: int = 4    # bytes per gradient element in the DP reduction
    grad_bytes: int = 4           # bytes per gradient element held (fp32 main grads)
    fsdp_regather_backward: bool = True   # ZeRO-3 gathers parameters again in backward
    tp_overlap: bool = True       # can overlap TP collectives with GEMMs (TE userbuffers)
    ep_overlap: bool = True       # can overlap the EP all-to-all with another micro-batch's compute
    flash_attention: bool = True  # fused attention (FlashAttention / cuDNN); False: scores materialised
    step_overhead_s: float = 0.0  # fixed per-step host overhead
    kernel_overhead_s: float = 4.3e-6   # launch + sync gap per kernel, fitted once over all runs
                                     # (benchmarks/fit_efficiency.py; CUDA launch latency is ~3-5 us)
    tp_layer_overhead_s: float = 0.0    # host seconds per TP-sharded layer forward (backward 2x) beyond
                                     # its kernels: DTensor dispatch of eager TP (validate calibrate
                                     # measures it); 0 for Megatron's hand-written TP
    schedules: tuple = ("1f1b", "interleaved", "zb-h1", "zbv", "dualpipe")  # pipeline schedules it runs
    zero_stages: tuple = (0, 1, 2, 3)
    source: str = ""


STACKS = {
    "megatron-core": Stack(
        "megatron-core",
        "Megatron-Core + Transformer Engine (NeMo / Megatron-Bridge recipes)",
        schedules=("1f1b", "interleaved"),
        source="reference stack; efficiencies live in the hardware profile"),
    "megatron-2021": Stack(
        "megatron-2021",
        "Megatron-LM of Narayanan et al. 2021 / Korthikanti et al. 2022 (Apex fused kernels, no TE, "
        "no TP overlap, grads all-reduced in fp32)",
        tp_overlap=False, ep_overlap=False, flash_attention=False, schedules=("1f1b", "interleaved"), zero_stages=(0,),
        source="Narayanan et al. 2021 sec. 5; Korthikanti et al. 2022 sec. 6"),
    "torchtitan": Stack(
        "torchtitan",
        "torchtitan (FSDP2 + DTensor TP, eager or torch.compile)",
        gemm=0.694, attention=0.308,   # fitted (benchmarks/fit_efficiency.py, 14 torchtitan runs)
        elementwise=2.0, tp_overlap=False, ep_overlap=False, zero_stages=(0, 3),
        schedules=("1f1b", "interleaved", "zb-h1", "zbv"),
        source="torchtitan docs/performance.md; factors from benchmarks/fit_efficiency.py"),
    "llm-foundry": Stack(
        "llm-foundry",
        "MosaicML Composer / llm-foundry with PyTorch FSDP (FULL_SHARD)",
        gemm=0.975,                    # fitted (benchmarks/fit_efficiency.py, 11 llm-foundry runs)
        elementwise=1.5, tp_overlap=False, ep_overlap=False, zero_stages=(2, 3), schedules=("1f1b",),
        source="llm-foundry scripts/train/benchmarking/README.md; factors from benchmarks/fit_efficiency.py"),
    "deepspeed": Stack(
        "deepspeed",
        "DeepSpeed ZeRO (data parallel only, Narayanan et al. 2021 Table 2 baseline)",
        grad_reduce_bytes=2, grad_bytes=2, tp_overlap=False, ep_overlap=False, flash_attention=False,
        schedules=("1f1b",),
        pooled_nics=False,
        source="Rajbhandari et al. 2020 sec. 5 (fp16 gradients)"),
}


def get_stack(name: str) -> Stack:
    try:
        return STACKS[name]
    except KeyError:
        raise PlannerError(f"unknown stack '{name}'; valid: {', '.join(STACKS)}") from None
