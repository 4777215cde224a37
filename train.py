"""Train nanovalor: the SFT warm start, an image-text expert, and VALOR's two GRPO stages (docs/DESIGN.md section 3).

    python train.py --stage text      # on a fresh clone: builds the phantom world, its SFT warm start and its expert
                                      # when absent (cached in out/), then GRPO with text rewards; prints the
                                      # held-out test metrics before and after
    python train.py --stage visual    # continues from out/text/checkpoint: GRPO scored by the frozen expert
    python train.py --stage sft       # (or --stage expert) a warm start on its own
    torchrun --nproc_per_node=8 train.py --stage text --model=microsoft/llava-med-v1.5-mistral-7b \\
        --data=iu_xray/annotation.json --expert=microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 --lr=1e-6

Stages. expert: CLIP's contrastive loss on (X-ray, report) pairs. sft: teacher-forced report likelihood (projector +
LLM; in the phantom world on a ViT copied from the phantom expert, as LLaVA starts from a CLIP ViT). text: G sampled
reports per study, rewarded by NLG + clinical metrics against the reference (rewards.py), z-scored in the group, one
clipped + KL GRPO update (grpo.py); LLM + projector train. visual: the same, but rewarded by the frozen expert's
X-ray-report similarity, rank-normalised in the group, and only the projector trains. Every option is a field of
Config (--field=value). One process, or torchrun: DDP, or --fsdp (FSDP2, one shard unit per decoder block); rank 0
logs and saves; `--resume` continues out/<stage>/checkpoint exactly.
"""
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from nanovalor import checkpoint, dist, grpo, lora, memory, phantoms
from nanovalor import expert as experts
from nanovalor import policy as policies
from nanovalor.config import diff, parse
from nanovalor.data import DEFAULT_PROMPT, Batches, collate, read_dataset, read_preprocessor_config
from nanovalor.evaluation import greedy_reports, normal_share, report_metrics, table
from nanovalor.generate import decode_completions, encode_prompts, load_tokenizer, sample
from nanovalor.chexpert import clinical_reward, label_reports
from nanovalor.nlg import CiderD, clean_report
from nanovalor.rewards import parse_weights, text_reward


@dataclass
class Config:
    stage: str = "text"  # sft | expert | text | visual
    out: str = "out"  # each stage writes out/<stage>/checkpoint and metrics.jsonl; the phantom world is out/phantoms
    model: str = ""  # starting policy (hub id or folder); "": the previous stage's checkpoint (sft: a fresh tiny one)
    data: str = ""  # annotation.json or .jsonl; "": the phantom world, generated on first use
    image_root: str = ""  # "": images/ next to the annotation file
    expert: str = ""  # the frozen expert (visual stage; expert similarity in evaluation); "": out/expert/checkpoint
    train: str = ""  # what trains: "" = the stage's default, or "all" / comma-separated names from TRAINABLE
    resume: bool = False  # continue out/<stage>/checkpoint exactly
    stop_after: int = 0  # end this run after this many steps, saving (a time-limited job); 0: run to `steps`
    seed: int = 0
    steps: int = 0  # 0: the stage's default (STAGES)
    batch_size: int = 0  # studies per optimizer step, all ranks together; 0: the stage's default
    micro_batch: int = 0  # studies per forward on one rank (gradient accumulation); 0: all of the rank's at once
    lr: float = 0.0  # 0: the stage's default (for the phantom world's tiny models; 7B models want ~1e-6)
    schedule: str = "cosine"  # cosine | constant, after `warmup` linear steps
    warmup: int = -1  # linear warmup steps; -1: the stage's default
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    group_size: int = 8  # G: samples per study
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.01  # KL coefficient; 0 drops the reference model
    kl: str = "k3"  # k1 | k2 | k3
    agg: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
    mu: int = 1  # optimisation passes over each rollout batch (> 1: the sampler's log-probs are pi_old)
    advantage: str = ""  # zscore | mean_only | rloo | rank; "": zscore (text), rank (visual)
    text_weight: float = 0.0  # visual: A = A_rank + text_weight * A_text
    rewards: str = "bleu4=0.25,rougeL=0.25,clinical=0.5"  # the text reward (logged in the visual stage too)
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal (as many on every rank)
    eval_every: int = -1  # greedy evaluation on val_n validation studies every this many steps; -1: the stage's
    eval_n: int = 200  # test studies evaluated before and after the stage
    val_n: int = 64
    save_every: int = 0  # 0: at the end only
    fsdp: bool = False
    grad_checkpointing: bool = False
    prompt: str = DEFAULT_PROMPT
    phantom_train: int = 2000  # phantom world sizes (when --data is "")
    phantom_val: int = 100
    phantom_test: int = 200
    wandb: str = ""  # a wandb project name: log there too (if wandb is installed)
    lora_rank: int = 0  # > 0: train the decoder through LoRA adapters of this rank (lora.py); its base is frozen
    lora_alpha: float = 16.0  # the adapters' scale is lora_alpha / lora_rank
    lora_targets: str = lora.TARGETS  # the decoder's linear layers that get an adapter
    dry_run: int = 0  # > 0: print the per-GPU memory plan of this run on that many GPUs (memory.py), then exit
    gpu_memory_gb: float = 80.0  # the dry run's GPU memory (GiB)


STAGES = {  # the defaults where Config says 0 / "": sized for the phantom world on a laptop CPU
    "sft": dict(steps=500, batch_size=16, lr=1e-3, warmup=30, eval_every=250,
                train="multi_modal_projector,language_model,lm_head"),
    "expert": dict(steps=1500, batch_size=32, lr=1e-3, warmup=30, eval_every=0, train="all"),
    "text": dict(steps=60, batch_size=8, lr=1e-4, warmup=5, eval_every=20,
                 train="multi_modal_projector,language_model,lm_head"),
    "visual": dict(steps=60, batch_size=8, lr=1e-4, warmup=5, eval_every=20, train="multi_modal_projector"),
}
TRAINABLE = ("vision_tower", "multi_modal_projector", "language_model", "lm_head")


def print0(rank, *args):
    if rank == 0:
        print(*args, flush=True)


def prepare(cfg, rank):
    """Fill in the stage defaults and, on the phantom world, build whatever a fresh clone lacks (cached in out/)."""
    if cfg.stage not in STAGES:
        raise SystemExit(f"--stage={cfg.stage}: expected one of {', '.join(STAGES)}")
    d, out, phantom = STAGES[cfg.stage], Path(cfg.out), not cfg.data
    cfg = replace(cfg, steps=cfg.steps or d["steps"], batch_size=cfg.batch_size or d["batch_size"],
                  lr=cfg.lr or d["lr"], train=cfg.train or d["train"],
                  warmup=d["warmup"] if cfg.warmup < 0 else cfg.warmup,
                  eval_every=d["eval_every"] if cfg.eval_every < 0 else cfg.eval_every,
                  advantage=cfg.advantage or ("rank" if cfg.stage == "visual" else "zscore"))
    if phantom:
        world = out / "phantoms"
        if not (world / "annotation.json").exists():
            if rank == 0:
                print(f"building the phantom world in {world}")
                phantoms.generate(world, cfg.phantom_train, cfg.phantom_val, cfg.phantom_test, seed=0)
            dist.barrier()
        cfg = replace(cfg, data=str(world / "annotation.json"))
    warm = {"text": out / "sft" / "checkpoint", "visual": out / "text" / "checkpoint"}.get(cfg.stage)
    if warm and not cfg.model:
        if not warm.exists() and not (phantom and cfg.stage == "text"):
            previous = "text" if cfg.stage == "visual" else "sft"
            raise SystemExit(f"{warm}: missing; run `python train.py --stage {previous}` first, or give --model")
        if not warm.exists():
            print0(rank, f"no SFT warm start in {warm}: training it first (python train.py --stage sft)")
            main(Config(stage="sft", out=cfg.out, seed=cfg.seed))  # on the phantom world
        cfg = replace(cfg, model=str(warm))
    if cfg.stage != "expert" and not cfg.expert:
        path = out / "expert" / "checkpoint"
        if not path.exists() and phantom:  # the phantom policy's ViT starts as the expert's, as LLaVA's from CLIP
            print0(rank, f"no expert in {path}: training it first (python train.py --stage expert)")
            main(Config(stage="expert", out=cfg.out, seed=cfg.seed))
        if not path.exists() and cfg.stage == "visual":
            raise SystemExit(f"{path}: missing; the visual stage needs --expert (e.g. "
                             "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224)")
        cfg = replace(cfg, expert=str(path) if path.exists() else "")
    return cfg


