#!/usr/bin/env python3
"""Builds assets/flowers10-64, the demo's small real subset of Oxford Flowers-102 (64 px).

Takes 10 classes (every 10th class: 0, 10, ..., 90), 24 training images per class from the course's
training pool (all-train.txt) and 16 test images per class from test.txt (the course's valid+test
splits, disjoint from the training pool), in file order. Labels are re-numbered 0..9.
Usage: python3 scripts/make-demo-data.py ../shared/data/flowers102-64 assets/flowers10-64
"""
import io, json, os, sys, tarfile

src, dst = sys.argv[1], sys.argv[2]
classes = list(range(0, 100, 10))
remap = {c: i for i, c in enumerate(classes)}
names = json.load(open(os.path.join(src, "classes.json")))

def pick(list_file, per_class):
    out, count = [], {c: 0 for c in classes}
    for line in open(os.path.join(src, list_file)):
        p, l = line.split()
        l = int(l)
        if l in count and count[l] < per_class:
            count[l] += 1
            out.append((p, remap[l]))
    return out

train, test = pick("all-train.txt", 24), pick("test.txt", 16)
os.makedirs(dst, exist_ok=True)
want = {p for p, _ in train + test}
with tarfile.open(os.path.join(src, "images.tar")) as t, tarfile.open(os.path.join(dst, "images.tar"), "w", format=tarfile.USTAR_FORMAT) as o:
    for m in t:
        if m.name in want:
            data = t.extractfile(m).read()
            info = tarfile.TarInfo(m.name); info.size = len(data); info.mtime = 0
            o.addfile(info, io.BytesIO(data))
for name, rows in (("train", train), ("test", test)):
    with open(os.path.join(dst, name + ".txt"), "w") as f:
        f.writelines(f"{p} {l}\n" for p, l in rows)
json.dump([names[c] for c in classes], open(os.path.join(dst, "classes.json"), "w"), indent=1)
print(f"{len(train)} train, {len(test)} test images, classes {[names[c] for c in classes]}")
