#!/usr/bin/env python3
"""Golden files for the Rust CPU implementation's parity test (crates/snella-model/tests/golden.rs).

An independent PyTorch (autograd) implementation of SNELLA (spec §1, §2, §4, §6 of
shared/spec/snella.md) on a tiny timm VisionTransformer, in float32 on the CPU:

  * tiny_vit.safetensors  - the frozen backbone (timm naming, seeded random weights scaled so the
                            activations are O(1); LayerNorm weights/biases random too).
  * snella_step.safetensors - a batch of 3 images and labels, the logits and mean cross-entropy of
                            the ViT with SNELLA adapters (q, k, v, proj, fc1, fc2 of both blocks,
                            r=4, H=2, s=0.3, magnitude-product rule, alpha/gamma/beta = 0.7/1.3/0.05),
                            the gradient of every trainable tensor (adapters' A, B, [alpha, gamma,
                            beta], head.weight, head.bias, cls_token), and the values after one
                            torch.optim.AdamW step (lr 1e-2, betas (0.9, 0.999), eps 1e-8, weight
                            decay 0.05 on tensors with ndim >= 2 except cls_token).
                            Also dw.<adapter> (the sparsified delta W [in, out] before the step), for
                            locating a mismatch.

Names: param.<name> (value before the step), grad.<name>, after.<name>, with <name> as the Rust
model names them: blocks.{i}.attn.{q,k,v,proj}.snella_{A,B,mix}, blocks.{i}.mlp.{fc1,fc2}.snella_*,
head.weight, head.bias, cls_token.

The seed is chosen (first from --seed upwards) so that no kept/dropped decision of the top-k is
near a tie (relative gap >= 1e-5 between the k-th and (k+1)-th largest |M| of every adapter) and no
gradient element is tiny relative to its tensor (|g| >= 1e-5 max|g|, so that AdamW's first step,
which is about lr*sign(g), is well conditioned). It then re-runs everything in float64 and prints
the float32-vs-float64 errors: the noise floor of the comparison.

Usage (torch, timm, safetensors, numpy needed; CPU only):
    CUDA_VISIBLE_DEVICES= python3 scripts/golden/make_golden.py --out crates/snella-model/tests/golden
"""
import argparse
import copy
import math
import os
import sys

os.environ.setdefault("TIMM_FUSED_ATTN", "0")  # plain softmax(QK^T/sqrt(d))V attention

import numpy as np  # noqa: F401  (safetensors.torch imports it; fail early if missing)
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.models.vision_transformer import VisionTransformer
import safetensors
from safetensors.torch import save_file

# ---- the configuration -------------------------------------------------------------------------
VIT = dict(img_size=16, patch_size=4, embed_dim=12, depth=2, num_heads=2, mlp_ratio=4, qkv_bias=True, num_classes=5)
H = 2                      # kernel pieces
RANK = 4                   # r (r/H = 2 per piece)
SPARSITY = 0.3             # s of every adapter
COEFFS = [0.1 * (-1) ** h for h in range(H)]  # c_h = (+0.1, -0.1), fixed
MIX = (0.7, 1.3, 0.05)     # alpha, gamma, beta (not the init values, so their gradients matter)
GAMMA_MIN = 1e-4           # gamma clamp in the forward (spec §1 Decision)
AB_BOUND = 1.5             # A, B ~ U(+-AB_BOUND): larger than Kaiming so delta W is not negligible
BATCH = 3
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-8, 0.05
MIN_GAP = 1e-5             # relative gap required around every top-k cut
MIN_GRAD = 1e-5            # |g| / max|g| required for every gradient element
META_VIT = {"num_heads": "2", "img_size": "16", "patch_size": "4", "embed_dim": "12", "depth": "2",
            "mean": "0.485,0.456,0.406", "std": "0.229,0.224,0.225"}


