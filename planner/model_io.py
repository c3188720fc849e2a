"""Loading model shapes: the built-in catalog, native .toml/.json model files, and Hugging Face
config.json files.

The native format is flat: the ModelSpec fields at the top level, plus optional [moe] and [mla]
tables (JSON: nested objects "moe" and "mla"), e.g. planner/catalog/deepseek-v3.toml.

Catalog files are parsed only when asked for, so loading one model reads one small file.
"""
from __future__ import annotations

import difflib
import json
import os
import tomllib
from pathlib import Path

from .errors import PlannerError
from .model_spec import MAX_FIELD, MLP_KINDS, MLASpec, ModelSpec, MoESpec, check_bounds  # noqa: F401

CATALOG_DIR = Path(__file__).resolve().parent / "catalog"
MODEL_FILE_SUFFIXES = (".json", ".toml")
MAX_FILE_BYTES = 16 << 20    # a model file or config.json is a few KiB; refuse to read more than this

# key -> (type, required). bool is not accepted where int is wanted, and vice versa.
_TOP_KEYS: dict[str, tuple[type, bool]] = {
    "name": (str, True),
    "layers": (int, True),
    "hidden": (int, True),
    "heads": (int, True),
    "kv_heads": (int, True),
    "head_dim": (int, False),
    "ffn_hidden": (int, True),
    "vocab": (int, True),
    "mlp": (str, True),
    "tied_embeddings": (bool, False),
    "dropout": (bool, False),
    "bias": (bool, False),
    "seq_len": (int, False),
    "sliding_window": (int, False),
    "sliding_window_layers": (int, False),
    "rope_theta": (float, False),
    "source": (str, False),
    "moe": (dict, False),
    "mla": (dict, False),
}
_MOE_KEYS: dict[str, tuple[type, bool]] = {
    "experts": (int, True),
    "top_k": (int, True),
    "expert_ffn_hidden": (int, True),
    "shared_experts": (int, False),
    "dense_layers": (int, False),
    "shared_expert_ffn_hidden": (int, False),
}
_MLA_KEYS: dict[str, tuple[type, bool]] = {
    "q_lora_rank": (int, False),
    "kv_lora_rank": (int, True),
    "qk_nope_head_dim": (int, True),
    "qk_rope_head_dim": (int, True),
    "v_head_dim": (int, True),
}
_TYPE_WORD = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a table"}


# ---- catalog ------------------------------------------------------------------------------
def list_models() -> list[str]:
    """Names of the catalog models (the file stems of planner/catalog/*.toml), sorted."""
    if not CATALOG_DIR.is_dir():
        return []
    return sorted(p.stem for p in CATALOG_DIR.glob("*.toml"))


def _catalog_path(name: str) -> Path | None:
    key = name.strip().lower()
    if not key or "/" in key or "\\" in key or key.startswith(".") or not key.isprintable():
        return None
    p = CATALOG_DIR / f"{key}.toml"
    try:
        return p if p.is_file() else None
    except (OSError, ValueError):    # a name too long for the file system
        return None


def _show(text: str, most: int = 200) -> str:
    """A user-given string for a one-line message: as is when printable, else escaped; long ones cut."""
    t = text if text.isprintable() else repr(text)[1:-1]
    return t if len(t) <= most else t[:most] + "..."


def catalog_table():
    """One row per catalog model: shape and parameter counts (billions). Returns a DataFrame."""
    import pandas as pd  # imported here: planning does not need pandas

    rows = []
    for name in list_models():
        m = load_model(name)
        rows.append({
            "name": m.name,
            "layers": m.layers,
            "hidden": m.hidden,
            "heads": m.heads,
            "kv_heads": m.kv_heads,
            "ffn_hidden": m.ffn_hidden,
            "vocab": m.vocab,
            "mlp": m.mlp,
            "experts": m.moe.experts if m.moe else None,
            "top_k": m.moe.top_k if m.moe else None,
            "total_params_B": m.total_params() / 1e9,
            "active_params_B": m.active_params() / 1e9,
        })
    df = pd.DataFrame(rows, columns=[
        "name", "layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab", "mlp",
        "experts", "top_k", "total_params_B", "active_params_B"])
    for c in ("experts", "top_k"):
        df[c] = df[c].astype("Int64")  # dense models: <NA>
    return df


