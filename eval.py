"""Evaluate chest X-ray reports: the metric table of radiology report generation papers, for checkpoints or files.

    python eval.py --model out/sft/checkpoint --model out/text/checkpoint --model out/visual/checkpoint --split test
    python eval.py --model DIR --data iu_xray/annotation.json --expert BIOMEDCLIP_DIR --n 500 --results results.md
    python eval.py --hyps generated.txt --refs references.txt [--json scores.json] [--style coco|r2gen]

--model (once per checkpoint): greedy reports for the first view of every study of --split (the first --n; default
data: the phantom world train.py builds, out/phantoms/annotation.json), with the prompt and report length cap each
checkpoint was trained with (its train_config.json) unless --prompt / --max_new_tokens say otherwise. Prints the
markdown table of evaluation.METRICS, one row per model: BLEU-1..4, ROUGE-L, METEOR, CIDEr-D, clinical F1,
hallucination and omission rates, mean length, distinct reports, and the expert's X-ray-report similarity when an
expert is given (default: <out>/expert/checkpoint when --data is a phantom world <out>/phantoms/annotation.json and
that expert exists; --expert none: no expert). --json writes the metrics, the config and every report per model.
Each model also appends one row to --results (default results.jsonl here; a .md file gets markdown rows): date, git
commit (short hash, "-dirty" when tracked files differ from it), model, split, n, the train.py settings that differ
from train.py's defaults for that stage (from train_config.json; stage always given), and the metrics.

--hyps / --refs: one report per line in each file (UTF-8, same number of lines; an empty line is an empty report).
Prints corpus BLEU-1..4, ROUGE-L, METEOR, CIDEr-D (pycocoevalcap's numbers on clean_report tokens; METEOR with exact
+ stem matching only) and clinical F1 (CheXpert-14 rule labeler, uncertain = positive, micro / macro over the 5
competition observations and all 14); --json also writes every sample's values and labels.
"""
import datetime
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nanovalor import expert as experts
from nanovalor import policy as policies
from nanovalor.bert import load_chexbert
from nanovalor.checkpoint import write_atomic
from nanovalor.config import checked, parse
from nanovalor.data import read_dataset
from nanovalor.evaluation import METRICS, evaluate, generation_settings, table, training_config
from nanovalor.generate import load_tokenizer
from nanovalor.nlg import read_reports
from nanovalor.rewards import corpus_metrics
from nanovalor.weights import resolve

# The file mode's rows: corpus_metrics' part of METRICS (BLEU-1 .. F1-14 macro), METEOR named for its matchers.
ROWS = [("METEOR (exact+stem)" if key == "meteor" else name, key) for name, key in METRICS[:11]]
ROOT = Path(__file__).resolve().parent


@dataclass
class Config:
    model: list[str] = field(default_factory=list)  # policy checkpoints (folders or hub ids): one table row each
    split: str = "test"  # the split of --data to evaluate (train, val or test)
    data: str = "out/phantoms/annotation.json"  # annotation.json or .jsonl (a .jsonl file is one split)
    image_root: str = ""  # "": images/ next to the annotation file
    skip_bad: bool = False  # skip (and count) studies whose images are missing or unreadable, instead of stopping
    expert: str = ""  # "": the phantom world's expert when there is one; "none": no expert similarity
    n: int = 0  # evaluate the first n studies of the split; 0: all
    prompt: str = ""  # "": each checkpoint's training prompt (train_config.json), else data.DEFAULT_PROMPT
    max_new_tokens: int = 0  # 0: each checkpoint's training max_new_tokens, else 128
    batch_size: int = 32  # studies per greedy generation batch
    json: str = ""  # write the metrics (and reports, or per-sample values) here
    results: str = "results.jsonl"  # append one row per model (.jsonl: JSON objects; .md: markdown table rows)
    device: str = ""  # "": cuda when available, else cpu
    hyps: str = ""  # the file mode: generated reports, one per line ...
    refs: str = ""  # ... and the references, line by line
    style: str = "coco"  # file mode: text normalisation before the NLG metrics (r2gen: periods are tokens)
    chexbert: str = ""  # CheXbert's chexbert.pth (bert-base-uncased's vocab.txt beside it): its clinical F1s too


def files_mode(cfg):
    if not (cfg.hyps and cfg.refs) or cfg.model:
        raise SystemExit("error: the file mode takes --hyps H and --refs R (and no --model)")
    if cfg.style not in ("coco", "r2gen"):
        raise SystemExit(f"error: --style={cfg.style}: expected coco or r2gen")
    hyps, refs = read_reports(cfg.hyps), read_reports(cfg.refs)
    if len(hyps) != len(refs):
        raise SystemExit(f"error: {cfg.hyps} has {len(hyps)} lines but {cfg.refs} has {len(refs)}: "
                         "expected one report per line in both, in the same order")
    if not hyps:
        raise SystemExit(f"error: {cfg.hyps} is empty: expected one report per line")
    chexbert = checked(load_chexbert, cfg.chexbert) if cfg.chexbert else None
    metrics = corpus_metrics(hyps, refs, style=cfg.style, chexbert=chexbert)
    print(f"{len(hyps)} reports, {cfg.hyps} vs {cfg.refs} (style {cfg.style})")
    print(f"{'metric':<20} {'value':>8}")
    for name, key in ROWS + [(name, key) for name, key in METRICS if key.startswith("chexbert") and key in metrics]:
        print(f"{name:<20} {metrics[key]:>8.4f}")
    if cfg.json:
        record = dict(hyps=cfg.hyps, refs=cfg.refs, style=cfg.style, n=len(hyps), **metrics)
        write_atomic(cfg.json, json.dumps(record, indent=1))
        print(f"per-sample values -> {cfg.json}")


