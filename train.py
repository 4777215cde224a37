"""Train nanovalor: the SFT warm start and VALOR's two GRPO stages (docs/DESIGN.md section 3).

    python train.py --stage text      # on a fresh clone: builds the phantom world, its expert and the SFT warm start
                                      # when absent (cached in out/), then GRPO with text rewards; prints the
                                      # held-out test metrics before and after
    python train.py --stage visual    # continues from out/text/checkpoint: GRPO scored by the frozen expert
    python train.py --stage sft       # (or --stage expert: the phantom world's expert) a warm start on its own
    python train.py --help            # every option, with its default and what it does
    torchrun --nproc_per_node=8 train.py --stage text --model=microsoft/llava-med-v1.5-mistral-7b \\
        --data=iu_xray/annotation.json --expert=microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 --lr=1e-6

Stages. sft: teacher-forced report likelihood (projector + LLM). text: G sampled reports per study, rewarded by NLG +
clinical metrics against the reference (rewards.py), z-scored in the group, a clipped + KL GRPO update (grpo.py);
LLM + projector train. visual: the same, but rewarded by the frozen expert's X-ray-report similarity,
rank-normalised in the group, and only the projector trains. Every option is a field of Config (--field=value).
One process, or torchrun: DDP, or --fsdp (FSDP2, one shard unit per decoder block); rank 0 logs and saves;
`--resume` continues out/<stage>/checkpoint exactly.
"""
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from nanovalor import checkpoint, dist, grpo, lora, memory, phantom_expert, phantoms
from nanovalor import policy as policies
from nanovalor.bert import load_chexbert
from nanovalor.config import checked, diff, parse
from nanovalor.dist import print0
from nanovalor.data import DEFAULT_PROMPT, Batches, collate, read_dataset, read_preprocessor_config
from nanovalor.evaluation import evaluate_sharded, finding_rates, table
from nanovalor.generate import decode_completions, encode_prompts, group_generators, load_tokenizer, sample
from nanovalor.chexpert import label_reports
from nanovalor.nlg import CiderD, clean_report
from nanovalor.rewards import parse_weights, text_reward


