"""How many nodes a layout's GPUs take and the torchrun / Slurm line that starts a run on them.

GPUs per node come from the cluster's innermost network domain (Cluster.domain_sizes[0]). A
rack-scale NVLink domain (more than 8 GPUs, e.g. GB200 NVL72) is built from compute trays of 4
GPUs each (DGX GB200 user guide: 18 compute trays of 4 Blackwell GPUs per 72-GPU rack), so there
a node is taken to be one 4-GPU tray; the assumption is written into the output."""
from __future__ import annotations

from .errors import PlannerError

NVL_TRAY_GPUS = 4          # GPUs per compute tray of a rack-scale NVLink domain (DGX GB200 user guide)
MAX_NODE_GPUS = 8          # largest innermost domain that is one host (DGX/HGX H100, B200, MI300X)
RDZV_PORT = 29500


def gpus_per_node(cluster) -> tuple:
    """(GPUs per node, the sentence saying where that number came from)."""
    if cluster is None:
        return MAX_NODE_GPUS, f"no hardware profile given: assuming {MAX_NODE_GPUS} GPUs per node"
    lv = cluster.levels[0]
    d0 = cluster.domain_sizes[0] or MAX_NODE_GPUS
    if d0 > MAX_NODE_GPUS:
        return NVL_TRAY_GPUS, (f"{cluster.name}: the {lv.name} domain spans {d0} GPUs over several hosts; "
                               f"assuming one node = one compute tray of {NVL_TRAY_GPUS} GPUs "
                               f"({d0 // NVL_TRAY_GPUS} trays per domain, as in GB200 NVL72)")
    return d0, f"{cluster.name}: {d0} GPUs per node (the {lv.name} domain)"


def node_layout(gpus: int, cluster) -> tuple:
    """(nodes, GPUs per node used, note)."""
    gpn, note = gpus_per_node(cluster)
    if gpus <= gpn:
        return 1, gpus, note
    if gpus % gpn:
        raise PlannerError(f"{gpus} GPUs do not fill whole nodes of {gpn} GPUs ({note})")
    return gpus // gpn, gpn, note


def launch_line(gpus: int, cluster, entry: str) -> str:
    """A torchrun command for `gpus` GPUs running `entry` (a script and its arguments, or -m
    module ...), and for several nodes its Slurm equivalent, as a bash snippet."""
    nodes, gpn, note = node_layout(gpus, cluster)
    if nodes == 1:
        return (f"# {gpus} GPUs on one node ({note})\n"
                f"torchrun --standalone --nnodes=1 --nproc-per-node={gpn} {entry}")
    tr = (f"torchrun --nnodes={nodes} --nproc-per-node={gpn} --rdzv-id=dtplanner --rdzv-backend=c10d "
          f"--rdzv-endpoint=\"$MASTER_ADDR:{RDZV_PORT}\" {entry}")
    # the rendezvous host: given, or the first host of a Slurm job; otherwise a one-line error
    # (the emitted scripts run under `set -u`)
    addr = ('MASTER_ADDR="${MASTER_ADDR:-$({ scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null || true; } '
            '| head -n1)}"\n'
            ': "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node (under Slurm it is taken from '
            'SLURM_JOB_NODELIST)}"')
    return (f"# {gpus} GPUs = {nodes} nodes x {gpn} GPUs ({note}); on every node:\n{addr}\n{tr}\n"
            f"# or once, from inside a Slurm allocation of {nodes} nodes:\n"
            f"# srun --nodes={nodes} --ntasks-per-node=1 --gpus-per-node={gpn} {tr}")
