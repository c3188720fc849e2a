"""The planner's step time for a validation run, described as validate runs it.

Three facts about a validation run that the planner's defaults (Megatron-Core with Transformer
Engine, bf16) do not describe, and how they are handed to the unchanged cost model:

1. Software stack: eager PyTorch (validate/model.py and validate/parallel.py). Its Stack has no
   TP or EP communication overlap (DTensor's parallel styles and validate's all-to-all are
   synchronous), unfused elementwise kernels, fp32 gradients reduced in fp32, flash attention
   (the CPU flash kernel / SDPA), and the host costs that a calibrated profile measured
   (efficiency.kernel_overhead per kernel, efficiency.step_overhead per step) in place of the
   Megatron-Core stack's fitted 4.3 us. The layout's overlap switches follow the run: data-parallel
   gradient reduction after the last backward (HandOptimizer; FSDP2 on gloo does not overlap either),
   pipeline sends asynchronous (torch.distributed.pipelining posts isend/irecv ahead).
2. Arithmetic precision: the run computes in --dtype (float32 by default); the planner's layouts
   are bf16, fp8 or fp16. For a float32 run on a profile with an fp32 peak, the prediction uses a
   view of the profile in which the layers' precision slot holds the fp32 figures (peak, GEMM
   ceiling, attention efficiency), and every byte count is doubled (4-byte activations, weights
   and gradients: the bandwidths of memory and network halved, the stack's gradient bytes halved
   back to 4). That is a change of units, exact for the cost model's formulas, not a fit.
3. Nothing else: no per-layout factor. Whatever the model misses shows in the comparison.
"""
from __future__ import annotations

import dataclasses

ELEMENTWISE_EAGER = 2.0     # unfused eager elementwise traffic, as planner/stacks.py's torchtitan
                            # stack (eager PyTorch); not fitted here
RUN_PRECISION = {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16"}


def calibrated(cluster) -> bool:
    """Does the profile carry measured host overheads (written by validate calibrate)?"""
    return cluster.efficiency.kernel_overhead is not None


def eager_stack(cluster, grad_reduce_bytes: int = 4):
    from planner.stacks import Stack
    e = cluster.efficiency
    return Stack(
        "validate-eager",
        "validate's own run: eager PyTorch, DTensor TP, hand-written ZeRO 0-2 / FSDP2, "
        "torch.distributed.pipelining",
        tp_overlap=False, ep_overlap=False, flash_attention=True, elementwise=ELEMENTWISE_EAGER,
        grad_reduce_bytes=grad_reduce_bytes, grad_bytes=4,
        kernel_overhead_s=e.kernel_overhead if e.kernel_overhead is not None else 4.3e-6,
        step_overhead_s=e.step_overhead or 0.0,
        tp_layer_overhead_s=e.tp_layer_overhead or 0.0,
        source="validate/calibrate/predict.py; host overheads from the profile's [efficiency]")


def run_layout(layout):
    """The layout's overlap switches as validate implements them."""
    return dataclasses.replace(layout, overlap_tp=False, overlap_dp=False, overlap_ep=False,
                               overlap_pp=True)


def precision_view(cluster, dtype: str):
    """(cluster, byte scale, note): the profile seen at the run's arithmetic precision."""
    want = RUN_PRECISION.get(dtype, dtype)
    gpu, e = cluster.gpu, cluster.efficiency
    if want == "bf16" or want not in gpu.peak_flops:
        note = (None if want == "bf16" else
                f"the profile has no {want} peak: the step time is predicted at its bf16 figures")
        return cluster, 1.0, note
    scale = 4.0 / 2.0 if want == "fp32" else 1.0       # the cost model counts 2-byte elements
    peaks = dict(gpu.peak_flops, bf16=gpu.peak_flops[want])
    gm = dict(e.gemm_max, bf16=e.gemm_max.get(want, e.gemm_max["bf16"]))
    att = e.attention_by_precision.get(want)
    if att is None:      # no measurement at this precision: the bf16 rate of attention, in FLOP/s
        att = min(e.attention_max * gpu.peak_flops["bf16"] / gpu.peak_flops[want], 1.0)
    g2 = dataclasses.replace(gpu, peak_flops=peaks, hbm_bandwidth=gpu.hbm_bandwidth / scale)
    e2 = dataclasses.replace(e, gemm_max=gm, attention_max=att)
    levels = tuple(dataclasses.replace(lv, bandwidth=lv.bandwidth / scale,
                                       fits=tuple((op, lat, bw / scale) for op, lat, bw in lv.fits))
                   for lv in cluster.levels)
    view = dataclasses.replace(cluster, gpu=g2, efficiency=e2, levels=levels)
    return view, scale, f"predicted at the run's {want} arithmetic and {int(2 * scale)}-byte elements"


def predict(spec, layout, cluster, stack=None, dtype: str = "float32"):
    """(Plan, notes) for a validation run of `layout` on `cluster`. With a calibrated profile and
    no explicit stack, the run is described as validate runs it (see the module docstring)."""
    from planner.engine import evaluate_layout
    notes = []
    if stack is None and calibrated(cluster):
        view, scale, note = precision_view(cluster, dtype)
        if note:
            notes.append(note)
        st = eager_stack(view, grad_reduce_bytes=int(round(4 / scale)))
        notes.append("stack: validate-eager (no TP/EP/DP overlap, host overheads from the profile)")
        return evaluate_layout(spec, view, run_layout(layout), st), notes
    return evaluate_layout(spec, cluster, layout, stack), notes


COMPUTE_TERMS = ("compute", "recompute", "optimizer", "overhead")
WAIT_TERMS = ("tp_comm", "cp_comm", "ep_comm", "pp_comm", "dp_comm", "bubble")


def split(breakdown: dict) -> dict:
    """The planner's time terms grouped as a run can measure them: rank busy vs waiting on
    communication (a pipeline bubble is a wait for the neighbouring stage)."""
    return {"compute_s": sum(breakdown.get(k, 0.0) for k in COMPUTE_TERMS),
            "comm_wait_s": sum(breakdown.get(k, 0.0) for k in WAIT_TERMS)}
