"""How fast the phantom world is made: studies per second of CPU time on one core, PNG writing included.

    python bench/phantoms.py [--n 200] [--repeats 3]

CPU time (time.process_time) of the best of several runs: what one free core does, on a shared machine too.
The default pipeline builds its world with `phantoms.generate`; this is its cost per study.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanovalor import phantoms  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--n", type=int, default=200, help="studies per run")
parser.add_argument("--repeats", type=int, default=3)
args = parser.parse_args()

seconds = []
with tempfile.TemporaryDirectory() as folder:
    for run in range(args.repeats):
        start = time.process_time()
        phantoms.generate(Path(folder) / str(run), n_train=0, n_val=args.n, n_test=0, seed=run, progress=False)
        seconds.append(time.process_time() - start)
print(f"phantom world: {args.n / min(seconds):.0f} studies/s of CPU time on one core (best of {args.repeats}, "
      f"{args.n} studies each, PNG writing included)")
