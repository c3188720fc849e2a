"""Phase 6, the step: stage times with their data-parallel traffic, the slowest stage, the
schedule's bubble and pipeline sends, exposed DP communication and the optimizer, as a named
time breakdown per candidate."""
from __future__ import annotations

import numpy as np

from .. import schedules as S
from ..hardware import Cluster
from ..layout import SCHEDULES
from ..stacks import Stack
from .comm import overlapped
from .knobs import StepKnobs
from .records import Record, record
from .stages import StageSums
from .state import DpTimes, StageParams

TIME_TERMS = ("compute", "recompute", "tp_comm", "cp_comm", "ep_comm", "pp_comm", "dp_comm",
              "bubble", "optimizer", "overhead", "offload")
ADAM_BYTES_PER_PARAM = 38   # Adam step traffic per fp32 master parameter: read grad/master/m/v (16),
                            # write master/m/v (12), bf16 weight copy (2), grad-norm read (4), zero grad (4)
                            # (apex/TE FusedAdam multi_tensor_adam kernel)


@record
class TimeBreakdown(Record):
    """Seconds per step by term (TIME_TERMS)."""
    compute: np.ndarray
    recompute: np.ndarray
    tp_comm: np.ndarray
    cp_comm: np.ndarray
    ep_comm: np.ndarray
    pp_comm: np.ndarray
    dp_comm: np.ndarray
    bubble: np.ndarray
    optimizer: np.ndarray
    overhead: np.ndarray
    offload: np.ndarray        # exposed activation offloading to host memory

    def total(self):
        return sum(self.named().values())


@record
class Stage:
    """One pipeline rank's micro-batch sums, parameters and DP traffic."""
    sums: StageSums
    params: StageParams
    dp: DpTimes
    dp_mb: np.ndarray          # exposed per-micro-batch DP seconds
    t: np.ndarray              # busy seconds per micro-batch


def make_stage(sums: StageSums, params: StageParams, dp: DpTimes, overlap_dp, slowdown: float) -> Stage:
    """DP traffic issued per micro-batch hides behind that micro-batch's compute when overlapped,
    slowing that compute by `slowdown` per hidden second (Efficiency.overlap_slowdown); gathers no
    prefetch can issue early (state.unprefetched) never do."""
    hid = overlapped(dp.per_mb_f, sums.fwd, slowdown) + overlapped(dp.per_mb_b, sums.bwd + sums.rc, slowdown)
    dp_mb = np.where(overlap_dp, hid, dp.per_mb_f + dp.per_mb_b) + dp.serial
    return Stage(sums, params, dp, dp_mb,
                 sums.fwd + sums.bwd + sums.rc + sums.tp + sums.cp + sums.ep + sums.off + dp_mb)


def effective_vpp(k: StepKnobs, split) -> np.ndarray:
    """Virtual stages as the interleaved bubble sees them: a rank's chunks run at the pace of its
    largest, so L_r layers in v chunks act as L_r / ceil(L_r / v) equal chunks (= v when v divides
    L_r; Narayanan et al. 2021 sec. 2.2.2 assume equal chunks)."""
    rank = np.where(k.pp > 2, split.mid, split.first)
    return np.where(rank > 0, rank / np.ceil(np.maximum(rank, 1) / k.vpp), k.vpp)


def _picker(k: StepKnobs, stages, shared: bool, vpp):
    """(pick(stage -> array), t_slow, bubble): the stage that sets the pace. On processors that
    several ranks time-share (a CPU: ranks per core), a work-conserving scheduler gives a waiting
    rank's share to the others: a step takes the ranks' mean busy time and a bubble costs nothing
    (processor sharing, Kleinrock 1967 'Time-shared systems', J. ACM 14(2))."""
    first, mid, last = stages
    pp = k.pp
    t_first, t_mid, t_last = first.t, np.where(pp > 2, mid.t, 0.0), np.where(pp > 1, last.t, 0.0)
    if shared:
        n_mid = np.maximum(pp - 2, 0)
        pick = lambda f: np.where(pp > 1, (f(first) + f(mid) * n_mid + f(last)) / pp, f(first))  # noqa: E731
        return pick, pick(lambda s: s.t), np.zeros(k.n)
    which = np.where(t_first >= t_mid, np.where(t_first >= t_last, 0, 2), np.where(t_mid >= t_last, 1, 2))
    w0, w1 = which == 0, which == 1
    pick = lambda f: np.where(w0, f(first), np.where(w1, f(mid), f(last)))  # noqa: E731
    t_slow = pick(lambda s: s.t)
    sum_t = t_first + t_mid * np.maximum(pp - 2, 0) + t_last
    avg_other = np.where(pp > 1, (sum_t - t_slow) / np.maximum(pp - 1, 1), 0.0)
    # bubble from the other stages' average per-micro-batch times, split into f / b / w shares
    frac_f = pick(lambda s: s.sums.tf) / np.maximum(t_slow, 1e-30)
    frac_w = pick(lambda s: s.sums.w) / np.maximum(t_slow, 1e-30)
    bubble = np.where(pp > 1, S.bubble_time(k.schedule, pp, vpp, avg_other * frac_f,
                                            avg_other * (1 - frac_f), avg_other * frac_w), 0.0)
    return pick, t_slow, bubble


