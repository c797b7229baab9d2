"""Tests for data.py: report cleaning, annotation validation, images, the dataset and the collate."""

import json
import os
import random
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import demo  # noqa: E402

# -----------------------------------------------------------------------------
# report cleaning: (raw, expected) written out by hand, one group of rules per case

IU_CASES = [
    # '..' collapses (repeatedly), sentences split on '. ', lowercased, ' . ' joins, ' .' ends
    ("The heart is normal in size.. No pleural effusion.", "the heart is normal in size . no pleural effusion ."),
    ("Heart size normal....  Lungs clear...", "heart size normal . lungs clear ."),
    # quotes, slashes, backslashes and R2Gen's character class go; '-' and digits stay; spaces collapse
    ("No \"acute\" cardio/pulmonary disease; (stable) X-ray: [ok] {a} 50% b&c @ <1> = 2 * 3! is it? ^_+ it's back\\slash.",
     "no acute cardiopulmonary disease stable x-ray ok a 50 bc 1 2 3 is it its backslash ."),
    # numbered list markers: '1. ' removed, '. 2. ' and ' 4. ' become sentence breaks
    ("1. No acute process. 2. Stable cardiomegaly. 3. Small effusion.",
     "no acute process . stable cardiomegaly . small effusion ."),
    ("Findings: 4. Lines intact.", "findings . lines intact ."),
    # empty sentences are dropped; XXXX (IU-Xray's anonymisation) is just lowercased
    ("XXXX is normal. . .", "xxxx is normal ."),
    # a newline is not a sentence break for IU-Xray
    ("Heart normal.\nLungs clear.", "heart normal lungs clear ."),
    ("...", ""),
]

MIMIC_CASES = [
    # newlines become spaces (so '.\n' is a sentence break), runs of spaces collapse
    ("FINDINGS:\nThe heart is normal.\n\nNo effusion.", "findings the heart is normal . no effusion ."),
    ("Heart normal.\nLungs clear.", "heart normal . lungs clear ."),
    # '__+' runs (MIMIC's anonymisation) collapse to '_', which the character class then removes
    ("Comparison: ___ Lungs are clear.", "comparison lungs are clear ."),
    ("Compared to ____. No change.", "compared to . no change ."),
    # multiple dots
    ("Heart normal... Lungs clear..", "heart normal . lungs clear ."),
    # numbered impression
    ("IMPRESSION:\n1. Cardiomegaly.\n2. No effusion.\n3. No pneumothorax.",
     "impression cardiomegaly . no effusion . no pneumothorax ."),
    # the same per-sentence characters as IU-Xray; an abbreviation's '. ' splits a sentence, as in R2Gen
    ("Tip at the cavo-atrial junction (approx. 2 cm); no PTX!", "tip at the cavo-atrial junction approx . 2 cm no ptx ."),
]


@pytest.mark.parametrize("raw, expected", IU_CASES)
def test_clean_iu_xray(raw, expected):
    assert data.clean_report_iu_xray(raw) == expected


@pytest.mark.parametrize("raw, expected", MIMIC_CASES)
def test_clean_mimic_cxr(raw, expected):
    assert data.clean_report_mimic_cxr(raw) == expected


@pytest.mark.parametrize("raw", [raw for raw, _ in IU_CASES + MIMIC_CASES])
def test_cleaning_is_idempotent(raw):
    # the demo tokenizer is trained on cleaned reports and the model's output is scored as is
    for clean in data.CLEANERS.values():
        assert clean(clean(raw)) == clean(raw)


# -----------------------------------------------------------------------------
# annotation validation


def _gray(path, w=40, h=32, value=128):
    Image.fromarray(np.full((h, w), value, np.uint8), "L").save(path)


@pytest.fixture
def ann_dir(tmp_path):
    """A valid IU-Xray-like annotation (two images per record) and its images; returns (dir, annotation)."""
    os.makedirs(tmp_path / "images")
    ann = {split: [] for split in ("train", "val", "test")}
    for split in ann:
        for i in range(3):
            rid = f"{split}{i}"
            paths = [f"{rid}_0.png", f"{rid}_1.png"]
            for p in paths:
                _gray(tmp_path / "images" / p)
            ann[split].append(dict(id=rid, report=f"Heart normal {i}. No effusion.", image_path=paths,
                                   split=split, extra_key=1))
    return tmp_path, ann


