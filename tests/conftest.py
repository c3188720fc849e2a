"""Test-suite set-up: tests/ on sys.path so the shared helpers (plan_run.py) import from every
package folder (tests/planner mirrors planner/, tests/validate mirrors validate/)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
