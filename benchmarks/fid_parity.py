"""fmjax's FID against the reference pytorch-fid, end to end, on the same weights and files.

    pip install -e ".[peers]"            # torch (CPU build), torchvision, pytorch-fid
    python benchmarks/fid_parity.py --num 256 --out benchmarks/results/fid_parity.json
    python benchmarks/fid_parity.py --weights pt_inception-2015-12-05-6726825d.pth  # real

What it does:

1. Builds pytorch-fid's own FID Inception-v3 (``pytorch_fid.inception.InceptionV3``, the
   2048-d pool3 block), with its weight download replaced: by default the network keeps the
   architecture and gets random weights from torch's generator (He-normal convolutions,
   batch-norm statistics and affine terms drawn around the identity, so activations stay
   well scaled through the 94 units); with ``--weights`` the given ``.pth`` is loaded instead.
   The network's state dict is saved as a ``.pth`` and converted by fmjax's
   :func:`fmjax.models.inception_weights.convert_pytorch_fid_weights`.
2. Writes image sets as 32x32 PNG files: ``shapes`` (random discs and rectangles on random
   backgrounds, two independent sets) and ``noise`` (smoothed Gaussian noise).
3. pytorch-fid: pool3 features of every file (``get_activations``: PIL, ``ToTensor``, its
   resize and scaling), their statistics as its ``calculate_activation_statistics`` takes
   them (``np.mean``, ``np.cov``; written out so that each file is read once) and its
   ``calculate_frechet_distance``.
4. fmjax: the same files read as 8-bit arrays, features by
   :func:`fmjax.models.inception.inception_features` (after :func:`fmjax.metrics.fid.preprocess`)
   and the FID from them by :func:`fmjax.metrics.fid.statistics` and
   :func:`fmjax.metrics.fid.frechet_distance`, the steps of
   :func:`fmjax.metrics.fid.compute_fid`, which ``--check_compute_fid`` also runs whole.

Reports the largest absolute and relative feature difference and both FIDs of each pair.
``--reference NPZ`` instead writes a small file for a test that needs no torch
(``benchmarks/results/fid_parity_reference.npz``): the features pytorch-fid gives for two
32x32 images with fmjax's ``init_random_params(0)`` weights written in pytorch-fid's layout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import harness
import numpy as np

FIELDS = {"kernel": "conv.weight", "scale": "bn.weight", "bias": "bn.bias"}
FIELDS.update(mean="bn.running_mean", var="bn.running_var")


# ----------------------------------------------------------------------------- images


def shapes_images(num: int, seed: int, size: int = 32) -> np.ndarray:
    """``num`` uint8 images of random discs and rectangles on random backgrounds."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((num, size, size, 3), np.uint8)
    for i in range(num):
        img = np.ones((size, size, 3)) * rng.uniform(0, 255, 3)
        for _ in range(rng.integers(1, 5)):
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(3, size / 3)
            if rng.random() < 0.5:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            else:
                mask = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < rng.uniform(3, size / 3))
            img[mask] = rng.uniform(0, 255, 3)
        out[i] = np.clip(np.round(img), 0, 255)
    return out


