"""One GRPO step on CPU: nanovalor vs TRL's GRPOTrainer on the same weights and settings.

    python bench/grpo_step.py                      # text-only: 4 prompts x G=8, 32 prompt + 64 new tokens, 1 thread
    python bench/grpo_step.py --image-tokens 576   # VALOR's shape: a LLaVA, an X-ray-sized image prompt per study
    python bench/grpo_step.py --image-tokens 144 --new-tokens 128 --repeats 3

The world: a byte-level BPE (nanovalor.phantoms.train_tokenizer, vocabulary 2048) trained on phantom reports and
made-up words, and a random tiny Qwen2 decoder (hidden 256, 4 layers, GQA 4/2 heads) built with transformers and
saved. TRL loads it by path (with beta > 0 it rebuilds its reference model from that path).
- Text-only (--image-tokens 0): a Qwen2ForCausalLM; nanovalor puts the same decoder weights into a Llava with a tiny
  ViT that text-only prompts never call. Prompts: phantom-report prefixes of exactly --prompt-tokens tokens.
- Image prompts (--image-tokens P, a square): a LlavaForConditionalGeneration (CLIP ViT with 14-px patches on
  14 sqrt(P)-px images: 144 or 576 patch tokens, as LLaVA-1.5's ViT-L/14-336 gives 576; the same Qwen2 decoder)
  that nanovalor.policy.load reads as it is. Every study is one random X-ray-sized image with VALOR's fixed
  instruction, "USER: <image>\n<instruction> ASSISTANT:" (P image + 35 text tokens). TRL gets the images and
  conversational prompts through a LlavaProcessor (PIL image processor, a chat template giving the same text);
  the ViT is frozen on both sides (VALOR's text stage trains projector, decoder and head). The parent checks that
  both sides give the same logits, the same prompt ids and the same pixel values before timing.

One step, on both sides: B prompts -> G completions each of exactly --new-tokens tokens (EOS is a token outside the
model's vocabulary, so it is never sampled and nothing stops early; the image token is never sampled either:
nanovalor bans it, TRL gets suppress_tokens), sampled at T = 1 with no top-k / top-p -> the same reward function on
the decoded texts -> group z-score advantages -> the reference model's log-probs -> the clipped + k3-KL loss (token
mean over the batch, TRL's "dapo") -> backward -> gradient clipping at 1.0 -> AdamW (torch, not fused, no weight
decay, constant lr). fp32 and no gradient checkpointing on both sides (TRL's GRPOConfig defaults bf16 and
checkpointing on; here off).

Measurement: each side runs in its own subprocess; the parent drives them one step at a time in turn (A, B, B, A,
...), so a noisy neighbour slows both alike and neither competes with the other for the CPUs. Throughput is B*G
completions per wall second of the whole step (data, generation, rewards, reference, loss, backward, optimizer),
best of --repeats steps after one warm-up step (and per CPU second of the process, which a busy neighbour disturbs
less: time spent descheduled is not counted), on the same number of torch threads (--threads; 1 by default: on
a shared machine a multi-threaded GEMM stalls whenever a neighbour holds a core). Memory is the peak resident set
size (VmHWM, reset through /proc/self/clear_refs once the models, reference and optimizer exist) minus the RSS at
that point: what the steps themselves add (activations, KV caches, AdamW state, allocator slack). RSS, not
tracemalloc, because tracemalloc sees only Python's allocator and none of torch's tensors. The total peak RSS is
printed too, but it includes the libraries each side imports (transformers + TRL + datasets vs torch alone).
A second table splits each side's best step into generation, the reference model's pass and the rest (rewards,
policy forward + backward, optimizer), timed around the calls that do them.
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

NEVER = "<never>"  # the EOS of both sides: id = the model's vocab size, so it can never be sampled
IMAGE = "<image>"  # train_tokenizer's special token 4: the image placeholder, expanded to P tokens
INSTRUCTION = "Describe the findings of this chest X-ray."  # VALOR: one instruction
CHAT_TEMPLATE = (  # for TRL's LlavaProcessor: renders nanovalor's "short" format, generate.short_prompt
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}")
MSG = "@@bench "  # prefix of the protocol lines the workers print on stdout


def reward(text):
    """The shared, cheap, deterministic reward: the share of distinct words in a completion."""
    words = text.split()
    return len(set(words)) / len(words) if words else 0.0


# -----------------------------------------------------------------------------
# The world: tokenizer, prompts, weights (parent process)

def build_world(folder, n_prompts, prompt_tokens, image_tokens):
    """Tokenizer, a random tiny Qwen2ForCausalLM (text-only) or LlavaForConditionalGeneration (image_tokens > 0)
    and n_prompts prompts (text-only: equal-length report prefixes; else one random image each), all in `folder`."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import (CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast,
                              Qwen2Config, Qwen2ForCausalLM)

    from nanovalor.phantom_reports import write_report
    from nanovalor.phantoms import sample_findings, train_tokenizer

    rng = np.random.default_rng(0)
    reports = [write_report(sample_findings(rng), rng)[0] for _ in range(600)]
    # The reports alone give ~930 tokens; sentences of made-up words fill the vocabulary up to 2048.
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    words = ["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(3000)]
    filler = [" ".join(rng.choice(words, 12)) for _ in range(400)]
    tok = train_tokenizer(reports + filler, folder / "bpe.json", vocab_size=2048)
    vocab = tok.get_vocab_size()  # the model's vocabulary; NEVER is added after it
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=NEVER, pad_token="<pad>",
                                     unk_token="<unk>")
    assert hf_tok.eos_token_id == vocab, (hf_tok.eos_token_id, vocab)
    hf_tok.save_pretrained(folder)  # tokenizer.json (with NEVER) for both sides

    torch.manual_seed(0)
    text = Qwen2Config(vocab_size=vocab, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=vocab, pad_token_id=3)
    if image_tokens:
        side = 14 * round(image_tokens ** 0.5)
        if (side // 14) ** 2 != image_tokens:
            raise SystemExit(f"--image-tokens {image_tokens}: expected a square (144, 576, ...)")
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=side, patch_size=14)
        config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_seq_length=image_tokens,
                             image_token_index=tok.token_to_id(IMAGE), tie_word_embeddings=False)
        model = LlavaForConditionalGeneration(config).eval()
        from transformers import CLIPImageProcessorPil
        CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
            folder)  # preprocessor_config.json, which both sides read
        (folder / "images").mkdir()
        prompts = []
        for i in range(n_prompts):  # random X-ray-sized grey images (their content does not matter to random weights)
            pixels = rng.integers(0, 256, (side, side), dtype=np.uint8)
            Image.fromarray(pixels, "L").convert("RGB").save(folder / "images" / f"{i}.png")
            prompts.append(f"images/{i}.png")
    else:
        model = Qwen2ForCausalLM(text).eval()
        prompts = []
        for report in reports:  # the longest word prefix of each report, kept when it is exactly prompt_tokens long
            words = report.split()
            n = max((k for k in range(1, len(words) + 1)
                     if len(tok.encode(" ".join(words[:k])).ids) <= prompt_tokens), default=0)
            if n and len(tok.encode(" ".join(words[:n])).ids) == prompt_tokens:
                prompts.append(" ".join(words[:n]))
        if len(prompts) < n_prompts:
            raise SystemExit(f"only {len(prompts)} phantom-report prefixes are exactly {prompt_tokens} tokens long")
    model.generation_config.eos_token_id = vocab
    model.save_pretrained(folder)
    (folder / "prompts.json").write_text(json.dumps(prompts[:n_prompts]))
    return model, prompts[:n_prompts]


