"""The planner's one user-facing error type.

Every message is a single line that says what was wrong and what is valid; the CLI prints it
and exits with status 2 (no traceback).
"""


class PlannerError(ValueError):
    """Bad input or an impossible request, with a one-line explanation."""