def noise_images(num: int, seed: int, size: int = 32) -> np.ndarray:
    """``num`` uint8 images of Gaussian noise smoothed by a 3x3 box filter."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1, (num, size + 2, size + 2, 3))
    smooth = sum(z[:, i : i + size, j : j + size] for i in range(3) for j in range(3)) / 3.0
    return np.clip(np.round(128 + 60 * smooth), 0, 255).astype(np.uint8)


def write_pngs(images: np.ndarray, folder: str) -> list[str]:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    files = []
    for i, img in enumerate(images):
        files.append(os.path.join(folder, f"{i:05d}.png"))
        Image.fromarray(img).save(files[-1])
    return files


def read_pngs(files: list[str]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


# ----------------------------------------------------------------------------- pytorch-fid

TORCHVISION_NOTE = []  # filled when torchvision's C++ extension could not be loaded


def import_pytorch_fid():
    """``pytorch_fid.inception``. A torchvision whose C++ extension does not match torch
    (PyPI's CUDA build of torchvision beside torch's CPU build: ``operator torchvision::nms
    does not exist``) is imported without registering its detection operators' kernels,
    which the FID network (convolutions, batch norms, pools, ``interpolate``) never calls."""
    import types

    try:
        import pytorch_fid.inception as pfi
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules[name] = types.ModuleType(name)
        TORCHVISION_NOTE.append(f"torchvision imported without its C++ operators ({err})")
        import pytorch_fid.inception as pfi
    return pfi


@contextlib.contextmanager
def pytorch_fid_weights(state_dict):
    """While active, pytorch-fid's FID Inception loads ``state_dict`` (None: keeps its
    architecture's initial weights) instead of downloading its weights; yields a list that
    receives each torchvision ``Inception3`` built (the module the ``.pth`` describes)."""
    pfi = import_pytorch_fid()
    from torchvision.models.inception import Inception3

    built = []
    loader, load = pfi.load_state_dict_from_url, Inception3.load_state_dict

    def fake_loader(url, *args, **kwargs):
        del url, args, kwargs
        return state_dict

    def fake_load(self, sd, *args, **kwargs):
        built.append(self)
        return None if sd is None else load(self, sd, *args, **kwargs)

    pfi.load_state_dict_from_url, Inception3.load_state_dict = fake_loader, fake_load
    try:
        yield built
    finally:
        pfi.load_state_dict_from_url, Inception3.load_state_dict = loader, load


def randomize_(net, seed: int) -> None:
    """He-normal convolutions and batch norms near the identity, from torch's generator."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=g)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.8, 1.2, generator=g)
                m.bias.normal_(0.0, 0.05, generator=g)
                m.running_mean.normal_(0.0, 0.05, generator=g)
                m.running_var.uniform_(0.8, 1.2, generator=g)


def build_pytorch_fid(seed: int, weights: str | None, pth_out: str):
    """pytorch-fid's ``InceptionV3`` (pool3) with random (or ``weights``) parameters, whose
    torchvision ``Inception3`` state dict is saved to ``pth_out``."""
    import torch

    pfi = import_pytorch_fid()
    sd = None if weights is None else torch.load(weights, map_location="cpu")
    with pytorch_fid_weights(sd) as built:
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    (net,) = built
    if weights is None:
        randomize_(net, seed)
    torch.save(net.state_dict(), pth_out)
    return model.eval()


def torch_features(model, files, batch_size):
    from pytorch_fid.fid_score import get_activations

    return get_activations(files, model, batch_size=batch_size, dims=2048, num_workers=0)


# ----------------------------------------------------------------------------- compare


def diffs(a, b) -> dict:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.abs(a - b)
    return {
        "max_abs_diff": float(err.max()),
        "max_rel_diff": float((err / np.maximum(np.abs(b), 1e-30))[np.abs(b) > 1e-3].max()),
        "max_abs_diff_over_max_abs": float(err.max() / np.abs(b).max()),
        "mean_abs": float(np.abs(b).mean()),
    }


def fmjax_features(params, images, batch_size):
    from fmjax.metrics import fid

    out = []
    for s in range(0, len(images), batch_size):
        x = fid.preprocess(images[s : s + batch_size])
        out.append(np.asarray(fid.inception_features(params, x)))
    return np.concatenate(out)


