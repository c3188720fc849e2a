"""`python -m validate memory`: one rank's training memory, measured by running the real model at
full size on fake tensors (no storage) in one CPU process that stands for one rank of an N-rank
world, under PyTorch's own trackers (torch.distributed._tools MemTracker / FSDPMemTracker), beside
the planner's prediction for the same layout and rank.

fakemodel.py builds the model from a ModelSpec; parallelize.py applies a stack's parallelism
(DTensor TP/SP and FSDP2 as torchtitan does, or Megatron-Core's hand-written TP and distributed
optimizer); tracking.py holds the patches the trackers need on CPU and the local FLOP counter;
measure.py runs one step; command.py is the CLI and the comparison with the planner."""
