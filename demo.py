"""
The built-in demo: a synthetic, MIMIC-CXR-like dataset that a tiny model can learn from in minutes
on a CPU, plus the small tokenizer the demo's text encoder and LLM share.

Each study is one image whose findings are drawn into the pixels and one report written from varied
templates. It is written to disk in the real layout (annotation.json, images/<split>/<id>.png), so
the demo runs through the same loading path (data.py) as IU-Xray and MIMIC-CXR.
"""

import csv
import dataclasses
import itertools
import json
import math
import os
import random
import re
import shutil
import time
from typing import Iterable

import numpy as np
from PIL import Image, ImageFilter
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

LABELS = (
    "no_finding", "cardiomegaly", "effusion_left", "effusion_right",
    "opacity_right_upper", "opacity_right_lower", "opacity_left_upper", "opacity_left_lower",
    "support_device",
)
OPACITIES = LABELS[4:8]
H = 256  # image height = the shorter edge, as MIMIC-CXR images after the paper's resize (Sec. 4.1)

# -----------------------------------------------------------------------------
# studies and images


def sample_study(rng: random.Random) -> dict:
    """A study: its view, its findings, and nuisance parameters that change the pixels but not the
    report (so pixel-space nearest neighbour is a weak predictor of the findings)."""
    view = "frontal" if rng.random() < 0.75 else "lateral"
    findings = set()
    if rng.random() < 0.30:
        findings.add("cardiomegaly")
    if rng.random() < 0.25:
        findings.add("support_device")
    # A lateral view alone cannot tell left from right, so lateral studies carry only the findings
    # it can show: heart size and devices.
    if view == "frontal":
        u = rng.random()  # effusion: left 15%, right 15%, bilateral 6%
        if u < 0.15:
            findings.add("effusion_left")
        elif u < 0.30:
            findings.add("effusion_right")
        elif u < 0.36:
            findings |= {"effusion_left", "effusion_right"}
        if rng.random() < 0.30:
            findings.add(rng.choice(OPACITIES))
    return dict(
        view=view,
        findings=frozenset(findings or {"no_finding"}),
        width=rng.randint(256, 300),  # height is 256: the resize keeps the aspect ratio
        scale=rng.uniform(0.85, 1.15),  # body size
        dx=rng.uniform(-22, 22), dy=rng.uniform(-16, 16),  # body position (px)
        angle=rng.uniform(-0.1, 0.1),  # patient rotation (radians)
        gradient=(rng.uniform(-35, 35), rng.uniform(0, 2 * math.pi)),  # exposure falling off across the film
        # things on the film that are not findings: ECG electrodes, a side marker, the arms
        electrodes=[(rng.uniform(40, 216), rng.uniform(60, 230)) for _ in range(rng.randint(0, 4))],
        marker=(rng.choice((20, 236)), rng.uniform(15, 40)) if rng.random() < 0.7 else None,
        arms=rng.random() < 0.4,
        ctr=rng.uniform(0.36, 0.44),  # cardiothoracic ratio of a normal heart; cardiomegaly adds 0.2
        fluid=rng.uniform(0.25, 0.33),  # fraction of the lung height an effusion fills
        blob=(rng.uniform(-6, 6), rng.uniform(-6, 6)),  # opacity centre jitter (px)
        tube=(rng.uniform(-8, 8), rng.uniform(-6, 6)),  # tube x offset at the top and at the tip (px)
        brightness=rng.uniform(-20, 20), contrast=rng.uniform(0.8, 1.2),
        noise=rng.uniform(2, 7), blur=rng.uniform(0.3, 1.5),  # noise std (grey levels), blur radius (px)
    )


def _ellipse(x, y, cx, cy, rx, ry):
    """Filled ellipse as an (H, W) mask in [0, 1], with a one-pixel soft edge (no aliasing)."""
    d = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return np.clip((1 - d) * min(rx, ry) + 0.5, 0, 1)


