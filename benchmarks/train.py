"""`python -m benchmarks.train`: the train benchmark (see benchmarks/run.py)."""
import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
