"""Tests for demo.py: determinism, reports that parse back, a dataset that loads, findings in the pixels."""

import csv
import itertools
import json
import os
import random
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import demo  # noqa: E402

FINDINGS = demo.LABELS[1:]  # everything but no_finding


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "d"
    demo.make_demo_dataset(root, n_train=20, n_val=5, n_test=5, seed=0)
    return root


# -----------------------------------------------------------------------------
# determinism


def test_same_seed_same_bytes_other_seed_other_bytes(demo_root, tmp_path):
    # demo_root was drawn by 2 processes (the default), "again" by one: the same bytes
    demo.make_demo_dataset(tmp_path / "again", n_train=20, n_val=5, n_test=5, seed=0, workers=1)
    demo.make_demo_dataset(tmp_path / "other", n_train=20, n_val=5, n_test=5, seed=1)
    a, again, other = _files(demo_root), _files(tmp_path / "again"), _files(tmp_path / "other")
    assert len(a) == 20 + 5 + 5 + 2 and a == again
    assert other.keys() == a.keys()
    assert other["annotation.json"] != a["annotation.json"]
    assert sum(other[k] != a[k] for k in a if k.endswith(".png")) == 30


def test_val_and_test_do_not_depend_on_train_size(demo_root, tmp_path):
    demo.make_demo_dataset(tmp_path / "bigger", n_train=25, n_val=5, n_test=5, seed=0)
    a, b = _files(demo_root), _files(tmp_path / "bigger")
    assert all(a[k] == b[k] for k in a if k.startswith(("images/val", "images/test")))
    ann_a, ann_b = json.loads(a["annotation.json"]), json.loads(b["annotation.json"])
    assert ann_a["test"] == ann_b["test"] and ann_a["train"] == ann_b["train"][:20]


# -----------------------------------------------------------------------------
# reports


def _check(report, expected):
    assert demo.parse_findings(report) == expected, report
    assert demo.parse_findings(data.clean_report_mimic_cxr(report)) == expected, data.clean_report_mimic_cxr(report)


def test_parse_findings_reads_back_random_reports():
    rng = random.Random(0)
    for i in range(600):
        if i % 2:  # the generator's own distribution
            findings = demo.sample_study(rng)["findings"]
        else:  # any combination, even ones the generator never draws (e.g. two opacities)
            findings = frozenset(f for f in FINDINGS if rng.random() < 0.3) or frozenset({"no_finding"})
        report = demo.write_report(findings, rng)
        _check(report, findings)
        # a generated report may repeat or reorder sentences
        sentences = [s for s in report.split(". ") if s]
        _check(". ".join(sentences[::-1] + sentences[:2]) + ".", findings)


def _all_positive_sentences():
    """(sentence, labels) for every phrasing of every finding."""
    out = [(s, {"cardiomegaly"}) for s in demo.CARDIOMEGALY]
    out += [(demo._say(t, side=side), {f"effusion_{side}"}) for t in demo.EFFUSION for side in ("left", "right")]
    out += [(s, {"effusion_left", "effusion_right"}) for s in demo.BILATERAL_EFFUSION]
    out += [(demo.opacity_sentence(t, label), {label}) for t in demo.OPACITY for label in demo.OPACITIES]
    out += [(s, {"support_device"}) for s in demo.DEVICE]
    return out


NEGATIVES = demo.NORMAL_HEART + demo.NO_EFFUSION + demo.CLEAR_LUNGS + demo.NO_DEVICE + demo.FILLER + demo.NO_ACUTE


def test_parse_findings_reads_every_phrasing():
    positives = _all_positive_sentences()
    assert len(positives) == 5 + 8 + 3 + 16 + 4
    for sentence, labels in positives:
        _check(sentence, frozenset(labels))
        # inside a report full of negative sentences, in both orders
        _check(" ".join(NEGATIVES[:12] + (sentence,) + NEGATIVES[12:]), frozenset(labels))
    for sentence in NEGATIVES:
        _check(sentence, frozenset({"no_finding"}))
    _check(" ".join(NEGATIVES), frozenset({"no_finding"}))
    # each finding has at least 3 phrasings, present and absent
    for templates in (demo.CARDIOMEGALY, demo.NORMAL_HEART, demo.EFFUSION, demo.BILATERAL_EFFUSION, demo.NO_EFFUSION,
                      demo.OPACITY, demo.CLEAR_LUNGS, demo.DEVICE, demo.NO_DEVICE):
        assert len(templates) >= 3