@dataclass
class Config:
    stage: str = "text"  # sft | text | visual (expert: train the phantom world's expert alone)
    out: str = "out"  # each stage writes out/<stage>/checkpoint and metrics.jsonl; the phantom world is out/phantoms
    model: str = ""  # starting policy (hub id or folder); "": the previous stage's checkpoint (sft: a fresh tiny one)
    data: str = ""  # annotation.json or .jsonl; "": the phantom world, generated on first use
    image_root: str = ""  # "": images/ next to the annotation file
    skip_bad: bool = False  # skip (and count) studies whose images are missing or unreadable, instead of stopping
    expert: str = ""  # the frozen expert (folder, hub id); "": out/expert/checkpoint; phantom-only controls: "oracle"
    # (labels read vs the study's true findings), "oracle_strict" (false findings count twice), "null" (another X-ray)
    chexbert: str = ""  # CheXbert's chexbert.pth (bert-base-uncased's vocab.txt beside it): --rewards chexbert=W
    train: str = ""  # what trains: "" = the stage's default, or "all" / comma-separated names from TRAINABLE
    resume: bool = False  # continue out/<stage>/checkpoint exactly
    stop_after: int = 0  # end this run after this many steps, saving (a time-limited job); 0: run to `steps`
    seed: int = 0  # model init, data order and every rollout's sampling
    steps: int = 0  # 0: the stage's default (STAGES)
    batch_size: int = 0  # studies per optimizer step, all ranks together; 0: the stage's default
    micro_batch: int = 0  # studies per forward on one rank (gradient accumulation); 0: all of the rank's at once
    lr: float = 0.0  # 0: the stage's default (for the phantom world's tiny models; 7B models want ~1e-6)
    schedule: str = "cosine"  # cosine | constant, after `warmup` linear steps
    warmup: int = -1  # linear warmup steps; -1: the stage's default
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    grad_clip: float = 1.0  # clip the global gradient norm to this before each optimizer step
    group_size: int = 8  # G: samples per study
    max_new_tokens: int = 96  # the longest report sampled (and, for sft, trained on), EOS included
    temperature: float = 1.0  # rollout sampling temperature (> 0); evaluation is greedy
    top_p: float = 1.0  # rollout nucleus sampling (1: off)
    top_k: int = 0  # rollout top-k sampling (0: off)
    eps_low: float = 0.2  # the ratio is clipped to [1 - eps_low, 1 + eps_high]
    eps_high: float = 0.2  # > eps_low: DAPO's clip-higher
    beta: float = 0.01  # KL coefficient; 0 drops the reference model
    kl: str = "k3"  # k1 | k2 | k3
    kl_clamp: bool = False  # bound the KL estimate as verl does: log-ratio to [-20, 20], k3 to <= 10
    agg: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
    mu: int = 1  # optimisation passes (optimizer steps) per rollout batch; > 1: pi_old from one no-grad forward
    advantage: str = ""  # zscore | mean_only | rloo | rank; "": zscore (text), rank (visual)
    text_weight: float = 0.0  # visual: A = A_rank + text_weight * A_text
    rewards: str = "bleu4=0.25,rougeL=0.25,clinical=0.5"  # the text reward (logged in the visual stage too)
    dynamic_sampling: bool = False  # take groups whose advantages are all 0 out of the loss and its normaliser
    max_skipped: int = 5  # stop when this many steps in a row were skipped (non-finite loss or gradient)
    eval_every: int = -1  # greedy evaluation on val_n validation studies every this many steps; -1: the stage's
    eval_n: int = 200  # test studies evaluated before and after the stage
    val_n: int = 64  # validation studies of the evaluation every eval_every steps
    save_every: int = -1  # save a checkpoint every this many steps (and at the end); -1: the stage's default
    fsdp: bool = False  # FSDP2: parameters, gradients and optimizer states sharded over the ranks
    grad_checkpointing: bool = False  # recompute each decoder block in backward: activation memory of one block
    prompt: str = DEFAULT_PROMPT  # the instruction each X-ray is given (the chat format and image tokens are added)
    phantom_train: int = 2000  # phantom world sizes (when --data is ""): training studies ...
    phantom_val: int = 100  # ... validation studies ...
    phantom_test: int = 200  # ... and test studies
    wandb: str = ""  # a wandb project name: log there too (if wandb is installed)
    lora_rank: int = 0  # > 0: train the decoder through LoRA adapters of this rank (lora.py); its base is frozen
    lora_alpha: float = 16.0  # the adapters' scale is lora_alpha / lora_rank
    lora_targets: str = lora.TARGETS  # the decoder's linear layers that get an adapter
    dry_run: int = 0  # > 0: print the per-GPU memory plan of this run on that many GPUs (memory.py), then exit
    gpu_memory_gb: float = 80.0  # the dry run's GPU memory (GiB)


STAGES = {  # the defaults where Config says 0 / "" / -1: sized for the phantom world on a laptop CPU
    "sft": dict(steps=500, batch_size=16, lr=1e-3, warmup=30, eval_every=250, save_every=250,
                train="multi_modal_projector,language_model,lm_head"),
    "text": dict(steps=60, batch_size=8, lr=1e-4, warmup=5, eval_every=20, save_every=20,
                 train="multi_modal_projector,language_model,lm_head"),
    "visual": dict(steps=60, batch_size=8, lr=1e-4, warmup=5, eval_every=20, save_every=20,
                   train="multi_modal_projector"),
}
TRAINABLE = ("vision_tower", "multi_modal_projector", "language_model", "lm_head")
VAL_LOGGED = ("f1_micro_14", "clinical", "expert_sim", "hallucination", "omission", "normal_share", "words")
FREE_ON_RESUME = {"resume", "stop_after", "eval_every", "eval_n", "val_n", "save_every", "wandb", "micro_batch",
                  "grad_checkpointing", "max_skipped", "skip_bad"}  # what a resumed run may change: not the maths


