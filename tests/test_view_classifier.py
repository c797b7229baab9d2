"""The view classifier: label mapping, bad input, the annotation copy, and that it learns."""
import json
import os

import pytest
import torch

import data
import demo
import view_classifier as vc


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    demo.make_demo_dataset(root, n_train=120, n_val=40, n_test=10, seed=4)
    return root


def test_mimic_metadata_mapping(tmp_path):
    rows = [("d1", "10000032", "50414267", "PA"), ("d2", "10000032", "50414267", "LATERAL"),
            ("d3", "11000011", "51000011", "AP"), ("d4", "11000011", "51000011", "LL"),
            ("d5", "11000011", "51000011", "")]
    path = tmp_path / "meta.csv"
    path.write_text("dicom_id,subject_id,study_id,ViewPosition\n" + "".join(",".join(r) + "\n" for r in rows))
    labels = vc.mimic_view_labels(path)
    assert labels == {"p10/p10000032/s50414267/d1.jpg": "frontal", "p10/p10000032/s50414267/d2.jpg": "lateral",
                      "p11/p11000011/s51000011/d3.jpg": "frontal", "p11/p11000011/s51000011/d4.jpg": "lateral"}


def test_unknown_view_value_names_the_record(tmp_path):
    path = tmp_path / "meta.csv"
    path.write_text("dicom_id,subject_id,study_id,ViewPosition\nabc123,10000032,50414267,UPSIDE DOWN\n")
    with pytest.raises(data.DataError, match="abc123"):
        vc.mimic_view_labels(path)


def test_missing_image_names_the_record(tmp_path):
    demo.make_demo_dataset(tmp_path, n_train=6, n_val=2, n_test=2, seed=5)
    record = json.load(open(tmp_path / "annotation.json"))["train"][0]
    os.remove(tmp_path / "images" / record["image_path"][0])
    with pytest.raises(data.DataError, match=record["id"]):
        vc.main(["--data_dir", str(tmp_path), "--labels", "demo"])


def test_it_learns_and_writes_an_annotation_copy(small_demo):
    before = (small_demo / "annotation.json").read_bytes()
    vc.main(["--data_dir", str(small_demo), "--labels", "demo", "--epochs", "8", "--batch_size", "16"])
    out = small_demo / vc.VIEWS_ANNOTATION
    assert (small_demo / "annotation.json").read_bytes() == before            # the original is untouched
    truth = vc.demo_view_labels(small_demo)
    records = data.load_annotation(out, "val", small_demo / "images")
    pred = [v for r in records for v in r.views]
    true = [truth[p] for r in records for p in r.image_paths]
    accuracy = sum(p == t for p, t in zip(pred, true)) / len(true)
    majority = max(true.count("frontal"), true.count("lateral")) / len(true)
    lateral_recall = sum(p == t == "lateral" for p, t in zip(pred, true)) / max(1, true.count("lateral"))
    assert accuracy > majority and lateral_recall > 0.5, (accuracy, majority, lateral_recall)
    ckpt = [f for f in os.listdir(small_demo) if f.endswith(".pt")]
    assert ckpt and torch.load(small_demo / ckpt[0], weights_only=True)
