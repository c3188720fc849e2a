"""`python -m validate calibrate`: measure a machine or cluster (measure.py), fit the planner's
parameters to it (fit.py, analyse.py) and write a complete hardware profile (profile.py); predict
a validation run's step time the way validate runs it (predict.py). command.py is the CLI."""
