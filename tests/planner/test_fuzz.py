"""Fuzzing the `plan` command and the file loaders (issue 7).

Any exception other than PlannerError is a failure: the CLI must answer (exit 0), report that no
layout fits (exit 1) or refuse in one line (exit 2); a loader must return a model/profile or raise
a one-line PlannerError, and what it accepts must be usable by the cost model. Every target runs
a fixed, bounded number of examples with derandomized generation (the same examples on every run,
no example database), so CI time stays small; each test asserts how many examples ran.
"""
from __future__ import annotations

import json
import math
import random
import re
import shutil
import tempfile
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from plan_run import assert_one_line_error, run_plan
from planner import model_io
from planner.cli import build_parser
from planner.costmodel import evaluate
from planner.errors import PlannerError
from planner.hardware import PROFILE_DIR
from planner.profiles import cluster_from_dict, list_hardware, load_hardware
from planner.hf_config import SUPPORTED_MODEL_TYPES
from planner.layout import Layout
from planner.model_io import load_model

DATA = Path(__file__).resolve().parents[1] / "data"
HF_FILES = sorted((DATA / "hf").glob("*.json"))
NATIVE_FILES = sorted((DATA / "native").glob("*"))
H100 = load_hardware("h100-sxm")
TMP = Path(tempfile.mkdtemp(prefix="dtplanner-fuzz-"))
RUNS: dict = {}


def fuzz_settings(n: int):
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck))


def _count(target: str) -> None:
    RUNS[target] = RUNS.get(target, 0) + 1


# ---- values ----------------------------------------------------------------------------------
# Each example is built by random.Random(seed) from one integer hypothesis draws (derandomized, so
# the same examples every run): structured generation through hypothesis strategies costs 3-7 ms
# an example, this well under 1 ms. A failure prints the seed and the input it built.
seeds = st.integers(0, 2 ** 64 - 1)
ALPHABET = list("abcxyz_-./019 ") + ["\n", "\t", "\r", "\x00", "\x7f", "\x1b", "é", "中", "\u2028", "\U0001f600",
                                      "\ud800", "'", '"', "\\", "=", "[", "{", "#"]
GARBAGE_WORDS = ["", " ", "-", "--", "-1", "0", "1.5", "nan", "inf", "-inf", "1e400", "0x10", "1_000", "８",
                 "\x00", "\u2028", "a" * 300, "/", ".", "..", "~", "/dev/null", "/nonexistent/x.toml",
                 str(10 ** 30), str(2 ** 63), "2T", "1-", "8-4", "1-2-3", "None", "true", "[]", "{}", ","]


def rand_text(rng, most: int = 8) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, most)))


def garbage(rng) -> str:
    return rng.choice(GARBAGE_WORDS) if rng.random() < 0.6 else rand_text(rng, 12)


def small_gpus(rng) -> str:
    """GPU counts whose search takes milliseconds, so thousands of examples stay cheap."""
    return str(rng.choice([1, 1, 2, 2, 3, 4, 4, 6, 8]))


MODELS = ["gpt-1.7b", "gpt-1.7b", "llama-2-7b", str(DATA / "native" / "tiny-moe.toml"),
          str(DATA / "native" / "tiny-mla.json"), str(DATA / "hf" / "gpt2.json"),
          str(DATA / "hf" / "qwen3-30b-a3b.json")] + [str(p) for p in NATIVE_FILES]
FLOATS = ["0", "1", "1.0", "1.5", "2", "0.5", "-1", "1e-300", "1e308", "nan", "inf", "-0.0", "3.999"]
# values by destination; a flag the parser gains later gets garbage and small numbers
VALUES = {
    "model": lambda r: r.choice(MODELS),
    "gpus": lambda r: r.choice([small_gpus(r), "1-4", "2-4", "16-8", "0", "-4", "1-" + str(10 ** 9), str(2 ** 40)]),
    "hardware": lambda r: r.choice(list_hardware() + [str(DATA / "native" / "broken.toml")]),
    "stack": lambda r: r.choice(["megatron-core", "torchtitan", "deepspeed", "llm-foundry", "megatron-2021"]),
    "tokens": lambda r: r.choice(["2T", "300B", "1e12", "5M", "1.5e12", "0", "-2T", "2X", "1e400"]),
    "no_overlap": lambda r: r.choice(["tp", "tp,dp", "pp,ep", "", ",", "xx", "tp,,dp"]),
    "top": lambda r: r.choice(["1", "2", "3", "0", "-1", "100000"]),
}
FLOAT_DESTS = {"moe_imbalance", "capacity_factor", "price", "mtbf_hours", "checkpoint_minutes", "checkpoint_write_s"}
# --out and --plot write files (tests/test_bad_input.py covers them)
SKIPPED = {"out", "plot"}
ACTIONS = [a for a in build_parser()._actions if a.dest not in SKIPPED]