def run(args) -> dict:
    import jax
    import torch

    from fmjax.metrics import fid

    import_pytorch_fid()
    from pytorch_fid.fid_score import calculate_frechet_distance

    log = harness.logger("fid_parity")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tmp = tempfile.mkdtemp(prefix="fid_parity_")
    pth, npz = os.path.join(tmp, "pt_inception.pth"), os.path.join(tmp, "inception.npz")
    model = build_pytorch_fid(args.seed, args.weights, pth)
    fid.convert_pytorch_fid_weights(pth, npz)
    params = fid.load_weights(npz)
    n = args.num
    sets = {
        "shapes_a": shapes_images(n, args.seed + 1),
        "shapes_b": shapes_images(n, args.seed + 2),
        "noise": noise_images(n, args.seed + 3),
    }
    folders = {k: os.path.join(tmp, k) for k in sets}
    files = {k: write_pngs(v, folders[k]) for k, v in sets.items()}
    res = {
        "weights": args.weights or f"random (torch generator, seed {args.seed})",
        "num_images_per_set": n,
        "image_size": 32,
        "sets": list(sets),
        "features": {},
        "fid": {},
    }
    torch_stats, ours_feats = {}, {}
    for k in sets:
        t = time.perf_counter()
        ref = torch_features(model, files[k], args.batch_size)
        t_torch = time.perf_counter() - t
        t = time.perf_counter()
        ours = fmjax_features(params, read_pngs(files[k]), args.batch_size)
        t_jax = time.perf_counter() - t
        torch_stats[k] = (np.mean(ref, axis=0), np.cov(ref, rowvar=False))
        ours_feats[k] = ours
        res["features"][k] = {**diffs(ours, ref), "seconds_torch": t_torch, "seconds_fmjax": t_jax}
        log(f"{k}: {res['features'][k]}")
    for a, b in (("shapes_a", "shapes_b"), ("shapes_a", "noise")):
        # pytorch-fid: calculate_activation_statistics (np.mean and np.cov of
        # get_activations) and calculate_frechet_distance, from the features above
        ref = calculate_frechet_distance(*torch_stats[a], *torch_stats[b])
        # fmjax: what compute_fid does with the features (statistics, frechet_distance)
        ours = fid.frechet_distance(*fid.statistics(ours_feats[a]), *fid.statistics(ours_feats[b]))
        res["fid"][f"{a}|{b}"] = {
            "pytorch_fid": float(ref),
            "fmjax": float(ours),
            "abs_diff": abs(float(ours) - float(ref)),
            "rel_diff": abs(float(ours) - float(ref)) / abs(float(ref)),
        }
        log(f"FID {a}|{b}: {res['fid'][f'{a}|{b}']}")
    if args.check_compute_fid:  # the whole of compute_fid once more, on the files' pixels
        ours = fid.compute_fid(
            lambda i: read_pngs(files["noise"]),
            [read_pngs(files["shapes_a"])],
            npz,
            n,
            feature_batch_size=args.batch_size,
            params=params,
        )
        res["fid"]["shapes_a|noise"]["fmjax_compute_fid"] = float(ours)
    res["meta"] = {
        **harness.machine_info(),
        "jax_backend": jax.default_backend(),
        "versions": harness.versions(
            ["jax", "flax", "torch", "torchvision", "pytorch-fid", "scipy", "numpy"]
        ),
        "notes": TORCHVISION_NOTE,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/fid_parity.py " + " ".join(sys.argv[1:]),
    }
    return res


def write_reference(path: str, num: int = 2) -> None:
    """pytorch-fid's pool3 features of ``num`` 32x32 ``shapes`` images (its own resize and
    scaling of ``[0, 1]`` inputs) with fmjax's ``init_random_params(0)`` weights written in
    pytorch-fid's layout: the reference of a test that needs no torch."""
    import torch
    from flax import traverse_util

    from fmjax.models.inception_weights import init_random_params

    sd = {}
    for k, v in traverse_util.flatten_dict(init_random_params(0)["params"], sep="/").items():
        unit, field = k.rsplit("/", 1)
        v = np.asarray(v)
        v = v.transpose(3, 2, 0, 1) if field == "kernel" else v
        sd[f"{unit.replace('/', '.')}.{FIELDS[field]}"] = torch.from_numpy(np.ascontiguousarray(v))
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    pfi = import_pytorch_fid()
    with pytorch_fid_weights(None) as built:
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    built[0].load_state_dict(sd, strict=False)  # no num_batches_tracked
    images = shapes_images(num, 11)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        f = model(x)[0][:, :, 0, 0].numpy()
    np.savez_compressed(path, images=images, features=f.astype(np.float32))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=256, help="images per set")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default=None, help="pytorch-fid .pth (default: random)")
    p.add_argument("--out", default=harness.results_path("fid_parity.json"))
    p.add_argument(
        "--check_compute_fid",
        action="store_true",
        help="also run fmjax's compute_fid end to end on shapes_a|noise (two more passes)",
    )
    p.add_argument("--reference", default=None, help="write the test's reference npz here")
    args = p.parse_args(argv)
    if args.reference:
        write_reference(args.reference)
        return None
    if args.num < 2:
        p.error(f"--num must be >= 2; got {args.num}")
    res = run(args)
    harness.write_json(args.out, res)
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
