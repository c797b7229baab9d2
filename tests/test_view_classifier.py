"""Tests for view_classifier.py: the label sources, learning on demo images, the annotation copy, the
checkpoint, and the messages for bad input."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import demo  # noqa: E402
import view_classifier as vc  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A small demo data set. 200 training images rather than 60: with seed 0, 60 hold only 7 laterals,
    too few to learn from reliably in a few steps; 200 hold 42 (and val + test hold 17 of 50)."""
    root = str(tmp_path_factory.mktemp("demo"))
    demo.make_demo_dataset(root, n_train=200, n_val=40, n_test=10)
    return root


def load_split(root, split):
    return data.load_annotation(os.path.join(root, "annotation.json"), split, os.path.join(root, "images"))


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


# -----------------------------------------------------------------------------
# learning


def test_classifier_learns_views_of_held_out_images(demo_dir):
    images = os.path.join(demo_dir, "images")
    labels = vc.demo_view_labels(demo_dir)
    train, held_out = load_split(demo_dir, "train"), load_split(demo_dir, "val") + load_split(demo_dir, "test")
    torch.manual_seed(0)
    model = vc.build_classifier("resnet18")
    vc.train_classifier(model, train, images, labels, epochs=4, batch_size=16, lr=1e-3, image_size=48, seed=0)
    predicted = vc.predict_views(model, held_out, images, image_size=48, batch_size=64)
    assert set(predicted) == {p for r in held_out for p in r.image_paths}
    s = vc.view_accuracy(predicted, labels, held_out)
    majority = max(s["n_frontal"], s["n_lateral"]) / s["n"]
    print(f"held out: {s['n_frontal']} frontal, {s['n_lateral']} lateral (majority {majority:.2f}); {s}")
    # Always answering "frontal" scores the majority rate (0.66 here) with lateral recall 0, and a coin
    # has a negligible chance of 0.9 on 50 images, so each of these can fail; we measured 1.0 for all.
    assert s["n_lateral"] >= 10
    assert s["accuracy"] >= 0.9 > majority + 0.1
    assert s["recall_frontal"] >= 0.75 and s["recall_lateral"] >= 0.75


def test_training_is_deterministic_under_a_seed(demo_dir):
    images, labels = os.path.join(demo_dir, "images"), vc.demo_view_labels(demo_dir)
    train = load_split(demo_dir, "train")[:32]
    states = []
    for seed in (3, 3, 4):                           # the same initial weights each time: only `seed` differs
        torch.manual_seed(3)
        model = vc.build_classifier("resnet18")
        vc.train_classifier(model, train, images, labels, epochs=1, batch_size=16, lr=1e-3, image_size=32, seed=seed)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])   # the seed orders the data


# -----------------------------------------------------------------------------
# label sources

MIMIC_HEADER = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                "Rows", "Columns"]
MIMIC_POSITIONS = {
    "PA": "frontal", "AP": "frontal", "AP AXIAL": "frontal", "AP LLD": "frontal", "AP RLD": "frontal",
    "PA LLD": "frontal", "PA RLD": "frontal",
    "LATERAL": "lateral", "LL": "lateral", "XTABLE LATERAL": "lateral",
    "LAO": None, "RAO": None, "LPO": None, "SWIMMERS": None, "": None,
}


def test_mimic_metadata_maps_every_view_position(tmp_path):
    rows = [MIMIC_HEADER]
    for i, position in enumerate(MIMIC_POSITIONS):
        rows.append([f"dicom{i:02d}", "10000032", f"5041426{i % 3}", "CHEST (PA AND LAT)", position, "3056", "2544"])
    write_csv(tmp_path / "meta.csv", rows)
    labels = vc.mimic_view_labels(tmp_path / "meta.csv")
    expected = {f"p10/p10000032/s5041426{i % 3}/dicom{i:02d}.jpg": view
                for i, view in enumerate(MIMIC_POSITIONS.values()) if view is not None}
    assert labels == expected  # the keys are R2Gen's image_path; obliques, swimmer's and empty are left out


def test_mimic_metadata_with_an_unknown_view_names_the_record(tmp_path):
    write_csv(tmp_path / "meta.csv", [MIMIC_HEADER,
                                      ["aaa", "10000032", "50414267", "CHEST", "PA", "1", "1"],
                                      ["bbb-123", "10000032", "50414267", "CHEST", "OBLIQUE", "1", "1"]])
    with pytest.raises(data.DataError, match=r"line 3, dicom_id 'bbb-123': unknown view 'OBLIQUE'"):
        vc.mimic_view_labels(tmp_path / "meta.csv")


def test_mimic_metadata_without_the_view_column_is_refused(tmp_path):
    write_csv(tmp_path / "meta.csv", [["dicom_id", "subject_id", "study_id"], ["a", "1", "2"]])
    with pytest.raises(data.DataError, match="ViewPosition"):
        vc.mimic_view_labels(tmp_path / "meta.csv")


