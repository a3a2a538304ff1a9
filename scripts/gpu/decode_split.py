#!/usr/bin/env python3
"""Decodes the images of a VTAB-1k list file from images.tar into a TensorDataset safetensors file
(`images` [N, S, S, 3] pixel values 0..255 as F32, `labels` [N] F32), for machines without sharp.
Resizes (bicubic) only when the size differs, like snella's sharp path. Needs numpy, Pillow, safetensors.
Usage: decode_split.py DATA_DIR LIST_NAME SIZE OUT.safetensors
"""
import io, os, sys, tarfile
import numpy as np
from PIL import Image
from safetensors.numpy import save_file

root, name, size, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rows = [l.split() for l in open(os.path.join(root, name + ".txt")) if l.strip()]
want = {p for p, _ in rows}
blobs = {}
with tarfile.open(os.path.join(root, "images.tar")) as t:
    for m in t:
        if m.name in want:
            blobs[m.name] = t.extractfile(m).read()
missing = [p for p, _ in rows if p not in blobs]
if missing:
    sys.exit(f"{root}/images.tar lacks {len(missing)} listed images, e.g. {missing[0]}")
def img(b):
    im = Image.open(io.BytesIO(b)).convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.float32)
images = np.stack([img(blobs[p]) for p, _ in rows])
labels = np.array([float(l) for _, l in rows], dtype=np.float32)
save_file({"images": images, "labels": labels}, out)
print(f"{out}: {len(rows)} images {images.shape}")