def test_parse_findings_on_model_like_output():
    assert demo.parse_findings("") == {"no_finding"}
    assert demo.parse_findings("the heart is enlarged . the heart is enlarged .") == {"cardiomegaly"}
    assert demo.parse_findings("no left pleural effusion . right pleural effusion is present") == {"effusion_right"}
    assert demo.parse_findings("pleural effusion .") == {"no_finding"}  # no side named: not guessed


def test_reports_look_like_reports():
    rng = random.Random(1)
    vocab, lengths = set(), []
    for _ in range(2000):
        report = demo.write_report(demo.sample_study(rng)["findings"], rng)
        assert report[0].isupper() and report.endswith(".")
        words = data.clean_report_mimic_cxr(report).split()
        assert not {"view", "frontal", "lateral", "pa", "ap"} & set(words)  # the view is never said
        vocab |= set(words)
        lengths.append(sum(w != "." for w in words))
    assert len(vocab) < 300
    lengths.sort()
    assert 2 <= lengths[0] and 8 <= lengths[len(lengths) // 100] and lengths[-1] <= 65  # "mild cardiomegaly ."


def test_lateral_studies_carry_only_what_a_lateral_view_shows():
    rng = random.Random(2)
    studies = [demo.sample_study(rng) for _ in range(2000)]
    lateral = [s for s in studies if s["view"] == "lateral"]
    assert 0.2 < len(lateral) / len(studies) < 0.3
    assert all(s["findings"] <= {"no_finding", "cardiomegaly", "support_device"} for s in lateral)
    seen = set().union(*(s["findings"] for s in studies))
    assert seen == set(demo.LABELS)


# -----------------------------------------------------------------------------
# the dataset on disk goes through the real loading path


def test_dataset_loads_through_data_py(demo_root):
    ann = json.loads((demo_root / "annotation.json").read_text())
    assert set(ann) == {"train", "val", "test"} and all("views" not in r for r in ann["train"])
    entries = [e for split in ann.values() for e in split]                 # one patient per study, no id twice
    assert len({e["study_id"] for e in entries}) == len({e["subject_id"] for e in entries}) == len(entries)
    for split, n in (("train", 20), ("val", 5), ("test", 5)):
        recs = data.load_annotation(demo_root / "annotation.json", split, demo_root / "images")
        assert len(recs) == n and all(len(r.image_paths) == 1 and r.views is None for r in recs)
    ds = data.ReportDataset(recs, demo_root / "images", data.CLEANERS["mimic_cxr"], train=True)
    item = ds[0]
    assert item["pixel_values"].shape == (1, 3, 224, 224)
    assert item["report"] == data.clean_report_mimic_cxr(recs[0].report) and item["report"].endswith(" .")
    img = data.load_image(demo_root / "images" / recs[0].image_paths[0])
    assert img.height == 256 and 256 <= img.width <= 300


def test_images_are_8_bit_grayscale_of_varied_width(demo_root):
    from PIL import Image

    widths = set()
    for path in (demo_root / "images" / "train").iterdir():
        img = Image.open(path)
        assert img.mode == "L" and img.height == 256
        widths.add(img.width)
    assert len(widths) > 5


def test_views_csv_matches(demo_root):
    with open(demo_root / "views.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ann = json.loads((demo_root / "annotation.json").read_text())
    records = [r for split in ("train", "val", "test") for r in ann[split]]
    assert [row["image_path"] for row in rows] == [r["image_path"][0] for r in records]
    assert {row["view"] for row in rows} == {"frontal", "lateral"}
    for row, rec in zip(rows, records):
        if row["view"] == "lateral":  # its report cannot name a sided finding
            assert demo.parse_findings(rec["report"]) <= {"no_finding", "cardiomegaly", "support_device"}


# -----------------------------------------------------------------------------
# findings are in the pixels: toggle one finding on an otherwise identical study


# the nuisance that moves pixels without changing findings, switched off where a test measures geometry
STILL = dict(angle=0.0, gradient=(0.0, 0.0), electrodes=[], marker=None, arms=False)


def _pair(findings, view="frontal", seed=0, **nuisance):
    study = dict(demo.sample_study(random.Random(seed)), view=view, **{**STILL, **nuisance})
    # the same rng seed gives the same noise, so the difference is the finding alone
    without = np.asarray(demo.render_image(dict(study, findings=frozenset({"no_finding"})), random.Random(9)), np.float32)
    with_ = np.asarray(demo.render_image(dict(study, findings=frozenset(findings)), random.Random(9)), np.float32)
    return study, without, with_


def _centre(study):
    return study["width"] / 2 + study["dx"], demo.H / 2 + study["dy"]


@pytest.mark.parametrize("seed", range(4))
def test_effusion_fills_the_lower_lung_on_its_side(seed):
    for side, sign in (("left", 1), ("right", -1)):  # patient's left is on the image's right
        study, without, with_ = _pair({f"effusion_{side}"}, seed=seed)
        cx, cy = _centre(study)
        s = study["scale"]
        lx = int(cx + sign * 46 * s)
        lower = (slice(int(cy + 50 * s), int(cy + 65 * s)), slice(lx - 15, lx + 15))
        other = (slice(int(cy + 50 * s), int(cy + 65 * s)), slice(int(cx - sign * 46 * s) - 15, int(cx - sign * 46 * s) + 15))
        upper = (slice(int(cy - 60 * s), int(cy - 30 * s)), slice(lx - 15, lx + 15))
        assert with_[lower].mean() > without[lower].mean() + 50
        assert with_[other].mean() == pytest.approx(without[other].mean(), abs=1)
        assert with_[upper].mean() == pytest.approx(without[upper].mean(), abs=1)


@pytest.mark.parametrize("label", demo.OPACITIES)
def test_opacity_is_a_blob_in_its_zone(label):
    study, without, with_ = _pair({label})
    cx, cy = _centre(study)
    diff = np.clip(with_ - without, 0, None)
    ys, xs = np.nonzero(diff > 20)
    assert len(ys) > 200  # visible at a 32 x 32 patch scale
    _, side, zone = label.split("_")
    assert (xs.mean() > cx) == (side == "left") and (ys.mean() < cy - 10) == (zone == "upper")


def _dark_runs(row):
    """Dark stretches of a row that starts and ends in the body's soft tissue."""
    dark = row < (row.min() + (row[:5].mean() + row[-5:].mean()) / 2) / 2
    return int(dark[0]) + int((dark[1:] & ~dark[:-1]).sum())


@pytest.mark.parametrize("seed", range(4))
def test_views_look_different(seed):
    # frontal: two dark lung fields either side of the spine; lateral: one oval field
    for view, runs in (("frontal", 2), ("lateral", 1)):
        study = dict(demo.sample_study(random.Random(seed)), view=view, findings=frozenset({"no_finding"}), **STILL)
        img = np.asarray(demo.render_image(study, random.Random(0)), np.float32)
        cx, cy = _centre(study)
        y, s = int(cy - 30 * study["scale"]), study["scale"]
        row = img[y - 3:y + 4, int(cx - 100 * s):int(cx + 100 * s)].mean(0)
        assert _dark_runs(np.convolve(row, np.ones(5) / 5, "valid")) == runs


def _heart_width(img, study):
    cx, cy = _centre(study)
    row = img[int(cy + 42 * study["scale"]) - 2:int(cy + 42 * study["scale"]) + 3].mean(0)
    return int((row > (row.max() + np.median(row)) / 2).sum())


@pytest.mark.parametrize("view", ["frontal", "lateral"])
def test_cardiomegaly_widens_the_heart(view):
    study, without, with_ = _pair({"cardiomegaly"}, view=view, contrast=1.0, brightness=0.0, ctr=0.4)
    w0, w1 = _heart_width(without, study), _heart_width(with_, study)
    assert w1 > 1.3 * w0 and w1 - w0 > 20, (w0, w1)


@pytest.mark.parametrize("view", ["frontal", "lateral"])
def test_support_device_is_a_bright_line_from_the_top(view):
    study, without, with_ = _pair({"support_device"}, view=view)
    bright = (with_ - without) > 40
    _, cy = _centre(study)
    tip = int(cy - 22 * study["scale"])
    widths = bright[:tip - 3].sum(1)
    assert widths.min() >= 3 and widths.max() <= 12  # a thick line in every row from the top edge...
    assert not bright[tip + 8:].any()  # ...ending in the chest


# -----------------------------------------------------------------------------
# tokenizer


def test_tokenizer_round_trip(demo_root, tmp_path):
    from transformers import AutoTokenizer

    recs = data.load_annotation(demo_root / "annotation.json", "train", demo_root / "images")
    reports = [data.clean_report_mimic_cxr(r.report) for r in recs]
    extra = ["Write the findings of this chest X-ray:", data.view_sentence(["frontal"]), data.view_sentence(["lateral"])]
    tok = demo.build_tokenizer(reports, extra)
    assert tok.tokenize("view: frontal.") == ["view", ":", "frontal", "."]
    for r in reports:
        ids = tok(r).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == r  # a cleaned report comes back exactly
    assert tok.unk_token_id not in tok(" ".join(extra)).input_ids
    assert tok("zebra").input_ids[1] == tok.unk_token_id
    assert len(tok) < 300

    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for text in itertools.chain(reports[:5], extra, ["zebra"]):
        assert again(text).input_ids == tok(text).input_ids
    for name in ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id", "model_max_length"):
        assert getattr(again, name) == getattr(tok, name)
    assert again.model_max_length == 512


def test_llm_pretraining_names_each_finding_with_one_word(demo_root, tmp_path):
    # The demo LLM learns to follow keywords; a finding spread over words ("left effusion") was not
    # bound in its budget (reports from the true keywords scored F1 0.72), one tag word per finding is.
    from transformers import AutoTokenizer

    demo.pretrain_demo_llm(demo_root, str(tmp_path / "llm"), steps=1, batch_size=2, seq_len=16)
    tok = AutoTokenizer.from_pretrained(tmp_path / "llm")
    rng = random.Random(0)
    for _ in range(200):
        findings = demo.sample_study(rng)["findings"]
        report = data.clean_report_mimic_cxr(demo.write_report(findings, rng))
        words = demo.keywords(report).split()
        assert frozenset(words) == findings and len(words) == len(findings)
        ids = tok(demo.keywords(report), add_special_tokens=False).input_ids
        assert len(ids) == len(findings) and tok.unk_token_id not in ids

    # The pre-training documents put Np words where E_v stands in the V2T prefix [S_v2t, E_v, S_v2t_after]:
    # each tag word in 1-4 of them, training-report words in the others (what llm_ceiling feeds the LLM);
    # only the report after them is a target of the loss.
    import model as M

    cfg = M.Config()
    n_slots = demo.n_visual(cfg)
    reports = [data.clean_report_mimic_cxr(e["report"]) for e in json.load(open(demo_root / "annotation.json"))["train"]]
    tags = set(demo.LABELS)
    words = demo.filler_words(reports)
    assert "cardiomegaly" in {w for r in reports for w in r.split()} and not tags & set(words)   # a tag and a word
    for report in reports:
        slots = demo.tag_prefix(report, words, n_slots, random.Random(report)).split()
        assert len(slots) == n_slots and set(slots) <= set(words) | tags
        counts = {t: slots.count(t) for t in tags}
        assert {t for t, c in counts.items() if c} == set(demo.keywords(report).split())
        assert all(c <= 4 for c in counts.values())
    rows, labels = demo.pretraining_rows(tok, reports, cfg, 64, random.Random(0))
    stream, targets = rows.flatten().tolist(), labels.flatten().tolist()
    prompt = tok(cfg.prompt_v2t, add_special_tokens=False).input_ids
    (after,) = tok(cfg.prompt_v2t_after, add_special_tokens=False).input_ids
    starts = [i for i, t in enumerate(stream) if t == tok.bos_token_id]
    assert len(starts) > 3 and rows.shape[1] == 64 and tok.unk_token_id not in stream
    lengths = []
    for i in starts[:-1]:                                                      # whole documents
        assert stream[i + 1:i + 1 + len(prompt)] == prompt
        head = stream.index(after, i) + 1                                      # S_v2t_after ends the prefix
        end = stream.index(tok.eos_token_id, i)
        slots = tok.convert_ids_to_tokens(stream[i + 1 + len(prompt):head - 1])
        report = tok.decode(stream[head:end])
        assert report in reports and set(slots) <= set(words) | tags
        assert {t for t in tags if t in slots} == set(demo.keywords(report).split())
        assert set(targets[i:head]) == {-100}                                 # prompt and prefix: not learnt
        assert targets[head:end + 1] == stream[head:end + 1]                  # the report and </s>: learnt
        lengths.append(len(slots))
    assert max(lengths) <= n_slots and len(set(lengths)) > 1                  # prefixes of 1..Np words


def test_encoder_pretraining_crops_as_the_training_pipeline_does():
    # demo.crop_batch cuts the pre-training's crops from uint8 tensors for speed; they must be what
    # data.image_transform gives the model in training: the same random draws, the same values.
    import torchvision.transforms.functional as TF
    from PIL import Image

    g = np.random.default_rng(0)
    images = [Image.fromarray(g.integers(0, 256, (128, w), dtype=np.uint8), "L") for w in (128, 131, 150, 140)]
    tensors = [TF.pil_to_tensor(im) for im in images]
    r1, r2 = random.Random(3), random.Random(3)
    for idx in ([0, 1, 2, 3], [3, 3, 1], [2]):
        want = torch.stack([data.image_transform(images[i].convert("RGB"), True, r1, 128, 112) for i in idx])
        got = demo.crop_batch(tensors, idx, 112, r2)
        assert got.shape == (len(idx), 3, 112, 112) and torch.equal(got, want)
    assert r1.random() == r2.random()                                       # the same number of draws


def test_encoder_pretraining_learns_from_training_images_only_and_loads_by_path(demo_root, tmp_path):
    import shutil

    import torch

    import model as M

    root = tmp_path / "d"
    shutil.copytree(demo_root, root)
    for split in ("val", "test"):                 # never opened: pre-training sees training images only
        for f in (root / "images" / split).iterdir():
            f.write_bytes(b"not an image")
    cfg = M.Config(vision="", vision_layers=1)
    losses = demo.pretrain_demo_encoder(root, str(tmp_path / "enc"), steps=40, batch_size=8, lr=3e-3, cfg=cfg)
    # it trains (from about ln 2 towards the label rates); what it reaches on
    # the full demo is measured in the README, not here
    assert len(losses) == 40 and np.mean(losses[-10:]) < 0.8 * losses[0]
    loaded = M.build_vision(M.Config(vision=str(tmp_path / "enc"), vision_layers=1))
    fresh = M.build_vision(cfg)
    changed = [k for k, v in loaded.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])]
    # encoder and decoder trained and saved (as MAE-large's decoder arrives trained); the mask token,
    # which no patch uses at mask ratio 0, and the fixed sin-cos tables do not change
    trained = {n for n, p in fresh.named_parameters() if p.requires_grad} - {"decoder.mask_token"}
    assert set(changed) - {"decoder.mask_token"} == trained     # (fresh draws its own random mask token)
    assert any(k.startswith("decoder.") for k in changed)
    assert not loaded.vit.embeddings.position_embeddings.requires_grad
    demo.pretrain_demo_encoder(root, str(tmp_path / "enc"), steps=1, batch_size=2, cfg=cfg, seed=1)  # a rerun replaces it
    again = M.build_vision(M.Config(vision=str(tmp_path / "enc"), vision_layers=1))
    assert not torch.equal(again.vit.embeddings.cls_token, loaded.vit.embeddings.cls_token)