class Snella(nn.Module):
    """One SNELLA adapter: delta W [n_in, n_out] from A [H, in, r/H], B [H, out, r/H], [alpha, gamma, beta]."""

    def __init__(self, n_in, n_out, gen):
        super().__init__()
        rh = RANK // H
        self.n_in, self.n_out = n_in, n_out
        self.snella_A = nn.Parameter((torch.rand(H, n_in, rh, generator=gen) * 2 - 1) * AB_BOUND)
        self.snella_B = nn.Parameter((torch.rand(H, n_out, rh, generator=gen) * 2 - 1) * AB_BOUND)
        self.snella_mix = nn.Parameter(torch.tensor(MIX, dtype=torch.float32))
        n = n_in * n_out
        self.k = n - math.floor(SPARSITY * n)  # kept entries, spec §2 (Python float is f64, as Rust)

    def merged(self):
        """M = K + alpha * softmax_j(K / max(gamma, 1e-4)) + beta, K = sum_h c_h D_h (spec §1)."""
        A, B = self.snella_A, self.snella_B
        diff = A[:, :, None, :] - B[:, None, :, :]          # [H, in, out, r/H]
        D = torch.sqrt((diff * diff).sum(dim=-1))           # [H, in, out], explicit Euclidean distance
        K = COEFFS[0] * D[0]
        for h in range(1, H):
            K = K + COEFFS[h] * D[h]
        alpha, gamma, beta = self.snella_mix[0], self.snella_mix[1], self.snella_mix[2]
        gamma = torch.clamp(gamma, min=GAMMA_MIN)
        P = torch.softmax(K / gamma, dim=1)                 # over output features j, per input row i
        return K + alpha * P + beta

    def mask_of(self, M):
        """1 on the k entries of largest |M| (ties: lower flat index first, via a stable sort)."""
        mag = M.detach().abs().flatten()
        order = torch.argsort(-mag, stable=True)
        mask = torch.zeros_like(mag)
        mask[order[: self.k]] = 1.0
        return mask.view_as(M)

    def gap(self):
        """Relative gap between the k-th and (k+1)-th largest |M| (inf when nothing is dropped)."""
        with torch.no_grad():
            mag = torch.sort(self.merged().abs().flatten(), descending=True).values.double()
        if self.k >= mag.numel():
            return math.inf
        return float((mag[self.k - 1] - mag[self.k]) / mag[self.k - 1])

    def delta(self):
        """Magnitude-product rule: delta W = M * sg(|M|) * 1_S (spec §2)."""
        M = self.merged()
        return M * M.detach().abs() * self.mask_of(M)


class Adapted(nn.Module):
    """A frozen linear plus SNELLA adapters on equal output chunks: y = base(x) + cat_c(x @ dW_c)."""

    def __init__(self, base, adapters):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleList(adapters)

    def forward(self, x):
        return self.base(x) + torch.cat([x @ a.delta() for a in self.adapters], dim=-1)


