"""data.py's one-time image preparation: sizes, resumability, errors, and the same tensors as the originals."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data

# (relative path, width, height, kind): portrait and landscape, 8- and 16-bit, JPEG, colour, one image
# smaller than 256 (upscaled, as the dataset's own resize would), two images per IU-Xray-like study
IMAGES = [("p10/s1/a.png", 300, 420, "L16"), ("p10/s1/b.png", 520, 380, "L"), ("p11/s2/c.jpg", 640, 800, "L"),
          ("p11/s3/d.png", 333, 290, "RGB"), ("p12/s4/e.png", 200, 300, "L"), ("p12/s4/f.jpg", 900, 700, "L")]


def _xray_like(w, h, seed, maxval):
    """Smooth shapes plus noise (realistic for the resize filter and JPEG), in 0..maxval."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.random((6, 5)).astype(np.float32), "F").resize((w, h), Image.BICUBIC)
    a = np.clip(np.asarray(low) + rng.normal(0, 0.03, (h, w)), 0, 1)
    return np.rint(a * maxval)


def _write(path, w, h, kind, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == "L16":
        Image.fromarray(_xray_like(w, h, seed, 65535).astype(np.uint16)).save(path)
        assert Image.open(path).mode.startswith("I")             # really a 16-bit PNG
    elif kind == "RGB":
        a = np.stack([_xray_like(w, h, seed + c, 255) for c in range(3)], -1).astype(np.uint8)
        Image.fromarray(a, "RGB").save(path)
    else:
        Image.fromarray(_xray_like(w, h, seed, 255).astype(np.uint8), "L").save(path, quality=95)


@pytest.fixture
def dataset(tmp_path):
    """tmp/images/... and tmp/annotation.json (R2Gen layout), two studies per split."""
    src = tmp_path / "images"
    for i, (rel, w, h, kind) in enumerate(IMAGES):
        _write(str(src / rel), w, h, kind, seed=i)
    ann = {}
    for s, split in enumerate(data.SPLITS):
        ann[split] = [dict(id=f"{split}-{j}", report="the heart is normal.", split=split,
                           image_path=[IMAGES[2 * s + j][0]]) for j in range(2)]
    ann["train"][1]["image_path"] = [IMAGES[2][0], IMAGES[3][0]]   # a path used twice is prepared once
    ann["train"][0]["image_path"] = [IMAGES[0][0], IMAGES[1][0]]
    with open(tmp_path / "annotation.json", "w") as f:
        json.dump(ann, f)
    return tmp_path


def prepare(root, workers=0, **kw):
    return data.prepare_images(root / "annotation.json", root / "images", root / "prepared", workers=workers,
                               progress=False, **kw)


def test_prepared_images_have_shorter_edge_256_and_the_same_aspect_ratio(dataset):
    counts = prepare(dataset, workers=2)                   # through the process pool
    assert counts == {"written": len(IMAGES), "skipped": 0}
    for rel, w, h, kind in IMAGES:
        with Image.open(dataset / "prepared" / rel) as img:
            pw, ph = img.size
            assert min(pw, ph) == 256, (rel, img.size)
            # the long edge is rounded down to whole pixels: the ratio moves by less than 1/256
            assert abs(pw / ph - w / h) < 1 / 256, (rel, img.size, (w, h))
            assert img.mode == ("RGB" if kind == "RGB" else "L")           # grey stays one channel
            assert img.format == ("JPEG" if rel.endswith(".jpg") else "PNG")
    assert not list((dataset / "prepared").rglob("*.part"))


def test_a_second_run_does_no_work(dataset):
    prepare(dataset)
    outputs = sorted((dataset / "prepared").rglob("*.*"))
    assert len(outputs) == len(IMAGES)
    before = {p: p.stat().st_mtime_ns for p in outputs}
    assert prepare(dataset, workers=2) == {"written": 0, "skipped": len(IMAGES)}
    assert {p: p.stat().st_mtime_ns for p in outputs} == before


def test_an_interrupted_run_is_completed_by_the_next(dataset):
    prepare(dataset)
    out = dataset / "prepared"
    reference = {rel: (out / rel).read_bytes() for rel, *_ in IMAGES}
    # an interruption can leave: an output never written, a temp file written but not renamed, and (if
    # something outside replaced a file by hand) a truncated output
    (out / IMAGES[0][0]).unlink()
    (out / IMAGES[1][0]).unlink()
    (out / (IMAGES[1][0] + ".part")).write_bytes(reference[IMAGES[1][0]][:100])
    (out / IMAGES[2][0]).write_bytes(reference[IMAGES[2][0]][:len(reference[IMAGES[2][0]]) // 2])
    assert prepare(dataset) == {"written": 3, "skipped": len(IMAGES) - 3}
    assert {rel: (out / rel).read_bytes() for rel, *_ in IMAGES} == reference
    assert not list(out.rglob("*.part"))


def test_a_corrupt_source_image_is_named_and_the_others_are_prepared(dataset, capsys):
    bad = dataset / "images" / IMAGES[4][0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    with pytest.raises(data.DataError, match="1 of 6 images could not be prepared") as err:
        prepare(dataset, workers=2)
    assert str(bad) in str(err.value)
    assert len(list((dataset / "prepared").rglob("*.*"))) == len(IMAGES) - 1
    # the command line says the same, without a traceback
    with pytest.raises(SystemExit) as exit_:
        data.main(["prepare", "--src", str(dataset / "images"), "--dst", str(dataset / "prepared"),
                   "--workers", "0"])
    assert str(bad) in str(exit_.value.code) and str(exit_.value.code).startswith("data.py: error:")


def test_refuses_to_overwrite_the_originals(dataset):
    with pytest.raises(data.DataError, match="originals would be overwritten"):
        data.prepare_images(dataset / "annotation.json", dataset / "images", dataset / "images" / ".",
                            progress=False)


@pytest.mark.parametrize("train", [False, True])
def test_the_dataset_gives_the_same_tensors_over_the_prepared_root(dataset, train):
    prepare(dataset)
    for split in data.SPLITS:
        records = data.load_annotation(dataset / "annotation.json", split, dataset / "images")
        raw, prep = (data.ReportDataset(records, str(dataset / root), data.clean_report_mimic_cxr, train=train, seed=3)
                     for root in ("images", "prepared"))
        for i in range(len(records)):
            a, b = raw[i]["pixel_values"], prep[i]["pixel_values"]
            assert a.shape == b.shape == (len(records[i].image_paths), 3, 224, 224)
            for k, rel in enumerate(records[i].image_paths):
                diff = (a[k] - b[k]).abs()
                if rel.endswith(".png"):     # lossless: bit-identical, 16-bit and colour sources included
                    assert torch.equal(a[k], b[k]), (rel, diff.max().item())
                else:                         # re-encoded at JPEG quality 95: about one grey level
                    levels = diff * torch.tensor(data.STD).view(3, 1, 1) * 255          # back to 0..255 units
                    psnr = 10 * torch.log10(255 ** 2 / levels.pow(2).mean())
                    assert levels.mean() < 1.5 and psnr > 40, (rel, levels.mean().item(), psnr.item())
