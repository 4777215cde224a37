"""The memory plan of a training run, before the GPUs are rented: bytes per GPU for the parameters, gradients, AdamW
states and GRPO reference, the rollout's gathered weights and KV cache, and the update's activations.

    python train.py --stage text --model=microsoft/llava-med-v1.5-mistral-7b --fsdp --dry_run=8 --batch_size=64 \\
        --micro_batch=2 --grad_checkpointing        # the plan on 8 GPUs (80 GiB each unless --gpu_memory_gb)

train.py builds the model on the meta device from its config files alone (policy.build: no weights read), sets what
trains and applies LoRA as a real run does, and calls plan(): parameter, gradient, optimizer and reference bytes are
counted from the model's parameters, as FSDP2 pads and shards them (ceil(rows / world) rows each). What depends on
kernels and data is an estimate, by these formulas (D hidden, Dq = heads * head_dim, Dkv = kv heads * head_dim,
I intermediate, L layers, V vocabulary; bf16 autocast on fp32 master weights, train.py's setting):

- activations saved for backward, per token and decoder layer: always 8D (the two RMSNorms' fp32 inputs on the
  residual stream) + 2(2Dq + 2Dkv) (SDPA's q, k, v and output, bf16) + 6I (SwiGLU's gate, silu(gate) and up, bf16);
  plus 4D per RMSNorm whose weight trains (its fp32 output) and 2 x input width per linear layer that trains or has
  a LoRA adapter (its bf16 input, one cast per layer): 26D + 6Dq + 4Dkv + 8I when the whole block trains.
  Tokens per micro-batch of m studies: m (Tp + G Tc) (each group's prompt runs once, grpo.CompletionLogprobs), plus
  the completions' shared-prefix attention, m G H (Tc - 1)(Tp + Tc) probabilities at 6 bytes (fp32 softmax output,
  bf16 copy). With gradient checkpointing each completion carries its own prompt copy: m G (Tp + Tc - 1) tokens,
  4D bytes per token and layer kept (a block's fp32 input), and one block's activations at a time in backward.
  A ViT that trains adds 34d + 4 mlp per image token and layer. Projector and LM head: under 1 %, not counted.
- rollout: B = batch / GPUs studies per GPU; KV cache in the master weights' dtype: L * 2 * Dkv per token for
  B Tp prompt tokens (each prompt once) + B G Tc completion tokens. Under FSDP the sampler gathers every parameter
  (dist.gathered): one whole unsharded model per GPU while sampling.
- update under FSDP: the root unit (everything outside the decoder blocks, never resharded after its forward) and
  two decoder blocks (the one running, the one prefetched) gathered, with their trained parameters' full gradients.
- Tp = the image tokens + 64 text tokens (the default prompt in a chat template is shorter), Tc = max_new_tokens.

Peak = what is held throughout (parameters, AdamW, reference) + the larger of the rollout and the update phase
(gradients exist from the first backward to zero_grad). Allocator fragmentation, CUDA context (~0.5 GiB) and NCCL
buffers come on top.
"""
import math

import torch

from nanovalor import lora, policy

GiB = 2 ** 30
PROMPT_TEXT_TOKENS = 64


def _bytes(params, world=1):
    """Bytes per GPU of `params`, each split over `world` GPUs as FSDP2 does: ceil(rows / world) rows each."""
    total = 0
    for p in params:
        rows = p.shape[0] if p.ndim else 1
        total += math.ceil(rows / world) * (p.numel() // max(rows, 1)) * p.element_size()
    return total


def _trains(module):
    return any(p.requires_grad for p in module.parameters())


def decoder_layer_bytes(block, t):
    """Activation bytes per token of one decoder block (decoder.DecoderBlock), by the formula in the docstring."""
    D, Dq, Dkv, I = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.intermediate_size
    n = 4 * D * 2 + 2 * (2 * Dq + 2 * Dkv) + 2 * 3 * I
    n += 4 * D * (_trains(block.input_layernorm) + _trains(block.post_attention_layernorm))
    attn, mlp = block.self_attn, block.mlp
    for linear, width in ((attn.q_proj, D), (attn.k_proj, D), (attn.v_proj, D), (attn.o_proj, Dq),
                          (mlp.gate_proj, D), (mlp.up_proj, D), (mlp.down_proj, I)):
        n += 2 * width * _trains(linear)
    return n


def plan(model, gpus, fsdp, batch_size, micro_batch=0, group_size=8, max_new_tokens=96, grad_checkpointing=False,
         beta=0.01, grpo=True):
    """{row: bytes per GPU} of a run of `model` (a Llava with what trains set, on the meta device or not) on `gpus`
    GPUs (FSDP2 world size with fsdp=True, DDP replicas otherwise), `batch_size` studies per step, micro-batches of
    `micro_batch` studies (0: all of a GPU's), G = group_size. grpo=False: the SFT stage (no rollout, no reference,
    one teacher-forced report per study)."""
    t, cfg = model.cfg.text, model.cfg
    world = gpus if fsdp else 1
    params = list(model.parameters())  # tied parameters once
    trained = [p for p in params if p.requires_grad]
    adapters = set(lora.adapter_names(model))
    copied = [p for n, p in model.named_parameters() if p.requires_grad and n not in adapters]
    B = batch_size // gpus
    m = micro_batch or B
    G, Tc, Tp = (group_size, max_new_tokens, cfg.num_image_tokens + PROMPT_TEXT_TOKENS)
    if not grpo:
        G = 1
    L, per_layer = t.num_layers, decoder_layer_bytes(model.language_model.layers[0], t)
    out = {"parameters": _bytes(params, world), "AdamW states": 2 * _bytes(trained, world),
           "reference copy": _bytes(copied, world) if grpo and beta else 0}
    # rollout: the sampler's caches, and under FSDP the whole model gathered
    kv_token = L * 2 * t.num_kv_heads * t.head_dim * model.lm_head.weight.element_size()  # the weights' dtype
    out["rollout: gathered parameters"] = _bytes(params) if grpo and fsdp else 0
    out["rollout: KV cache"] = kv_token * (B * Tp + B * G * Tc) if grpo else 0
    # update: gradients, FSDP's gathered units, activations
    out["update: gradients"] = _bytes(trained, world) * (2 if not fsdp and gpus > 1 else 1)  # DDP: + its buckets
    gathered = 0
    if fsdp:
        in_blocks = {id(p) for p in model.language_model.layers.parameters()}
        root = [p for p in params if id(p) not in in_blocks]
        block = list(model.language_model.layers[0].parameters())
        gathered = _bytes(root) + _bytes([p for p in root if p.requires_grad])
        gathered += 2 * (_bytes(block) + _bytes([p for p in block if p.requires_grad]))
    out["update: gathered units + their gradients"] = gathered
    if grad_checkpointing:
        tokens = m * G * (Tp + Tc - 1) if grpo else m * (Tp + Tc)
        act = L * tokens * 4 * t.hidden_size + tokens * per_layer
    else:
        tokens = m * (Tp + G * Tc)
        scores = m * G * t.num_heads * (Tc - 1) * (Tp + Tc) * 6
        act = L * (tokens * per_layer + scores)
    v = cfg.vision
    if _trains(model.vision_tower):
        act += v.num_layers * m * (v.num_patches + 1) * (34 * v.hidden_size + 4 * v.intermediate_size)
    out["update: activations"] = act
    held = out["parameters"] + out["AdamW states"] + out["reference copy"]
    rollout = out["rollout: gathered parameters"] + out["rollout: KV cache"]
    update = out["update: gradients"] + gathered + act
    out["peak"] = held + max(rollout, update)
    return out


def table(rows, gpu_memory_gb):
    """The plan as a text table in GiB, with the headroom left on a GPU of gpu_memory_gb GiB."""
    lines = [f"{'per GPU':<44} {'GiB':>8}"]
    for name, n in rows.items():
        lines.append(f"{name:<44} {n / GiB:8.2f}")
    lines.append(f"{'GPU memory (--gpu_memory_gb), headroom':<44} {gpu_memory_gb:8.2f}  "
                 f"{'fits' if rows['peak'] <= gpu_memory_gb * GiB else 'DOES NOT FIT'}: "
                 f"{gpu_memory_gb - rows['peak'] / GiB:.2f} GiB left")
    return "\n".join(lines)


def dry_run(cfg, stages, set_trainable):
    """train.py --dry_run=N: the model of cfg.model built on the meta device from its config files, what trains set
    (set_trainable, LoRA), the plan on N GPUs printed as a table. Nothing is read but config files."""
    if cfg.stage not in ("sft", "text", "visual") or not cfg.model:
        raise SystemExit("--dry_run plans a policy stage (sft, text, visual) of a given --model (hub id or folder)")
    d = stages[cfg.stage]
    model = policy.build(cfg.model, torch.float32)
    n_train = set_trainable(model, cfg.train or d["train"])
    if cfg.lora_rank:
        n_train = lora.apply(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
    batch, grpo = cfg.batch_size or d["batch_size"], cfg.stage != "sft"
    rows = plan(model, cfg.dry_run, cfg.fsdp, batch, cfg.micro_batch, cfg.group_size, cfg.max_new_tokens,
                cfg.grad_checkpointing, cfg.beta, grpo)
    n = sum(p.numel() for p in model.parameters())
    return (f"memory plan: stage {cfg.stage}, {n / 1e9:.3f}B parameters ({n_train / 1e9:.3f}B trained: "
            f"{cfg.train or d['train']}{f', LoRA rank {cfg.lora_rank}' if cfg.lora_rank else ''}), fp32 master "
            f"weights, bf16 autocast; {cfg.dry_run} GPU(s), {'FSDP2' if cfg.fsdp else 'DDP'}; {batch} studies per "
            f"step, micro-batch {cfg.micro_batch or batch // cfg.dry_run}, G = {cfg.group_size if grpo else 1}, "
            f"{cfg.max_new_tokens} new tokens, gradient checkpointing {'on' if cfg.grad_checkpointing else 'off'}\n"
            + table(rows, cfg.gpu_memory_gb))