def build(seed):
    """The backbone (random, O(1) activations), its state dict, the adapted model and the batch."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = VisionTransformer(**VIT)
    model.eval()  # no dropout anywhere (all rates are 0 anyway)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / math.sqrt(fan_in))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
        model.cls_token.copy_(0.5 * torch.randn(model.cls_token.shape, generator=gen))
        model.pos_embed.copy_(0.5 * torch.randn(model.pos_embed.shape, generator=gen))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}

    for p in model.parameters():
        p.requires_grad_(False)
    adapters = {}
    d = VIT["embed_dim"]
    for i, blk in enumerate(model.blocks):
        qkv = [Snella(d, d, gen) for _ in range(3)]
        for w, a in zip("qkv", qkv):
            adapters[f"blocks.{i}.attn.{w}"] = a
        blk.attn.qkv = Adapted(blk.attn.qkv, qkv)
        for path, lin in (("attn.proj", blk.attn.proj), ("mlp.fc1", blk.mlp.fc1), ("mlp.fc2", blk.mlp.fc2)):
            a = Snella(lin.in_features, lin.out_features, gen)
            adapters[f"blocks.{i}.{path}"] = a
            wrapped = Adapted(lin, [a])
            if path == "attn.proj":
                blk.attn.proj = wrapped
            elif path == "mlp.fc1":
                blk.mlp.fc1 = wrapped
            else:
                blk.mlp.fc2 = wrapped

    images = torch.randn(BATCH, 3, VIT["img_size"], VIT["img_size"], generator=gen)
    labels = torch.randint(0, VIT["num_classes"], (BATCH,), generator=gen)
    return model, state, adapters, images, labels


def trainables(model, adapters):
    """name -> parameter, in Rust naming; sets requires_grad."""
    t = {}
    for name, a in adapters.items():
        for pn in ("snella_A", "snella_B", "snella_mix"):
            t[f"{name}.{pn}"] = getattr(a, pn)
    t["head.weight"] = model.head.weight
    t["head.bias"] = model.head.bias
    t["cls_token"] = model.cls_token
    for p in t.values():
        p.requires_grad_(True)
    return t


def step(model, adapters, images, labels):
    """Forward, loss, backward, one AdamW step. Returns a dict of results (tensors detached)."""
    params = trainables(model, adapters)
    out = {"param." + n: p.detach().clone() for n, p in params.items()}
    out["dw"] = {n: a.delta().detach().clone() for n, a in adapters.items()}
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    for p in params.values():
        p.grad = None
    loss.backward()
    for n, p in params.items():
        if p.grad is None:
            raise RuntimeError(f"{n} got no gradient: is the adapter wrapper bypassed by timm?")
        out["grad." + n] = p.grad.detach().clone()
    decay = [p for n, p in params.items() if p.ndim >= 2 and n != "cls_token"]
    no_decay = [p for n, p in params.items() if not (p.ndim >= 2 and n != "cls_token")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=EPS, foreach=False)
    opt.step()
    for n, p in params.items():
        out["after." + n] = p.detach().clone()
    out["logits"] = logits.detach().clone()
    out["loss"] = loss.detach().reshape(1).clone()
    return out


def rel(a, b):
    """max|a - b| / max(max|b|, 1e-6)"""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-6))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for tiny_vit.safetensors and snella_step.safetensors")
    ap.add_argument("--seed", type=int, default=0, help="first seed tried")
    args = ap.parse_args()

    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, timm {timm.__version__}, "
          f"safetensors {safetensors.__version__}", flush=True)

    for seed in range(args.seed, args.seed + 100):
        model, state, adapters, images, labels = build(seed)
        gaps = {n: a.gap() for n, a in adapters.items()}
        model64 = copy.deepcopy(model).double()  # same values, before the step
        adapters64 = {}
        for i, blk in enumerate(model64.blocks):
            for j, w in enumerate("qkv"):
                adapters64[f"blocks.{i}.attn.{w}"] = blk.attn.qkv.adapters[j]
            adapters64[f"blocks.{i}.attn.proj"] = blk.attn.proj.adapters[0]
            adapters64[f"blocks.{i}.mlp.fc1"] = blk.mlp.fc1.adapters[0]
            adapters64[f"blocks.{i}.mlp.fc2"] = blk.mlp.fc2.adapters[0]
        res = step(model, adapters, images, labels)
        min_gap = min(gaps.values())
        min_grad = min(float(g.abs().min() / g.abs().max()) for n, g in res.items() if n.startswith("grad."))
        print(f"seed {seed}: min top-k gap {min_gap:.3e}, min |g|/max|g| {min_grad:.3e}", flush=True)
        if min_gap >= MIN_GAP and min_grad >= MIN_GRAD:
            break
    else:
        raise SystemExit("no seed satisfied the gap/gradient conditions")

    # float64 re-run: the noise floor of float32 parity.
    res64 = step(model64, adapters64, images.double(), labels)
    print("float32 vs float64 (rel err = max|a-b| / max|b|):")
    worst = {}
    for n in res:
        if n == "dw":
            e = max(rel(res["dw"][k], res64["dw"][k]) for k in res["dw"])
            key = "dw"
        else:
            e = rel(res[n], res64[n])
            key = f"{n.split('.')[0]}.{n.split('.')[-1]}" if "." in n else n
        worst[key] = max(worst.get(key, 0.0), e)
    for k, e in worst.items():
        print(f"  {k:22s} {e:.3e}")

    os.makedirs(args.out, exist_ok=True)
    vit_path = os.path.join(args.out, "tiny_vit.safetensors")
    save_file(state, vit_path, metadata=META_VIT)

    tensors = {"images": images, "labels": labels.to(torch.float32), "logits": res["logits"], "loss": res["loss"],
               "sparsity": torch.tensor([SPARSITY], dtype=torch.float32)}
    for n, v in res.items():
        if n == "dw":
            for a, dw in v.items():
                tensors[f"dw.{a}"] = dw
        elif n not in ("logits", "loss"):
            tensors[n] = v
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in tensors.items()}
    meta = {"seed": str(seed), "rank": str(RANK), "heads": str(H), "sparsity": str(SPARSITY),
            "rule": "magnitude-product", "coeffs": ",".join(str(c) for c in COEFFS),
            "mix_alpha_gamma_beta": ",".join(str(x) for x in MIX), "ab_bound": str(AB_BOUND),
            "lr": str(LR), "betas": f"{BETAS[0]},{BETAS[1]}", "eps": str(EPS), "weight_decay": str(WD),
            "batch": str(BATCH), "torch": torch.__version__, "timm": timm.__version__,
            "min_topk_gap": f"{min_gap:.3e}", "min_grad_ratio": f"{min_grad:.3e}"}
    step_path = os.path.join(args.out, "snella_step.safetensors")
    save_file(tensors, step_path, metadata=meta)
    print(f"loss {float(res['loss']):.6f}; logits\n{res['logits']}")
    for p in (vit_path, step_path):
        print(f"wrote {p} ({os.path.getsize(p)} bytes)")


if __name__ == "__main__":
    main()
