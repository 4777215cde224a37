"""How good a judge of reports is an expert, on held-out phantom studies? (phantom_expert.judge)

    python bench/expert_judge.py --expert out/expert/checkpoint [--data out/phantoms/annotation.json] [--n 200]
    python bench/expert_judge.py --expert oracle          # the phantom-only controls: the labels' agreement ...
    python bench/expert_judge.py --expert null            # ... and out/expert/checkpoint against other X-rays

For each of n test studies: its own report and 7 near misses (its findings with one removed, added or swapped,
written by the phantom report writer). Printed: the within-group Spearman correlation of the expert's scores with
clinical correctness, how often the true report scores highest, and how often each of the first 200 X-rays
retrieves its own report among their 200 reports, with chance levels and top-1's ceiling.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanovalor import expert as experts  # noqa: E402
from nanovalor import phantom_expert  # noqa: E402
from nanovalor.data import read_dataset  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--expert", default="out/expert/checkpoint",
                    help="a folder or hub id, or a control: " + " / ".join(phantom_expert.CONTROLS))
parser.add_argument("--null_of", default="out/expert/checkpoint", help="the expert the null control wraps")
parser.add_argument("--data", default="out/phantoms/annotation.json")
parser.add_argument("--split", default="test")
parser.add_argument("--n", type=int, default=200, help="test studies (the first n)")
parser.add_argument("--world_seed", type=int, default=0, help="the seed the phantom world was generated with")
parser.add_argument("--seed", type=int, default=0, help="the near misses' seed")
parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
args = parser.parse_args()

if args.threads:
    torch.set_num_threads(args.threads)
studies = phantom_expert.load_studies(args.data, args.split, args.world_seed, args.n)
if args.expert in phantom_expert.ORACLES:
    scorer = phantom_expert.Oracle(read_dataset(args.data, args.split)[:args.n], phantom_expert.ORACLES[args.expert])
elif args.expert == "null":
    scorer = phantom_expert.Null(experts.load(args.null_of), read_dataset(args.data, "train"), args.seed)
else:
    scorer = experts.load(args.expert)
start = time.time()
result = phantom_expert.judge(scorer, studies, seed=args.seed)
print(f"{args.expert} on {len(studies)} {args.split} studies of {args.data} ({time.time() - start:.0f}s):")
print(json.dumps(result, indent=1))
