#!/usr/bin/env python3
"""Copies the images that train800val200.txt and test.txt name (2,637 of 8,189) out of a flowers102
pack's images.tar, with the list files, so the recipe's data fits the GPU machine's carry limit.
Usage: make-flowers-subset.py ../shared/data/flowers102-64 .gpu/flowers102-64
"""
import io, os, shutil, sys, tarfile
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
want = set()
for name in ("train800val200.txt", "test.txt"):
    shutil.copy(os.path.join(src, name), dst)
    want |= {l.split()[0] for l in open(os.path.join(src, name)) if l.strip()}
with tarfile.open(os.path.join(src, "images.tar")) as t, tarfile.open(os.path.join(dst, "images.tar"), "w", format=tarfile.USTAR_FORMAT) as o:
    for m in t:
        if m.name in want:
            data = t.extractfile(m).read(); info = tarfile.TarInfo(m.name); info.size = len(data); info.mtime = 0
            o.addfile(info, io.BytesIO(data))
print(f"{dst}: {len(want)} images")
