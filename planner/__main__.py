"""`python -m planner`: the plan command."""
import sys

from .cli import main

sys.exit(main())