def _segment(x, y, x0, y0, x1, y1, half_width):
    """Thick line from (x0, y0) to (x1, y1) as an (H, W) mask in [0, 1]."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.clip(half_width + 0.5 - np.hypot(x - x0 - t * dx, y - y0 - t * dy), 0, 1)


def _paint(img, mask, value):
    img += (value - img) * mask  # in place: blend `value` over img where mask is 1


def _draw_frontal(img, x, y, cx, cy, s, study):
    """PA view. Radiological convention: the patient's left is on the image's right."""
    f = study["findings"]
    _paint(img, _ellipse(x, y, cx, cy + 40 * s, 118 * s, 170 * s), 105)  # body
    _paint(img, np.clip(9 * s - np.abs(x - cx), 0, 1), 150 + 10 * np.cos(y / (3 * s)))  # spine
    lungs = {}
    for side in (-1, 1):  # -1: image left = patient's right
        lx, ly = cx + side * 46 * s, cy - 5 * s  # lung centre; each lung is 72s wide, 156s tall
        lung = _ellipse(x, y, lx, ly, 36 * s, 78 * s)
        _paint(img, lung, 35)
        arc = (y + 0.008 * (x - cx) ** 2 / s) / (15 * s)  # faint ribs, curving down to the sides
        img += 16 * lung * np.clip(2 * np.cos(2 * np.pi * arc) - 1, 0, 1)
        lungs["left" if side == 1 else "right"] = (side, lx, ly, lung)

    for name in ("left", "right"):  # effusion: homogeneous fluid filling the lung's base, with a meniscus
        if f"effusion_{name}" in f:
            side, lx, ly, lung = lungs[name]
            level = ly + 78 * s - study["fluid"] * 156 * s
            lateral = np.clip((x - lx) * side / (36 * s), -1, 1)  # -1 medial .. 1 at the chest wall
            top = level - 14 * s * ((lateral + 1) / 2) ** 2  # fluid climbs the lateral chest wall
            _paint(img, lung * np.clip(y - top + 0.5, 0, 1), 150)

    for label in f & set(OPACITIES):  # opacity: one bright fuzzy blob in its zone
        _, name, zone = label.split("_")
        side, lx, ly, lung = lungs[name]
        bx = lx + side * 6 * s + study["blob"][0]
        # the lower blob sits above the highest meniscus, so an opacity never hides inside an effusion
        by = ly + (-43 if zone == "upper" else 1) * s + study["blob"][1]
        img += 90 * lung * np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * (13 * s) ** 2))

    # heart last, on top: its width is ctr x the thorax (the lungs' outer span, 164s); it sits a little
    # to the image's right, i.e. to the patient's left
    ctr = study["ctr"] + 0.2 * ("cardiomegaly" in f)
    _paint(img, _ellipse(x, y, cx + 12 * s, cy + 42 * s, ctr * 82 * s, 36 * s), 170)


def _draw_lateral(img, x, y, cx, cy, s, study):
    """Lateral view, patient facing the image's left: heart anterior (left), spine posterior (right)."""
    _paint(img, _ellipse(x, y, cx, cy + 40 * s, 112 * s, 175 * s), 100)  # body
    _paint(img, _ellipse(x, y, cx - 4 * s, cy - 4 * s, 64 * s, 82 * s), 45)  # both lungs overlap: one oval
    vertebrae = 165 - 40 * (np.cos(2 * np.pi * y / (18 * s)) < -0.6)  # bodies with darker discs
    _paint(img, np.clip(11 * s - np.abs(x - cx - 72 * s), 0, 1), vertebrae)
    ctr = study["ctr"] + 0.2 * ("cardiomegaly" in study["findings"])
    _paint(img, _ellipse(x, y, cx - 30 * s, cy + 40 * s, ctr * 72 * s, 34 * s), 165)  # heart


def render_image(study: dict, rng: random.Random) -> Image.Image:
    """Draw a study as an 8-bit grayscale (mode "L") image, H x width. Findings are large enough to
    survive a random 224 crop and to span a 32 x 32 patch: the demo model is tiny."""
    s, w = study["scale"], study["width"]
    cx, cy = w / 2 + study["dx"], H / 2 + study["dy"]
    y0, x0 = np.mgrid[0:H, 0:w].astype(np.float32)
    a = study.get("angle", 0.0)  # the patient, rotated about the body centre
    x = cx + (x0 - cx) * math.cos(a) - (y0 - cy) * math.sin(a)
    y = cy + (x0 - cx) * math.sin(a) + (y0 - cy) * math.cos(a)
    img = np.full((H, w), 10.0, np.float32)  # air
    if study.get("arms"):  # raised arms at both upper corners
        for side in (-1, 1):
            _paint(img, _ellipse(x, y, cx + side * 150 * s, cy - 110 * s, 30 * s, 90 * s), 120)
    (_draw_frontal if study["view"] == "frontal" else _draw_lateral)(img, x, y, cx, cy, s, study)
    for ex, ey in study.get("electrodes", []):  # small bright rings, smaller than any opacity
        img += 80 * np.clip(1.5 - np.abs(np.hypot(x0 - ex, y0 - ey) - 5), 0, 1)
    if study.get("marker"):  # a bright square side marker near a top corner
        mx, my = study["marker"]
        mx = mx * w / 256
        _paint(img, ((np.abs(x0 - mx) < 7) & (np.abs(y0 - my) < 7)).astype(np.float32), 250)
    amp, theta = study.get("gradient", (0.0, 0.0))
    img += amp * ((x0 - w / 2) * math.cos(theta) + (y0 - H / 2) * math.sin(theta)) / 128
    if "support_device" in study["findings"]:  # a thick bright tube from the top edge into the chest
        x0 = cx + study["tube"][0] - (12 * s if study["view"] == "lateral" else 0)
        _paint(img, _segment(x, y, x0, -4, x0 + study["tube"][1], cy - 22 * s, 5), 235)
    img = (img - 100) * study["contrast"] + 100 + study["brightness"]
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(study["blur"]))
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0, study["noise"], (H, w))
    return Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).round().astype(np.uint8), "L")


# -----------------------------------------------------------------------------
# reports

# Each finding, present or absent, has several phrasings. Positive sentences never contain a negation
# word (NEGATIONS below) and each sentence speaks of one finding, which is what lets parse_findings
# read them back with keyword rules.
CARDIOMEGALY = ("The heart is enlarged.", "Cardiomegaly is present.", "Mild cardiomegaly.",
                "Moderate enlargement of the cardiac silhouette.", "The cardiac silhouette is enlarged.")
NORMAL_HEART = ("Heart size is normal.", "Normal heart size.", "No cardiomegaly.", "The heart is not enlarged.",
                "The cardiac silhouette is within normal limits.")