def test_ensure_demo_makes_only_what_is_missing(demo_root, tmp_path, monkeypatch):
    """python train.py's first run makes the data, the LLM and the ViT-MAE (at cfg's shapes) where the
    config names them; later runs, or --vision "" (no vision_dir), make nothing more."""
    import shutil

    import model as M

    root = tmp_path / "d"
    shutil.copytree(demo_root, root)
    (root / "llm").mkdir(exist_ok=True)
    (root / "llm" / "config.json").write_text("{}")              # an LLM is there already
    made = []
    monkeypatch.setattr(demo, "pretrain_demo_llm", lambda *a, **k: made.append("llm"))
    monkeypatch.setattr(demo, "pretrain_demo_encoder", lambda data_dir, out, **k: made.append((out, k["cfg"])))
    cfg = M.Config(vision_width=32)
    demo.ensure_demo(root, str(root / "llm"), vision_dir=str(root / "vit_mae"), cfg=cfg)
    assert made == [(str(root / "vit_mae"), cfg)]
    (root / "vit_mae").mkdir()
    (root / "vit_mae" / "config.json").write_text("{}")
    demo.ensure_demo(root, str(root / "llm"), vision_dir=str(root / "vit_mae"), cfg=cfg)
    demo.ensure_demo(root, str(root / "llm"), vision_dir="", cfg=cfg)
    assert len(made) == 1


