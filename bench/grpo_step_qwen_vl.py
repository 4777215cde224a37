"""One GRPO step on Qwen2.5-VL, on CPU: nanovalor vs TRL's GRPOTrainer, same weights, images and settings.

    python bench/grpo_step_qwen_vl.py           # 4 X-rays x G=8, 32 new tokens, beta 0.04, best of 3, 1 thread
    python bench/grpo_step_qwen_vl.py --threads 2 --repeats 5

bench/grpo_step.py's measurement (its protocol helpers are imported from it) for a vision-language policy: a random
tiny Qwen2_5_VLForConditionalGeneration (4-block ViT of width 128 with 112-px windows, 4-layer decoder of width 256,
GQA 4/2, M-RoPE) built with transformers and saved with a byte-level BPE (phantom reports, Qwen's special tokens, an
EOS outside the model's vocabulary so that nothing stops early). Each prompt is Qwen2.5-VL's chat template around
one 224 x 224 grayscale X-ray-like image (64 image tokens) and the same question, so no side pads. Both sides train
every parameter (TRL's default), fp32, no gradient checkpointing; TRL gets Qwen2_5_VLProcessor with the PIL image
processor (torchvision, which its video processor needs, is not installed: the processor's class check for it is
skipped). One step: preprocessing, B prompts -> G completions of exactly --new-tokens tokens at T = 1, the shared
reward, group z-score advantages, the reference model's log-probs, the clipped + k3-KL loss (token mean, TRL's
"dapo"), backward, clipping at 1.0, AdamW. Each side in its own process, stepped in turn (A B, B A, ...); throughput
is completions per wall second of the best step (and per CPU second), memory the peak RSS above the baseline taken
once models, reference and optimizer exist.
"""
import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from grpo_step import NEVER, compare, memory_mark, receive, reward, say, send, trl_config  # noqa: E402  (bench/ is on sys.path)

QUESTION = "Describe the findings of the chest X-ray."
PIXELS = dict(min_pixels=56 * 56, max_pixels=224 * 224)  # a 224 x 224 image stays as it is: 16 x 16 patches


def peak_mib():
    return int(re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


def build_world(folder, n_images):
    """Tokenizer, a random tiny Qwen2.5-VL, its preprocessor config and n_images X-ray-like PNGs, in `folder`."""
    import numpy as np
    import torch
    from PIL import Image
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from nanovalor.phantom_reports import write_report
    from nanovalor.phantoms import sample_findings

    rng = np.random.default_rng(0)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
               "<|image_pad|>", "<|video_pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([write_report(sample_findings(rng), rng)[0] for _ in range(600)] + [QUESTION], trainer)
    vocab = tok.get_vocab_size()
    tok.add_special_tokens([NEVER])  # id = vocab: outside the model, never sampled
    tok.save(str(folder / "tokenizer.json"))
    ids = {f"{name}_token_id": tok.token_to_id(f"<|{token}|>") for name, token in [
        ("image", "image_pad"), ("video", "video_pad"), ("vision_start", "vision_start"), ("vision_end", "vision_end")]}
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=2, window_size=112,
                           fullatt_block_indexes=[1, 3], out_hidden_size=256),
        text_config=dict(vocab_size=vocab, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=vocab, pad_token_id=0,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[8, 12, 12])),
        **ids)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = vocab
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(
        image_processor_type="Qwen2VLImageProcessor", patch_size=14, temporal_patch_size=2, merge_size=2, **PIXELS)))
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (224, 224), dtype=np.uint8)).save(folder / f"xray{i}.png")
    return model


# -----------------------------------------------------------------------------
# Workers: one per side, in its own process (bench/grpo_step.py's protocol)