def _pp_comm(lt, k: StepKnobs, shared: bool, stack: Stack, slowdown: float):
    """PP p2p: fill and drain sit on the critical path; steady-state sends overlap where the
    stack's schedule overlaps them (Stack.p2p_overlap_schedules: Megatron only with virtual
    stages, --overlap-p2p-communication; its plain 1F1B exchanges blocking send/recv pairs) and
    --no-overlap pp is not given, and slow the compute beside them by `slowdown` per hidden
    second (Efficiency.overlap_slowdown: NCCL's send/recv kernels hold SMs too). On shared
    processors a send is CPU work of both ends that nothing hides: each micro-batch crosses
    pp - 1 boundaries both ways, a rank's mean share 2 (pp-1)/pp."""
    nmb = k.micro_batches
    cross = S.p2p_crossings(k.schedule, k.pp, k.vpp, nmb)
    t = lt.comm.t_p2p
    if shared:
        return 2 * t * cross * nmb * (k.pp - 1) / k.pp
    ovl = k.overlap_pp & np.isin(k.schedule, [SCHEDULES.index(n) for n in stack.p2p_overlap_schedules])
    return 2 * t * cross * (k.pp - 1) + np.where(ovl, slowdown, 1.0) * 2 * t * cross * nmb


def compose_step(lt, k: StepKnobs, cluster: Cluster, stack: Stack, split, stages, detail: bool = True) -> tuple:
    """(TimeBreakdown, slowest-stage picker) of every candidate; detail=False: (step seconds, None),
    the breakdown's sum taken without its terms."""
    gpu = cluster.gpu
    shared = gpu.shared_by > 1
    nmb = k.micro_batches
    pick, t_slow, bubble = _picker(k, stages, shared, effective_vpp(k, split))
    # DP once per step: overlapped with the last micro-batch's backward (grad reduce-scatter,
    # Megatron overlap_grad_reduce) and the first forward (param all-gather, overlap_param_gather);
    # nothing overlaps on shared processors, where communication is CPU work of the same ranks; the
    # hidden part slows the compute beside it (Efficiency.overlap_slowdown)
    ovl = k.overlap_dp & (not shared)
    window = np.where(ovl, pick(lambda s: s.sums.bwd + s.sums.rc + s.sums.fwd * (k.zero == 1)), 0.0)
    per_step, phi = pick(lambda s: s.dp.per_step), cluster.efficiency.overlap_slowdown
    dp_exposed = overlapped(per_step, window, phi) + pick(lambda s: s.dp_mb) * nmb
    # optimizer step over the parameters this rank owns (sharded by ZeRO >= 1)
    g = lt.groups
    sharded = k.zero >= 1
    owned = (pick(lambda s: s.params.dense) / np.where(sharded, g.shard, 1)
             + pick(lambda s: s.params.expert) / np.where(sharded, g.eshard, 1))
    opt_bw = gpu.hbm_bandwidth * (cluster.efficiency.optimizer or cluster.efficiency.hbm)
    t_opt = owned * ADAM_BYTES_PER_PARAM * S.weight_copies(k.schedule) / opt_bw
    t_pp = _pp_comm(lt, k, shared, stack, phi)
    if not detail:
        return (nmb * t_slow + t_pp + bubble + dp_exposed - pick(lambda s: s.dp_mb) * nmb
                + t_opt + stack.step_overhead_s), None
    tb = TimeBreakdown(
        compute=nmb * pick(lambda s: s.sums.fwd + s.sums.bwd), recompute=nmb * pick(lambda s: s.sums.rc),
        tp_comm=nmb * pick(lambda s: s.sums.tp), cp_comm=nmb * pick(lambda s: s.sums.cp),
        ep_comm=nmb * pick(lambda s: s.sums.ep), pp_comm=t_pp, dp_comm=dp_exposed,
        bubble=bubble, optimizer=t_opt, overhead=np.full(k.n, stack.step_overhead_s),
        offload=nmb * pick(lambda s: s.sums.off))
    return tb, pick