def test_ensure_demo_pretrains_the_llm_in_a_second_process_beside_the_encoder(demo_root, tmp_path):
    """A first run makes the LLM in a second process, with half the threads, while this one makes the
    ViT-MAE: the LLM is bit for bit the one pretrain_demo_llm makes here with that many threads, the
    threads are given back, and an error in the second process is raised here."""
    import shutil

    import torch
    from safetensors.torch import load_file

    import model as M

    root = tmp_path / "d"
    shutil.copytree(demo_root, root)
    cfg = M.Config(vision_layers=1)
    llm_options, encoder_options = dict(steps=3, batch_size=2, seq_len=16), dict(steps=2, batch_size=2)
    threads = torch.get_num_threads()
    demo.ensure_demo(root, str(root / "llm"), vision_dir=str(root / "vit_mae"), cfg=cfg,
                     llm_options=llm_options, encoder_options=encoder_options)
    assert torch.get_num_threads() == threads
    assert (root / "vit_mae" / "config.json").exists()
    torch.set_num_threads(max(1, threads // 2))
    try:
        demo.pretrain_demo_llm(root, str(tmp_path / "here"), **llm_options)
    finally:
        torch.set_num_threads(threads)
    there, here = load_file(root / "llm" / "model.safetensors"), load_file(tmp_path / "here" / "model.safetensors")
    assert there.keys() == here.keys() and all(torch.equal(there[k], here[k]) for k in there)

    shutil.rmtree(root / "llm")
    shutil.rmtree(root / "vit_mae")
    with pytest.raises(RuntimeError, match="random_ expects"):   # rows of 1e6 tokens: none to sample
        demo.ensure_demo(root, str(root / "llm"), vision_dir=str(root / "vit_mae"), cfg=cfg,
                         llm_options=dict(seq_len=10**6), encoder_options=encoder_options)
    assert (root / "vit_mae" / "config.json").exists() and not (root / "llm").exists()
    assert torch.get_num_threads() == threads


def test_label_prefix_is_per_token_or_shared_and_learns_each_finding_from_its_reports(demo_root, tmp_path):
    # demo.label_prefix_bound: the README's bound on a visual prefix linear in the findings
    import model as M

    llm = str(tmp_path / "llm")
    demo.pretrain_demo_llm(demo_root, llm, steps=1, batch_size=2, seq_len=16)
    n_tokens = (M.Config().image_size // M.Config().patch_size) ** 2
    run = dict(batch_size=8, num_beams=1, split="test")
    _, shared = demo.label_prefix_bound(demo_root, llm, shared=True, steps=2, **run)
    _, P0 = demo.label_prefix_bound(demo_root, llm, steps=0, **run)        # the initial blocks
    scores, P = demo.label_prefix_bound(demo_root, llm, steps=4, **run)
    assert shared.shape[:2] == (len(demo.LABELS), 1) and P.shape[:2] == (len(demo.LABELS), n_tokens)
    assert not (P == P[:, :1]).all()                            # one vector per visual token, not tied
    assert 0 <= scores["f1"] <= 1 and {"precision", "recall"} <= scores.keys()
    # The constant block learns, and so do (some of) the blocks of findings that training reports have;
    # a finding no training report has (the val/test reports may) keeps its initial block.
    train = [data.clean_report_mimic_cxr(e["report"]) for e in json.load(open(demo_root / "annotation.json"))["train"]]
    seen = {j for j, label in enumerate(demo.LABELS[1:], 1) if any(label in demo.parse_findings(r) for r in train)}
    moved = {j for j in range(len(demo.LABELS)) if not torch.equal(P0[j], P[j])}
    assert len(seen) < len(demo.LABELS) - 1, "the fixture should leave some finding out of its 20 training reports"
    assert 0 in moved and len(moved) > 2 and moved - {0} <= seen
