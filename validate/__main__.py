"""`python -m validate`: the validate command (run, calibrate)."""
import sys

from .cli import main

sys.exit(main())
