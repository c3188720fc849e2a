"""Validation: run a layout with real torch.distributed and hold the planner's counts against it.

`python -m validate run ...` (validate/cli.py). torch is an optional dependency
(`pip install 'dtplanner[validate]'`); nothing here imports it until a run starts.
"""