def flag_value(rng, action) -> str:
    if action.dest in VALUES:
        return VALUES[action.dest](rng)
    if action.choices:
        return str(rng.choice(list(action.choices)))
    if action.dest in FLOAT_DESTS:
        return rng.choice(FLOATS)
    return str(rng.choice([1, 1, 2, 2, 4, 8, 0, -1, 33]))


def gen_argv(rng) -> list:
    """A `plan` command line over small models and GPU counts with any of the parser's flags.
    About one in six is left as built (most of those reach the search and the report); the rest
    are spoilt -- a value swapped for garbage, a stray word, an unknown flag, a value dropped --
    and must be refused in one line (cheap: a search costs ~50 ms, a refusal ~2 ms)."""
    argv = []
    if rng.random() < 0.05:
        argv.append(rng.choice(["models", "hardware"]))
        if rng.random() < 0.5:
            return argv
    argv += ["--model", rng.choice(MODELS[:5]), "--gpus", small_gpus(rng)]
    for _ in range(rng.randint(0, 4)):
        a = rng.choice(ACTIONS)
        argv.append(rng.choice(a.option_strings))
        if a.nargs != 0:
            argv.append(flag_value(rng, a))
    if rng.random() < 0.83:
        for _ in range(rng.randint(1, 2)):
            op, i = rng.randint(0, 3), rng.randrange(len(argv))
            if op == 0:
                argv[i] = rng.choice(["--tpp", "-x", "--"]) if argv[i].startswith("--") else garbage(rng)
            elif op == 1:
                argv.insert(i, rng.choice([garbage(rng), "--tpp", "-x", "--"]))
            elif op == 2:
                del argv[i]
            else:
                argv[i] = rng.choice([VALUES["model"](rng), VALUES["gpus"](rng), garbage(rng)])
    return argv


@fuzz_settings(800)
@given(seeds)
def _fuzz_cli(seed):
    _count("cli")
    argv = gen_argv(random.Random(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # numpy overflow warnings on absurd floats are not failures
        code, out, err = run_plan(argv)
    assert code in (0, 1, 2), (argv, code)
    assert "Traceback" not in err, argv
    if code == 2:
        assert_one_line_error(code, err)
    if code == 1:
        assert err.startswith("no layout of "), (argv, err)


def test_fuzz_cli_argv():
    _fuzz_cli()
    assert RUNS["cli"] >= 800


# ---- native model files ----------------------------------------------------------------------
def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(map(toml_value, v)) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False)


def to_toml(d: dict) -> str:
    return "\n".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in d.items()) + "\n"


SCALARS = [0, 1, 2, 3, 7, 8, 64, 4096, -1, -2, 2 ** 31, 2 ** 53, 2 ** 53 + 1, 2 ** 63, 10 ** 30, 1.0, 2.0, 1.5,
           0.5, -0.0, 4096.0, 1e300, 1e-300, math.nan, math.inf, -math.inf, True, False, "", "x", "8", "gelu",
           "swiglu", "relu2", "geglu", "silu", "llama", "\n", "é"]


