"""Does the frozen expert's reward point where clinical correctness does? The diagnostic behind the visual stage.

    python bench/expert_agreement.py --model out/text/checkpoint --expert out/expert/checkpoint [--n 64] [--G 8]

For n test studies, a policy samples G reports each (T = 1, as in training); every report is scored by the expert
(its cosine with the X-ray, the visual stage's reward) and by the clinical reward against the reference (our
CheXpert labeler), and the within-group rank correlation of the two is averaged over the groups with any spread:
the visual stage's rank advantages move the policy towards clinically better reports only as far as it is above 0.
The same is printed for the text reward, and for the expert's cosine with the *reference* report as an upper mark.
The prompt and the length cap are those the checkpoint was trained with unless --prompt / --max_new_tokens say so.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanovalor import expert as experts  # noqa: E402
from nanovalor import policy as policies  # noqa: E402
from nanovalor.data import read_dataset  # noqa: E402
from nanovalor.evaluation import generation_settings, images_of, training_config  # noqa: E402
from nanovalor.generate import decode_completions, encode_prompts, load_tokenizer, sample  # noqa: E402
from nanovalor.grpo import rank  # noqa: E402
from nanovalor.rewards import parse_weights, text_reward  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", default="out/text/checkpoint")
parser.add_argument("--expert", default="out/expert/checkpoint")
parser.add_argument("--data", default="out/phantoms/annotation.json")
parser.add_argument("--n", type=int, default=64)
parser.add_argument("--G", type=int, default=8)
parser.add_argument("--prompt", default="", help="default: the checkpoint's training prompt, else DEFAULT_PROMPT")
parser.add_argument("--max_new_tokens", type=int, default=0, help="0: the checkpoint's training cap, else 128")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

torch.manual_seed(args.seed)
policy, expert = policies.load(args.model), experts.load(args.expert)
tok = load_tokenizer(policy.source)
studies = read_dataset(args.data, "test")[:args.n]
prompt, cap = generation_settings(training_config(policy.source), args.prompt, args.max_new_tokens)
images = images_of(policy, studies)
ids, mask = encode_prompts(tok, policy.cfg, [prompt] * len(studies), images)
out = sample(policy, ids, mask, images, group_size=args.G, max_new_tokens=cap,
             generator=torch.Generator().manual_seed(args.seed))
texts = decode_completions(tok, out)  # (n*G,)
refs = [s.report for s in studies for _ in range(args.G)]
# One expert pass per study: its G samples and, as column G, its own report.
groups = [texts[i * args.G:(i + 1) * args.G] + [s.report] for i, s in enumerate(studies)]
cosines = expert.similarity([s.images[0] for s in studies], groups)  # (n, G + 1)
sim, own = cosines[:, :args.G], cosines[:, args.G]
text, parts = text_reward(texts, refs, parse_weights("bleu4=0.25,rougeL=0.25,clinical=0.5"))
text, clinical = torch.as_tensor(text), torch.as_tensor(parts["clinical"])  # (n*G,) each


def agreement(a, b):
    """Mean within-group Spearman correlation of a and b (n, G), over groups where both vary."""
    ra, rb = rank(a.double()), rank(b.double())  # ranks mapped to [-1, 1], ties averaged: Spearman's ranks
    keep = (ra.std(1) > 0) & (rb.std(1) > 0)
    r = (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))  # (n,) the ranks are centred: Pearson of ranks
    return float(r[keep].mean()), int(keep.sum())


clinical = clinical.view(-1, args.G).float()
for name, score in (("expert cosine (visual reward)", sim), ("text reward", text.view(-1, args.G))):
    rho, groups = agreement(score, clinical)
    print(f"{name:<32} vs clinical reward: mean within-group Spearman {rho:+.3f} over {groups} groups")
print(f"expert cosine: reference reports {own.mean():.4f}, sampled reports {sim.mean():.4f}; "
      "share of groups where the reference outscores every sample: "
      f"{float((own[:, None] > sim).all(1).float().mean()):.3f}")