EFFUSION = ("There is a small {side} pleural effusion.", "{side} pleural effusion is present.",
            "A moderate {side} sided pleural effusion is seen.",
            "Blunting of the {side} costophrenic angle due to a pleural effusion.")
BILATERAL_EFFUSION = ("There are bilateral pleural effusions.", "Small pleural effusions on both sides.",
                      "Bilateral pleural effusions are present.")
NO_EFFUSION = ("No pleural effusion.", "There is no pleural effusion.", "No pleural effusion or pneumothorax.")
# {level}: upper/lower, {lobe}: upper lobe/lower lobe, {end}: apex/base
OPACITY = ("There is a focal opacity in the {side} {level} zone.", "Patchy consolidation in the {side} {lobe}.",
           "Airspace opacity at the {side} lung {end}.", "{side} {lobe} pneumonia.")
CLEAR_LUNGS = ("The lungs are clear.", "No focal consolidation.", "There is no focal airspace opacity.",
               "Lungs are clear without focal consolidation.")
DEVICE = ("An endotracheal tube is in place.", "A central venous catheter is present.",
          "A support tube projects over the mediastinum.", "There is a tube in the trachea.")
NO_DEVICE = ("No support devices are seen.", "No lines or tubes.", "There are no tubes or catheters.")
FILLER = ("The mediastinal contours are unremarkable.", "The mediastinum is within normal limits.",
          "Hilar contours are normal.", "Pulmonary vascularity is normal.", "No pneumothorax.",
          "There is no pneumothorax.", "No acute osseous abnormality.", "The osseous structures are intact.",
          "Visualized bones are unremarkable.", "Degenerative changes of the thoracic spine.")
NO_ACUTE = ("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.")  # if no finding


def _say(template: str, **words) -> str:
    sentence = template.format(**words)
    return sentence[0].upper() + sentence[1:]


def opacity_sentence(template: str, label: str) -> str:
    _, side, zone = label.split("_")
    end = "apex" if zone == "upper" else "base"
    return _say(template, side=side, level=zone, lobe=f"{zone} lobe", end=end)


def habit(rng: random.Random, phrasings):
    """One of `phrasings`, the k-th with weight 1 / (k + 1): the first is the habitual one."""
    return rng.choices(phrasings, weights=[1 / (k + 1) for k in range(len(phrasings))])[0]


def write_report(findings: frozenset, rng: random.Random) -> str:
    """A raw report (capitalised sentences, punctuation) stating every finding and, usually, the
    absence of the others. Like real reports it follows a habitual order (devices, heart, mediastinum,
    lungs, pleura, bones, impression) with the wording varied and now and then two sentences swapped;
    a fully shuffled order would make a tiny LLM spend its capacity on bookkeeping. The view is never
    mentioned, as in real reports.

    Wording follows habits, as a radiologist's does: one phrasing of each finding is the most common
    (habit(): Zipf weights 1, 1/2, 1/3, ...) and each optional sentence is usually written or usually
    left out (probabilities 0.2-0.3 or 0.7-0.9, never a coin flip). A model writes the most likely
    report; with uniform phrasings and coin-flip sentences that report's wording is a near tie that
    flips from epoch to epoch, and validation BLEU-4, which picks the checkpoint (Sec. 4.1), then
    measures the flips more than the findings (measured: README, "The demo")."""
    f = findings
    out = []
    if "support_device" in f:
        out.append(habit(rng, DEVICE))
    elif rng.random() < 0.3:
        out.append(habit(rng, NO_DEVICE))
    out.append(habit(rng, CARDIOMEGALY if "cardiomegaly" in f else NORMAL_HEART))
    if rng.random() < 0.7:
        out.append(habit(rng, FILLER[:4]))                      # mediastinum, hila, vessels
    opacities = sorted(f & set(OPACITIES))
    if opacities:
        out += [opacity_sentence(habit(rng, OPACITY), label) for label in opacities]
    elif rng.random() < 0.9:
        out.append(habit(rng, CLEAR_LUNGS))
    sides = [side for side in ("left", "right") if f"effusion_{side}" in f]
    if len(sides) == 2 and rng.random() < 0.7:
        out.append(habit(rng, BILATERAL_EFFUSION))
    elif sides:
        out += [_say(habit(rng, EFFUSION), side=side) for side in sides]
    elif rng.random() < 0.8:
        out.append(habit(rng, NO_EFFUSION))
    if rng.random() < 0.3:
        out.append(habit(rng, FILLER[4:6]))                     # pneumothorax
    if rng.random() < 0.3:
        out.append(habit(rng, FILLER[6:]))                      # bones
    if f == {"no_finding"} and rng.random() < 0.8:
        out.append(habit(rng, NO_ACUTE))
    if len(out) > 1 and rng.random() < 0.2:                     # an occasional swap of neighbours
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    return " ".join(out)


# keyword rules of the demo's CheXbert-like labeller, one concept per sentence
NEGATIONS = {"no", "not", "without", "normal", "clear", "negative"}
HEART_WORDS = {"cardiomegaly", "enlarged", "enlargement"}
EFFUSION_WORDS = {"effusion", "effusions"}
OPACITY_WORDS = {"opacity", "opacities", "opacification", "consolidation", "pneumonia"}
DEVICE_WORDS = {"tube", "tubes", "catheter", "catheters", "device", "devices", "line", "lines"}
UPPER, LOWER = {"upper", "apex", "apical"}, {"lower", "base", "basilar", "basal"}