def git_commit():
    """The short hash of the code's commit, "-dirty" when tracked files differ from it ("unknown" outside git)."""
    try:
        git = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, check=True)
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return git("rev-parse", "--short", "HEAD").stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def config_diff(saved):
    """train.py settings (a saved train_config.json) that differ from its defaults for that stage, stage first."""
    if not saved:
        return {}
    import train  # train.py, beside this script: its Config defaults and per-stage defaults
    stage = saved.get("stage", train.Config.stage)
    raw = asdict(train.Config(stage=stage))  # a default is the field's own (e.g. -1) or the stage's (resolved)
    staged = raw | train.STAGES.get(stage, {})
    return {"stage": stage} | {k: v for k, v in saved.items() if k not in raw or v not in (raw[k], staged[k])}


def append_result(path, row):
    """One row, appended in a single write (.md: a table with the header once, every METRICS column, - if absent)."""
    path = Path(path)
    if path.suffix == ".md":
        head = ["date", "commit", "model", "split", "n", "config"] + [name for name, _ in METRICS]
        cells = [row["date"], row["commit"], row["model"], row["split"], row["n"], json.dumps(row["config"])]
        cells += [f"{row['metrics'][k]:.4f}" if k in row["metrics"] else "-" for _, k in METRICS]
        line = "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |\n"
        if not path.exists() or path.stat().st_size == 0:
            line = "| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|\n" + line
    else:
        line = json.dumps(row) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def models_mode(cfg):
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if len(set(cfg.model)) < len(cfg.model):
        raise SystemExit(f"error: --model given twice with the same checkpoint: {cfg.model}")
    for name in cfg.model:  # every checkpoint is there before the first is evaluated
        checked(resolve, name)
    studies = checked(read_dataset, cfg.data, cfg.split, cfg.image_root or None, skip_bad=cfg.skip_bad)[:cfg.n or None]
    if not studies:
        raise SystemExit(f"error: {cfg.data}: no studies in split {cfg.split!r}")
    expert_path = cfg.expert
    world = Path(cfg.data).parent
    if not expert_path and world.name == "phantoms" and (world.parent / "expert" / "checkpoint").exists():
        expert_path = str(world.parent / "expert" / "checkpoint")
    expert = checked(experts.load, expert_path, device) if expert_path not in ("", "none") else None
    chexbert = checked(load_chexbert, cfg.chexbert, device=device) if cfg.chexbert else None
    print(f"{cfg.split} split of {cfg.data}: {len(studies)} studies; expert: {expert_path or 'none'}", file=sys.stderr)

    rows, record = {}, dict(data=cfg.data, split=cfg.split, n=len(studies), expert=expert_path, models={})
    commit = git_commit()  # the code that evaluates every model: two git processes, once
    for name in cfg.model:
        start = time.time()
        model = checked(policies.load, name, device=device)
        tok = checked(load_tokenizer, model.source)
        trained = checked(training_config, model.source)
        prompt, cap = generation_settings(trained, cfg.prompt, cfg.max_new_tokens)
        rows[name], reports = evaluate(model, tok, studies, expert, prompt, cfg.batch_size, cap, chexbert)
        print(f"{name}: {len(studies)} reports in {time.time() - start:.1f} s", file=sys.stderr)
        row = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), commit=commit,
                   model=name, split=cfg.split, n=len(studies), data=cfg.data, config=config_diff(trained),
                   metrics=rows[name])
        append_result(cfg.results, row)
        record["models"][name] = dict(metrics=rows[name], config=row["config"], prompt=prompt, max_new_tokens=cap,
                                      reports=[dict(id=s.id, report=r, reference=s.report)
                                               for s, r in zip(studies, reports)])
        del model
    print(table(rows))
    print(f"{len(rows)} row(s) -> {cfg.results}", file=sys.stderr)
    if cfg.json:
        write_atomic(cfg.json, json.dumps(record, indent=1))
        print(f"metrics and reports -> {cfg.json}", file=sys.stderr)


if __name__ == "__main__":
    config = checked(parse, Config)
    if config.hyps or config.refs:
        files_mode(config)
    elif config.model:
        models_mode(config)
    else:
        raise SystemExit("error: give --model DIR (one or more) and --split, or --hyps H --refs R; see eval.py's "
                         "docstring")
