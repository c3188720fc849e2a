"""Hardware profiles as files: read hwprofiles/*.toml (or a path) into a Cluster with every number
checked (one-line errors), list them, and write a profile dict back as TOML."""
from __future__ import annotations

import math
import tomllib
from functools import lru_cache
from pathlib import Path

from .errors import PlannerError
from .hardware import (COLLECTIVE_OPS, GPU, MAX_DOMAIN, PRECISIONS, PROFILE_DIR, Cluster, Efficiency,
                       NetLevel)

# --------------------------------------------------------------------------------------------
# loading

def _num(tbl, key, where, required=True, default=None):
    if key not in tbl:
        if required:
            raise PlannerError(f"{where}: missing '{key}'")
        return default
    v = tbl[key]
    if isinstance(v, dict):
        if "value" not in v:
            raise PlannerError(f"{where}.{key}: missing 'value'")
        if not str(v.get("source", "")).strip():
            raise PlannerError(f"{where}.{key}: every number needs a non-empty 'source'")
        v = v["value"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise PlannerError(f"{where}.{key}: must be a finite number, got {v!r}")
    if v < 0:
        raise PlannerError(f"{where}.{key}: must be >= 0, got {v}")
    return float(v)


def cluster_from_dict(d: dict, origin: str) -> Cluster:
    w = f"hardware profile {origin}"
    if not isinstance(d, dict):
        raise PlannerError(f"{w}: expected a table at top level")
    for req in ("name", "gpu", "network", "price_per_gpu_hour"):
        if req not in d:
            raise PlannerError(f"{w}: missing '{req}'")
    _check_name(d["name"], f"{w}: name")
    gpu = _gpu(d["gpu"], w, d["name"])
    levels = _levels(d["network"], w)
    eff = _efficiency(d["efficiency"], w, origin) if "efficiency" in d else Efficiency()
    return Cluster(name=str(d["name"]), gpu=gpu, levels=tuple(levels),
                   price_per_gpu_hour=_num(d, "price_per_gpu_hour", w), efficiency=eff,
                   description=str(d.get("description", "")), path=origin)


def _gpu(g, w: str, default_name) -> GPU:
    if not isinstance(g, dict) or not isinstance(g.get("peak_flops"), dict) or "bf16" not in g["peak_flops"]:
        raise PlannerError(f"{w}: [gpu] needs a [gpu.peak_flops] table with a bf16 entry (and fp8, ... if any)")
    peaks = {}
    for prec, ent in g["peak_flops"].items():
        if prec not in PRECISIONS:
            raise PlannerError(f"{w}: gpu.peak_flops.{_show(prec, 40)}: unknown precision; valid: {', '.join(PRECISIONS)}")
        if isinstance(ent, dict) and ent.get("sparsity", "dense") != "dense":
            raise PlannerError(f"{w}: gpu.peak_flops.{prec}: only dense peaks are accepted")
        val = _num(g["peak_flops"], prec, f"{w}: gpu.peak_flops")
        if val <= 0:
            raise PlannerError(f"{w}: gpu.peak_flops.{prec} must be > 0")
        peaks[prec] = val
    gpu = GPU(name=str(g.get("name", default_name)), peak_flops=peaks,
              hbm_bytes=_num(g, "hbm_bytes", f"{w}: gpu"),
              hbm_bandwidth=_num(g, "hbm_bandwidth", f"{w}: gpu"),
              reserved_bytes=_num(g, "reserved_bytes", f"{w}: gpu", required=False, default=0.0),
              shared_by=_num(g, "shared_by", f"{w}: gpu", required=False, default=1.0),
              host_bandwidth=_num(g, "host_bandwidth", f"{w}: gpu", required=False, default=0.0))
    if gpu.hbm_bytes <= 0 or gpu.hbm_bandwidth <= 0:
        raise PlannerError(f"{w}: gpu.hbm_bytes and gpu.hbm_bandwidth must be > 0")
    return gpu


def _levels(nets, w: str) -> list:
    if not isinstance(nets, list) or not nets:
        raise PlannerError(f"{w}: 'network' must be a list of [[network]] levels")
    levels = []
    for i, n in enumerate(nets):
        lw = f"{w}: network[{i}]"
        if not isinstance(n, dict) or "name" not in n or "domain" not in n:
            raise PlannerError(f"{lw}: needs name, domain, bandwidth, latency")
        _check_name(n["name"], f"{lw}.name")
        dom = n["domain"]
        if isinstance(dom, dict):
            dom = dom.get("value")
        if isinstance(dom, bool) or not isinstance(dom, int) or dom < 0:
            raise PlannerError(f"{lw}: domain must be an integer >= 0, got {_show(repr(dom), 60)}")
        if dom > MAX_DOMAIN:   # the topology graph holds two domains of the outermost bounded level
            raise PlannerError(f"{lw}: domain must be at most {MAX_DOMAIN} GPUs (0 = the whole cluster), got {dom}")
        bw = _num(n, "bandwidth", lw)
        if bw <= 0:
            raise PlannerError(f"{lw}: bandwidth must be > 0, got {bw}")
        fits = []
        if "fit" in n:
            if not isinstance(n["fit"], dict):
                raise PlannerError(f"{lw}: 'fit' must be a table of collectives")
            for op, ent in n["fit"].items():
                if op not in COLLECTIVE_OPS:
                    raise PlannerError(f"{lw}.fit.{_show(str(op), 40)}: not a collective; valid: "
                                       f"{', '.join(COLLECTIVE_OPS)}")
                if not isinstance(ent, dict):
                    raise PlannerError(f"{lw}.fit.{op}: needs latency and bandwidth")
                fbw = _num(ent, "bandwidth", f"{lw}.fit.{op}")
                if fbw <= 0:
                    raise PlannerError(f"{lw}.fit.{op}: bandwidth must be > 0, got {fbw}")
                fits.append((str(op), _num(ent, "latency", f"{lw}.fit.{op}"), fbw))
        levels.append(NetLevel(name=str(n["name"]), domain=dom, bandwidth=bw,
                               latency=_num(n, "latency", lw),
                               algorithm=str(n.get("algorithm", "ring")),
                               oversubscription=_num(n, "oversubscription", lw, required=False, default=1.0),
                               fits=tuple(fits)))
    return levels


def _efficiency(e, w: str, origin: str) -> Efficiency:
    """[efficiency]: achievable fractions (0, 1] and host overheads (seconds >= 0)."""
    gm = dict(Efficiency().gemm_max)
    ew = f"{w}: efficiency"
    if not isinstance(e, dict) or not all(isinstance(e.get(t, {}), dict)
                                          for t in ("gemm_max", "attention_by_precision")):
        raise PlannerError(f"{ew}: [efficiency], [efficiency.gemm_max] and "
                           "[efficiency.attention_by_precision] must be tables")
    for prec in e.get("gemm_max", {}):
        if prec not in PRECISIONS:
            raise PlannerError(f"{ew}.gemm_max.{_show(prec, 40)}: unknown precision; valid: {', '.join(PRECISIONS)}")
        gm[prec] = _num(e["gemm_max"], prec, f"{ew}.gemm_max")
    kw = {}
    for key in ("gemm_half_dim", "attention_max", "hbm", "network", "grouped_gemm", "optimizer", "sdpa_attention",
                "overlap_slowdown"):
        if key in e:
            kw[key] = _num(e, key, ew)
    ab = {}
    for prec in e.get("attention_by_precision", {}):
        if prec not in PRECISIONS:
            raise PlannerError(f"{ew}.attention_by_precision.{_show(prec, 40)}: unknown precision; "
                               f"valid: {', '.join(PRECISIONS)}")
        ab[prec] = _num(e["attention_by_precision"], prec, f"{ew}.attention_by_precision")
    for key, v in list(kw.items()) + [(f"gemm_max.{p}", v) for p, v in gm.items()] \
            + [(f"attention_by_precision.{p}", v) for p, v in ab.items()]:
        if key == "overlap_slowdown" and not 0 <= v < 1:
            raise PlannerError(f"{ew}.{key}: must be in [0, 1), got {v}")
        if key not in ("gemm_half_dim", "overlap_slowdown") and not 0 < v <= 1:
            raise PlannerError(f"{ew}.{key}: must be in (0, 1], got {v}")
    for key in ("kernel_overhead", "step_overhead", "tp_layer_overhead"):      # seconds, >= 0
        if key in e:
            kw[key] = _num(e, key, ew)
    if ab:
        kw["attention_by_precision"] = ab
    return Efficiency(gemm_max=gm, source=str(e.get("source", origin)), **kw)


def list_hardware() -> list:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


MAX_PROFILE_BYTES = 1 << 20      # a profile is a few KiB


@lru_cache(maxsize=32)
def load_hardware(spec: str = "h100-sxm") -> Cluster:
    """A profile name from hwprofiles/ or a path to a TOML file."""
    if not isinstance(spec, str) or not spec.strip():
        raise PlannerError(f"unknown hardware {_show(spec)!r}; give one of {', '.join(list_hardware())} "
                           "or a path to a .toml profile")
    p = Path(spec)
    try:
        is_path = p.suffix.lower() == ".toml" or "/" in spec or p.exists()
        name = PROFILE_DIR / f"{spec.lower()}.toml"
        if not is_path and (not spec.isprintable() or "\\" in spec or not name.is_file()):
            raise PlannerError(f"unknown hardware '{_show(spec)}'; give one of {', '.join(list_hardware())} "
                               "or a path to a .toml profile")
        if not is_path:
            p = name
        origin = _show(str(p)) if is_path else p.name
        if not p.exists():
            raise PlannerError(f"hardware profile {origin}: file not found")
        if not p.is_file():    # never open a FIFO or device: reading one may block forever
            kind = "a directory" if p.is_dir() else "a device, pipe or socket"
            raise PlannerError(f"hardware profile {origin}: cannot read (not a regular file: {kind})")
        with open(p, "rb") as fh:
            data = fh.read(MAX_PROFILE_BYTES + 1)
    except OSError as e:       # name too long, permission denied, ...
        raise PlannerError(f"hardware profile {_show(spec)}: cannot read ({e.strerror or e})") from None
    if len(data) > MAX_PROFILE_BYTES:
        raise PlannerError(f"hardware profile {origin}: larger than {MAX_PROFILE_BYTES >> 20} MiB; "
                           "a profile is a few KiB")
    try:
        d = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise PlannerError(f"hardware profile {origin}: not a UTF-8 text file") from None
    except tomllib.TOMLDecodeError as e:
        raise PlannerError(f"hardware profile {origin}: invalid TOML ({e})") from None
    except (ValueError, RecursionError) as e:   # integers over Python's digit limit, deep nesting
        raise PlannerError(f"hardware profile {origin}: invalid TOML ({e or 'nested too deeply'})") from None
    return cluster_from_dict(d, origin)


def _check_name(v, where: str) -> None:
    """Names are quoted in messages and reports: printable text on one line."""
    if not isinstance(v, str) or not v.strip() or not v.isprintable():
        raise PlannerError(f"{where} must be printable text on one line, got {_show(repr(v), 60)}")


def _show(text, most: int = 200) -> str:
    """A user-given string for a one-line message: escaped unless printable, long ones cut."""
    t = str(text)
    t = t if t.isprintable() else repr(t)[1:-1]
    return t if len(t) <= most else t[:most] + "..."


def hardware_table():
    import pandas as pd
    rows = []
    for n in list_hardware():
        c = load_hardware(n)
        rows.append({"name": n, "gpu": c.gpu.name, "hbm_gib": c.gpu.hbm_bytes / 2**30,
                     "bf16_tflops": c.gpu.peak_flops.get("bf16", float("nan")) / 1e12,
                     "fp8_tflops": c.gpu.peak_flops.get("fp8", float("nan")) / 1e12,
                     "levels": " > ".join(f"{lv.name}({lv.domain or 'all'}, {lv.bandwidth/1e9:.0f} GB/s)"
                                          for lv in c.levels),
                     "usd_per_gpu_hour": c.price_per_gpu_hour})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# writing

def _toml_key(k: str) -> str:
    import re
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_str(k)


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in str(s):
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_val(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"a profile number must be finite, got {v}")
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_val(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_val(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to a profile")


def _is_number_table(v) -> bool:
    return isinstance(v, dict) and "value" in v


def profile_to_toml(d: dict, header: str = "") -> str:
    """A profile dict (the schema of hwprofiles/*.toml: numbers as {value, source} tables) as TOML
    text that tomllib reads back to the same dict. Numbers become inline tables; other tables
    become [sections]; lists of tables become [[arrays]]."""
    lines = [f"# {ln}" if ln else "#" for ln in header.splitlines()]

    def section(path, tbl):
        scalars = [(k, v) for k, v in tbl.items()
                   if not isinstance(v, dict) or _is_number_table(v)
                   if not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))]
        subs = [(k, v) for k, v in tbl.items() if isinstance(v, dict) and not _is_number_table(v)]
        arrays = [(k, v) for k, v in tbl.items()
                  if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        for k, v in scalars:
            lines.append(f"{_toml_key(k)} = {_toml_val(v)}")
        for k, v in subs:
            p = f"{path}.{_toml_key(k)}" if path else _toml_key(k)
            lines.append("")
            lines.append(f"[{p}]")
            section(p, v)
        for k, v in arrays:
            p = f"{path}.{_toml_key(k)}" if path else _toml_key(k)
            for x in v:
                lines.append("")
                lines.append(f"[[{p}]]")
                section(p, x)

    section("", d)
    return "\n".join(lines).lstrip("\n") + "\n"