def parse_findings(report: str) -> frozenset[str]:
    """Read the labels back from a report, raw or cleaned, written by the templates or by a model.
    Each sentence is read on its own, so order and repetition do not matter; a sentence with a
    negation word asserts nothing; a side or zone that is not named is not guessed."""
    found = set()
    for sentence in report.lower().split("."):
        words = set(re.findall(r"[a-z]+", sentence))
        if not words or words & NEGATIONS:
            continue
        sides = {side for side in ("left", "right") if side in words}
        if words & HEART_WORDS:
            found.add("cardiomegaly")
        if words & EFFUSION_WORDS:
            named = {"left", "right"} if words & {"bilateral", "both"} else sides
            found |= {f"effusion_{side}" for side in named}
        if words & OPACITY_WORDS:
            zones = ["upper"] * bool(words & UPPER) + ["lower"] * bool(words & LOWER)
            found |= {f"opacity_{side}_{zone}" for side in sides for zone in zones}
        if words & DEVICE_WORDS:
            found.add("support_device")
    return frozenset(found or {"no_finding"})


# -----------------------------------------------------------------------------
# the dataset on disk


def _write_study(task) -> tuple[dict, str]:
    """Draw, write and report one study: (annotation entry, view). Its own generator, seeded by its
    name, makes it the same whatever process draws it and whatever the other splits' sizes."""
    root, seed, k, split, i = task
    rng = random.Random(f"demo-{seed}-{split}-{i}")
    study = sample_study(rng)
    sid = f"{split}-{i:05d}"
    path = f"{split}/{sid}.png"
    render_image(study, rng).save(os.path.join(root, "images", path), compress_level=1)
    report = write_report(study["findings"], rng)
    # one patient per study, no id shared between splits (no patient is in two splits), and a split's
    # ids do not depend on the other splits' sizes
    num = f"{seed}{k}{i:06d}"
    return dict(id=sid, study_id=f"s{num}", subject_id=f"p{num}", report=report, image_path=[path],
                split=split), study["view"]