def previous_stage(cfg):
    """The checkpoint a stage starts from by default: out/sft for text, out/text for visual ("" for sft)."""
    return {"text": str(Path(cfg.out) / "sft" / "checkpoint"),
            "visual": str(Path(cfg.out) / "text" / "checkpoint")}.get(cfg.stage, "")


def with_defaults(cfg):
    """The stage's defaults where cfg says 0 / "" / -1, the previous stage's checkpoint and the expert in out/."""
    if cfg.stage not in STAGES:
        raise SystemExit(f"error: --stage={cfg.stage}: expected one of {', '.join(STAGES)} (or expert)")
    d, phantom_expert_folder = STAGES[cfg.stage], Path(cfg.out) / "expert" / "checkpoint"
    return replace(cfg, steps=cfg.steps or d["steps"], batch_size=cfg.batch_size or d["batch_size"],
                   lr=cfg.lr or d["lr"], train=cfg.train or d["train"],
                   warmup=d["warmup"] if cfg.warmup < 0 else cfg.warmup,
                   eval_every=d["eval_every"] if cfg.eval_every < 0 else cfg.eval_every,
                   save_every=d["save_every"] if cfg.save_every < 0 else cfg.save_every,
                   advantage=cfg.advantage or ("rank" if cfg.stage == "visual" else "zscore"),
                   model=cfg.model or previous_stage(cfg),
                   expert=cfg.expert or (str(phantom_expert_folder) if phantom_expert_folder.exists() else ""))


def check(cfg, world):
    """Every option, before any work: one message listing whatever is wrong."""
    problems = []
    per_rank = cfg.batch_size // world
    if cfg.batch_size % world or per_rank % (cfg.micro_batch or per_rank):
        problems.append(f"--batch_size={cfg.batch_size} must split evenly over {world} rank(s) and into "
                        f"micro-batches of {cfg.micro_batch or per_rank}")
    if not cfg.data:
        problems.append("--data is empty: give a dataset, or run train.py as a script to build the phantom world")
    if cfg.stage != "sft" and cfg.model == previous_stage(cfg) and not Path(cfg.model).exists():
        previous = "text" if cfg.stage == "visual" else "sft"
        problems.append(f"{cfg.model}: missing; run `python train.py --stage {previous}` first, or give --model")
    if cfg.stage == "sft" and not cfg.model and not (Path(cfg.data).parent / "tokenizer.json").exists():
        problems.append("--stage sft without --model builds the phantom world's tiny policy: give --model for "
                        f"{cfg.data or 'your data'}")
    if cfg.expert in phantom_expert.CONTROLS and cfg.stage != "visual":
        problems.append(f"--expert={cfg.expert} is a control of the visual stage's reward (phantom world only)")
    if cfg.stage == "visual" and not cfg.expert:
        problems.append("the visual stage needs --expert (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224)")
    try:
        weights = parse_weights(cfg.rewards)
        if "chexbert" in weights and not cfg.chexbert:
            problems.append("--rewards names chexbert: give CheXbert's weights with --chexbert=PATH/chexbert.pth")
    except ValueError as e:
        problems.append(f"--rewards: {e}")
    checks = [
        (cfg.steps >= 1 and cfg.batch_size >= 1 and cfg.lr > 0, "--steps, --batch_size and --lr must be > 0"),
        (cfg.schedule in ("cosine", "constant"), f"--schedule={cfg.schedule}: expected cosine or constant"),
        (cfg.max_new_tokens >= 1 and cfg.max_skipped >= 1, "--max_new_tokens and --max_skipped must be >= 1"),
        (0 < cfg.top_p <= 1 and cfg.top_k >= 0, "--top_p must be in (0, 1] and --top_k >= 0"),
        (cfg.stage == "visual" or not cfg.text_weight, "--text_weight applies to the visual stage only")]
    problems += [message for ok, message in checks if not ok]
    if cfg.stage in ("text", "visual"):
        problems += grpo.check_options(cfg.group_size, cfg.temperature, cfg.advantage, cfg.kl, cfg.agg, cfg.eps_low,
                                       cfg.eps_high, cfg.beta, cfg.mu)
    if problems:
        raise SystemExit("error: " + "\n       ".join(problems))


