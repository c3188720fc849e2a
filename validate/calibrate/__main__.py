"""One calibration rank: `python -m validate.calibrate JOB.json OUT` (spawned by command.py)."""
import sys

from .command import worker_main

if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2])
