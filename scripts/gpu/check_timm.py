#!/usr/bin/env python3
"""Interchange check: timm loads snella's merged, timm-named export and gives snella's logits.
Usage: check_timm.py MERGED.safetensors OURS.json  (OURS.json from scripts/gpu/our_logits.ts)
Prints one JSON line; exits 1 when the max relative logit difference exceeds 1e-4 (f32 on both sides).
"""
import json, sys
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

path, ours = sys.argv[1], json.load(open(sys.argv[2]))
with safe_open(path, "pt") as f:
    meta = f.metadata()
sd = load_file(path)
m = VisionTransformer(img_size=int(meta["img_size"]), patch_size=int(meta["patch_size"]), embed_dim=int(meta["embed_dim"]),
                      depth=int(meta["depth"]), num_heads=int(meta["num_heads"]), qkv_bias=True,
                      num_classes=sd["head.weight"].shape[0])
missing, unexpected = m.load_state_dict(sd, strict=True), None
m.eval()
x = torch.tensor(ours["images"], dtype=torch.float32).view(*ours["shape"])
with torch.no_grad():
    y = m(x)
o = torch.tensor(ours["logits"], dtype=torch.float32).view_as(y)
rel = ((y - o).abs().max() / o.abs().max()).item()
same_top1 = bool((y.argmax(-1) == o.argmax(-1)).all())
print(json.dumps({"check": "timm loads snella merged export", "timm_version": __import__("timm").__version__,
                  "images": y.shape[0], "max_rel_logit_diff": rel, "same_top1": same_top1}))
sys.exit(0 if rel <= 1e-4 and same_top1 else 1)
