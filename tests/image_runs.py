"""Shared by the image experiment tests: the tiny preset made smaller, a tiny npz dataset,
subprocess settings and readers of a run's outputs."""

import json
import math
import os
import subprocess

import numpy as np
from conftest import ROOT, XLA_CACHE

from experiments.configs import imagenet32 as imagenet32_config

# The tiny preset made smaller still (one resolution level, 16 channels) to keep compiles short.
SMALL = {
    "model.ch": 16,
    "model.ch_mult": (1,),
    "model.attn_resolutions": (),
    "train.num_steps": 4,
    "train.checkpoint_every": 2,
    "train.log_every": 1,
    "train.sample_every": 4,
    "train.progress": False,
    "eval.num_dequant": 2,
    "eval.global_batch_size": 4,
    "eval.num_batches": 1,
    "eval.nfe_num_samples": 4,
    "eval.sample_batch_size": 4,
    "data.global_batch_size": 4,
    "data.read_threads": 1,
}


def small_config(preset="tiny", **extra):
    c = imagenet32_config.get_config(preset)
    for dotted, value in {**SMALL, **extra}.items():
        *group, name = dotted.split(".")
        (c[group[0]] if group else c)[name] = value
    return c


def parsed_flags(name, *args):
    """Fresh flags of ``python -m experiments.<name> --config=<its config>:tiny *args``,
    parsed in this process."""
    from absl import flags

    from experiments.images import main as main_lib

    config = main_lib.config_path(name)
    argv = [name, f"--config={config}:tiny", "--notune_cpu_allocator", *args]
    fv = flags.FlagValues()
    main_lib.define_flags(config, fv, argv)
    main_lib.parse(argv, fv)
    return fv


def config_flag(dotted, value):
    if isinstance(value, tuple):
        value = "(" + ",".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
    return f"--config.{dotted}={value}"


def subprocess_env(**extra):
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        JAX_COMPILATION_CACHE_DIR=XLA_CACHE,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1",
    )
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def run_here(args, **kw):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False, **kw)


def write_npz_dataset(folder, n_train=16, n_val=8, seed=0, resolution=32):
    """A tiny dataset in the official downsampled-ImageNet npz format (at 64x64 as the
    official zips unzip: the train batches in two sub-folders, the validation in a third)."""
    rng = np.random.default_rng(seed)
    files = [("", "train_data_batch_1", n_train), ("", "val_data", n_val)]
    if resolution == 64:
        half = n_train // 2
        files = [
            ("Imagenet64_train_part1_npz", "train_data_batch_1", half),
            ("Imagenet64_train_part2_npz", "train_data_batch_6", n_train - half),
            ("Imagenet64_val_npz", "val_data", n_val),
        ]
    for sub, name, n in files:
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        np.savez(
            os.path.join(folder, sub, f"{name}.npz"),
            data=rng.integers(0, 256, (n, 3 * resolution**2), dtype=np.uint8),
            labels=rng.integers(1, 1001, n),
        )


def read_json(*path):
    with open(os.path.join(*map(str, path))) as f:
        return json.load(f)


def read_jsonl(*path):
    with open(os.path.join(*map(str, path))) as f:
        return [json.loads(ln) for ln in f]


def check_eval_metrics(m, dataset, nfe=True):
    assert m["dataset"]["name"] == dataset
    bpd = m["results"]["bpd"]
    assert bpd["dataset"] == dataset and math.isfinite(bpd["value"]) and bpd["value"] > 0
    assert bpd["num_dequant"] == 2 and bpd["num_examples"] == 4
    assert (m["results"]["nfe"]["value"] > 0) if nfe else ("nfe" not in m["results"])
    assert m["results"]["fid"]["value"] is None and "Inception" in m["results"]["fid"]["skipped"]
    # every reported number names its dataset
    for r in m["results"].values():
        assert dataset.split(":")[0] in r["dataset"]
    assert all(dataset.split(":")[0] in k for k in m["summary"])


def write_image_folder(root, n_train, n_eval, *, ext="png", classes=(), size=(40, 56), seed=0):
    """``n_train`` + ``n_eval`` random images of ``size`` (height, width) as ``ext`` files in
    ``root`` (spread over the ``classes`` sub-folders, if any), named so that the folder
    source's hash rule puts exactly that many in each split; returns their relative paths."""
    from PIL import Image

    from fmjax.data import folder

    rng = np.random.default_rng(seed)
    want = {"train": n_train, "eval": n_eval}
    written, i = [], 0
    while any(want.values()):
        sub = classes[i % len(classes)] + "/" if classes else ""
        rel = f"{sub}img_{i:05d}.{ext}"
        i += 1
        split = folder.split_of(rel)
        if want[split] == 0:
            continue
        want[split] -= 1
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            os.path.join(root, rel)
        )
        written.append(rel)
    return sorted(written)