def llava_processor(folder):
    """TRL's processing class for the image world: the PIL image processor (no torchvision), the tokenizer, and a
    chat template that renders what nanovalor's prompt is."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    return LlavaProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(folder),
                          tokenizer=PreTrainedTokenizerFast.from_pretrained(folder), patch_size=14,
                          vision_feature_select_strategy="default", image_token=IMAGE, num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def load_ours(folder, image_tokens):
    """nanovalor's policy for the world in `folder`, with what TRL trains trainable (the ViT frozen)."""
    from nanovalor.decoder import decoder_config_from_hf
    from nanovalor.policy import Llava, LlavaConfig, load
    from nanovalor.weights import read_checkpoint
    from nanovalor.vit import VisionConfig

    if image_tokens:  # the saved LlavaForConditionalGeneration, as it is
        model = load(folder)
        model.vision_tower.requires_grad_(False)
        return model
    # text-only: the saved Qwen2 decoder inside a Llava (tiny unused ViT and projector, both frozen)
    text = decoder_config_from_hf(json.loads((folder / "config.json").read_text()), str(folder / "config.json"))
    vision = VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=1,
                          num_heads=2)
    model = Llava(LlavaConfig(vision=vision, text=text, image_token_id=text.vocab_size + 1,
                              eos_token_id=[text.vocab_size]))  # NEVER: what sample() stops at
    # transformers' Qwen2ForCausalLM names -> ours: model.* -> language_model.*, lm_head.* as it is
    weights, unmapped = read_checkpoint(folder, [("model.", "language_model."), ("lm_head.", "lm_head.")])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith(("vision_tower.", "multi_modal_projector."))]
    if missing or unmapped or unexpected:
        raise SystemExit(f"the decoder weights do not map onto nanovalor's Llava: missing {missing}, "
                         f"unexpected {unmapped + unexpected}")
    model.vision_tower.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(False)  # text-only: what trains is what TRL trains
    return model