def _load(tmp_path, ann, split="train", raw=None):
    path = tmp_path / "annotation.json"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(json.dumps(ann))
    return data.load_annotation(path, split, tmp_path / "images")


def test_load_annotation_valid(ann_dir):
    root, ann = ann_dir
    recs = _load(root, ann, "val")
    assert [r.id for r in recs] == ["val0", "val1", "val2"]
    assert recs[1].image_paths == ["val1_0.png", "val1_1.png"] and recs[1].split == "val"
    assert recs[1].report == "Heart normal 1. No effusion." and recs[1].views is None
    ann["val"][0]["views"] = ["frontal", "lateral"]
    assert _load(root, ann, "val")[0].views == ["frontal", "lateral"]


# each breaks the record 'train1' and gives what the error message must say
BREAKS = {
    "missing key": (lambda e: e.pop("report"), "missing key 'report'"),
    "wrong type": (lambda e: e.update(image_path="train1_0.png"), "'image_path' should be a list"),
    "wrong type report": (lambda e: e.update(report=["a"]), "'report' should be a str"),
    "empty report": (lambda e: e.update(report="  \n "), "empty report"),
    "duplicate id": (lambda e: e.update(id="train0"), "duplicate id"),
    "missing image": (lambda e: e["image_path"].__setitem__(1, "nope.png"), "nope.png does not exist"),
    "views length": (lambda e: e.update(views=["frontal"]), "'views' should be a list of 2"),
    "views value": (lambda e: e.update(views=["frontal", "oblique"]), "'views' has a value not in"),
    "split field": (lambda e: e.update(split="test"), "listed under 'train'"),
    "image count": (lambda e: e.update(image_path=["train1_0.png"]), "has 1 image(s) where the split's other studies have 2"),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_load_annotation_refuses(ann_dir, case):
    root, ann = ann_dir
    mutate, problem = BREAKS[case]
    mutate(ann["train"][1])
    with pytest.raises(data.DataError) as err:
        _load(root, ann)
    msg = str(err.value)
    rid = ann["train"][1]["id"]
    assert "annotation.json" in msg and f"'{rid}'" in msg and "'train'" in msg and problem in msg, msg


def test_the_odd_image_count_out_is_named_even_when_it_comes_first(ann_dir):
    root, ann = ann_dir
    ann["train"][0]["image_path"] = ["train0_0.png"]
    with pytest.raises(data.DataError, match=r"1 bad record\(s\).*\n  record 'train0': has 1 image\(s\)[^\n]*$"):
        _load(root, ann)


def test_every_split_must_carry_images_per_study_images(ann_dir):
    root, ann = ann_dir
    for e in ann["test"]:
        e["image_path"] = e["image_path"][:1]
    records = {split: _load(root, ann, split) for split in data.SPLITS}
    data.check_images_per_study({s: records[s] for s in ("train", "val")}, 2, "annotation.json")
    with pytest.raises(data.DataError, match=r"the 'test' studies have 1 image\(s\) each, but images_per_study is 2"):
        data.check_images_per_study(records, 2, "annotation.json")
    with pytest.raises(data.DataError, match=r"the 'train' studies have 2 image\(s\) each, .*--images_per_study 2"):
        data.check_images_per_study(records, 1, "annotation.json")


def test_load_annotation_missing_id_names_index(ann_dir):
    root, ann = ann_dir
    ann["train"][2].pop("id")
    with pytest.raises(data.DataError, match=r"record #2: missing key 'id'"):
        _load(root, ann)


def test_load_annotation_bad_file(ann_dir):
    root, ann = ann_dir
    with pytest.raises(data.DataError, match="unknown split 'dev'"):
        _load(root, ann, split="dev")
    with pytest.raises(data.DataError, match=r"annotation.json: not UTF-8"):
        _load(root, ann, raw=b'{"train": [{"id": "\xff\xfe"}]}')
    with pytest.raises(data.DataError, match=r"annotation.json: not valid JSON"):
        _load(root, ann, raw=b'{"train": [')
    del ann["test"]
    with pytest.raises(data.DataError, match=r"no split 'test' at the top level \(it has \['train', 'val'\]"):
        _load(root, ann, split="test")
    # a UTF-8 byte-order mark (what some Windows tools write) is accepted
    assert len(_load(root, ann, raw=b"\xef\xbb\xbf" + json.dumps(ann).encode())) == 3


def test_load_annotation_lists_every_bad_record_at_once(ann_dir):
    """Fixing a 270k-record annotation takes one pass, not one run per bad record."""
    root, ann = ann_dir
    ann["train"][0]["report"] = 7
    ann["train"][2]["image_path"] = ["gone.png", "train2_1.png"]
    with pytest.raises(data.DataError) as err:
        _load(root, ann)
    msg = str(err.value)
    assert "split 'train': 2 bad record(s); fix or remove them" in msg
    assert "record 'train0': 'report' should be a str" in msg and "record 'train2': image file" in msg
    ann["train"] = [dict(id=f"t{i}", report="", image_path=["x.png"], split="train") for i in range(25)]
    with pytest.raises(data.DataError, match=r"(?s)25 bad record\(s\).*record 't19': empty report\n  \.\.\. and 5 more$"):
        _load(root, ann)


def test_report_that_is_not_valid_unicode_is_refused(ann_dir):
    # valid JSON and UTF-8, but "\ud800" decodes to a lone surrogate, which tokenizers cannot encode
    root, ann = ann_dir
    raw = json.dumps(ann).replace("Heart normal 1.", "Heart \\ud800 normal 1.").encode()
    with pytest.raises(data.DataError, match=r"record 'train1': the report is not valid Unicode text \(surrogates "
                                             r"not allowed at character 6\)"):
        _load(root, ann, raw=raw)


def test_report_empty_after_cleaning_is_refused():
    recs = [data.Record(f"r{i}", text, ["x.png"], "val", None) for i, text in enumerate(["Heart normal.", "...", "___ ."])]
    with pytest.raises(data.DataError, match=r"2 record\(s\) of split 'val' have a report that is empty after "
                                             r"cleaning .*\['r1', 'r2'\]"):
        data.clean_reports(recs, data.clean_report_mimic_cxr)
    with pytest.raises(data.DataError, match="empty after cleaning"):
        data.ReportDataset(recs, "images", data.clean_report_mimic_cxr, train=True)


def test_unreadable_image_names_record_and_file(ann_dir):
    root, ann = ann_dir
    (root / "images" / "train2_1.png").write_bytes(b"\x89PNG garbage, not an image" * 10)
    recs = _load(root, ann)  # existence is all load_annotation checks: cheap
    ds = data.ReportDataset(recs, root / "images", data.clean_report_iu_xray, train=False)
    ds[0]
    with pytest.raises(data.DataError) as err:
        ds[2]
    assert "'train2'" in str(err.value) and "train2_1.png" in str(err.value)
    # a PNG cut short is refused too (decoding is forced at load time)
    good = (root / "images" / "train0_0.png").read_bytes()
    (root / "images" / "train0_0.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(data.DataError, match="train0_0.png"):
        data.load_image(root / "images" / "train0_0.png")


# -----------------------------------------------------------------------------
# images and transforms


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 4096]], np.uint16)
    Image.fromarray(values).save(tmp_path / "x16.png")
    assert Image.open(tmp_path / "x16.png").mode.startswith("I")
    img = data.load_image(tmp_path / "x16.png")
    a = np.asarray(img)
    assert img.mode == "RGB" and a.shape == (1, 4, 3)
    assert a[0, :, 0].tolist() == [0, 100, 255, 16]  # 4096 / 257 = 15.9; clipping would give 255
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_grayscale_becomes_rgb(tmp_path):
    _gray(tmp_path / "g.png", value=77)
    a = np.asarray(data.load_image(tmp_path / "g.png"))
    assert a.shape == (32, 40, 3) and (a == 77).all()


