"""Run as a script: torchtitan 0.3's own code over emitted configuration modules, each on a fake
process group of its world size (this process stands for rank 0): ConfigManager (every config
dataclass's checks), the model's update_from_config, ParallelDims and its device mesh, the batch
and sequence checks Trainer.__init__ makes inline (trainer.py, repeated here), and for pipelines
the stage split, the rank-to-stage map and the real torch.distributed.pipelining schedule built
over stages of the meta-device model.

stdin: JSON list of {"name", "folder", "module", "world"}; stdout: JSON list of
{"name", "ok", "error" | "dp_replicate", "dp_shard", "stages", "schedule", "compile"}."""
import sys
import warnings

from driver import serve

warnings.filterwarnings("ignore")


def check(case: dict) -> dict:
    import torch
    import torch.distributed as dist
    from torchtitan.config import ConfigManager
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import pipeline_parallel as ttpp
    if case["folder"] not in sys.path:
        sys.path.insert(0, case["folder"])
    try:
        cfg = ConfigManager().parse_args(["--module", case["module"], "--config", "plan"])
    except SystemExit as e:
        raise ValueError(f"ConfigManager rejected the configuration (exit {e.code})") from None
    par, tr, mcfg = cfg.parallelism, cfg.training, cfg.model_spec.model
    mcfg.update_from_config(config=cfg)
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=0, world_size=case["world"])
    pd = ParallelDims.from_config(par, case["world"])
    pd.build_mesh()
    # trainer.py Trainer.__init__: sequence divisible for SP/CP; global batch in local x dp steps
    div = (pd.tp if par.enable_sequence_parallel else 1) * (2 * pd.cp if pd.cp > 1 else 1)
    if tr.seq_len % div:
        raise ValueError(f"seq_len {tr.seq_len} not divisible by {div}")
    dp = pd.dp_replicate * pd.dp_shard
    gbs = tr.global_batch_size if tr.global_batch_size > 0 else tr.local_batch_size * dp
    if gbs % (tr.local_batch_size * dp):
        raise ValueError(f"global batch {gbs} not a multiple of local {tr.local_batch_size} x dp {dp}")
    out = {"dp_replicate": pd.dp_replicate, "dp_shard": pd.dp_shard, "stages": 1, "schedule": None,
           "compile": bool(cfg.compile.enable)}
    if pd.pp_enabled:
        nvs, nl, iw, ow = ttpp._get_pipeline_metadata(pd, par, mcfg)
        parts = par.module_fqns_per_model_part or ttpp._generate_llm_fqn_per_model_part(nvs, nl, iw, ow)
        for r in range(pd.pp):
            ttpp._get_pp_rank_to_stage_indices_mapping(r, pd.pp, par.pipeline_parallel_schedule, len(parts))
        with torch.device("meta"):
            model = mcfg.build()
        stages, _ = ttpp._pipeline_module_split(model, pd.get_mesh("pp"), par.pipeline_parallel_schedule,
                                                torch.device("cpu"), parts)
        sched = ttpp._build_pipeline_schedule(parallelism=par, local_batch_size=tr.local_batch_size, stages=stages,
                                              loss_fn=lambda *a, **k: (a[0].sum(), None))
        out.update(stages=len(parts), schedule=type(sched).__name__)
    return out


def main() -> None:
    serve(check)


if __name__ == "__main__":
    main()
