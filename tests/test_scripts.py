"""Tests of the entry scripts sample.py and eval.py --model, on tiny checkpoints built here (a phantom world of 20
studies, random tiny policies and expert); the scripts run as subprocesses on CPU, as a user runs them.
(eval.py --hyps --refs is tested in test_rewards.py.)

    python -m pytest -q tests/test_scripts.py
"""
import importlib.util
import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from nanovalor import expert as experts
from nanovalor import phantoms, policy
from nanovalor.data import DEFAULT_PROMPT, Study, load_image, preprocess, read_dataset, read_preprocessor_config
from nanovalor.evaluation import METRICS, evaluate, greedy_reports
from nanovalor.generate import chat_prompt, encode_prompt, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Report the findings."  # the prompt the "text" checkpoint was trained with: eval.py must use it


def script(name):
    """sample.py / eval.py / train.py as a module (their command-line part runs only as __main__)."""
    spec = importlib.util.spec_from_file_location(f"script_{Path(name).stem}", ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start(name, *args, cwd=ROOT):
    return subprocess.Popen([sys.executable, str(ROOT / name), *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(name, *args, cwd=ROOT):
    out, err = start(name, *args, cwd=cwd).communicate(timeout=300)
    return out, err


def tiny_policy(world, seed):
    """The phantom world's tiny policy with its weights shaken (std 0.1), so that different X-rays get different
    reports and attention is far from uniform."""
    torch.manual_seed(seed)
    model = phantoms.tiny_policy(world)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder laid out as train.py's out/: phantoms/ (12 / 2 / 6 studies), sft/checkpoint (no train_config.json),
    text/checkpoint (with one, as train.py writes it), expert/checkpoint."""
    out = tmp_path_factory.mktemp("out")
    phantoms.generate(out / "phantoms", 12, 2, 6, seed=0, progress=False)
    policy.save(tiny_policy(out / "phantoms", 0), out / "sft" / "checkpoint")
    policy.save(tiny_policy(out / "phantoms", 1), out / "text" / "checkpoint")
    train = script("train.py")
    cfg = train.Config(stage="text", lr=3e-5, group_size=4, prompt=PROMPT)  # then filled in as train.prepare() does
    cfg = replace(cfg, **{k: train.STAGES["text"][k] for k in ("steps", "batch_size", "train", "warmup", "eval_every")})
    (out / "text" / "checkpoint" / "train_config.json").write_text(json.dumps(asdict(cfg)))
    torch.manual_seed(2)
    experts.save(phantoms.tiny_expert(out / "phantoms"), out / "expert" / "checkpoint")
    return out


# ---------------------------------------------------------------------------------------------------- sample.py

def test_sample_prints_one_report_per_image_and_writes_the_heatmap(world, tmp_path):
    images = [world / "phantoms" / "images" / "test" / f"phantom-test-0000{i}.png" for i in (0, 3)]
    out, err = run("sample.py", "--model", world / "sft" / "checkpoint", "--image", images[0], "--image", images[1],
                   "--max_new_tokens", 10, "--heatmap", tmp_path / "map.png", "--device", "cpu")
    lines = out.splitlines()
    assert len(lines) == 2, out + err
    model = policy.load(world / "sft" / "checkpoint")
    expected = greedy_reports(model, load_tokenizer(model.source), [Study(str(i), [str(i)], "") for i in images],
                              max_new_tokens=10)
    assert expected[0] != expected[1]  # the two X-rays really get different reports
    assert lines == [f"{i}: {r}" for i, r in zip(images, expected)]
    heat = Image.open(tmp_path / "map.png")
    assert heat.format == "PNG" and heat.mode == "RGB" and heat.size == (2 * 128, 128)  # two 128 px panels
    pixels = np.asarray(heat).astype(int)
    assert (pixels[..., 0] != pixels[..., 2]).any()  # coloured, not the grey X-ray alone
    assert not np.array_equal(pixels[:, :128], pixels[:, 128:])
    assert err.count("of the attention") == 2 and not list(tmp_path.glob("*.tmp*"))


def test_attention_probabilities_equal_transformers_eager_attention(world):
    """sample.attention_probs rebuilds softmax(q k^T / sqrt(d)) from hooks: it must equal transformers' eager
    attention weights (float64 models; transformers takes the softmax in fp32, hence 1e-6), and reproduce each of
    our decoder layers' SDPA output (probs @ v, then o_proj) to float64 precision."""
    transformers = pytest.importorskip("transformers")
    sample = script("sample.py")
    folder = world / "sft" / "checkpoint"
    model = policy.load(folder, torch.float64)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager")
    hf = hf.double().eval()
    prompt = encode_prompt(load_tokenizer(folder), chat_prompt(model.cfg, DEFAULT_PROMPT), model.cfg)
    ids = torch.tensor([prompt + [17, 250, 9, 31, 2]])  # (1, T): prompt, 4 report tokens and EOS
    processing = read_preprocessor_config(model.preprocessor_config)
    image = load_image(world / "phantoms" / "images" / "test" / "phantom-test-00001.png")
    pixels = preprocess([image], processing).double()
    queries = torch.arange(len(prompt) - 1, ids.shape[1] - 1)  # (5,): the positions that predicted the report

    probs = sample.attention_probs(model, ids, pixels, queries)  # (L, H, 5, T)
    with torch.no_grad():
        attentions = hf(input_ids=ids, pixel_values=pixels, output_attentions=True).attentions
    reference = torch.stack(attentions)[:, 0][:, :, queries]  # L x (1, H, T, T) -> (L, H, 5, T)
    assert probs.shape == (4, 6, 5, ids.shape[1]) and reference.shape == probs.shape and probs.dtype == torch.float64
    assert probs.max() > 0.2  # far from uniform over ~75 keys, so the comparison means something
    torch.testing.assert_close(probs, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 6, 5, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (probs[:, :, 0, queries[0] + 1:] == 0).all() and (probs[:, :, 0, :queries[0] + 1] > 0).all()  # causal

    caught = {}  # our model's own SDPA path: each layer's attention output and values
    for i, block in enumerate(model.language_model.layers):
        block.self_attn.register_forward_hook(lambda m, a, out, i=i: caught.__setitem__(("out", i), out))
        block.self_attn.v_proj.register_forward_hook(lambda m, a, out, i=i: caught.__setitem__(("v", i), out))
    with torch.no_grad():
        model.hidden_states(ids, pixels)
        for i, block in enumerate(model.language_model.layers):
            v = caught["v", i].view(ids.shape[1], 2, 32).transpose(0, 1).repeat_interleave(3, 0)  # (H, T, hd)
            y = (probs[i] @ v).transpose(0, 1).reshape(len(queries), -1)  # (5, H * hd)
            torch.testing.assert_close(block.self_attn.o_proj(y), caught["out", i][0, queries], rtol=0, atol=1e-12)


def test_image_attention_on_hand_numbers():
    """probs over 2 text and 4 image tokens (a 2 x 2 patch grid): mean over layers, heads and queries."""
    sample = script("sample.py")
    cfg = SimpleNamespace(image_token_id=9, vision=SimpleNamespace(image_size=32, patch_size=16))
    ids = torch.tensor([[5, 9, 9, 9, 9, 6]])
    probs = torch.tensor([[0.1, 0.3, 0.1, 0.2, 0.1, 0.2], [0.3, 0.1, 0.1, 0.0, 0.3, 0.2]])  # two queries
    probs = torch.stack([probs, probs.flip(0)])[None]  # (L=1, H=2, n=2, T=6)
    heat, share = sample.image_attention(SimpleNamespace(cfg=cfg), probs, ids)
    torch.testing.assert_close(heat, torch.tensor([[0.2, 0.1], [0.1, 0.2]]))  # row-major patches
    assert share == pytest.approx(0.6)
    with_class = torch.tensor([[9, 9, 9, 9, 9, 6]])  # feature_select "full": the class token comes first
    heat, share = sample.image_attention(SimpleNamespace(cfg=cfg), probs, with_class)
    torch.testing.assert_close(heat, torch.tensor([[0.2, 0.1], [0.1, 0.2]]))
    assert share == pytest.approx(0.8)


def test_overlay_puts_a_patch_where_it_is():
    """One hot patch (row 2, column 5 of an 8 x 8 grid) over a flat grey 128 px image: coloured there, grey away
    from it and at the transposed patch (row 5, column 2)."""
    sample = script("sample.py")
    heat = np.zeros((8, 8))
    heat[2, 5] = 1.0
    out = np.asarray(sample.overlay(Image.new("RGB", (128, 128), (101, 101, 101)), heat)).astype(int)
    assert out.shape == (128, 128, 3)
    r, g, b = out[2 * 16 + 8, 5 * 16 + 8]  # the patch's centre: dark red (0.5, 0, 0) at opacity ~0.6
    assert r > 110 and g == b and g < 45
    assert (out[5 * 16 + 8, 2 * 16 + 8] == 101).all() and (out[120, 8] == 101).all()
    outside = np.ones((128, 128), dtype=bool)
    outside[16:64, 64:112] = False  # the patch and half of each neighbour: bilinear upsampling reaches no further
    assert (out[outside] == 101).all() and (out[~outside] != 101).any()


def test_model_view_is_the_image_the_model_saw(world):
    sample = script("sample.py")
    image = load_image(world / "phantoms" / "images" / "test" / "phantom-test-00002.png")  # 128 px: no resizing
    processing = read_preprocessor_config(phantoms.PREPROCESSOR)
    view = sample.model_view(preprocess([image], processing)[0], processing)
    assert np.array_equal(np.asarray(view), np.asarray(image))


# ---------------------------------------------------------------------------------------------------- eval.py

def test_eval_models_table_json_and_results_rows(world, tmp_path):
    (tmp_path / "results.jsonl").write_text('{"an": "earlier row"}\n')
    models = [world / "sft" / "checkpoint", world / "text" / "checkpoint"]
    out, err = run("eval.py", "--model", models[0], "--model", models[1], "--split", "test", "--data",
                   world / "phantoms" / "annotation.json", "--n", 4, "--max_new_tokens", 8, "--json",
                   tmp_path / "e.json", "--device", "cpu", cwd=tmp_path)
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["n"] == 4 and saved["expert"] == str(world / "expert" / "checkpoint"), err  # the default expert
    studies = read_dataset(world / "phantoms" / "annotation.json", "test")[:4]
    expert = experts.load(world / "expert" / "checkpoint")
    table = out.splitlines()
    assert table[0].startswith("| run | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 |") and "| expert sim |" in table[0]
    for row, folder, prompt in zip(table[2:], models, [DEFAULT_PROMPT, PROMPT]):
        model = policy.load(folder)
        metrics, reports = evaluate(model, load_tokenizer(folder), studies, expert, prompt, max_new_tokens=8)
        record = saved["models"][str(folder)]
        assert record["prompt"] == prompt and record["max_new_tokens"] == 8
        assert [r["report"] for r in record["reports"]] == reports
        assert record["metrics"] == pytest.approx(metrics, rel=1e-6, abs=1e-9)
        cells = [c.strip() for c in row.strip("|").split("|")]
        shown = [key for _, key in METRICS if not key.startswith("chexbert")]  # CheXbert columns need --chexbert
        assert cells[0] == str(folder) and cells[1] == f"{metrics['bleu1']:.4f}" and len(cells) == len(shown) + 1

    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[0] == {"an": "earlier row"}  # appended after what was there
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    for row, folder in zip(rows[1:], models):
        assert row["commit"] in (head.stdout.strip(), head.stdout.strip() + "-dirty")
        assert row["model"] == str(folder) and row["split"] == "test" and row["n"] == 4 and row["date"][:2] == "20"
        assert row["metrics"] == saved["models"][str(folder)]["metrics"]
    assert rows[1]["config"] == {}  # no train_config.json beside the first checkpoint
    assert rows[2]["config"] == {"stage": "text", "lr": 3e-5, "group_size": 4, "prompt": PROMPT}  # not steps etc.


def test_eval_results_markdown_rows(tmp_path):
    append_result = script("eval.py").append_result
    row = dict(date="2025-01-02T03:04:05+00:00", commit="abc1234-dirty", model="out/a|b", split="test", n=3,
               config={"stage": "visual"}, metrics={key: 0.5 for _, key in METRICS if key != "expert_sim"})
    append_result(tmp_path / "r.md", row)
    append_result(tmp_path / "r.md", row | {"metrics": {key: 0.25 for _, key in METRICS}})
    lines = (tmp_path / "r.md").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| date | commit | model | split | n | config | BLEU-1 |")
    cells = [c.strip() for c in lines[2].strip("|").split(" | ")]
    assert cells[:6] == ["2025-01-02T03:04:05+00:00", "abc1234-dirty", "out/a\\|b", "test", "3", '{"stage": "visual"}']
    assert cells[6:] == ["-" if key == "expert_sim" else "0.5000" for _, key in METRICS]
    assert lines[3].count("0.2500") == len(METRICS)


def test_bad_inputs_give_one_clear_error(world, tmp_path):
    model, data = world / "sft" / "checkpoint", world / "phantoms" / "annotation.json"
    image = world / "phantoms" / "images" / "test" / "phantom-test-00000.png"
    cases = {  # (script, arguments): what the one error line must name
        ("sample.py", "--model", tmp_path / "nope", "--image", image): f"{tmp_path / 'nope'}: no such model folder",
        ("sample.py", "--model", model, "--image", tmp_path / "gone.png"): f"{tmp_path / 'gone.png'}: image file not",
        ("eval.py", "--model", tmp_path / "nope", "--data", data): f"{tmp_path / 'nope'}: no such model folder",
        ("eval.py", "--model", model, "--data", data, "--split", "tset"): "expected an object with a list under 'tset'",
    }
    running = {case: start(*case, cwd=tmp_path) for case in cases}  # side by side: each is mostly torch's import
    for case, process in running.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 1 and out == "" and "Traceback" not in err, (case, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and cases[case] in err, (case, err)
    assert not list(tmp_path.glob("results*"))  # nothing written on the way out