def set_trainable(module, spec):
    """requires_grad by top-level module name: "all" or a comma-separated subset of TRAINABLE."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n != "all" and n not in TRAINABLE]
    if unknown:
        raise SystemExit(f"error: --train={spec}: unknown {unknown}; expected 'all' or names from {TRAINABLE}")
    for name, p in module.named_parameters():
        p.requires_grad_("all" in names or name.split(".")[0] in names)
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def lr_at(cfg, step):
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))


def main(cfg):
    """One stage. Its prerequisites (the data, the starting checkpoint, the expert) must exist: on the phantom world
    the script's bootstrap() builds them first. --dry_run prints the memory plan instead, from config files alone."""
    if cfg.dry_run:
        print(memory.dry_run(cfg, STAGES, set_trainable))
        return None
    rank, world, device = dist.init()
    cfg = with_defaults(cfg)
    check(cfg, world)
    run = Path(cfg.out) / cfg.stage
    held = checkpoint.lock(run) if rank == 0 else None  # noqa: F841 (out/<stage>'s lock, until main returns)
    if rank == 0 and (note := checkpoint.recover(run / "checkpoint")):
        print(note, flush=True)
    dist.barrier()
    if cfg.resume:
        checkpoint.check_resume(run / "checkpoint", asdict(cfg), FREE_ON_RESUME)
    torch.manual_seed(cfg.seed)
    print0(f"stage {cfg.stage} ({world} process{'es' * (world > 1)}, {device}): {json.dumps(diff(cfg))}")

    # ---- data
    read = lambda split: checked(read_dataset, cfg.data, split, cfg.image_root or None, skip_bad=cfg.skip_bad)
    studies = read("train")
    batches = Batches(studies, cfg.batch_size // world, cfg.seed, rank, world)
    test = read("test")[:cfg.eval_n]
    val = read("val")[:cfg.val_n] if cfg.eval_every else []

    # ---- the policy on the meta device, what trains, LoRA, FSDP2; then its weights, the reference, DDP, optimizer
    judge, expert = phantom_expert.judge_and_expert(cfg.expert, cfg.data, studies, cfg.seed, device)
    if cfg.stage == "sft" and not cfg.model:  # the phantom world: a fresh tiny policy on the expert's ViT
        model = phantoms.tiny_policy(Path(cfg.data).parent, expert.visual if expert is not None else None)
    else:  # its weights are read once it is sharded (each rank its own rows)
        model = checked(policies.build, cfg.model, torch.float32)
    tok = checked(load_tokenizer, model.source)
    processing = read_preprocessor_config(model.preprocessor_config or {})
    n_train = set_trainable(model, cfg.train)
    if cfg.lora_rank:  # low-rank adapters on the decoder's linear layers, its base frozen (lora.py)
        n_train = lora.apply(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
    print0(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trained "
           f"({cfg.train}{f', LoRA rank {cfg.lora_rank}' if cfg.lora_rank else ''})")
    model.language_model.gradient_checkpointing = cfg.grad_checkpointing
    fsdp, wrapped = cfg.fsdp, grpo.CompletionLogprobs(model)
    if fsdp:
        wrapped = dist.shard(wrapped, model.language_model.layers)
    if next(model.parameters()).is_meta:
        checked(policies.fill, model, cfg.model, device)
    model.to(device).train()
    grpo_stage = cfg.stage in ("text", "visual")
    reference = grpo.reference_model(model) if grpo_stage and cfg.beta else None  # the stage's starting policy
    if cfg.resume:  # what trains, from out/<stage>/checkpoint (frozen weights never change within a stage)
        checked(policies.fill, model, run / "checkpoint", device, trained_only=True)
    if not fsdp:
        wrapped = dist.replicate(wrapped)  # DDP under torchrun (it needs the weights in place), else as it is
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    weights = parse_weights(cfg.rewards)
    r = SimpleNamespace(  # what every step uses
        cfg=cfg, model=model, wrapped=wrapped, reference=reference, tok=tok, optimizer=optimizer, params=params,
        judge=judge if cfg.stage == "visual" else None, rank=rank, world=world, device=device, fsdp=fsdp,
        micro=cfg.micro_batch or cfg.batch_size // world, weights=weights, skipped=0,
        cider=CiderD(sorted({clean_report(s.report) for s in studies})) if "cider" in weights else None,
        chexbert=checked(load_chexbert, cfg.chexbert, device=device) if cfg.chexbert else None)
    step = 0
    if cfg.resume:
        state = checkpoint.restore_training(run / "checkpoint", wrapped, optimizer, fsdp)
        batches.load_state_dict(state["data"])
        torch.set_rng_state(state["torch_rng"])
        step, r.skipped = state["step"], state["counters"]["skipped"]
        print0(f"resumed {run / 'checkpoint'} at step {step}")

    def save():
        state = dict(step=step, data=batches.state_dict(), torch_rng=torch.get_rng_state(),
                     counters={"skipped": r.skipped})
        checkpoint.save_training(run / "checkpoint", model, wrapped, optimizer, state, asdict(cfg), policies.save,
                                 policies.empty_like, fsdp, rank)

    def held_out(name, split):  # greedy reports, each rank a shard; the table on rank 0
        return evaluate_sharded(name, model, tok, split, cfg.prompt, cfg.max_new_tokens, expert, r.chexbert,
                                wrapped, fsdp) if split else None

    before = held_out(f"{cfg.stage} start, test", test) if grpo_stage and not cfg.resume else None
    log = checkpoint.open_log(run, asdict(cfg), cfg.wandb) if rank == 0 else None
    t_start, start_step, in_a_row = time.time(), step, 0
    end = min(cfg.steps, step + cfg.stop_after) if cfg.stop_after else cfg.steps

    while step < end:
        t0 = time.time()
        chunk = next(iter(batches), None) or next(iter(batches))  # at the end of an epoch the next one starts
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        skipped = r.skipped
        stats = (grpo_step if grpo_stage else sft_step)(r, collate(chunk, processing, cfg.prompt), step)
        in_a_row = in_a_row + 1 if r.skipped > skipped else 0
        step += 1

        seconds = time.time() - t0
        stats |= dict(skipped=r.skipped, tok_s=stats.pop("tokens") / seconds)
        eta = (time.time() - t_start) / (step - start_step) * (cfg.steps - step)
        if rank == 0:
            shown = " ".join(f"{k} {v:.4g}" for k, v in stats.items())
            print(f"step {step}/{cfg.steps} | {shown} | lr {lr_at(cfg, step - 1):.2e} | {seconds:.1f}s | "
                  f"eta {eta / 60:.1f}m", flush=True)
            log(dict(step=step, lr=lr_at(cfg, step - 1), **stats))
        if in_a_row >= cfg.max_skipped:  # a dead run: say so, keep the last good checkpoint
            raise SystemExit(f"error: {in_a_row} steps in a row were skipped (non-finite loss or gradient, or no "
                             f"group to learn from); stopping at step {step}. The last checkpoint saved is kept.")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            metrics = held_out(f"{cfg.stage} step {step}, val", val)
            if rank == 0 and metrics:  # the curves of bench/plot_visual.py
                log(dict(step=step, val={k: metrics[k] for k in VAL_LOGGED if k in metrics}))
        if (cfg.save_every and step % cfg.save_every == 0) or step == end:
            save()
    if step < cfg.steps:
        print0(f"stopped after step {step} (--stop_after); continue with --resume: {run / 'checkpoint'}")
        return None

    after = held_out(f"{cfg.stage} end, test", test)
    if rank == 0 and before is not None:
        print(f"held-out test, before and after the {cfg.stage} stage:\n"
              + table({f"{cfg.stage} start": before, f"{cfg.stage} end": after}))
    print0(f"checkpoint -> {run / 'checkpoint'}")
    return after


# -----------------------------------------------------------------------------
# One step of each stage: the gradient of this rank's studies, then the optimizer step(s). Returns the step's stats.

def optimize(r, finite):
    """Clip and step, unless the loss or the gradient is not finite (then the step is skipped and counted)."""
    norm = torch.nn.utils.clip_grad_norm_(r.params, r.cfg.grad_clip)
    if finite and torch.isfinite(norm):
        r.optimizer.step()
    else:
        r.skipped += 1
    r.optimizer.zero_grad(set_to_none=True)
    return float(norm)


def sft_step(r, batch, step):
    """Teacher-forced -log p(report, EOS | image, prompt), averaged over every report token of the global batch."""
    cfg, device, eos = r.cfg, r.device, r.model.cfg.eos_token_id[:1]
    pixels = batch["pixels"].to(device)
    prompt_ids, prompt_mask = (t.to(device) for t in encode_prompts(r.tok, r.model.cfg, batch["prompts"], pixels))
    reports = [r.tok.encode(x, add_special_tokens=False).ids[:cfg.max_new_tokens - 1] + eos for x in batch["reports"]]
    n = max(map(len, reports))
    tokens = torch.tensor([x + [0] * (n - len(x)) for x in reports], device=device)  # (B, n), right-padded
    mask = torch.arange(n, device=device)[None] < torch.tensor([len(x) for x in reports], device=device)[:, None]
    total = dist.all_sum(mask.sum(), device)
    parts, loss_sum = dist.micro_batches(len(reports), r.micro), 0.0
    for i, s in enumerate(parts):
        with dist.no_sync_unless_last(r.wrapped, i, len(parts)), dist.autocast(device):
            loss = -r.wrapped(pixels[s], prompt_ids[s], prompt_mask[s], tokens[s], mask[s]).sum() / total * r.world
            loss.backward()  # DDP averages over ranks, so * world makes it the global token mean
        loss_sum += loss.item() / r.world
    loss = float(dist.all_sum(loss_sum, device))
    return {"loss": loss, "grad_norm": optimize(r, math.isfinite(loss)), "tokens": int(total)}


def grpo_step(r, batch, step):
    """One GRPO step on this rank's B studies: sample, score, advantages, then mu optimisation passes."""
    cfg, device, B, G = r.cfg, r.device, len(batch["ids"]), r.cfg.group_size
    pixels = batch["pixels"].to(device)
    prompt_ids, prompt_mask = (t.to(device) for t in encode_prompts(r.tok, r.model.cfg, batch["prompts"], pixels))

    # 1. Sample G reports per study from the current policy (FSDP gathers the weights once for the whole rollout).
    with torch.no_grad(), dist.gathered(r.wrapped, r.fsdp), dist.autocast(device):
        r.model.eval()  # nothing in the model depends on it, but rollouts are inference
        samples = sample(r.model, prompt_ids, prompt_mask, pixels, group_size=G, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                         generator=group_generators((cfg.seed, step), r.rank, r.world, B, device))
        r.model.train()
    texts = decode_completions(r.tok, samples)  # (B*G,), rows b*G .. b*G+G-1 for study b
    groups = [texts[b * G:(b + 1) * G] for b in range(B)]

    # 2. Score them. The text reward (against the reference) is logged in both stages; in the visual stage the frozen
    # expert's similarity with the X-ray is the reward, with no reference. Rewards are (B, G) tensors on the host.
    references = [report for report in batch["reports"] for _ in range(G)]
    text_r, parts = text_reward(texts, references, r.weights, r.cider, chexbert=r.chexbert)
    text_r = torch.as_tensor(text_r).view(B, G)
    rewards = r.judge.similarity(batch["first_views"], groups) if cfg.stage == "visual" else text_r

    # 3. Advantages within each group. Dynamic sampling takes the groups with nothing to learn from (all advantages
    # 0) out of the loss and its normalisers, masking their tokens: every rank still runs the same micro-batches (as
    # DDP needs), and the gradient is the same for any split of the batch over ranks.
    adv = grpo.group_advantages(rewards, cfg.advantage, text_r, cfg.text_weight if cfg.stage == "visual" else 0)
    zero_var = (adv == 0).all(1)  # (B,)
    mask = samples.mask & ~zero_var.repeat_interleave(G).to(device)[:, None] if cfg.dynamic_sampling else samples.mask
    labels = label_reports(texts)  # the samples' findings against their references' (hallucination, omission)
    rates = finding_rates(labels, label_reports(references))
    stats = {"reward": float(rewards.mean()), "text_reward": float(text_r.mean())} | {
        k: float(v.mean()) for k, v in parts.items()} | {
        "zero_var": float(zero_var.float().mean()), "length": float(samples.mask.sum(1).float().mean()),
        "hallucination": rates[0], "omission": rates[1], "normal": rates[2]}
    stats = dict(zip(stats, (dist.all_sum(list(stats.values()), device) / r.world).tolist()))  # global means
    stats["tokens"] = int(dist.all_sum(samples.mask.sum(), device))
    if dist.all_sum(mask.sum(), device) == 0:  # dynamic sampling left nothing to learn from, on any rank
        r.skipped += 1
        return stats

    # 4. Update: mu optimisation passes, each an optimizer step. pi_ref, and pi_old when mu > 1, are computed once,
    # before the first pass.
    rollout = grpo.Rollout(pixels, prompt_ids, prompt_mask, samples.tokens, mask, samples.logprobs, G)
    adv = adv.flatten().to(device)  # (B*G,)
    ref_logp = grpo.reference_logprobs(r.reference, r.wrapped, rollout, r.micro, cfg.temperature)
    old_logp = grpo.rollout_logprobs(r.wrapped, rollout, r.micro, cfg.temperature) if cfg.mu > 1 else None
    for k in range(cfg.mu):
        update, finite = grpo.update(r.wrapped, rollout, adv, r.micro, r.world, cfg.temperature, old_logp, ref_logp,
                                     eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, kl=cfg.kl,
                                     kl_clamp=cfg.kl_clamp, agg=cfg.agg, max_len=cfg.max_new_tokens)
        update["grad_norm"] = optimize(r, finite)
        if k == 0:
            stats |= update
        else:  # later passes: how far pi has moved from pi_old, and how much the clip bites
            stats |= {f"{name}_pass{k + 1}": update[name] for name in ("loss", "clip_frac", "ratio_dev", "grad_norm")}
    return stats


# -----------------------------------------------------------------------------
# The phantom world's prerequisites, built in order when absent: what `python train.py` runs on a fresh clone.

def bootstrap(cfg):
    """On the phantom world (no --data), build what this stage needs and a fresh clone lacks, each cached in out/:
      1. the world: phantoms.generate -> out/phantoms (annotation.json, images, tokenizer.json);
      2. its expert: phantom_expert.train -> out/expert/checkpoint (the visual stage's judge; the SFT policy's ViT
         starts as the expert's, as LLaVA's starts from a CLIP ViT);
      3. the SFT warm start: this script's sft stage -> out/sft/checkpoint (what the text stage starts from).
    Returns cfg with --data (and --expert) filled in."""
    rank, _, _ = dist.init()
    out = Path(cfg.out)
    world, expert = out / "phantoms", out / "expert" / "checkpoint"
    if not (world / "annotation.json").exists():
        print0(f"1. building the phantom world in {world}")
        if rank == 0:
            phantoms.generate(world, cfg.phantom_train, cfg.phantom_val, cfg.phantom_test, seed=0)
        dist.barrier()
    if cfg.stage == "expert" or (not expert.exists() and cfg.expert in ("",) + phantom_expert.CONTROLS):
        print0(f"2. training the phantom world's expert into {expert}")
        if rank == 0:
            phantom_expert.train(world, expert, seed=cfg.seed, **({"steps": cfg.steps} if cfg.steps else {}))
        dist.barrier()
    cfg = replace(cfg, data=str(world / "annotation.json"))
    if cfg.stage == "text" and not cfg.model and not (out / "sft" / "checkpoint").exists():
        print0(f"3. training the SFT warm start into {out / 'sft' / 'checkpoint'}")
        main(Config(stage="sft", out=cfg.out, data=cfg.data, seed=cfg.seed))
    return cfg


if __name__ == "__main__":
    config = checked(parse, Config)
    if config.stage == "expert" and config.data:
        raise SystemExit("error: --stage expert trains the phantom world's expert (phantom_expert.py): no --data")
    if not config.data:
        config = bootstrap(config)
    if config.stage != "expert":
        main(config)