def rand_value(rng, depth: int = 0):
    """A JSON/TOML value: mostly edge-case scalars, some random integers, text, lists and tables."""
    r = rng.random()
    if r < 0.5:
        return rng.choice(SCALARS)
    if r < 0.65:
        return rng.randint(-10 ** rng.randint(1, 20), 10 ** rng.randint(1, 20))
    if r < 0.75:
        return rng.uniform(-1e4, 1e4)
    if r < 0.85 or depth >= 2:
        return rand_text(rng)
    if r < 0.93:
        return [rand_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rand_text(rng) or "k": rand_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


BASE_MODEL = {"name": "fz", "layers": 4, "hidden": 256, "heads": 8, "kv_heads": 4, "ffn_hidden": 1024,
              "vocab": 1000, "mlp": "swiglu"}
MOE = {"experts": 8, "top_k": 2, "expert_ffn_hidden": 512}
MLA = {"kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32}


def mutate(rng, d: dict, keys, times: int) -> dict:
    """Drop keys, replace values (wrong types, zero, negative, huge), add keys: `keys` are the
    names the loader knows, so most edits reach its checks rather than its unknown-key error."""
    for _ in range(times):
        op = rng.randint(0, 4)
        if op == 0 and d:
            d.pop(rng.choice(sorted(d)))
        elif op in (1, 2):
            d[rng.choice(keys)] = rand_value(rng)
        elif op == 3:
            d[rng.choice(keys)] = rng.choice([0, -1, 1, 2, 3, 2 ** 53 + 1, 10 ** 9, 10 ** 30, 1.5, None, [], {}])
        else:
            d[rand_text(rng) or "k"] = rand_value(rng)
    return d


def gen_model_dict(rng) -> dict:
    """A valid tiny model edited at random (its [moe] and [mla] tables too), or random keys."""
    if rng.random() < 0.2:
        return {rng.choice(list(model_io._TOP_KEYS) + [rand_text(rng)]): rand_value(rng)
                for _ in range(rng.randint(0, 10))}
    d = dict(BASE_MODEL)
    if rng.random() < 0.5:
        d["moe"] = mutate(rng, dict(MOE), list(model_io._MOE_KEYS), rng.randint(0, 2))
    if rng.random() < 0.3:
        d["mla"] = mutate(rng, dict(MLA), list(model_io._MLA_KEYS), rng.randint(0, 2))
    return mutate(rng, d, list(model_io._TOP_KEYS), rng.randint(0, 3))


def _no_none(v):
    """TOML has no null: drop None from a value (JSON keeps it)."""
    if isinstance(v, dict):
        return {k: _no_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_no_none(x) for x in v if x is not None]
    return v


def serialize(rng, d: dict) -> tuple:
    """(text, suffix): TOML or JSON."""
    if rng.random() < 0.5:
        return to_toml(_no_none(d)), ".toml"
    return json.dumps(d, ensure_ascii=False), ".json"


def _load_text(text, suffix: str):
    TMP.mkdir(parents=True, exist_ok=True)   # another run's clean-up must not break this one
    p = TMP / f"m{suffix}"
    p.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    try:
        m = load_model(str(p))
    except PlannerError as e:
        assert "\n" not in str(e), str(e)
        return None
    # a model the loader accepts must be usable: its parameter counts and one layout's prediction
    assert m.total_params() > 0
    predict(m, H100, Layout(seq_len=m.seq_len or 256, global_batch=1))
    return m


def predict(model, cluster, layout):
    """One layout's prediction; numpy's overflow warnings on absurd shapes are not failures."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return evaluate(model, cluster, layout.to_candidates())


@fuzz_settings(1000)
@given(seeds)
def _fuzz_native_dicts(seed):
    _count("native")
    rng = random.Random(seed)
    d = gen_model_dict(rng)
    text, suffix = serialize(rng, d)
    _load_text(text, suffix)


@fuzz_settings(500)
@given(seeds)
def _fuzz_native_bytes(seed):
    """Random bytes, random text, and valid model text cut short or with bytes flipped."""
    _count("native")
    rng = random.Random(seed)
    r = rng.random()
    if r < 0.3:
        data = rng.randbytes(rng.randint(0, 300))
    elif r < 0.5:
        data = rand_text(rng, 200).encode("utf-8", "surrogatepass")
    else:
        data = bytearray(serialize(rng, gen_model_dict(rng))[0].encode("utf-8", "surrogatepass"))
        if rng.random() < 0.5:
            data = data[: rng.randint(0, len(data))]
        for _ in range(rng.randint(0, 3)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
    _load_text(bytes(data), rng.choice([".toml", ".json"]))


def test_fuzz_native_model_loader():
    _fuzz_native_dicts()
    _fuzz_native_bytes()
    assert RUNS["native"] >= 1500


# ---- Hugging Face config.json ----------------------------------------------------------------
HF_CONFIGS = [json.loads(p.read_text()) for p in HF_FILES]
HF_KEYS = sorted({k for c in HF_CONFIGS for k in c})
MODEL_TYPES = list(SUPPORTED_MODEL_TYPES) + ["t5", "bert", "LLAMA", "", "llama ", "gemma3", 3, None, ["llama"]]


def gen_hf(rng) -> dict:
    """A real config.json with fields dropped or replaced and model_type switched, or random
    fields over the real names, with a supported or unsupported model_type (or one of another
    type: a number, null, a list)."""
    if rng.random() < 0.3:
        d = {rng.choice(HF_KEYS): rand_value(rng) for _ in range(rng.randint(0, 15))}
    else:
        d = mutate(rng, json.loads(json.dumps(rng.choice(HF_CONFIGS))), HF_KEYS, rng.randint(1, 4))
    if rng.random() < 0.6:
        d["model_type"] = rng.choice(MODEL_TYPES)
    d.setdefault("model_type", "llama")     # without one a .json is read as the native format
    return d


@fuzz_settings(1500)
@given(seeds)
def _fuzz_hf(seed):
    _count("hf")
    d = gen_hf(random.Random(seed))
    _load_text(json.dumps(d, ensure_ascii=False), ".json")


def test_fuzz_hf_config_loader():
    _fuzz_hf()
    assert RUNS["hf"] >= 1500


# ---- hardware profiles -------------------------------------------------------------------------
PROFILES = [tomllib.loads((PROFILE_DIR / f"{n}.toml").read_text()) for n in list_hardware()]
# keys a profile may have beyond the bundled ones' (calibrated profiles: validate/calibrate)
PROFILE_KEYS = ["attention_by_precision", "kernel_overhead", "step_overhead", "tp_layer_overhead", "optimizer",
                "shared_by", "fit", "gemm_max", "algorithm", "oversubscription", "reserved_bytes", "sparsity",
                "value", "source", "efficiency", "network", "all_reduce", "reduce_scatter", "send_recv"]
GPT = load_model("gpt-1.7b")


def _spots(d):
    """Every (container, key) inside a profile, to pick one to edit."""
    out = []
    for k, v in (d.items() if isinstance(d, dict) else enumerate(d)):
        out.append((d, k))
        if isinstance(v, (dict, list)):
            out += _spots(v)
    return out


def gen_profile(rng) -> dict:
    """A real profile with one to three edits anywhere in it: a key deleted, a value replaced by
    a random or an edge-case one (negative, zero, huge, a bare number for a sourced table), a
    network level duplicated, or a key added."""
    d = json.loads(json.dumps(rng.choice(PROFILES)))
    for _ in range(rng.randint(1, 3)):
        spots = _spots(d)
        if not spots:
            break
        container, key = rng.choice(spots)
        op = rng.randint(0, 4)
        if op == 0:
            del container[key]
        elif op == 1:
            container[key] = rand_value(rng)
        elif op == 2:
            container[key] = rng.choice([0, -1, -5e9, 1e-300, 1e300, 2 ** 40, 10 ** 30, 0.5, 7, 3, "",
                                         {"value": -1, "source": "x"}, {"value": 0}, {"source": "x"}])
        elif op == 3 and isinstance(container, list) and container:
            container.append(json.loads(json.dumps(rng.choice(container))))
        elif isinstance(container, dict):    # a key the loader knows (optional ones too) or a new one
            container[rng.choice(PROFILE_KEYS + [rand_text(rng) or "k"])] = rand_value(rng)
    return d


@fuzz_settings(1200)
@given(seeds)
def _fuzz_profile(seed):
    _count("hardware")
    rng = random.Random(seed)
    d = gen_profile(rng)
    try:
        if rng.random() < 0.5:
            TMP.mkdir(parents=True, exist_ok=True)
            p = TMP / "hw.toml"
            p.write_text(to_toml(_no_none(d)), encoding="utf-8", errors="surrogatepass")
            c = load_hardware.__wrapped__(str(p))      # bypass the cache: a new profile every time
        else:
            c = cluster_from_dict(d, "fuzz.toml")
    except PlannerError as e:
        assert "\n" not in str(e), str(e)
        return
    # a profile the loader accepts must be usable: its domains and one layout's prediction
    assert len(c.domain_sizes) == len(c.levels)
    predict(GPT, c, Layout(tp=2, dp=2, global_batch=4, seq_len=256))


def test_fuzz_hardware_profile_loader(monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(TMP / "cache"))   # domain-size cache of edited profiles stays here
    _fuzz_profile()
    assert RUNS["hardware"] >= 1200


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    print(f"\nfuzz examples run: {RUNS}")
    shutil.rmtree(TMP, ignore_errors=True)