def make_demo_dataset(root, n_train=2000, n_val=200, n_test=300, seed=0, workers=2) -> None:
    """Write root/annotation.json (R2Gen format, no "views" field, like the real release),
    root/images/<split>/<id>.png and root/views.csv (the true view per image: the demo's analogue of
    MIMIC-CXR's metadata CSV, against which the view classifier can be checked). `workers` processes
    draw the images (the same bytes with any number)."""
    import multiprocessing

    splits = (("train", n_train), ("val", n_val), ("test", n_test))
    tasks = [(str(root), seed, k, split, i) for k, (split, n) in enumerate(splits) for i in range(n)]
    for split, _ in splits:
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            done = pool.map(_write_study, tasks, chunksize=32)
    else:
        done = [_write_study(t) for t in tasks]
    annotation = {split: [entry for entry, _ in done if entry["split"] == split] for split, _ in splits}
    views = [(entry["image_path"][0], view) for entry, view in done]
    with open(os.path.join(root, "views.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("image_path", "view"), *views])
    # the annotation goes last, through a rename, so an interrupted run leaves no half-valid dataset
    with open(os.path.join(root, "annotation.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(annotation, f, indent=1)
    os.replace(os.path.join(root, "annotation.json.tmp"), os.path.join(root, "annotation.json"))


# -----------------------------------------------------------------------------
# tokenizer


def build_tokenizer(texts: Iterable[str], extra_texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer for the demo's text encoder and LLM, trained on the cleaned training
    reports plus `extra_texts` (prompts, view sentences) so that every word they use has an id.
    Whitespace pre-tokenizing splits punctuation off ("view:" -> "view", ":"), and decoding joins
    tokens with spaces, which gives back a cleaned report exactly."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()  # cleaned reports are lowercase; prompts may not be
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    tok.train_from_iterator(itertools.chain(texts, extra_texts), trainer)
    bos, eos = ("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[bos, eos])
    # bert_score (the demo's BERTScore) fails on a tokenizer without a real model_max_length
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=512)


# -----------------------------------------------------------------------------
# the demo's frozen LLM: a tiny Llama pre-trained as a language model on the training reports

LLM_CONFIG = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512)


def split_reports(data_dir, split: str):
    """A demo split's records (data.load_annotation) and their reports, cleaned as data.py cleans the
    demo's (MIMIC-CXR's rules)."""
    from data import clean_report_mimic_cxr, load_annotation

    records = load_annotation(os.path.join(data_dir, "annotation.json"), split, os.path.join(data_dir, "images"))
    return records, [clean_report_mimic_cxr(r.report) for r in records]


def finding_matrix(reports: list[str]):
    """(n, 8) float tensor: 1 where parse_findings finds LABELS[1:] in a report (no_finding is "none")."""
    import torch

    return torch.tensor([[float(f in parse_findings(r)) for f in LABELS[1:]] for r in reports])


def _cosine(lr: float, step: int, steps: int) -> float:
    """Cosine decay from lr to 0 over `steps` (the demo's pre-training runs)."""
    return lr * 0.5 * (1 + math.cos(math.pi * step / steps))


def _save_whole(out_dir, *parts) -> None:
    """save_pretrained each part (model, tokenizer) into a temporary dir, then rename it over out_dir:
    never half a model, and a rerun replaces the earlier one."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for part in parts:
        part.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def keywords(report: str) -> str:
    """The findings of a report as tag words, one word per finding, in LABELS order, e.g.
    "cardiomegaly effusion_left support_device" ("no_finding" when there is none).

    One word each, not phrases: with "left effusion" or "right lower opacity" the demo LLM did not
    learn, in its pre-training budget, to bind the side or zone to the finding (llm_ceiling)."""
    found = parse_findings(report)
    return " ".join(label for label in LABELS if label in found)


def n_visual(cfg) -> int:
    """Np, the number of visual tokens (patches) of cfg's images: the length of E_v."""
    return (cfg.image_size // cfg.patch_size) ** 2


def filler_words(reports: list[str]) -> list[str]:
    """The words of tag_prefix's other slots: the reports' vocabulary less the tag words
    ("cardiomegaly" is both). Pre-training and llm_ceiling draw from the same list."""
    return sorted({w for r in reports for w in r.split()} - set(LABELS))


def tag_prefix(report: str, words: list[str], n_slots: int, rng: random.Random) -> str:
    """The words that stand where E_v stands in a pre-training document: `n_slots` (up to Np) words,
    each tag word of the report's findings (keywords()) in 1-4 random slots, every other slot a word
    drawn from `words` (filler_words of the training reports)."""
    tags = [tag for tag in keywords(report).split() for _ in range(rng.randint(1, 4))]
    n_slots = max(n_slots, len(tags))
    slots = [rng.choice(words) for _ in range(n_slots)]
    for pos, tag in zip(rng.sample(range(n_slots), len(tags)), tags):
        slots[pos] = tag
    return " ".join(slots)


def pretraining_rows(tokenizer, reports: list[str], cfg, seq_len: int, rng: random.Random):
    """The demo LLM's pre-training documents, "<s> S_v2t <1..Np tag-prefix words> S_v2t_after report </s>",
    packed back to back and cut into rows of seq_len tokens, as LLMs are pre-trained (the model then
    writes a report starting at any position): (ids, labels), each (R, seq_len); labels are -100 on
    "<s>", the prompt and the prefix, which are not text to learn to write."""
    import torch

    n_slots, words = n_visual(cfg), filler_words(reports)
    ids, labels = [], []
    for report in reports:
        length = rng.randint(1, n_slots)               # any length up to Np: short prefixes teach the tags
        head = f"{cfg.prompt_v2t} {tag_prefix(report, words, length, rng)} {cfg.prompt_v2t_after}"
        doc = tokenizer(f"{head} {report}").input_ids
        n_head = 1 + len(tokenizer(head, add_special_tokens=False).input_ids)
        ids += doc
        labels += [-100] * n_head + doc[n_head:]
    n = len(ids) // seq_len * seq_len
    return torch.tensor(ids[:n]).view(-1, seq_len), torch.tensor(labels[:n]).view(-1, seq_len)


def pretrain_demo_llm(data_dir, out_dir, steps=1000, batch_size=16, seq_len=128, lr=2e-3, seed=0):
    """Train a tiny Llama on the demo's *training* reports and save it with save_pretrained.

    A frozen random LLM cannot be steered into writing reports through a visual prefix (its loss stays
    near ln(vocab)); Llama-2 was pre-trained on text before the paper froze it, and so is this one. The
    validation and test reports are never seen.

    Each report is written as an instruction-following document: the V2T prompt, then 1 to Np (the
    number of visual tokens) words in which tag words naming the report's findings (read from the
    report itself) stand among random words from the training reports, then the report ("<prompt> ...
    lungs effusion_left unremarkable ... support_device ... effusion_left ... : <report>";
    pretraining_rows, tag_prefix). The loss is on the report only.
    - The demo's reports state each finding independently of the others, so a model trained on the
      bare reports never learns to let earlier words decide a later finding (we measured: a visual
      prefix then cannot steer it, even one computed from the true labels). Llama-2-chat brings that
      ability from its pre-training and instruction tuning.
    - The tags stand anywhere among Np words, not right after the prompt, because that is what the
      visual tokens are: Np of them, each looking at one patch, a finding visible in a few. A real LLM
      finds the words that matter anywhere in its context; a tiny one trained on the tags alone did not
      learn to read them from Np tokens in the model's budget (measured: README, "The demo"). Prefixes
      of every length up to Np, rather than Np always, and lr 2e-3 rather than 3e-3 made its learning
      of every tag more reliable in 1,000 steps (ceilings 0.93-0.94 against 0.79-0.93; README).
    The visual mapper must learn, from pixels alone, to write a prefix that does what the tags do."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from model import Config

    _, reports = split_reports(data_dir, "train")
    cfg = Config()
    extra = [cfg.prompt_v2t, cfg.prompt_v2t_after, cfg.prompt_t2v, "view: frontal.", "view: lateral.",
             "views: frontal, lateral.", " ".join(LABELS)]     # the last: the tag words of keywords()
    tokenizer = build_tokenizer(reports, extra)
    torch.manual_seed(seed)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                       eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id, **LLM_CONFIG))
    rows, labels = pretraining_rows(tokenizer, reports, cfg, seq_len, random.Random(seed))
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    llm.train()
    for step in range(steps):
        pick = torch.randint(len(rows), (batch_size,), generator=g)
        for group in opt.param_groups:
            group["lr"] = _cosine(lr, step, steps)
        loss = llm(input_ids=rows[pick], labels=labels[pick]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"demo LLM pre-training step {step}/{steps}: loss {loss.item():.3f}", flush=True)
    _save_whole(out_dir, llm, tokenizer)
    return loss.item()


def llm_ceiling(data_dir="demo_data", llm_dir="demo_data/llm", split="val", num_beams=3, seed=0) -> dict[str, float]:
    """Clinical scores of the reports the frozen demo LLM writes when it is told the true findings: the
    Np words of a pre-training document's prefix (tag_prefix: the tag words of each reference report
    among random training words) stand where E_v stands, in the V2T prefix [S_v2t, words, S_v2t_after].
    No visual prefix can do better than the tags it was trained on, so this bounds the demo model's
    clinical F1 (measured: README, "The demo")."""
    import torch

    from evaluate import clinical_scores

    _, refs = split_reports(data_dir, split)
    words = filler_words(split_reports(data_dir, "train")[1])
    model, tokenizer = _frozen_v2t_model(llm_dir)
    n_slots = n_visual(model.cfg)
    rng = random.Random(seed)
    ids = torch.tensor([tokenizer(tag_prefix(ref, words, n_slots, rng), add_special_tokens=False).input_ids
                        for ref in refs])                                   # (n, Np): one word per slot
    hyps = []
    for s in range(0, len(refs), model.cfg.eval_batch_size):
        hyps += _write(model, tokenizer, model._embed(ids[s:s + model.cfg.eval_batch_size]), num_beams)
    return clinical_scores(refs, hyps, parse_findings)


def _frozen_v2t_model(llm_dir):
    """The V2T-only model around the frozen LLM of llm_dir (its vision encoder is built but unused)."""
    from model import Config, ReportGenerator, load_frozen_llm, load_tokenizer

    cfg = Config(llm=llm_dir, vision="", t2v=False, rec=False)
    tokenizer = load_tokenizer(llm_dir)
    return ReportGenerator(cfg, load_frozen_llm(cfg), tokenizer).eval(), tokenizer


def _write(model, tokenizer, E_v, num_beams) -> list[str]:
    """The reports the frozen LLM writes after [S_v2t, E_v, S_v2t_after], E_v (B, n, dL) in place of
    the visual tokens."""
    import torch

    prefix = model._v2t_prefix(E_v)
    mask = torch.ones(prefix.shape[:2], dtype=torch.long)
    return tokenizer.batch_decode(model.generate_from_embeds(prefix, mask, num_beams), skip_special_tokens=True)


def label_prefix_bound(data_dir="demo_data", llm_dir="demo_data/llm", shared=False, split="val", steps=500,
                       batch_size=16, lr=1e-3, seed=0, num_beams=3):
    """Clinical scores of the reports the frozen demo LLM writes from a visual prefix computed from the
    true labels instead of the image, and that prefix's blocks: (scores, P).

    E_v = P_0 + sum_j y_j P_j, with y_j = 1 when finding j is in the report (parse_findings) and one
    learned (Np, dL) block per finding plus a constant one, trained by L_VTC (Eq. 1) on the training
    reports through the frozen LLM, with no image. It bounds what a visual prefix linear in the
    findings can do. shared=True ties each block's Np rows to one vector, so every visual token is
    the same: what an encoder whose tokens all carry the image's findings can give the LLM. See the
    README ("Status") for what each reaches."""
    import torch

    from data import report_targets
    from evaluate import clinical_scores

    model, tokenizer = _frozen_v2t_model(llm_dir)
    cfg = model.cfg

    def reports_and_labels(split):  # (n,) cleaned reports, (n, 9): a constant 1, then each finding
        reports = split_reports(data_dir, split)[1]
        return reports, torch.cat([torch.ones(len(reports), 1), finding_matrix(reports)], 1)

    n_tokens = n_visual(cfg)                                          # Np: the prefix has E_v's shape
    W = model.llm.get_input_embeddings().weight
    torch.manual_seed(seed)
    P = torch.nn.Parameter(torch.randn(len(LABELS), 1 if shared else n_tokens, W.shape[1])
                           * W.norm(dim=1).mean().item() / math.sqrt(W.shape[1]))   # word-embedding scale

    def prefix(y):  # (B, 9) -> E_v (B, Np, dL)
        return torch.einsum("bj,jnd->bnd", y, P).expand(-1, n_tokens, -1)

    reports, y = reports_and_labels("train")
    opt = torch.optim.AdamW([P], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(reports), (batch_size,), generator=g)
        for group in opt.param_groups:
            group["lr"] = _cosine(lr, step, steps)
        ids, mask = report_targets(tokenizer, [reports[i] for i in idx], cfg.max_report_tokens)
        loss = model.loss_v2t(prefix(y[idx]), ids, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    refs, y = reports_and_labels(split)
    hyps = []
    with torch.no_grad():
        for s in range(0, len(refs), cfg.eval_batch_size):
            hyps += _write(model, tokenizer, prefix(y[s:s + cfg.eval_batch_size]), num_beams)
    return clinical_scores(refs, hyps, parse_findings), P.detach()


def crop_batch(images, idx, crop: int, rng: random.Random):
    """(B, 3, crop, crop): data.image_transform(img.convert("RGB"), train=True) of each images[i] (grey
    uint8 tensors (1, h, w), already at the resize), the same random draws and the same values (tested),
    cut from the tensors instead of through PIL (2.4 ms a batch of 32 against 9.4 ms, measured 2026-12-01)."""
    import torch
    import torchvision.transforms.functional as TF

    from data import MEAN, STD, crop_offsets

    crops = []
    for i in idx:
        top, left = crop_offsets(*images[i].shape[1:], crop, True, rng)
        crops.append(images[i][:, top:top + crop, left:left + crop])
    x = torch.stack(crops).expand(-1, 3, -1, -1).float().div(255)     # to_tensor of the grey image as RGB
    return TF.normalize(x, MEAN, STD)


def pretrain_demo_encoder(data_dir, out_dir, steps=2000, batch_size=32, lr=2e-3, seed=0, cfg=None,
                          rec=1.0) -> list[float]:
    """Pre-train the demo's ViT-MAE, encoder and decoder, on the *training* images and save it with
    save_pretrained; returns the training loss of every step. `python train.py` makes it the first time
    (demo_data/vit_mae, the tiny preset's `vision`) and loads it by path, as the paper preset loads
    MAE-large; `--vision ""` trains the encoder from scratch instead.

    The paper starts from MAE-large, pre-trained on ImageNet, encoder and decoder. Trained from scratch in
    the demo's budget, the tiny encoder never learns to make its visual tokens carry the findings, and the
    model writes nearly the same report for every image (measured: README, "Status"). With no ImageNet
    here, it is pre-trained on the training images for two things at once:
    - to recognise the findings that parse_findings reads from their reports (the demo's analogue of an
      encoder pre-trained on CheXpert labels), by a linear head on the *mean* of the patch tokens, so
      that every token, on its own, learns to speak of the findings (the LLM reads the tokens one by one
      through the shared visual mapper). The head is thrown away. The opacities, a soft blob in one or
      two of the 49 tokens whose zone only its position tells, come last: after 1,000 steps the head
      has not found them (ROC AUC 0.55-0.95 over two runs, F1 0.00), after 2,000 of a 4,000-step
      schedule it mostly has (AUC 0.81-0.97; throwaway probe without the decoder), and with 2,000
      steps instead of 1,000 the model's test clinical F1 rose from 0.725 to 0.793 (6 epochs;
      README, "Status"). A head on all tokens side
      by side finds them in 1,000 steps, but the model reads them no better: the shared visual mapper
      needs each token to say which zone it shows, which a position-specific head never asks.
    - to reconstruct the image from its tokens through the MAE decoder (rec: the weight of that pixel
      MSE), so the decoder arrives trained, as MAE-large's does. With a random decoder the
      reconstruction branch's first gradients wipe the findings out of the encoder (measured: validation
      clinical F1 0.43 with V2T + Rec against 0.73 with the decoder pre-trained).
    Both see every patch, through the functions the model uses (model.encode_patches_in_order,
    model.decode_all_patches)."""
    import torch
    import torch.nn.functional as F
    import torchvision.transforms.functional as TF

    from data import load_image
    from model import Config, build_vision, decode_all_patches, encode_patches_in_order

    cfg = cfg or Config()
    records, reports = split_reports(data_dir, "train")
    y = finding_matrix(reports)                 # (n, 8)
    # every image decoded once, at the training pipeline's resize, as a grey uint8 tensor (1, h, w)
    images = [TF.pil_to_tensor(TF.resize(load_image(os.path.join(data_dir, "images", r.image_paths[0])),
                                         cfg.resize).convert("L")) for r in records]
    rng = random.Random(seed)

    torch.manual_seed(seed)
    mae = build_vision(dataclasses.replace(cfg, vision=""))      # random, with cfg's shapes
    mae.decoder.mask_token.requires_grad_(False)                  # no patch is masked (as in the model)
    head = torch.nn.Linear(cfg.vision_width, y.shape[1])
    params = [p for p in [*mae.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    mae.train()
    losses = []
    for step in range(steps):
        idx = [rng.randrange(len(images)) for _ in range(batch_size)]
        for group in opt.param_groups:
            group["lr"] = _cosine(lr, step, steps)
        px = crop_batch(images, idx, cfg.image_size, rng)
        z = encode_patches_in_order(mae.vit, px)                      # (B, N, dv), as model.encode_image
        loss = F.binary_cross_entropy_with_logits(head(z.mean(1)), y[idx])
        if rec:                                                         # as model.loss_rec, from z itself
            loss = loss + rec * F.mse_loss(decode_all_patches(mae.decoder, z), mae.patchify(px))
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 500 == 0 or step == steps - 1:
            print(f"demo encoder pre-training step {step}/{steps}: loss {loss.item():.3f}", flush=True)
    _save_whole(out_dir, mae)
    return losses


def _pretrain_llm_timed(data_dir, llm_dir, seed, threads, options) -> None:
    """pretrain_demo_llm with `threads` CPU threads, timed: what ensure_demo's second process runs."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.time()
    pretrain_demo_llm(data_dir, llm_dir, seed=seed, **options)
    print(f"demo LLM pre-trained and saved to {llm_dir} in {time.time() - t0:.0f} s", flush=True)


def ensure_demo(data_dir="demo_data", llm_dir="demo_data/llm", vision_dir=None, seed=0, cfg=None, views=False,
                llm_options=None, encoder_options=None):
    """Make what the demo needs and is not there yet: the data set, its pre-trained frozen LLM,
    (vision_dir: where; cfg: its shapes) its pre-trained ViT-MAE, and (views) every image's view from
    the view classifier (view_classifier.ensure_views). llm_options, encoder_options: keyword
    arguments of pretrain_demo_llm and pretrain_demo_encoder (None: their defaults, the quick start's).

    The LLM needs only the training reports, the ViT-MAE and the view classifier only the training
    images: when the LLM and something else are both to be made, the LLM is pre-trained in a second
    process while this one makes the rest, each process with half the CPU threads. Small models use
    two threads poorly (one thread runs a step of either at 0.6 times the speed of two), so side by
    side they finish sooner than one after the other: this stage took 215-267 s in three quick starts
    on 2 cores (2026-12-01), against 285 s and about 312 s one after the other (data from the logs of
    two earlier quick starts; the second's view classifier was not timed). The weights
    then come from one-thread arithmetic, which rounds differently from two threads' (a few 1e-5
    after 150 steps): `python demo.py encoder` remakes an encoder with all the threads, so not bit
    for bit this one."""
    if not os.path.exists(os.path.join(data_dir, "annotation.json")):
        t0 = time.time()
        make_demo_dataset(data_dir, seed=seed)
        print(f"demo data written to {data_dir} in {time.time() - t0:.0f} s", flush=True)
    make_llm = not os.path.exists(os.path.join(llm_dir, "config.json"))
    make_vision = bool(vision_dir) and not os.path.exists(os.path.join(vision_dir, "config.json"))
    make_views = views and not os.path.exists(os.path.join(data_dir, "annotation_views.json"))
    if not (make_llm or make_vision or make_views):
        return
    import multiprocessing

    import torch

    threads = torch.get_num_threads()
    if make_llm and not (make_vision or make_views):
        _pretrain_llm_timed(data_dir, llm_dir, seed, threads, llm_options or {})
        return
    pool = llm_job = None
    if make_llm:                                       # side by side: the LLM in a second process
        pool = multiprocessing.get_context("spawn").Pool(1)
        llm_job = pool.apply_async(_pretrain_llm_timed, (data_dir, llm_dir, seed, max(1, threads // 2),
                                                         llm_options or {}))
        torch.set_num_threads(max(1, threads - threads // 2))
    try:
        if make_vision:
            t0 = time.time()
            pretrain_demo_encoder(data_dir, vision_dir, seed=seed, cfg=cfg, **(encoder_options or {}))
            print(f"demo ViT-MAE pre-trained and saved to {vision_dir} in {time.time() - t0:.0f} s", flush=True)
        if make_views:
            import view_classifier
            view_classifier.ensure_views(data_dir, labels="demo")
        if llm_job is not None:
            llm_job.get()                              # waits for the LLM; an error there is raised here
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            pool.terminate()                           # after an error here, the LLM's process too
            pool.join()


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Tools for the built-in demo (python train.py makes the demo itself).",
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encoder", help="pre-train the demo ViT-MAE (encoder and decoder) on the training "
                         "images (python train.py makes demo_data/vit_mae itself; this remakes it, or another "
                         "one to use with train.py --vision OUT)")
    enc.add_argument("--steps", type=int, default=2000)
    enc.add_argument("--out", default="demo_data/vit_mae")
    enc.add_argument("--lr", type=float, default=2e-3)
    enc.add_argument("--vision_width", type=int, default=64, help="dv of the encoder built (the tiny preset's 64)")
    ceiling = sub.add_parser("ceiling", help="clinical F1 of what the frozen demo LLM writes when told the true "
                             "findings: the bound on the demo model's")
    bound = sub.add_parser("prefix", help="clinical F1 of what the frozen demo LLM writes from a prefix learned "
                           "from the true labels (no image): per position, or --shared by all visual tokens")
    bound.add_argument("--shared", action="store_true", help="every visual token the same vector")
    bound.add_argument("--steps", type=int, default=500)
    bound.add_argument("--lr", type=float, default=1e-3)
    for command in (ceiling, bound):
        command.add_argument("--split", default="val", choices=("train", "val", "test"))
    for command in (enc, ceiling, bound):
        command.add_argument("--data_dir", default="demo_data", help="made first (as python train.py does) if missing")
    args = p.parse_args()
    llm_dir = os.path.join(args.data_dir, "llm")
    ensure_demo(args.data_dir, llm_dir)
    t0 = time.time()
    if args.command == "encoder":
        from model import Config
        pretrain_demo_encoder(args.data_dir, args.out, steps=args.steps, lr=args.lr,
                              cfg=Config(vision_width=args.vision_width))
        print(f"demo encoder pre-trained and saved to {args.out} in {time.time() - t0:.0f} s")
    elif args.command == "ceiling":
        scores = llm_ceiling(args.data_dir, llm_dir, args.split)
        print(f"{llm_dir} told the true findings of the {args.split} reports ({time.time() - t0:.0f} s): "
              + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    else:
        scores, _ = label_prefix_bound(args.data_dir, llm_dir, args.shared, args.split, args.steps, lr=args.lr)
        kind = "one vector shared by all visual tokens" if args.shared else "one vector per visual token"
        print(f"{llm_dir} from a prefix learned from the true findings ({kind}, {args.steps} steps at lr {args.lr:g}), "
              f"{args.split} split ({time.time() - t0:.0f} s): " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
