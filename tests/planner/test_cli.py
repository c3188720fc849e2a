"""The `plan` command: output formats, contract keys, exit codes and one-line errors."""
import csv
import io
import json
import subprocess
import sys

import pytest

from planner.cli import main


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_table_default(capsys):
    code, out, err = run(["--model", "gpt-20b", "--gpus", "64", "--top", "3"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert "gpt-20b on 64 x h100-sxm" in lines[0]
    assert lines[1].split()[:4] == ["#", "gpus", "tp", "pp"]
    assert lines[2].split()[0] == "1" and lines[4].split()[0] == "3"


def test_json_contract(capsys):
    code, out, _ = run(["--model", "gpt-20b", "--gpus", "64", "--format", "json", "--top", "4"], capsys)
    assert code == 0
    d = json.loads(out)
    for k in ("model", "hardware", "gpus", "evaluated", "feasible", "search_seconds", "layouts"):
        assert k in d
    assert d["model"] == "gpt-20b" and d["hardware"] == "h100-sxm" and d["gpus"] == 64
    assert len(d["layouts"]) == 4 and d["evaluated"] >= d["feasible"] > 0
    lay = d["layouts"][0]
    for k in ("tp", "pp", "dp", "cp", "ep", "vpp", "sp", "micro_batch", "global_batch", "recompute", "zero",
              "precision", "step_time_s", "tokens_per_s_per_gpu", "mfu", "model_tflops_per_gpu", "memory_gib",
              "memory_breakdown_gib", "time_breakdown_s"):
        assert k in lay, k
    assert lay["tp"] * lay["pp"] * lay["dp"] * lay["cp"] == 64
    tps = [x["tokens_per_s_per_gpu"] for x in d["layouts"]]
    assert tps == sorted(tps, reverse=True)
    assert sum(lay["time_breakdown_s"].values()) == pytest.approx(lay["step_time_s"], rel=1e-9)
    assert sum(lay["memory_breakdown_gib"].values()) == pytest.approx(lay["memory_gib"], rel=1e-9)


def test_offloaded_layers_are_held_shown_and_in_json(capsys):
    """--offload-layers N is held like any knob, shown in the table (column `offload`) and written
    to JSON as `offload_layers`, with the exposed copies as time term `offload`."""
    args = ["--model", "llama-3-70b", "--gpus", "64", "--hardware", "gb200-nvl72", "--tp", "1", "--pp", "1",
            "--cp", "1", "--zero", "3", "--micro-batch", "2", "--seq-len", "8192", "--global-batch", "256",
            "--precision", "fp8", "--offload-layers", "40", "--top", "2"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    head = out.splitlines()[1].split()
    assert "offload" in head and out.splitlines()[2].split()[head.index("offload")] == "40"
    code, out, _ = run(args + ["--format", "json"], capsys)
    lay = json.loads(out)["layouts"][0]
    assert lay["offload_layers"] == 40 and lay["recompute"] == "none" and lay["time_breakdown_s"]["offload"] > 0


def test_csv_flat(capsys):
    code, out, _ = run(["--model", "llama-3-8b", "--gpus", "16", "--format", "csv", "--top", "2"], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == 2 and "time_bubble_s" in rows[0] and "mem_activations_gib" in rows[0]


def test_fixed_knobs_are_held(capsys):
    code, out, _ = run(["--model", "llama-3-70b", "--gpus", "64", "--tp", "8", "--pp", "2", "--recompute", "full",
                        "--precision", "bf16", "--format", "json"], capsys)
    d = json.loads(out)
    assert code == 0
    assert all(x["tp"] == 8 and x["pp"] == 2 and x["recompute"] == "full" and x["precision"] == "bf16"
               for x in d["layouts"])


@pytest.mark.parametrize("args,needle", [
    (["--model", "gpt-99", "--gpus", "64"], "unknown model 'gpt-99'"),
    (["--model", "gpt-20b", "--gpus", "64", "--tp", "3"], "--tp 3 does not divide --gpus 64"),
    (["--model", "gpt-20b", "--gpus", "0"], "--gpus must be >= 1"),
    (["--model", "gpt-20b", "--gpus", "abc"], "--gpus must be an integer"),
    (["--model", "gpt-20b", "--gpus", "64", "--precision", "fp4"], "invalid choice: 'fp4'"),
    (["--model", "gpt-20b", "--gpus", "64", "--hardware", "tpu-v9"], "unknown hardware 'tpu-v9'"),
    (["--model", "gpt-20b", "--gpus", "64", "--tp", "32"], "--tp 32 does not divide the 48"),
    (["--model", "gpt-20b", "--gpus", "64", "--ep", "2"], "needs a mixture-of-experts model"),
    (["--model", "gpt-20b", "--gpus", "64", "--no-overlap", "xx"], "--no-overlap: unknown 'xx'"),
    (["--model", "/nonexistent/model.toml", "--gpus", "8"], "no such file"),
    (["--model", "gpt-20b", "--gpus", "64", "--dp", "64", "--micro-batch", "3", "--global-batch", "64"],
     "not divisible"),
    (["--model", "gpt-20b", "--gpus", "64", "--grad-dtype", "bf16", "--stack", "torchtitan"],
     "--grad-dtype is modelled for the megatron-core stack"),
    (["--model", "gpt-20b", "--gpus", "64", "--grad-dtype", "fp16"], "invalid choice: 'fp16'"),
    (["--model", "gpt-20b", "--gpus", "64", "--offload-layers", "-1"], "--offload-layers must be >= 0"),
    (["--model", "gpt-20b", "--gpus", "64", "--offload-layers", "8", "--recompute", "full"],
     "--offload-layers runs with --recompute none only"),
    (["--model", "gpt-20b", "--gpus", "64", "--offload-layers", "8", "--stack", "torchtitan"],
     "torchtitan has no activation offloading"),
    (["--model", "gpt-20b", "--gpus", "64", "--offload-layers", "8", "--emit", "deepspeed"],
     "a deepspeed configuration cannot express it"),
    (["--model", "gpt-20b", "--gpus", "64", "--grad-dtype", "bf16", "--emit", "deepspeed"],
     "bf16 gradients (--grad-dtype bf16) cannot be expressed in a deepspeed configuration"),
])
def test_bad_input_one_line_exit_2(args, needle, capsys):
    code, out, err = run(args, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("plan: error: ")
    assert needle in err, err
    assert "Traceback" not in err


def test_no_fit_exits_1_with_reason(capsys):
    code, out, err = run(["--model", "llama-3.1-405b", "--gpus", "8", "--hardware", "a100-sxm-40gb"], capsys)
    assert code == 1
    assert "no layout" in err and "GiB" in err and "largest term" in err


def test_console_script_and_models_listing():
    r = subprocess.run([sys.executable, "-m", "planner", "models"], capture_output=True, text=True)
    assert r.returncode == 0 and "llama-3-70b" in r.stdout and "deepseek-v3" in r.stdout
    r = subprocess.run([sys.executable, "-m", "planner", "hardware"], capture_output=True, text=True)
    assert r.returncode == 0 and "gb200-nvl72" in r.stdout and "mi300x" in r.stdout
    r = subprocess.run([sys.executable, "-m", "planner", "--model", "nope", "--gpus", "8"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_bf16_gradients_halve_the_gradient_memory_and_are_reported(capsys):
    """--grad-dtype bf16 (Megatron --grad-reduce-in-bf16): the same layout keeps half the gradient
    bytes and nothing else changes in memory; JSON says which (grad_dtype), the table's title too."""
    fixed = ["--model", "gpt-20b", "--gpus", "64", "--tp", "8", "--pp", "1", "--dp", "8", "--cp", "1", "--zero", "1",
             "--micro-batch", "1",
             "--recompute", "full", "--precision", "bf16", "--no-sp", "--top", "1", "--format", "json"]
    out = {}
    for dtype in ("fp32", "bf16"):
        code, text, err = run(fixed + ["--grad-dtype", dtype], capsys)
        assert code == 0, err
        d = json.loads(text)
        assert d["grad_dtype"] == dtype
        out[dtype] = d["layouts"][0]["memory_breakdown_gib"]
    assert out["bf16"]["gradients"] == pytest.approx(out["fp32"]["gradients"] / 2)
    assert {k: v for k, v in out["bf16"].items() if k != "gradients"} == pytest.approx(
        {k: v for k, v in out["fp32"].items() if k != "gradients"})
    assert json.loads(run(["--model", "gpt-20b", "--gpus", "8", "--top", "1", "--format", "json"],
                          capsys)[1])["grad_dtype"] == "fp32"
    code, text, _ = run(["--model", "gpt-20b", "--gpus", "64", "--top", "1", "--grad-dtype", "bf16"], capsys)
    assert "(megatron-core, bf16 grads)" in text.splitlines()[0]
