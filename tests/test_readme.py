"""The README's set-up commands and .ci/run stay in step."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def blocks():
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)


def test_first_command_runs_plan_on_a_catalog_model():
    first = blocks()[0].strip()
    assert "pip install" in first and "plan --model gpt-20b --gpus 64" in first


def test_ci_runs_the_readme_test_command_exactly():
    test_cmd = blocks()[1].strip()
    assert "pytest" in test_cmd and "torch==2.13.0" in test_cmd
    ci_lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines
