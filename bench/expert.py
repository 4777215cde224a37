"""The frozen expert's GRPO scorer (nanovalor.expert.Expert.similarity) against transformers, CLIPModel-style.

    python bench/expert.py                 # B = 16 images x G = 8 reports, BiomedCLIP-sized, one timed run each
    python bench/expert.py --repeats 2

Both sides are the same random BiomedCLIP-sized network (timm-style ViT-B/16 at 224 px + BERT-base, MLP text
projection, context 256), float32 on CPU, under no_grad. transformers (ViTModel + BertModel + the two projections,
the weights copied from ours) encodes every (image, report) pair as a CLIPModel-style scorer does: B*G images and
B*G reports, reports padded to the longest. Ours is `similarity`: each image encoded once for its group, reports
sorted by length and encoded in chunks under the memory cap. Reports are 20-150 words long, so padding matters.
Each measurement is taken once (--repeats n: the best of n) after a small warm-up, side by side in one process
(the machine is shared and noisy): wall seconds and this process's CPU seconds. Target: >= 1.0x per pair.
About 3 minutes on 2 idle cores, 6 when they are shared.
"""
import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import BertConfig as HFBertConfig, BertModel, BertTokenizer, ViTConfig, ViTModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanovalor.bert import BertConfig, load_bert_tokenizer  # noqa: E402
from nanovalor.expert import Expert, ExpertConfig  # noqa: E402
from nanovalor.vit import VisionConfig  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--images", type=int, default=16)
parser.add_argument("--group", type=int, default=8)
parser.add_argument("--repeats", type=int, default=1)
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
B, G = args.images, args.group

# A vocabulary of plain words (one WordPiece each) and B groups of G reports of varied length.
words = [f"w{i}" for i in range(2000)]
folder = Path(tempfile.mkdtemp())
(folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
rng = random.Random(0)
reports = [[" ".join(rng.choices(words, k=rng.randint(20, 150))) + " ." for _ in range(G)] for _ in range(B)]
pixels = torch.randn(B, 3, 224, 224)

cfg = ExpertConfig(vision=VisionConfig(image_size=224, patch_size=16, act="gelu", class_token=True, pre_norm=False,
                                       patch_bias=True, layer_norm_eps=1e-6),
                   text=BertConfig(vocab_size=len(words) + 5), embed_dim=512, text_projection="mlp",
                   context_length=256)
ours = Expert(cfg, load_bert_tokenizer(folder, 256)).eval()

# transformers: the same weights in ViTModel / BertModel names
vit = ViTModel(ViTConfig(image_size=224, patch_size=16, layer_norm_eps=1e-6), add_pooling_layer=False).eval()
bert = BertModel(HFBertConfig(vocab_size=len(words) + 5), add_pooling_layer=False).eval()
sd = {k: v for k, v in ours.state_dict().items()}
vit_sd = {"embeddings.cls_token": sd["visual.embeddings.class_embedding"][None, None],
          "embeddings.position_embeddings": sd["visual.embeddings.position_embedding.weight"][None],
          "embeddings.patch_embeddings.projection.weight": sd["visual.embeddings.patch_embedding.weight"],
          "embeddings.patch_embeddings.projection.bias": sd["visual.embeddings.patch_embedding.bias"],
          "layernorm.weight": sd["visual.post_layernorm.weight"], "layernorm.bias": sd["visual.post_layernorm.bias"]}
for k in vit.state_dict():
    if k.startswith("layers."):
        ours_name = (k.replace("layernorm_before", "layer_norm1").replace("layernorm_after", "layer_norm2")
                     .replace("attention.o_proj", "self_attn.out_proj").replace("attention.", "self_attn."))
        vit_sd[k] = sd["visual.encoder." + ours_name]
vit.load_state_dict(vit_sd)
bert.load_state_dict({k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")})
hf_tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)})
w_image, proj = ours.visual_projection.weight, ours.text_projection


def hf_images(x):  # (N, 3, 224, 224) -> (N, 512)
    return F.normalize(vit(pixel_values=x).last_hidden_state[:, 0] @ w_image.T, dim=-1)


def hf_texts(texts):  # N strings -> (N, 512), one batch padded to the longest
    batch = hf_tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    return F.normalize(proj(bert(**batch).last_hidden_state[:, 0]), dim=-1)


every_image = pixels.repeat_interleave(G, dim=0)  # (B*G, 3, 224, 224): each image once per report
flat = [r for group in reports for r in group]


def timed(fn):
    best_wall = best_cpu = float("inf")
    for _ in range(args.repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = fn()
        best_wall, best_cpu = min(best_wall, time.perf_counter() - wall), min(best_cpu, time.process_time() - cpu)
    return out, best_wall, best_cpu


with torch.no_grad():  # warm-up: one image and one report through each side
    hf_images(pixels[:1]), hf_texts(flat[:1]), ours.similarity(pixels[:1], [reports[0][:1]])

# B*G ViT-B/16 encodes take minutes on 2 cores: transformers' scorer is timed as the sum of its two parts.
hf_img, hf_img_wall, hf_img_cpu = timed(lambda: hf_images(every_image))  # (B*G, E)
_, hf_same_wall, hf_same_cpu = timed(lambda: hf_images(pixels))
_, ours_img_wall, ours_img_cpu = timed(lambda: ours.encode_images(pixels))
hf_txt, hf_txt_wall, hf_txt_cpu = timed(lambda: hf_texts(flat))
ours_sim, ours_sim_wall, ours_sim_cpu = timed(lambda: ours.similarity(pixels, reports))
ours_txt_wall, ours_txt_cpu = ours_sim_wall - ours_img_wall, ours_sim_cpu - ours_img_cpu  # the rest of similarity
hf_sim = (hf_img * hf_txt).sum(-1).view(B, G)
lengths = ours.tokenize(flat)[1].sum(1)

print(f"B = {B} images x G = {G} reports, ViT-B/16 224 px + BERT-base, float32, CPU, {args.threads} threads, "
      f"best of {args.repeats}; reports {int(lengths.min())}-{int(lengths.max())} tokens")
print(f"{'':44s} {'transformers wall / cpu':>24s} {'ours wall / cpu':>20s} {'speed-up':>9s}")
for name, hw, hc, ow, oc in (
        (f"images, same work ({B} vs {B})", hf_same_wall, hf_same_cpu, ours_img_wall, ours_img_cpu),
        (f"images for the scores ({B * G} vs {B}: once each)", hf_img_wall, hf_img_cpu, ours_img_wall, ours_img_cpu),
        (f"reports ({B * G} vs {B * G}, sorted chunks)*", hf_txt_wall, hf_txt_cpu, ours_txt_wall, ours_txt_cpu),
        (f"similarity, end to end (B={B} x G={G})", hf_img_wall + hf_txt_wall, hf_img_cpu + hf_txt_cpu, ours_sim_wall,
         ours_sim_cpu)):
    print(f"{name:44s} {hw:10.2f} s / {hc:7.2f} s {ow:8.2f} s / {oc:7.2f} s {hw / ow:8.2f}x")
print("* ours: similarity's time less its image encoding (tokenizing, sorting, chunked BERT)")
hf_pair, ours_pair = (hf_img_wall + hf_txt_wall) / (B * G), ours_sim_wall / (B * G)
print(f"per pair: transformers {1000 * hf_pair:.0f} ms, ours {1000 * ours_pair:.0f} ms -> {hf_pair / ours_pair:.2f}x "
      f"(target >= 1.0x); max |difference| of the (B, G) cosines: {(hf_sim - ours_sim).abs().max().item():.1e}")