# ---- loading ------------------------------------------------------------------------------
def load_model(spec: str | os.PathLike) -> ModelSpec:
    """A catalog name (case-insensitive) or a path to a .json/.toml model file.

    A JSON file with a "model_type" key is read as a Hugging Face config.json; anything else
    is the native format (see model_from_dict).
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise PlannerError(_unknown_model_message(str(spec)))
    spec = spec.strip()
    try:
        path = Path(spec).expanduser()
        # a path-like spec that exists (a directory, a device) is a file the user meant, not a name
        as_file = (path.suffix.lower() in MODEL_FILE_SUFFIXES or path.is_file()
                   or ((os.sep in spec or spec.startswith((".", "~"))) and path.exists()))
    except (OSError, ValueError, RuntimeError) as e:  # name too long, NUL byte, unknown ~user
        raise PlannerError(f"model file {_show(spec)}: cannot be opened ({_reason(e)})") from None
    if as_file:
        return _load_file(path, spec)
    cat = _catalog_path(spec)
    if cat is None:
        raise PlannerError(_unknown_model_message(spec))
    data = _read_toml(cat, f"catalog model file {cat.name}")
    return model_from_dict(data, f"catalog model file {cat.name}")


def _unknown_model_message(spec: str) -> str:
    names = list_models()
    hint = ""
    close = difflib.get_close_matches(spec.lower(), names, n=1, cutoff=0.6)
    if close:
        hint = f" (did you mean '{close[0]}'?)"
    return (f"unknown model '{_show(spec)}'{hint}; give a catalog name ({', '.join(names)}), "
            "or a path to a .json/.toml model file")


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _load_file(path: Path, spec: str) -> ModelSpec:
    origin = f"model file {_show(spec)}"
    try:
        if not path.exists():
            raise PlannerError(f"{origin}: no such file")
        if not path.is_file():
            kind = "a directory" if path.is_dir() else "a device, pipe or socket"
            raise PlannerError(f"{origin}: not a regular file ({kind}); give a .json or .toml model file")
    except OSError as e:
        raise PlannerError(f"{origin}: cannot be opened ({_reason(e)})") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return model_from_dict(_read_toml(path, origin), origin)
    if suffix == ".json":
        data = _read_json(path, origin)
        if "model_type" in data:
            from .hf_config import from_hf_config
            return from_hf_config(data, _show(path.stem))
        return model_from_dict(data, origin)
    raise PlannerError(f"{origin}: unsupported file type '{_show(path.suffix) or '(none)'}'; "
                       "a model file must end in .json or .toml")


def _read_text(path: Path, origin: str) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise PlannerError(f"{origin}: cannot read ({_reason(e)})") from None
    if len(data) > MAX_FILE_BYTES:
        raise PlannerError(f"{origin}: larger than {MAX_FILE_BYTES >> 20} MiB; a model file is a few KiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PlannerError(f"{origin}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_toml(path: Path, origin: str) -> dict:
    text = _read_text(path, origin)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PlannerError(f"{origin}: invalid TOML: {_one_line(str(e))}") from None
    except (ValueError, RecursionError) as e:   # integers over Python's digit limit, deep nesting
        raise PlannerError(f"{origin}: invalid TOML: {_one_line(str(e)) or 'nested too deeply'}") from None


def _read_json(path: Path, origin: str) -> dict:
    text = _read_text(path, origin)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlannerError(
            f"{origin}: invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except (ValueError, RecursionError) as e:   # integers over Python's digit limit, deep nesting
        raise PlannerError(f"{origin}: invalid JSON: {_one_line(str(e)) or 'nested too deeply'}") from None
    if not isinstance(data, dict):
        raise PlannerError(f"{origin}: expected a JSON object at the top level, "
                           f"got {type(data).__name__}")
    return data


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---- native format ------------------------------------------------------------------------
def _check_keys(d: dict, schema: dict[str, tuple[type, bool]], origin: str, table: str) -> dict:
    where = f"[{table}] " if table else ""
    prefix = f"{table}." if table else ""
    valid = ", ".join(schema)
    for k in d:
        if k not in schema:
            close = difflib.get_close_matches(str(k), list(schema), n=1, cutoff=0.6)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise PlannerError(f"{origin}: unknown key '{prefix}{_show(str(k), 60)}'{hint}; "
                               f"valid keys {'in ' + where if where else ''}are: {valid}")
    missing = [k for k, (_, req) in schema.items() if req and k not in d]
    if missing:
        raise PlannerError(f"{origin}: missing required key{'s' if len(missing) > 1 else ''} "
                           f"{', '.join(repr(prefix + k) for k in missing)}; "
                           f"required {'in ' + where if where else ''}are: "
                           f"{', '.join(k for k, (_, r) in schema.items() if r)}")
    out = {}
    for k, v in d.items():
        want = schema[k][0]
        if want is int:
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif want is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            v = float(v) if ok else v
        else:
            ok = isinstance(v, want)
        if not ok:
            raise PlannerError(f"{origin}: '{prefix}{k}' must be {_TYPE_WORD[want]}, got {_short(v)}")
        if want is int and abs(v) > MAX_FIELD:
            raise PlannerError(f"{origin}: '{prefix}{k}' must be at most 2^53 = {MAX_FIELD:,}, got {_short(v)}")
        out[k] = v
    return out


def _short(v, most: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= most else r[:most] + "..."


def model_from_dict(d: dict, origin: str) -> ModelSpec:
    """Build a ModelSpec from the native format; `origin` names the source in error messages
    (e.g. "model file my.toml")."""
    if not isinstance(d, dict):
        raise PlannerError(f"{origin}: expected a table of model keys, got {type(d).__name__}")
    top = _check_keys(d, _TOP_KEYS, origin, "")
    if not top["name"].isprintable():   # it is quoted in messages and reports: one line of text
        raise PlannerError(f"{origin}: 'name' must be printable text on one line, got {_short(top['name'])}")
    if top["mlp"] not in MLP_KINDS:
        raise PlannerError(f"{origin}: 'mlp' must be one of {', '.join(MLP_KINDS)}, "
                           f"got {top['mlp']!r}")
    moe_d = _check_keys(top.pop("moe"), _MOE_KEYS, origin, "moe") if "moe" in top else None
    mla_d = _check_keys(top.pop("mla"), _MLA_KEYS, origin, "mla") if "mla" in top else None
    try:
        moe = MoESpec(**moe_d) if moe_d is not None else None
        mla = MLASpec(**mla_d) if mla_d is not None else None
        m = ModelSpec(**top, moe=moe, mla=mla)
    except PlannerError as e:
        raise PlannerError(f"{origin}: {e}") from None
    return check_bounds(m, origin)


def model_to_dict(m: ModelSpec) -> dict:
    """The native-format dict of a ModelSpec (inverse of model_from_dict; defaults omitted)."""
    d = {"name": m.name, "layers": m.layers, "hidden": m.hidden, "heads": m.heads,
         "kv_heads": m.kv_heads}
    if m.hidden % m.heads or m.head_dim != m.hidden // m.heads:
        d["head_dim"] = m.head_dim
    d.update(ffn_hidden=m.ffn_hidden, vocab=m.vocab, mlp=m.mlp)
    for k in ("tied_embeddings", "dropout", "bias"):
        if getattr(m, k):
            d[k] = True
    for k in ("seq_len", "sliding_window"):
        if getattr(m, k) is not None:
            d[k] = getattr(m, k)
    if m.sliding_window is not None and m.sliding_window_layers != m.layers:
        d["sliding_window_layers"] = m.sliding_window_layers
    if m.rope_theta is not None:
        d["rope_theta"] = m.rope_theta
    if m.source:
        d["source"] = m.source
    if m.moe:
        mo = m.moe
        d["moe"] = {"experts": mo.experts, "top_k": mo.top_k,
                    "expert_ffn_hidden": mo.expert_ffn_hidden}
        if mo.shared_experts:
            d["moe"]["shared_experts"] = mo.shared_experts
            if mo.shared_expert_ffn_hidden != mo.expert_ffn_hidden:
                d["moe"]["shared_expert_ffn_hidden"] = mo.shared_expert_ffn_hidden
        if mo.dense_layers:
            d["moe"]["dense_layers"] = mo.dense_layers
    if m.mla:
        d["mla"] = {"q_lora_rank": m.mla.q_lora_rank, "kv_lora_rank": m.mla.kv_lora_rank,
                    "qk_nope_head_dim": m.mla.qk_nope_head_dim,
                    "qk_rope_head_dim": m.mla.qk_rope_head_dim,
                    "v_head_dim": m.mla.v_head_dim}
    return d
