"""The two halves of asking a framework's own code about emitted configurations in a fresh
process (so its imports, fake process groups and globals never touch the test process):
`ask` in the test, `serve` in the script that runs the framework."""
import contextlib
import io
import json
import subprocess
import sys


def ask(script, cases: list, timeout: float) -> dict:
    """{case name: verdict} from running `script` over `cases` (JSON on stdin)."""
    r = subprocess.run([sys.executable, str(script)], input=json.dumps(cases), text=True, capture_output=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return {v["name"]: v for v in json.loads(r.stdout.strip().splitlines()[-1])}


def serve(check) -> None:
    """Read cases from stdin, print [{"name", "ok", "error" | what check returns}] as JSON."""
    out = []
    for case in json.load(sys.stdin):
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                r = check(case)
            out.append({"name": case["name"], "ok": True, **r})
        except Exception as e:  # noqa: BLE001  (any rejection is the answer)
            out.append({"name": case["name"], "ok": False, "error": f"{type(e).__name__}: {e}"[:400]})
    print(json.dumps(out))