def test_palette_and_bilevel_pngs_go_through_their_palette(tmp_path):
    gray = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    gray.putpalette([0, 0, 0, 200, 200, 200, 37, 37, 37])      # index -> grey level, not the index itself
    gray.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert np.asarray(data.load_image(tmp_path / "p.png"))[0].tolist() == [[0, 0, 0], [200, 200, 200], [37, 37, 37]]
    Image.fromarray(np.array([[0, 255]], np.uint8), "L").convert("1").save(tmp_path / "b.png")
    assert np.asarray(data.load_image(tmp_path / "b.png"))[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_an_image_far_larger_than_usual_is_refused_before_decoding(tmp_path, monkeypatch):
    _gray(tmp_path / "big.png", w=400, h=300)
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100_000)                # 400 x 300 = 120,000
    with pytest.raises(data.DataError, match=r"big.png: image is 400 x 300 = 0 M pixels, above the limit .*"
                                             r"data.MAX_IMAGE_PIXELS"):
        data.load_image(tmp_path / "big.png")
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)                # PIL's own limit: 2x this
    with pytest.raises(data.DataError, match=r"big.png: cannot read image \(Image size \(120000 pixels\) exceeds"):
        data.load_image(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)               # between PIL's warning and error
    assert data.load_image(tmp_path / "big.png").size == (400, 300)


