"""`python -m benchmarks.decode`: the decode benchmark (see benchmarks/run.py)."""
import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main(["decode", *sys.argv[1:]]))
