import sys

from cmalign.cli import main

code = main()
if "cmalign.training.distributed" in sys.modules:  # a (multi-rank) run: no teardown beside gloo's threads
    sys.modules["cmalign.training.distributed"].end_process(code)
sys.exit(code)
