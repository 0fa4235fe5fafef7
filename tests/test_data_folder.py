"""A folder of the user's images (fmjax.data.folder) and its conversion to arrays
(fmjax.data.folder_arrays): the split rule against its definition, decoded pixels against
known images (exact crops, a resized ramp, constant colours), PNG and JPEG at 32 and 64
with and without class sub-folders through the pipelines, bad files named, exact resume."""

import hashlib
import io
import json

import numpy as np
import pytest
from image_runs import write_image_folder
from PIL import Image
from test_data_images import levels_of, train_iterator

from fmjax.data import folder, folder_arrays
from fmjax.data import images as di


def _save(path, array, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def test_split_rule_is_the_documented_hash_of_the_relative_path(tmp_path):
    names = [f"c{i % 3}/photo {i}.JPG" for i in range(4000)]
    for name in names:
        first8 = hashlib.sha256(name.encode("utf-8")).digest()[:8]
        expected = "eval" if int(first8.hex(), 16) % 100 < folder.EVAL_PERCENT else "train"
        assert folder.split_of(name) == expected
    share = sum(folder.split_of(n) == "eval" for n in names) / len(names)
    assert 0.04 < share < 0.06  # EVAL_PERCENT = 5
    written = write_image_folder(tmp_path, 6, 2, classes=("b", "a"), size=(8, 8))
    train = di.open_source("folder", "train", tmp_path, resolution=8)
    ev = di.open_source("folder", "eval", tmp_path, resolution=8)
    assert sorted(train.files + ev.files) == written and not set(train.files) & set(ev.files)
    assert train.files == sorted(train.files) and len(ev) == 2
    assert all(folder.split_of(f) == "eval" for f in ev.files)
    # classes are the sorted top-level sub-folders
    assert [int(train[i]["label"]) for i in range(6)] == [f[0] == "b" for f in train.files]


@pytest.mark.parametrize("resolution", [32, 64])
def test_png_crop_offsets_resized_ramp_and_exact_squares(tmp_path, resolution):
    r = resolution
    rows, cols = np.meshgrid(np.arange(r), np.arange(2 * r + 1), indexing="ij")
    wide = np.stack([cols % 256, rows, np.full_like(rows, 7)], -1).astype(np.uint8)
    _save(tmp_path / "wide.png", wide)  # shorter side already r: a crop, no resampling
    out = folder.load_image(tmp_path / "wide.png", r)
    left = (2 * r + 1 - r) // 2
    np.testing.assert_array_equal(out, wide[:, left : left + r])
    square = np.random.default_rng(0).integers(0, 256, (r, r, 3), dtype=np.uint8)
    _save(tmp_path / "square.png", square)
    np.testing.assert_array_equal(folder.load_image(tmp_path / "square.png", r), square)
    # a horizontal ramp 0..2r-1 halved: bicubic reproduces a linear function, so column j
    # is the mean of source columns 2j and 2j + 1 (away from the edges), within rounding
    ramp = np.stack(np.broadcast_arrays(cols[:, : 2 * r].repeat(2, 0), 50, 200), -1)
    _save(tmp_path / "ramp.png", ramp.astype(np.uint8))
    out = folder.load_image(tmp_path / "ramp.png", r).astype(float)
    np.testing.assert_allclose(
        out[:, 2:-2, 0], np.broadcast_to(2 * np.arange(2, r - 2) + 0.5, (r, r - 4)), atol=0.51
    )
    assert (out[..., 1] == 50).all() and (out[..., 2] == 200).all()


@pytest.mark.parametrize("ext", ["png", "jpg"])
@pytest.mark.parametrize("classes", [(), ("dogs", "cats")])
@pytest.mark.parametrize("resolution", [32, 64])
def test_png_and_jpeg_with_and_without_classes_through_the_pipelines(
    tmp_path, ext, classes, resolution
):
    written = write_image_folder(tmp_path, 5, 2, ext=ext, classes=classes, size=(70, 90))
    # a constant-colour grayscale image of another size: decoded to that colour in RGB
    gray = np.full((3 * resolution + 1, 2 * resolution), 90, np.uint8)
    name = f"{classes[0]}/gray.{ext}" if classes else f"gray.{ext}"
    _save(tmp_path / name, gray)
    split = folder.split_of(name)
    src = di.open_source("folder", split, tmp_path, resolution=resolution)
    img = src[src.files.index(name)]["image"]
    assert img.shape == (resolution, resolution, 3) and img.dtype == np.uint8
    assert np.abs(img.astype(int) - 90).max() <= (0 if ext == "png" else 2)
    t = next(
        train_iterator("folder", global_batch_size=4, data_dir=tmp_path, resolution=resolution)
    )
    assert t["image"].shape == (4, resolution, resolution, 3) and t["image"].dtype == np.float32
    expected_labels = {0, 1} if classes else {di.NO_LABEL}
    assert set(t["label"].tolist()) <= expected_labels
    e = list(
        di.make_eval_iterator(
            "folder", global_batch_size=2, data_dir=tmp_path, resolution=resolution
        )
    )
    ev = di.open_source("folder", "eval", tmp_path, resolution=resolution)
    assert sum(int(b["mask"].sum()) for b in e) == len(ev) >= 2
    np.testing.assert_array_equal(e[0]["image"][0], levels_of(ev[0]["image"]))
    assert len(written) == 7


def _png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_files_are_errors_naming_the_file(tmp_path):
    write_image_folder(tmp_path, 3, 1, size=(16, 16))
    good = _png_bytes(np.zeros((16, 16, 3), np.uint8))
    cases = {
        "truncated.png": good[: len(good) // 2],
        "not_an_image.jpg": b"hello",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    _save(tmp_path / "deep.png", np.zeros((16, 16), np.uint16))  # 16-bit grayscale
    for name in [*cases, "deep.png"]:
        with pytest.raises(folder.ImageFileError, match=name):
            folder.load_image(tmp_path / name, 16)
    src = di.open_source("folder", folder.split_of("truncated.png"), tmp_path, resolution=16)
    with pytest.raises(folder.ImageFileError, match="truncated.png"):
        src[src.files.index("truncated.png")]
    with pytest.raises(folder.ImageFileError, match=r"not_an_image\.jpg|truncated\.png|deep"):
        it = train_iterator("folder", global_batch_size=4, data_dir=tmp_path, resolution=16)
        for _ in range(3):  # one epoch reads every train file, the bad ones included
            next(it)
    # layouts that cannot be read, and a folder that is not there
    _save(tmp_path / "cls" / "x.png", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="both directly in it"):
        di.num_examples("folder", "train", tmp_path, resolution=16)
    with pytest.raises(di.DatasetNotFoundError, match="is not a folder"):
        di.num_examples("folder", "train", tmp_path / "nope", resolution=16)
    with pytest.raises(di.DatasetNotFoundError, match="needs data_dir"):
        di.num_examples("folder", "train", None, resolution=16)
    with pytest.raises(ValueError, match="give one"):
        di.num_examples("folder", "train", tmp_path)


def test_conversion_gives_the_same_batches_and_resumes_exactly(tmp_path):
    src_dir, out_dir = tmp_path / "photos", tmp_path / "arrays"
    write_image_folder(src_dir, 10, 2, ext="jpg", classes=("a", "b"), size=(30, 41))
    manifest = folder_arrays.convert(src_dir, out_dir, 24, num_workers=0)
    assert manifest["num_images"] == {"train": 10, "eval": 2} and manifest["classes"] == ["a", "b"]
    assert json.loads((out_dir / folder_arrays.MANIFEST).read_text())["resolution"] == 24
    kw = {"global_batch_size": 4, "resolution": 24, "seed": 3}
    files = [
        next(it) for it in [train_iterator("folder", data_dir=src_dir, **kw)] for _ in range(6)
    ]
    it = train_iterator("folder", data_dir=out_dir, **kw)
    head = [next(it) for _ in range(2)]
    fresh = train_iterator("folder", data_dir=out_dir, **kw)
    fresh.set_state(json.loads(json.dumps(it.get_state())))
    arrays = head + [next(fresh) for _ in range(4)]  # crosses epochs (10 images, batch 4)
    for a, b in zip(files, arrays, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    with pytest.raises(ValueError, match="converted at 24x24, but resolution 32"):
        di.num_examples("folder", "train", out_dir, resolution=32)
    (src_dir / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(folder.ImageFileError, match=r"(?s)1 of 13 files .*broken\.jpg"):
        folder_arrays.convert(src_dir, tmp_path / "again", 24, num_workers=0)
    skipped = folder_arrays.convert(src_dir, tmp_path / "again", 24, num_workers=0, skip_bad=True)
    assert skipped["num_skipped"] == 1 and "broken.jpg" in skipped["skipped"][0]
    assert sum(skipped["num_images"].values()) == 12