def test_csv_labels_accept_views_and_view_positions(tmp_path):
    write_csv(tmp_path / "v.csv", [["image_path", "view"], ["a/0.png", "frontal"], ["a/1.png", "Lateral"],
                                   ["b/0.png", "PA"], ["b/1.png", "LL"], ["c/0.png", ""]])
    assert vc.csv_view_labels(tmp_path / "v.csv") == {
        "a/0.png": "frontal", "a/1.png": "lateral", "b/0.png": "frontal", "b/1.png": "lateral"}
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "v.csv").read_bytes())  # as Excel saves it
    assert vc.csv_view_labels(tmp_path / "bom.csv") == vc.csv_view_labels(tmp_path / "v.csv")
    write_csv(tmp_path / "bad.csv", [["image_path", "view"], ["a/0.png", "frontal"], ["a/1.png", "side"]])
    with pytest.raises(data.DataError, match=r"line 3, image 'a/1.png': unknown view 'side'"):
        vc.csv_view_labels(tmp_path / "bad.csv")


def test_demo_labels_cover_every_image(demo_dir):
    labels = vc.demo_view_labels(demo_dir)
    paths = [p for split in data.SPLITS for r in load_split(demo_dir, split) for p in r.image_paths]
    assert sorted(labels) == sorted(paths) and set(labels.values()) == set(data.VIEWS)


# -----------------------------------------------------------------------------
# missing images


def test_missing_image_names_the_record(demo_dir, tmp_path):
    # through the command line: load_annotation's check, printed without a traceback
    root = tmp_path / "data"
    shutil.copytree(demo_dir, root, ignore=shutil.ignore_patterns("annotation_views.json", "*.pt"))
    ann = json.loads((root / "annotation.json").read_text())
    victim = ann["val"][3]
    os.remove(root / "images" / victim["image_path"][0])
    result = subprocess.run([sys.executable, os.path.join(REPO, "view_classifier.py"), "--data_dir", str(root)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"record {victim['id']!r}" in result.stderr and "does not exist" in result.stderr
    assert not (root / vc.VIEWS_ANNOTATION).exists()

    # and an image that vanishes after the annotation was loaded
    record = data.Record(victim["id"], "r", victim["image_path"], "val", None)
    with pytest.raises(data.DataError, match=f"record {victim['id']!r}: .*cannot read image"):
        vc.predict_views(vc.build_classifier(), [record], str(root / "images"), image_size=32, batch_size=4)


# -----------------------------------------------------------------------------
# the annotation copy and the checkpoint


def test_annotation_copy_has_one_view_per_image_and_leaves_the_original(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    entries = {}
    for split in data.SPLITS:  # two images per study, as in IU-Xray
        entries[split] = [dict(id=f"{split}{i}", report="The heart is normal.", split=split,
                               image_path=[f"{split}{i}_0.png", f"{split}{i}_1.png"]) for i in range(2)]
        for e in entries[split]:
            for p in e["image_path"]:
                (images / p).write_bytes(b"")
    original = tmp_path / "annotation.json"
    original.write_text(json.dumps(entries))
    before = original.read_bytes()
    views = {p: ("frontal" if p.endswith("_0.png") else "lateral")
             for es in entries.values() for e in es for p in e["image_path"]}
    views["val1_0.png"] = "lateral"  # one study with both images lateral, so order and pairing are checked

    vc.write_annotation_with_views(original, tmp_path / "copy.json", views)
    assert original.read_bytes() == before
    assert not (tmp_path / "copy.json.tmp").exists()
    for split in data.SPLITS:
        for rec in data.load_annotation(tmp_path / "copy.json", split, images):
            assert rec.views == [views[p] for p in rec.image_paths]
    assert data.load_annotation(tmp_path / "copy.json", "val", images)[1].views == ["lateral", "lateral"]

    # an annotation saved with a byte-order mark, which load_annotation accepts, is copied too
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + before)
    vc.write_annotation_with_views(tmp_path / "bom.json", tmp_path / "bom_copy.json", views)
    assert json.loads((tmp_path / "bom_copy.json").read_text()) == json.loads((tmp_path / "copy.json").read_text())

    with pytest.raises(ValueError, match="overwrite"):
        vc.write_annotation_with_views(original, original, views)
    del views["test1_1.png"]
    with pytest.raises(data.DataError, match="record 'test1'"):
        vc.write_annotation_with_views(original, tmp_path / "copy2.json", views)


def test_ensure_views_writes_annotation_and_checkpoint_once(demo_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(demo_dir, root)
    before = (root / "annotation.json").read_bytes()
    path = vc.ensure_views(str(root))  # the whole script with its defaults
    assert path == str(root / vc.VIEWS_ANNOTATION) and (root / "annotation.json").read_bytes() == before

    ckpt = torch.load(root / vc.CHECKPOINT, weights_only=True)  # tensors, strings and numbers only
    assert ckpt["arch"] == "resnet18" and ckpt["image_size"] == 64 and 0 <= ckpt["accuracy"]["val"] <= 1
    model, image_size = vc.load_classifier(root / vc.CHECKPOINT)
    val = data.load_annotation(path, "val", root / "images")
    assert all(r.views is not None for r in val)
    # the reloaded classifier gives back the views that were written
    assert vc.predict_views(model, val, root / "images", image_size, 64) == {
        p: v for r in val for p, v in zip(r.image_paths, r.views)}

    mtime = os.path.getmtime(path)
    assert vc.ensure_views(str(root)) == path and os.path.getmtime(path) == mtime  # not made twice