def test_training_dataset_replaces_an_unreadable_record_and_says_so(ann_dir):
    root, ann = ann_dir
    recs = _load(root, ann)
    (root / "images" / "train1_0.png").write_bytes(b"not a png")
    ds = data.ReportDataset(recs, root / "images", data.clean_report_iu_xray, train=True, substitute_bad_images=True)
    item = ds[1]
    assert item["id"] == "train2" and len(item["skipped"]) == 1
    assert "record 'train1'" in item["skipped"][0] and "train1_0.png: cannot read image" in item["skipped"][0]
    assert torch.equal(item["pixel_values"], ds[2]["pixel_values"]) and ds[2]["skipped"] == []
    (root / "images" / "train2_1.png").write_bytes(b"")
    assert ds[1]["id"] == "train0"                                           # wraps around to the start
    # each item names only its own record, so an epoch counts each of two bad records in a row once
    assert [m.split(":")[0] for i in range(len(ds)) for m in ds[i]["skipped"]] == ["record 'train1'", "record 'train2'"]
    out = data.make_collate(demo.build_tokenizer(["heart normal ."], []), demo.build_tokenizer(["heart ."], []),
                            8, 8)([ds[1], ds[2]])
    assert out["ids"] == ["train0", "train0"] and len(out["skipped"]) == 2
    # evaluation never replaces a study
    with pytest.raises(data.DataError, match=r"record 'train1': .*train1_0.png: cannot read image"):
        data.ReportDataset(recs, root / "images", data.clean_report_iu_xray, train=False)[1]


def test_a_broken_images_directory_stops_the_run(ann_dir, monkeypatch):
    root, ann = ann_dir
    recs = _load(root, ann)
    monkeypatch.setattr(data, "MAX_BAD_IN_A_ROW", 2)
    for i in (0, 1):
        (root / "images" / f"train{i}_0.png").write_bytes(b"")
    ds = data.ReportDataset(recs, root / "images", data.clean_report_iu_xray, train=True, substitute_bad_images=True)
    with pytest.raises(data.DataError, match=r"2 records in a row have unreadable images, the last: record 'train1'"):
        ds[0]


def _column_image(w, h):
    """Pixel value = its column (mod 256), so a crop's first column tells where the crop starts."""
    return Image.fromarray(np.tile(np.arange(w) % 256, (h, 1)).astype(np.uint8), "L").convert("RGB")


def _first_column(x):
    v = x[0, :, 0] * data.STD[0] + data.MEAN[0]  # undo the normalisation of channel 0
    return (v * 255).round().long()