def worker_ours(args, folder):
    import torch
    from tokenizers import Tokenizer

    from nanovalor.data import load_image, preprocess, read_preprocessor_config
    from nanovalor.generate import decode_completions, encode_prompts, sample
    from nanovalor.grpo import (CompletionLogprobs, Rollout, group_advantages, reference_logprobs, reference_model,
                                update)
    from nanovalor.policy import load

    B, G, N = args.prompts, args.group, args.new_tokens
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = load(folder).train()
    model.cfg.eos_token_id = [tok.token_to_id(NEVER)]
    processing = read_preprocessor_config(model.preprocessor_config)
    reference = reference_model(model)  # everything trains: a full copy, as TRL's
    scorer = CompletionLogprobs(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    n_images = len(list(folder.glob("xray*.png")))
    rss, reset = memory_mark()
    say(ready=True, trained=sum(p.numel() for p in params), rss=rss, reset=reset)
    for step in itertools.count():
        if sys.stdin.readline().strip() != "step":
            break
        t0, c0 = time.perf_counter(), time.process_time()
        paths = [folder / f"xray{(step * B + b) % n_images}.png" for b in range(B)]
        images = preprocess([load_image(p) for p in paths], processing)  # PackedImages
        ids, mask = encode_prompts(tok, model.cfg, [QUESTION] * B, images)  # (B, Tp)
        samples = sample(model, ids, mask, images, group_size=G, max_new_tokens=N, generator=generator)
        texts = decode_completions(tok, samples)
        advantages = group_advantages(torch.tensor([reward(t) for t in texts]).view(B, G), "zscore").flatten()
        rollout = Rollout(images, ids, mask, samples.tokens, samples.mask, samples.logprobs, G)
        ref_logp = reference_logprobs(reference, scorer, rollout, micro=B)  # the starting weights swapped in
        update(scorer, rollout, advantages, micro=B, ref_logp=ref_logp, beta=args.beta, eps_low=0.2, eps_high=0.2,
               agg="token_mean")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        say(seconds=time.perf_counter() - t0, cpu=time.process_time() - c0, completions=len(texts),
            tokens=int(samples.mask.sum()), prompt_tokens=int(mask.sum()))
    say(peak=peak_mib(), threads=torch.get_num_threads())


def worker_trl(args, folder):
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, TrainerCallback
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin
    from trl import GRPOTrainer

    sys.path.insert(0, str(ROOT / "tests"))
    from test_qwen_vl import CHAT_TEMPLATE  # Qwen2.5-VL's chat template, as the tests keep it

    check = ProcessorMixin.check_argument_for_proper_class  # its video-processor check needs torchvision
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: (
        None if name == "video_processor" else check(self, name, arg))
    B, G, N = args.prompts, args.group, args.new_tokens
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token=NEVER,
                                  pad_token="<|endoftext|>", padding_side="left")
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(**PIXELS), tokenizer=tok,
                                    video_processor=None, chat_template=CHAT_TEMPLATE)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    paths = sorted(folder.glob("xray*.png"), key=lambda p: int(p.stem[4:]))
    images = [Image.open(p).convert("RGB") for p in paths]
    chat = processor.apply_chat_template(messages, add_generation_prompt=True)
    prompt_len = len(processor(text=[chat], images=images[:1])["input_ids"][0])  # every prompt: one 224-px image
    work = {"completions": 0, "tokens": 0, "prompt_tokens": 0}

    def distinct_words(prompts, completions, completion_ids, **kwargs):  # TRL's reward-function signature
        work["completions"] += len(completions)
        work["tokens"] += sum(len(c) for c in completion_ids)
        work["prompt_tokens"] += prompt_len * (len(prompts) // G)
        return [reward(c[0]["content"]) for c in completions]  # conversational: [{"role": "assistant", ...}]

    class Lockstep(TrainerCallback):
        """Report each step when it ends and wait for the parent's next command (timed from its arrival)."""
        t0 = c0 = None

        def on_step_end(self, targs, state, control, **kwargs):
            say(seconds=time.perf_counter() - self.t0, cpu=time.process_time() - self.c0, **work)
            work.update(completions=0, tokens=0, prompt_tokens=0)
            if sys.stdin.readline().strip() != "step":
                control.should_training_stop = True
            self.t0, self.c0 = time.perf_counter(), time.process_time()
            return control

    config = trl_config(args, folder, B, G, N, shuffle_dataset=False)
    lockstep = Lockstep()
    dataset = Dataset.from_dict({"prompt": [messages] * len(images), "image": images})
    trainer = GRPOTrainer(model=str(folder), reward_funcs=distinct_words, args=config, processing_class=processor,
                          train_dataset=dataset, callbacks=[lockstep])
    torch.set_num_threads(args.threads)  # again, in case a library changed it
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    rss, reset = memory_mark()
    say(ready=True, trained=trained, rss=rss, reset=reset)
    if sys.stdin.readline().strip() == "step":
        lockstep.t0, lockstep.c0 = time.perf_counter(), time.process_time()
        trainer.train()
    say(peak=peak_mib(), threads=torch.get_num_threads())


# -----------------------------------------------------------------------------
# Parent: build, check, drive both workers in turn, print the table

def start(side, args, folder):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    options = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
               if k not in ("worker", "folder", "verbose")]
    cmd = [sys.executable, __file__, "--worker", side, "--folder", str(folder), *options]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def run_sides(args, folder):
    """Both workers, set up one after the other (not timed), then stepped in turn; {name: (ready, steps, end)}."""
    procs, ready, steps, end = {}, {}, {}, {}
    try:
        for name, side in (("nanovalor", "ours"), ("TRL GRPOTrainer", "trl")):
            procs[name] = start(side, args, folder)
            ready[name], steps[name] = receive(procs[name], args.verbose), []
        for i in range(1 + args.repeats):  # step 0 is the warm-up
            for name in list(procs)[::1 if i % 2 == 0 else -1]:
                send(procs[name], "step")
                steps[name].append(receive(procs[name], args.verbose))
        for name, proc in procs.items():
            send(proc, "quit")
            end[name] = receive(proc, args.verbose)
            proc.wait()
        return {name: (ready[name], steps[name], end[name]) for name in procs}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def main(args):
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from PIL import Image

    from nanovalor.data import PackedImages
    from nanovalor.policy import load
    torch.set_num_threads(args.threads)
    B, G, N = args.prompts, args.group, args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        hf = build_world(folder, B * (args.repeats + 2))
        ours = load(folder)
        pixels = Qwen2VLImageProcessorPil(**PIXELS)([Image.open(folder / "xray0.png").convert("RGB")],
                                                    return_tensors="pt")
        image = ours.cfg.image_token_id
        ids = torch.tensor([[5, ours.cfg.vision_start_token_id] + [image] * 64 + [ours.cfg.vision_end_token_id, 9]])
        with torch.no_grad():
            ref = hf(input_ids=ids, pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"],
                     mm_token_type_ids=(ids == image).long()).logits
            diff = float((ref - ours(ids, PackedImages(pixels["pixel_values"], pixels["image_grid_thw"]))).abs().max())
        if diff > 1e-4:
            raise SystemExit(f"the two models disagree: max |logits difference| {diff}")
        n_params = sum(p.numel() for p in hf.parameters())
        del hf, ours
        results = run_sides(args, folder)

    threads = {name: end["threads"] for name, (_, _, end) in results.items()}
    print(f"# one GRPO step on CPU: tiny Qwen2.5-VL ({n_params / 1e6:.2f}M parameters), {B} X-rays (64 image tokens "
          f"each) x G={G}, {N} new tokens, beta {args.beta}, fp32, all parameters trained; best of {args.repeats} "
          f"steps after 1 warm-up; torch threads {threads}; torch {torch.__version__}")
    print(f"# same weights: max |logits difference| on an image prompt {diff:.1e}")
    _, same = compare(results, B, G, N)
    if not same:
        raise SystemExit("the two sides did not do the same work: the comparison above is not valid")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=4, help="B prompts (X-rays) per step")
    parser.add_argument("--group", type=int, default=8, help="G completions per prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="show what the libraries print")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.verbose:
        os.environ.update(TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1",
                          TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore::FutureWarning")
        warnings.filterwarnings("ignore", category=FutureWarning)
    if args.worker is None:
        main(args)
    else:
        import torch
        torch.set_num_threads(args.threads)
        (worker_ours if args.worker == "ours" else worker_trl)(args, Path(args.folder))
