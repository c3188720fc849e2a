"""Command-line plumbing shared by `plan` and `python -m validate`: a parser whose errors are one
line, typed argument converters, and a main that turns bad input into one line on stderr and
exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """argparse, with errors raised as UsageError (one line, exit 2)."""

    def error(self, message):  # one line, exit 2, no usage dump
        raise UsageError(message)


class UsageError(Exception):
    pass


def int_arg(name, lo=1):
    def conv(text):
        try:
            v = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{name} must be >= {lo}, got {v}")
        return v
    return conv


def float_arg(name, lo=0.0, strict=False):
    def conv(text):
        try:
            v = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if v != v or v in (float("inf"), float("-inf")) or v < lo or (strict and v == lo):
            raise argparse.ArgumentTypeError(f"{name} must be {'>' if strict else '>='} {lo}, got {text}")
        return v
    return conv


def gpus_arg(text):
    t = str(text).strip()
    if "-" in t[1:]:
        lo, hi = t.split("-", 1)
        lo, hi = int_arg("--gpus")(lo), int_arg("--gpus")(hi)
        if hi < lo:
            raise argparse.ArgumentTypeError(f"--gpus range must be LO-HI with LO <= HI, got {t}")
        return (lo, hi)
    return int_arg("--gpus")(t)


def one_line(text) -> str:
    """An error message on one line: every line break Python knows (\\r, U+2028, ...) a space."""
    return " ".join(str(text).splitlines()).strip()


def guarded_main(prog: str, run_fn, argv=None, usage_errors=()) -> int:
    """Run a command's `run_fn(argv)`: bad input is one line on stderr and exit status 2, never a
    traceback (shared by `plan` and `python -m validate`)."""
    from .errors import PlannerError
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return run_fn(argv)
    except (PlannerError, UsageError, *usage_errors) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except OSError as e:        # e.g. --out or --plot into a missing or read-only directory
        where = f" {one_line(e.filename)}" if getattr(e, "filename", None) else ""
        print(f"{prog}: error: cannot write{where}: {one_line(e.strerror or e)}", file=sys.stderr)
        return 2
    except SystemExit as e:     # argparse's --help (exit 0)
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