def test_transform_shapes_and_crops():
    img = _column_image(300, 256)
    x = data.image_transform(img, train=False, rng=random.Random(0))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert (_first_column(x) == 38).all()  # centre: (300 - 224) / 2
    lefts = {int(_first_column(data.image_transform(img, True, random.Random(s)))[0]) for s in range(30)}
    assert len(lefts) > 10 and min(lefts) >= 0 and max(lefts) <= 76
    # the shorter edge is resized to 256 first: a 512 x 600 image is treated like a 256 x 300 one
    big = data.image_transform(_column_image(600, 512), train=False, rng=random.Random(0))
    assert big.shape == (3, 224, 224)
    small = data.image_transform(Image.new("RGB", (100, 80)), train=True, rng=random.Random(0), resize=64, crop=56)
    assert small.shape == (3, 56, 56)


@pytest.fixture
def column_dataset(tmp_path):
    os.makedirs(tmp_path / "images")
    recs = []
    for i in range(4):
        _column_image(300, 256).save(tmp_path / "images" / f"{i}.png")
        recs.append(data.Record(f"r{i}", "Heart normal.", [f"{i}.png", f"{i}.png"], "train", None))
    return recs, tmp_path / "images"


def test_train_crops_are_a_function_of_seed_epoch_index(column_dataset):
    recs, root = column_dataset
    a = data.ReportDataset(recs, root, data.clean_report_mimic_cxr, train=True, seed=1)
    b = data.ReportDataset(recs, root, data.clean_report_mimic_cxr, train=True, seed=1)
    a_items = [a[i]["pixel_values"] for i in range(4)]
    b_items = [b[i]["pixel_values"] for i in reversed(range(4))][::-1]  # order of access does not matter
    assert all(torch.equal(x, y) for x, y in zip(a_items, b_items))
    assert a_items[0].shape == (2, 3, 224, 224)

    def starts(ds):
        return [int(_first_column(ds[i]["pixel_values"][k])[0]) for i in range(4) for k in range(2)]

    base = starts(a)
    a.set_epoch(1)
    assert starts(a) != base
    a.set_epoch(0)
    assert starts(a) == base
    assert starts(data.ReportDataset(recs, root, data.clean_report_mimic_cxr, train=True, seed=2)) != base
    ev = data.ReportDataset(recs, root, data.clean_report_mimic_cxr, train=False, seed=1)
    assert starts(ev) == [38] * 8
    ev.set_epoch(3)
    assert starts(ev) == [38] * 8
    item = ev[0]
    assert item["id"] == "r0" and item["report"] == "heart normal ." and item["views"] is None


# -----------------------------------------------------------------------------
# collate

WORDS = "the heart is normal in size no pleural effusion lungs are clear there a small left right view views".split()


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    d = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", ":", "frontal", "lateral", *WORDS]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast.from_pretrained(d)


@pytest.fixture(scope="module")
def demo_tokenizer():
    reports = ["the heart is normal in size . no pleural effusion .", "the lungs are clear ."]
    return demo.build_tokenizer(reports, ["there is a small left right", "view: frontal.", "views: frontal, lateral."])


def _batch(views):
    reports = ["the heart is normal in size . no pleural effusion . the lungs are clear .", "the lungs are clear ."]
    return [dict(id=f"s{i}", pixel_values=torch.zeros(len(v or [0]), 3, 8, 8), report=r, views=v)
            for i, (r, v) in enumerate(zip(reports, views))]


@pytest.mark.parametrize("which", ["bert", "demo"])
def test_collate(which, bert_tokenizer, demo_tokenizer):
    text_tok = bert_tokenizer if which == "bert" else demo_tokenizer
    llm_tok = demo_tokenizer
    eos, pad = llm_tok.eos_token_id, llm_tok.pad_token_id
    batch = _batch([["frontal"], ["lateral"]])
    out = data.make_collate(llm_tok, text_tok, max_report_tokens=64, max_text_tokens=64)(batch)

    assert out["ids"] == ["s0", "s1"] and out["reports"] == [b["report"] for b in batch]
    assert out["pixel_values"].shape == (2, 1, 3, 8, 8)
    ids, mask = out["report_ids"], out["report_mask"]
    assert ids.dtype == torch.long and mask.dtype == torch.long and ids.shape == mask.shape
    for b, row in enumerate(ids):
        n = int(mask[b].sum())
        expected = llm_tok(batch[b]["report"], add_special_tokens=False).input_ids + [eos]
        assert row[:n].tolist() == expected and (row[n:] == pad).all() and (mask[b, n:] == 0).all()
        assert row[0] != llm_tok.bos_token_id
    assert int(mask[1].sum()) < ids.shape[1]  # the short row really is padded

    # text input: the report + its view sentence, wrapped in the text tokenizer's own special tokens
    for b, view in enumerate(["view: frontal.", "view: lateral."]):
        n = int(out["text_mask"][b].sum())
        expected = text_tok(batch[b]["report"] + " " + view).input_ids
        assert out["text_ids"][b, :n].tolist() == expected
        assert (out["text_ids"][b, n:] == text_tok.pad_token_id).all()
    unk = text_tok.unk_token_id
    assert unk not in out["text_ids"].tolist()[0], "the fixture vocabulary should cover the test text"


