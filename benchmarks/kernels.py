"""`python -m benchmarks.kernels`: the kernels benchmark (see benchmarks/run.py)."""
import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main(["kernels", *sys.argv[1:]]))
