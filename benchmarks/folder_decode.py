"""How fast source ``"folder"`` decodes images, per core, against its array conversion.

    python benchmarks/folder_decode.py [--num=200] [--out=benchmarks/results/folder_decode.json]

Writes synthetic photo-like images (smooth gradients plus noise, so that PNG and JPEG
compress as photos do, not as noise) into a temporary folder: ImageNet-sized 500x375 JPEGs
(quality 90) and PNGs, and 64x64 PNGs already at the training resolution. Then, in this
process (one core), times :func:`fmjax.data.folder.load_image` over every file at 32 and at
64 (decode, crop, resize) and the reads of the same images from their one-time conversion
(:mod:`fmjax.data.folder_arrays`, memory-mapped arrays), and reports images/s per core
(``n`` over the median CPU time of this process in 3 passes, so a busy machine does not
skew it; the files are in the page cache, so this is decoding, not disk).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import numpy as np  # noqa: E402
from harness import loadavg, logger, machine_info, results_path, versions, write_json  # noqa: E402

from fmjax.data import folder, folder_arrays  # noqa: E402

log = logger("folder_decode")


def photo_like(rng, height, width):
    """A smooth colour field plus mild noise (compresses like a photo)."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    phase = rng.uniform(0, 2 * np.pi, 3)
    base = [128 + 100 * np.sin(4 * x + 3 * y + p) * np.cos(2 * y - x + p) for p in phase]
    img = np.stack(base, -1) + rng.normal(0, 12, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_set(root, name, num, size, ext, **save_kw):
    from PIL import Image

    rng = np.random.default_rng(0)
    d = os.path.join(root, name)
    os.makedirs(d)
    for i in range(num):
        Image.fromarray(photo_like(rng, *size)).save(os.path.join(d, f"{i:05d}.{ext}"), **save_kw)
    total = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    return d, total / num


def rate(fn, n, passes=3):
    """``n`` / the median CPU seconds of this process for ``fn()`` (one thread: images per
    second of one core, whatever else the machine runs)."""
    times = []
    for _ in range(passes):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return n / statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num", type=int, default=200, help="images per set")
    ap.add_argument("--out", default=results_path("folder_decode.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = [
            ("jpeg_500x375", (375, 500), "jpg", {"quality": 90}),
            ("png_500x375", (375, 500), "png", {}),
            ("png_64x64", (64, 64), "png", {}),
        ]
        for name, size, ext, kw in sets:
            d, mean_bytes = write_set(tmp, name, args.num, size, ext, **kw)
            files = sorted(os.path.join(d, f) for f in os.listdir(d))
            for res in (32, 64):
                decode = rate(
                    lambda res=res, files=files: [folder.load_image(f, res) for f in files],
                    len(files),
                )
                out = os.path.join(tmp, f"{name}_{res}_arrays")
                t0 = time.process_time()
                folder_arrays.convert(d, out, res, num_workers=0)
                convert_s = time.process_time() - t0
                arrays = [folder_arrays.open_arrays(out, s, res) for s in folder.SPLITS]

                def read(arrays=arrays):
                    for a in arrays:
                        for i in range(len(a)):
                            a[i]

                row = {
                    "set": name,
                    "file_bytes_mean": mean_bytes,
                    "resolution": res,
                    "decode_images_per_s_per_core": decode,
                    "arrays_images_per_s_per_core": rate(read, len(files)),
                    "convert_cpu_s": convert_s,
                }
                log(
                    f"{name} -> {res}: decode {decode:.0f}/s, arrays "
                    f"{row['arrays_images_per_s_per_core']:.0f}/s"
                )
                rows.append(row)
    payload = {
        "meta": {
            **machine_info(),
            "loadavg_1min_end": loadavg(),
            "num_images_per_set": args.num,
            "versions": versions(["pillow", "numpy"]),
            "command": "python "
            + " ".join([os.path.relpath(__file__, os.getcwd()), *sys.argv[1:]]),
        },
        "rows": rows,
    }
    write_json(args.out, payload)
    print("| images | to | decode (images/s/core) | arrays (images/s/core) |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['set']} ({r['file_bytes_mean'] / 1e3:.0f} kB) | {r['resolution']} | "
            f"{r['decode_images_per_s_per_core']:.0f} | {r['arrays_images_per_s_per_core']:.0f} |"
        )


if __name__ == "__main__":
    main()