# -----------------------------------------------------------------------------
# Workers: one per side, in its own process. Protocol: print MSG + json; read "step" or "quit" from stdin.

def say(**fields):
    print(MSG + json.dumps(fields), flush=True)


def memory_mark():
    """RSS now (MiB); the kernel's peak-RSS mark is reset so that later peaks are the steps' own."""
    rss = _status_mib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:  # no reset: fall back on the lifetime peak (an overestimate of the steps' own)
        reset = False
    return rss, reset


def _status_mib(field):
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


def timed(phases, name, fn, when=lambda: True):
    """fn, with the wall time of its calls (those for which when() holds) added to phases[name]."""
    def wrapper(*args, **kwargs):
        if not when():
            return fn(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
    return wrapper


def no_grad():  # the reference model's pass is the one that runs without autograd
    import torch
    return not torch.is_grad_enabled()


def worker_ours(args, folder, prompts):
    import torch
    from tokenizers import Tokenizer

    from nanovalor import generate
    from nanovalor.generate import decode_completions, encode_prompt, left_pad, short_prompt
    from nanovalor.grpo import (CompletionLogprobs, Rollout, group_advantages, reference_logprobs, reference_model,
                                update)

    B, G, N = args.prompts, args.group, args.new_tokens
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = load_ours(folder, args.image_tokens)
    reference = reference_model(model)  # the starting weights of what trains, swapped in for the KL pass
    scorer = CompletionLogprobs(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    if args.image_tokens:
        from PIL import Image

        from nanovalor.data import preprocess, read_preprocessor_config
        proc = read_preprocessor_config(folder)
        prompt = encode_prompt(tok, short_prompt(INSTRUCTION), model.cfg)  # the same for every study
    phases = {}
    sample = timed(phases, "generate", generate.sample)
    CompletionLogprobs.forward = timed(phases, "reference", CompletionLogprobs.forward, when=no_grad)
    rss, reset = memory_mark()
    say(ready=True, trained=sum(p.numel() for p in params), rss=rss, reset=reset)
    for step in itertools.count():
        if sys.stdin.readline().strip() != "step":
            break
        phases.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        batch = [prompts[(step * B + b) % len(prompts)] for b in range(B)]
        if args.image_tokens:  # one X-ray per study: (B, 3, S, S), each through the ViT once per pass
            pixels = preprocess([Image.open(folder / p) for p in batch], proc)
            ids, mask = left_pad([prompt] * B, pad_token_id=3)
        else:  # text-only prompts: CompletionLogprobs encodes no image
            pixels = torch.zeros(0, 3, 16, 16)
            ids, mask = left_pad([tok.encode(p).ids for p in batch], pad_token_id=3)  # (B, Tp)
        samples = sample(model, ids, mask, pixels if args.image_tokens else None, group_size=G, max_new_tokens=N,
                         generator=generator)
        texts = decode_completions(tok, samples)  # (B*G,)
        rewards = torch.tensor([reward(t) for t in texts]).view(B, G)
        advantages = group_advantages(rewards, "zscore").flatten()  # (B*G,)
        rollout = Rollout(pixels, ids, mask, samples.tokens, samples.mask, samples.logprobs, G)
        ref_logp = reference_logprobs(reference, scorer, rollout, micro=B)  # the starting weights swapped in
        update(scorer, rollout, advantages, micro=B, ref_logp=ref_logp, beta=args.beta, eps_low=0.2, eps_high=0.2,
               agg="token_mean")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        say(seconds=time.perf_counter() - t0, cpu=time.process_time() - c0, completions=len(texts),
            tokens=int(samples.mask.sum()), prompt_tokens=int(mask.sum()), phases=phases)
    say(peak=_status_mib("VmHWM"), threads=torch.get_num_threads())


def trl_config(args, folder, B, G, N, **extra):
    """TRL's GRPOConfig for the step ours takes: B prompts x G completions of N tokens in one optimizer step, the
    DAPO token mean, group z-scores, one pass, beta, clip 0.2, AdamW at a constant lr, fp32 on CPU, no logging."""
    from trl import GRPOConfig
    return GRPOConfig(
        output_dir=str(folder / "trl"), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
        logging_steps=10 ** 6, seed=0, max_steps=10 ** 6, per_device_train_batch_size=B * G,
        gradient_accumulation_steps=1, num_generations=G, max_completion_length=N, temperature=1.0, top_k=0,
        top_p=1.0, beta=args.beta, epsilon=0.2, loss_type="dapo", scale_rewards="group", num_iterations=1,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", weight_decay=0.0,
        max_grad_norm=1.0, bf16=False, activation_checkpointing=False, **extra)


def worker_trl(args, folder, prompts):
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOTrainer

    B, G, N = args.prompts, args.group, args.new_tokens
    work = {"completions": 0, "tokens": 0, "prompt_tokens": 0}
    if args.image_tokens:  # conversational prompts with an image each, through a LlavaProcessor
        from PIL import Image
        from transformers import LlavaForConditionalGeneration

        processing_class = llava_processor(folder)
        tok = processing_class.tokenizer
        n_prompt = json.loads((folder / "world.json").read_text())["prompt_tokens"]  # checked by the parent
        data = {"prompt": [[{"role": "user", "content": INSTRUCTION}] for _ in prompts],
                "image": [Image.open(folder / p) for p in prompts]}
        model = LlavaForConditionalGeneration.from_pretrained(folder)  # config._name_or_path: the reference's path
        model.model.vision_tower.requires_grad_(False)  # as nanovalor's text stage: the ViT stays frozen
        extra = dict(generation_kwargs={"suppress_tokens": [tok.convert_tokens_to_ids(IMAGE)]})
    else:
        processing_class = tok = PreTrainedTokenizerFast.from_pretrained(folder)
        data, model, extra = {"prompt": prompts}, str(folder), {}

    def distinct_words(prompts, completions, completion_ids, **kwargs):  # TRL's reward-function signature
        work["completions"] += len(completions)
        work["tokens"] += sum(len(c) for c in completion_ids)
        if args.image_tokens:
            work["prompt_tokens"] += n_prompt * len(prompts[::G])
            completions = [c[-1]["content"] for c in completions]  # conversational: the assistant's message
        else:
            work["prompt_tokens"] += sum(len(tok(p, add_special_tokens=False).input_ids) for p in prompts[::G])
        return [reward(c) for c in completions]

    phases = {}

    class Lockstep(TrainerCallback):
        """Report each step when it ends and wait for the parent's next command (timed from its arrival)."""
        t0 = c0 = None

        def on_step_end(self, targs, state, control, **kwargs):
            say(seconds=time.perf_counter() - self.t0, cpu=time.process_time() - self.c0, **work, phases=phases)
            work.update(completions=0, tokens=0, prompt_tokens=0)
            phases.clear()
            if sys.stdin.readline().strip() != "step":
                control.should_training_stop = True
            self.t0, self.c0 = time.perf_counter(), time.process_time()
            return control

    config = trl_config(args, folder, B, G, N, **extra)
    lockstep = Lockstep()
    trainer = GRPOTrainer(model=model, reward_funcs=distinct_words, args=config, processing_class=processing_class,
                          train_dataset=Dataset.from_dict(data), callbacks=[lockstep])
    trainer._generate_single_turn = timed(phases, "generate", trainer._generate_single_turn)
    trainer._get_per_token_logps_and_entropies = timed(phases, "reference", trainer._get_per_token_logps_and_entropies,
                                                       when=no_grad)
    torch.set_num_threads(args.threads)  # again, in case a library changed it
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    rss, reset = memory_mark()
    say(ready=True, trained=trained, rss=rss, reset=reset)
    if sys.stdin.readline().strip() == "step":
        lockstep.t0, lockstep.c0 = time.perf_counter(), time.process_time()
        trainer.train()
    say(peak=_status_mib("VmHWM"), threads=torch.get_num_threads())


# -----------------------------------------------------------------------------
# Parent: build, check, drive both workers in turn, print the table

def start(side, args, folder):
    """A worker process for `side` ("ours" or "trl") with this run's arguments and thread count."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    options = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
               if k not in ("worker", "folder", "verbose")]
    cmd = [sys.executable, __file__, "--worker", side, "--folder", str(folder), *options]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def receive(proc, verbose):
    """The worker's next protocol message (a dict)."""
    for line in proc.stdout:
        if line.startswith(MSG):
            return json.loads(line[len(MSG):])
        if verbose:  # what a library printed on stdout (TRL: its end-of-training summary); errors go to stderr
            print(line, end="", file=sys.stderr)
    raise SystemExit(f"a worker exited with status {proc.wait()} (its stderr is above)")


def send(proc, command):
    proc.stdin.write(command + "\n")
    proc.stdin.flush()


def run_sides(args, folder):
    """Start both workers (one after the other: set-up is not timed), step them in turn, stop them.
    Returns {name: (ready message, [step messages], end message)}."""
    procs = {}
    try:
        ready = {}
        for name, side in (("nanovalor", "ours"), ("TRL GRPOTrainer", "trl")):
            procs[name] = start(side, args, folder)
            ready[name] = receive(procs[name], args.verbose)
        steps = {name: [] for name in procs}
        for i in range(1 + args.repeats):  # step 0 is the warm-up
            for name in list(procs)[::1 if i % 2 == 0 else -1]:  # A B, B A, ...: neither always goes first
                send(procs[name], "step")
                steps[name].append(receive(procs[name], args.verbose))
        end = {}
        for name, proc in procs.items():
            send(proc, "quit")
            end[name] = receive(proc, args.verbose)
            proc.wait()
        return {name: (ready[name], steps[name], end[name]) for name in procs}
    finally:
        for proc in procs.values():
            if proc.poll() is None:  # a failure elsewhere: do not leave a worker behind
                proc.kill()
                proc.wait()


def check_world(folder, hf, ours, prompts, image_tokens):
    """Both sides see the same model, prompt ids and pixels. Returns (max |logits difference|, prompt length)."""
    import torch

    from nanovalor.generate import encode_prompt, load_tokenizer, short_prompt
    tok = load_tokenizer(folder)
    if not image_tokens:
        ids = torch.tensor([tok.encode(prompts[0]).ids])  # (1, Tp)
        with torch.no_grad():
            return float((hf(ids).logits - ours(ids)).abs().max()), ids.shape[1]
    from PIL import Image

    from nanovalor.data import preprocess, read_preprocessor_config
    image = Image.open(folder / prompts[0])
    content = [{"type": "image", "image": image}, {"type": "text", "text": INSTRUCTION}]
    conversation = [{"role": "user", "content": content}]
    theirs = llava_processor(folder).apply_chat_template([conversation], add_generation_prompt=True, tokenize=True,
                                                         return_dict=True, return_tensors="pt")  # as TRL calls it
    ids = encode_prompt(tok, short_prompt(INSTRUCTION), ours.cfg)
    pixels = preprocess([image], read_preprocessor_config(folder))
    if theirs["input_ids"][0].tolist() != ids or not torch.equal(theirs["pixel_values"], pixels):
        raise SystemExit("TRL's processor and nanovalor give different prompt ids or pixels")
    (folder / "world.json").write_text(json.dumps({"prompt_tokens": len(ids)}))
    with torch.no_grad():
        ids = torch.tensor([ids])
        return float((hf(input_ids=ids, pixel_values=pixels).logits - ours(ids, pixels)).abs().max()), ids.shape[1]


def compare(results, B, G, N):
    """Each side's best and median step, throughput and peak memory, printed as one table with their ratios.
    results: run_sides' {side: (ready, steps, end)}. Returns ({side: row}, whether both sides did the same work)."""
    rows = {}
    for name, (ready, steps, end) in results.items():
        seconds, cpu = sorted(s["seconds"] for s in steps[1:]), min(s["cpu"] for s in steps[1:])
        work = tuple(sum(s[k] for s in steps) for k in ("completions", "tokens", "prompt_tokens")) + (ready["trained"],)
        best = min(steps[1:], key=lambda s: s["seconds"])
        rows[name] = dict(best=seconds[0], median=seconds[len(seconds) // 2], rate=B * G / seconds[0], cpu=cpu,
                          work=work, above=end["peak"] - ready["rss"], total=end["peak"], phases=best.get("phases", {}))
        print(f"# {name}: {work[0]} completions, {work[1]} completion tokens, {work[2]} prompt tokens in "
              f"{len(steps)} steps, {work[3]:,} trained parameters; peak-RSS mark reset at baseline: {ready['reset']}")
    ours, trl = rows["nanovalor"], rows["TRL GRPOTrainer"]
    same = ours["work"] == trl["work"] and ours["work"][1] == len(results["nanovalor"][1]) * B * G * N
    print(f"# both sides did the same work (completions, tokens, prompt tokens, trained parameters): {same}")
    print("| side | completions / step | best step (s) | median step (s) | completions / s | CPU s / step (best) | "
          "completions / CPU s | peak RSS above baseline (MiB) | peak RSS total (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {B * G} | {r['best']:.3f} | {r['median']:.3f} | {r['rate']:.1f} | {r['cpu']:.3f} | "
              f"{B * G / r['cpu']:.1f} | {r['above']:.0f} | {r['total']:.0f} |")
    print(f"| nanovalor / TRL | | | | {ours['rate'] / trl['rate']:.2f}x | | {trl['cpu'] / ours['cpu']:.2f}x | "
          f"{ours['above'] / trl['above']:.2f}x | {ours['total'] / trl['total']:.2f}x |")
    return rows, same


def main(args):
    import torch
    torch.set_num_threads(args.threads)
    B, G, N, P = args.prompts, args.group, args.new_tokens, args.image_tokens
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        hf, prompts = build_world(folder, B * (args.repeats + 2), args.prompt_tokens, P)
        ours = load_ours(folder, P)
        diff, prompt_length = check_world(folder, hf, ours, prompts, P)
        if diff > 1e-4:
            raise SystemExit(f"the two models disagree: max |logits difference| {diff}")
        n_params, vocab = sum(p.numel() for p in hf.parameters()), hf.config.get_text_config().vocab_size
        del hf, ours
        results = run_sides(args, folder)

    threads = {name: end["threads"] for name, (_, _, end) in results.items()}
    kind = (f"a LLaVA (CLIP ViT, {P} image tokens; Qwen2 decoder)" if P else "tiny Qwen2")
    print(f"# one GRPO step on CPU: {kind}, {n_params / 1e6:.2f}M parameters, vocab {vocab}; {B} prompts x G={G}, "
          f"{prompt_length} prompt tokens ({prompt_length - P} text) + {N} new tokens, beta {args.beta}, fp32; best "
          f"of {args.repeats} steps after 1 warm-up; torch threads {threads}; torch {torch.__version__}; a shared "
          f"machine (the ratios are side by side)")
    print(f"# same weights: max |logits difference| on a prompt {diff:.1e}" + (
        "; same prompt ids and pixel values as TRL's LlavaProcessor" if P else ""))
    rows, same = compare(results, B, G, N)
    print("\nWhere the best step's wall time goes (s): generation, the reference model's pass, and the rest (rewards, "
          "policy forward + backward, optimizer)")
    print("| side | generation | reference | rest | step |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        gen, ref = r["phases"].get("generate", 0.0), r["phases"].get("reference", 0.0)
        print(f"| {name} | {gen:.3f} | {ref:.3f} | {r['best'] - gen - ref:.3f} | {r['best']:.3f} |")
    if not same:
        raise SystemExit("the two sides did not do the same work: the comparison above is not valid")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=4, help="B prompts per step")
    parser.add_argument("--group", type=int, default=8, help="G completions per prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32, help="text-only prompts: their length")
    parser.add_argument("--image-tokens", type=int, default=0, help="P > 0: a LLaVA with image prompts")
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="show what the libraries print")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.verbose:  # progress bars and the intended out-of-vocabulary-EOS warning
        os.environ.update(TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1",
                          TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore::FutureWarning")  # for the workers
        warnings.filterwarnings("ignore", category=FutureWarning)
    if args.worker is None:
        main(args)
    else:
        import torch
        torch.set_num_threads(args.threads)
        folder = Path(args.folder)
        prompts = json.loads((folder / "prompts.json").read_text())
        (worker_ours if args.worker == "ours" else worker_trl)(args, folder, prompts)