def set_trainable(module, spec):
    """requires_grad by top-level module name: "all" or a comma-separated subset of TRAINABLE."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n != "all" and n not in TRAINABLE]
    if unknown:
        raise SystemExit(f"--train={spec}: unknown {unknown}; expected 'all' or names from {TRAINABLE}")
    for name, p in module.named_parameters():
        p.requires_grad_("all" in names or name.split(".")[0] in names)
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def lr_at(cfg, step):
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))


def generators(cfg, step, rank, world, n, device):
    """One generator per study of this rank's batch, seeded by (seed, step, the study's place in the global batch):
    a group's samples are the same on any number of ranks and after a resume."""
    seeds = [np.random.SeedSequence([cfg.seed, step, rank + k * world]).generate_state(1)[0] for k in range(n)]
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def main(cfg):
    if cfg.dry_run:  # from config.json alone: no weights read, nothing trained
        print(memory.dry_run(cfg, STAGES, set_trainable))
        return None
    rank, world, device = dist.init()
    cfg = prepare(cfg, rank)
    run = Path(cfg.out) / cfg.stage
    torch.manual_seed(cfg.seed)
    print0(rank, f"stage {cfg.stage} ({world} process{'es' * (world > 1)}, {device}): {json.dumps(diff(cfg))}")
    per_rank = cfg.batch_size // world
    micro = cfg.micro_batch or per_rank
    if cfg.batch_size % world or per_rank % micro:
        raise SystemExit(f"--batch_size={cfg.batch_size} must split evenly over {world} rank(s) and into "
                         f"micro-batches of {micro}")
    studies = read_dataset(cfg.data, "train", cfg.image_root or None)
    batches = Batches(studies, per_rank, cfg.seed, rank, world)
    test = read_dataset(cfg.data, "test", cfg.image_root or None)[:cfg.eval_n]
    val = read_dataset(cfg.data, "val", cfg.image_root or None)[:cfg.val_n] if cfg.eval_every else []

    # ---- the model, what trains, the DDP / FSDP wrapper, the weights, the reference, the optimizer
    expert = experts.load(cfg.expert, device) if cfg.expert else None
    if cfg.stage == "expert":
        model = experts.load(cfg.model) if cfg.model else phantoms.tiny_expert(Path(cfg.data).parent)
        processing = model.processing
    else:
        if cfg.stage == "sft" and not cfg.model:  # the phantom world: a fresh tiny policy on the expert's ViT
            model = phantoms.tiny_policy(Path(cfg.data).parent, expert.visual if expert else None)
        else:  # on the meta device: its weights are read once it is sharded (policies.fill, below)
            model = policies.build(cfg.model, torch.float32)
        processing = read_preprocessor_config(model.preprocessor_config or {})
        tok = load_tokenizer(model.source)
    n_train = set_trainable(model, cfg.train)
    if cfg.lora_rank:  # low-rank adapters on the decoder's linear layers, its base frozen (lora.py)
        n_train = lora.apply(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
    print0(rank, f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M "
                 f"trained ({cfg.train})")
    grpo_stage = cfg.stage in ("text", "visual")
    if cfg.stage != "expert":
        model.language_model.gradient_checkpointing = cfg.grad_checkpointing
    wrapped = Contrastive(model) if cfg.stage == "expert" else grpo.CompletionLogprobs(model)
    fsdp = cfg.fsdp and cfg.stage != "expert"
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in model.language_model.layers:
            fully_shard(block)
        fully_shard(wrapped)
    if next(model.parameters()).is_meta:  # each rank reads the rows it holds (all of them without FSDP)
        policies.fill(model, cfg.model, device)
    model.to(device).train()
    reference = grpo.reference_model(model) if grpo_stage and cfg.beta else None  # the stage's starting policy
    if cfg.resume:  # what trains, from out/<stage>/checkpoint; the reference stays the stage's start
        if cfg.stage == "expert":
            model.load_state_dict(experts.load(run / "checkpoint").state_dict())
        else:  # frozen weights never change within a stage; each rank reads its own rows
            policies.fill(model, run / "checkpoint", device, trained_only=True)
    if world > 1 and not fsdp:
        wrapped = torch.nn.parallel.DistributedDataParallel(wrapped)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, counters = 0, {"skipped": 0}
    if cfg.resume:
        state = checkpoint.load_state(run / "checkpoint")
        if fsdp:  # a full optimizer state: each rank takes its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(wrapped, optimizer, state["optimizer"], StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["data"])
        torch.set_rng_state(state["torch_rng"])
        step, counters = state["step"], state["counters"]
        print0(rank, f"resumed {run / 'checkpoint'} at step {step}")
    weights = parse_weights(cfg.rewards)
    cider = CiderD(sorted({clean_report(s.report) for s in studies})) if "cider" in weights else None

    def save():
        state = dict(step=step, optimizer=optimizer.state_dict(), data=batches.state_dict(),
                     torch_rng=torch.get_rng_state(), counters=counters)
        target = model
        if fsdp:  # gather the full weights and optimizer state to rank 0's CPU, into an unsharded copy of the model
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
            sd, state["optimizer"] = get_state_dict(wrapped, optimizer, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
            if rank == 0:
                target = policies.empty_like(model)  # LoRA adapters included
                target.load_state_dict({k.removeprefix("policy."): v for k, v in sd.items()}, assign=True)
        if rank == 0:
            write = experts.save if cfg.stage == "expert" else policies.save
            checkpoint.save(run / "checkpoint", lambda path: write(target, path), state, asdict(cfg))
        dist.barrier()

    def held_out(name, split):
        """Greedy reports on `split`, each rank a shard; the metrics table on rank 0."""
        if not split:
            return None
        if cfg.stage == "expert":
            return expert_metrics(model, split, processing) if rank == 0 else None
        with dist.gathered(wrapped, fsdp):
            mine = greedy_reports(model, tok, split[rank::world], cfg.prompt, max_new_tokens=cfg.max_new_tokens)
        shards = dist.gather_objects(mine)
        if rank != 0:
            return None
        metrics = report_metrics([shards[i % world][i // world] for i in range(len(split))], split, expert)
        print(f"{name} ({len(split)} studies):\n{table({name: metrics})}", flush=True)
        return metrics

    before = held_out(f"{cfg.stage} start, test", test) if grpo_stage and not cfg.resume else None
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        log = open(run / "metrics.jsonl", "a")
        wandb = None
        if cfg.wandb:
            try:
                import wandb
                wandb.init(project=cfg.wandb, config=asdict(cfg))
            except ImportError:
                print("wandb is not installed: logging to metrics.jsonl only")
    t_start, start_step = time.time(), step
    end = min(cfg.steps, step + cfg.stop_after) if cfg.stop_after else cfg.steps

    while step < end:
        t0 = time.time()
        chunk = next(iter(batches), None) or next(iter(batches))  # at the end of an epoch the next one starts
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        batch = collate(chunk, processing, cfg.prompt)
        pixels = batch["pixels"].to(device)
        if cfg.stage == "expert":
            ids, mask = model.tokenize(batch["reports"])
            stats, finite = contrastive_step(wrapped, pixels, ids.to(device), mask.to(device), micro)
        else:
            prompt_ids, prompt_mask = (t.to(device) for t in encode_prompts(tok, model.cfg, batch["prompts"], pixels))
            if grpo_stage:
                stats, finite = grpo_step(cfg, model, wrapped, reference, expert, tok, batch, pixels,
                                          prompt_ids, prompt_mask, weights, cider, step, rank, world, device, micro,
                                          fsdp)
            else:
                stats, finite = sft_step(cfg, model, wrapped, tok, batch, pixels, prompt_ids, prompt_mask, world,
                                         device, micro)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if finite and torch.isfinite(norm):
            optimizer.step()
        else:  # a non-finite loss or gradient (or nothing to learn from): no update, counted
            counters["skipped"] += 1
        optimizer.zero_grad(set_to_none=True)
        step += 1

        seconds = time.time() - t0
        stats |= dict(grad_norm=float(norm), skipped=counters["skipped"], tok_s=stats.pop("tokens") / seconds)
        eta = (time.time() - t_start) / (step - start_step) * (cfg.steps - step)
        if rank == 0:
            shown = " ".join(f"{k} {v:.4g}" for k, v in stats.items())
            print(f"step {step}/{cfg.steps} | {shown} | lr {lr_at(cfg, step - 1):.2e} | {seconds:.1f}s | "
                  f"eta {eta / 60:.1f}m", flush=True)
            log.write(json.dumps(dict(step=step, lr=lr_at(cfg, step - 1), **stats)) + "\n")
            log.flush()
            if wandb:
                wandb.log(stats, step=step)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            held_out(f"{cfg.stage} step {step}, val", val)
        if (cfg.save_every and step % cfg.save_every == 0) or step == end:
            save()
    if step < cfg.steps:
        print0(rank, f"stopped after step {step} (--stop_after); continue with --resume: {run / 'checkpoint'}")
        return None

    after = held_out(f"{cfg.stage} end, test", test)
    if rank == 0 and before is not None:
        print(f"held-out test, before and after the {cfg.stage} stage:\n"
              + table({f"{cfg.stage} start": before, f"{cfg.stage} end": after}))
    print0(rank, f"checkpoint -> {run / 'checkpoint'}")
    return after


# -----------------------------------------------------------------------------
# one step of each stage: accumulate this rank's gradient, return (stats, finite)

def sft_step(cfg, model, wrapped, tok, batch, pixels, prompt_ids, prompt_mask, world, device, micro):
    """Teacher-forced -log p(report, EOS | image, prompt), averaged over every report token of the global batch."""
    reports = [tok.encode(r, add_special_tokens=False).ids[:cfg.max_new_tokens - 1] + model.cfg.eos_token_id[:1]
               for r in batch["reports"]]
    n = max(map(len, reports))
    tokens = torch.tensor([r + [0] * (n - len(r)) for r in reports], device=device)  # (B, n), right-padded
    mask = torch.arange(n, device=device)[None] < torch.tensor([len(r) for r in reports], device=device)[:, None]
    total = dist.all_sum(mask.sum(), device)
    parts, loss_sum = dist.micro_batches(len(reports), micro), 0.0
    for i, s in enumerate(parts):
        with dist.no_sync_unless_last(wrapped, i, len(parts)), dist.autocast(device):
            loss = -wrapped(pixels[s], prompt_ids[s], prompt_mask[s], tokens[s], mask[s]).sum() / total * world
            loss.backward()  # DDP averages over ranks, so * world makes it the global token mean
        loss_sum += loss.item() / world
    loss = float(dist.all_sum(loss_sum, device))
    return {"loss": loss, "tokens": int(total)}, math.isfinite(loss)


def grpo_step(cfg, model, wrapped, reference, expert, tok, batch, pixels, prompt_ids, prompt_mask, weights,
              cider, step, rank, world, device, micro, fsdp):
    """Roll out G reports per study, score them (text rewards, or the expert), and accumulate the GRPO gradient."""
    B, G = len(batch["ids"]), cfg.group_size
    with torch.no_grad(), dist.gathered(wrapped, fsdp), dist.autocast(device):
        model.eval()  # nothing in the model depends on it, but rollouts are inference
        samples = sample(model, prompt_ids, prompt_mask, pixels, group_size=G, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                         generator=generators(cfg, step, rank, world, B, device))
        model.train()
    texts = decode_completions(tok, samples)  # (B*G,), rows b*G .. b*G+G-1 for study b
    text_r, parts = text_reward(texts, [r for r in batch["reports"] for _ in range(G)], weights, cider)
    text_r = torch.as_tensor(text_r).view(B, G)
    rewards = text_r
    if cfg.stage == "visual":  # no reference report: the frozen expert scores each report against its X-ray
        rewards = expert.similarity(batch["first_views"], [texts[b * G:(b + 1) * G] for b in range(B)])
    adv = grpo.group_advantages(rewards, cfg.advantage, text_r, cfg.text_weight if cfg.stage == "visual" else 0)
    zero_var = rewards.max(1).values == rewards.min(1).values  # (B,): nothing to learn from these groups
    keep = torch.arange(B)
    if cfg.dynamic_sampling:  # drop them; every rank keeps as many groups as the poorest rank (DDP-safe)
        keep = torch.nonzero(~zero_var).flatten()
        keep = keep[:dist.all_min(len(keep), device)]
    labels = label_reports(texts)
    stats = {"reward": float(rewards.mean()), "text_reward": float(text_r.mean())} | {
        k: float(v.mean()) for k, v in parts.items()} | {
        "zero_var": float(zero_var.float().mean()), "length": float(samples.mask.sum(1).float().mean()),
        "normal": normal_share(labels)}
    stats = dict(zip(stats, (dist.all_sum(list(stats.values()), device) / world).tolist()))  # global means
    stats["tokens"] = int(dist.all_sum(samples.mask.sum(), device))
    if len(keep) == 0:  # dynamic sampling left nothing (keep has the same length on every rank)
        return stats, False
    rows = (keep[:, None] * G + torch.arange(G)).flatten().to(device)  # the kept groups' sample rows
    k = keep.to(device)
    update, finite = grpo.update(
        wrapped, reference, pixels[k], prompt_ids[k], prompt_mask[k], samples.tokens[rows], samples.mask[rows],
        samples.logprobs[rows], adv.flatten().to(device)[rows], G, micro, world, cfg.temperature, cfg.mu,
        eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, kl=cfg.kl, agg=cfg.agg, max_len=cfg.max_new_tokens)
    return stats | update, finite


class Contrastive(torch.nn.Module):
    """The expert's contrastive loss behind one forward, for DDP's hooks."""

    def __init__(self, expert):
        super().__init__()
        self.expert = expert

    def forward(self, pixels, ids, mask):
        return experts.contrastive_loss(self.expert, pixels, ids, mask)


def contrastive_step(wrapped, pixels, ids, mask, micro):
    """CLIP's loss; each micro-batch's own in-batch negatives (on each rank)."""
    parts, total = dist.micro_batches(len(ids), micro), 0.0
    for i, s in enumerate(parts):
        with dist.no_sync_unless_last(wrapped, i, len(parts)), dist.autocast(pixels.device):
            loss = wrapped(pixels[s], ids[s], mask[s]) / len(parts)
            loss.backward()
        total += loss.item()
    return {"loss": total, "tokens": int(mask.sum())}, math.isfinite(total)


@torch.no_grad()
def expert_metrics(expert, split, processing):
    """Retrieval on held-out studies: how often an X-ray's own report scores highest among all of them (top-1),
    and the clinical agreement of the report it ranks first (reports repeat in a dataset: many are normal)."""
    from nanovalor.data import load_image, preprocess
    expert.eval()
    images = expert.encode_images(preprocess([load_image(s.images[0]) for s in split], processing))
    texts = expert.encode_texts(*expert.tokenize([s.report for s in split]))
    best = (images @ texts.T).argmax(1)  # (N,)
    labels = label_reports([s.report for s in split])
    expert.train()
    metrics = {"top1": float((best == torch.arange(len(split))).float().mean()),
               "clinical_of_top1": float(np.mean([clinical_reward(labels[j], labels[i]) for i, j in
                                                  enumerate(best.tolist())]))}
    print(f"expert on {len(split)} held-out studies: {json.dumps(metrics)}", flush=True)
    return metrics


if __name__ == "__main__":
    main(parse(Config))
