"""Run as a script: DeepSpeed's own DeepSpeedConfig over emitted configurations, each on a fake
process group of its world size (one process stands for rank 0), with the data-parallel size
DeepSpeed itself derives: a real PipelineModule's grid for PP (deepspeed/__init__.py passes
model.mpu()), config["sequence_parallel_size"] for Ulysses, the whole world otherwise (AutoTP).
The engines' later checks of a pipeline run are repeated from runtime/pipe/engine.py.

stdin: JSON list of {"name", "config", "world", "pp", "tp"}; stdout: JSON list of
{"name", "ok", "error" | "dp", "train_batch_size", "micro", "gas"}."""
import contextlib
import importlib
import io
import logging
import os
import warnings

from driver import serve

warnings.filterwarnings("ignore")


def _fake_world(world: int) -> None:
    import torch.distributed as tdist
    os.environ.setdefault("LOCAL_RANK", "0")
    if tdist.is_initialized():
        tdist.destroy_process_group()
    tdist.init_process_group("fake", rank=0, world_size=world)
    # the CPU accelerator JIT-compiles a shared-memory op on init (minutes); configs never use it
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    from deepspeed import comm
    comm.init_distributed(dist_backend="gloo", dist_init_required=False, verbose=False)


def check(case: dict) -> dict:
    import torch
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from deepspeed.runtime.zero.config import ZeroStageEnum
    world, pp, tp = case["world"], case["pp"], case["tp"]
    _fake_world(world)
    mpu = None
    if pp > 1:
        topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=world // (pp * tp))
        with contextlib.redirect_stdout(io.StringIO()):
            mpu = PipelineModule(layers=[torch.nn.Identity() for _ in range(2 * pp)], topology=topo,
                                 partition_method="uniform").mpu()
    ds = DeepSpeedConfig(case["config"], mpu=mpu)
    if pp > 1 and ds.zero_optimization_stage >= ZeroStageEnum.gradients:
        raise AssertionError("ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism")
    return {"dp": ds.world_size, "train_batch_size": ds.train_batch_size,
            "micro": ds.train_micro_batch_size_per_gpu, "gas": ds.gradient_accumulation_steps}


def main() -> None:
    from deepspeed.utils import logger
    logger.setLevel(logging.ERROR)
    serve(check)


if __name__ == "__main__":
    main()