@pytest.mark.parametrize("which", ["bert", "demo"])
def test_collate_truncates_but_keeps_view_and_references(which, bert_tokenizer, demo_tokenizer):
    text_tok = bert_tokenizer if which == "bert" else demo_tokenizer
    llm_tok = demo_tokenizer
    batch = _batch([["frontal", "lateral"], ["lateral", "frontal"]])
    out = data.make_collate(llm_tok, text_tok, max_report_tokens=5, max_text_tokens=12)(batch)
    assert out["reports"][0] == batch[0]["report"]  # references are never truncated
    assert out["pixel_values"].shape == (2, 2, 3, 8, 8)
    assert out["report_ids"].shape[1] == 5
    head = llm_tok(batch[0]["report"], add_special_tokens=False).input_ids[:4]
    assert out["report_ids"][0].tolist() == head + [llm_tok.eos_token_id]

    row = out["text_ids"][0].tolist()
    assert len(row) == 12 and out["text_mask"][0].tolist() == [1] * 12
    view = text_tok("views: frontal, lateral.", add_special_tokens=False).input_ids
    full = text_tok(batch[0]["report"] + " views: frontal, lateral.").input_ids
    assert row[-1] == full[-1] and row[0] == full[0]  # [CLS] .. [SEP] / <s> .. </s>
    assert row[-1 - len(view):-1] == view  # the view sentence survives whole
    assert row[1:-1 - len(view)] == full[1: 12 - 1 - len(view)]  # the report is cut, from its end


def test_collate_without_views_is_the_report(bert_tokenizer, demo_tokenizer):
    batch = _batch([None, None])
    out = data.make_collate(demo_tokenizer, bert_tokenizer, 64, 64)(batch)
    n = int(out["text_mask"][0].sum())
    assert out["text_ids"][0, :n].tolist() == bert_tokenizer(batch[0]["report"]).input_ids


def test_collate_refuses_a_tokenizer_without_pad(demo_tokenizer):
    import copy

    no_pad = copy.deepcopy(demo_tokenizer)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="llm_tokenizer has no pad token"):
        data.make_collate(no_pad, demo_tokenizer, 8, 8)


def test_view_sentence():
    assert data.view_sentence(["frontal"]) == "view: frontal."
    assert data.view_sentence(["frontal", "lateral"]) == "views: frontal, lateral."


def test_annotation_path_prefers_the_views_copy_unless_one_is_named(tmp_path):
    """train.py and evaluate.py read the same file through data.annotation_path."""
    assert data.annotation_path(str(tmp_path)) == str(tmp_path / "annotation.json")
    (tmp_path / "annotation_views.json").write_text("{}")
    assert data.annotation_path(str(tmp_path)) == str(tmp_path / "annotation_views.json")
    assert data.annotation_path(str(tmp_path), "other.json") == str(tmp_path / "other.json")


def test_annotation_path_with_a_relative_data_dir(tmp_path, monkeypatch):
    """`python train.py` passes data_dir="demo_data", a relative path: the views copy must not be
    joined to it twice (demo_data/demo_data/annotation_views.json)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo_data").mkdir()
    (tmp_path / "demo_data" / "annotation_views.json").write_text("{}")
    path = data.annotation_path("demo_data")
    assert path == os.path.join("demo_data", "annotation_views.json")
    assert os.path.exists(path)
