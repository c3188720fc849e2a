"""Shared by the robustness tests: run `plan` in-process and check the bad-input contract."""
from __future__ import annotations

import contextlib
import io

from planner.cli import main


def run_plan(argv) -> tuple:
    """(exit status, stdout, stderr) of planner.cli.main(argv), run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, err: str, needle: str | None = None) -> None:
    """Exit status 2, exactly one line on stderr starting 'plan: error: ', no traceback, and the
    line names what was wrong (`needle`)."""
    assert code == 2, (code, err)
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)      # one POSIX line
    assert err.startswith("plan: error: "), err
    assert "Traceback" not in err, err
    if needle is not None:
        assert needle in err, (needle, err)
