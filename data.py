"""
Data loading for radiology report generation: R2Gen's annotation.json, report cleaning, images,
a Dataset, and the collate that tokenizes (tokenization happens here, never in the model).

The real datasets (IU-Xray, MIMIC-CXR) and the built-in demo (demo.py writes its data in the same
layout) go through exactly this code.
"""

import json
import os
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
import torchvision.transforms.functional as TF


class DataError(ValueError):
    """Every bad-input error; the message names the file, the record and what is wrong."""


# -----------------------------------------------------------------------------
# report cleaning: R2Gen's rules (Chen et al., 2020), so our BLEU/ROUGE/METEOR are comparable

# R2Gen's character class is '[.,?;*!%^&_+():-\[\]{}]'. Inside it ':-\[' is a *range* (':' to '['),
# so it also removes '<=>@' (and A-Z, already lowercased) but NOT the hyphen: "x-ray" survives.
# We spell that set out instead of relying on the range.
_PUNCT = re.compile(r"[.,?;*!%^&_+():<=>@\[\]{}]")


def _clean_sentences(text: str) -> str:
    """Split on '. ', clean each sentence, drop empty ones, join as 'a b . c d .' ('' if none is left)."""
    sentences = []
    for sent in text.strip().lower().split(". "):
        for ch in "\"/\\'":
            sent = sent.replace(ch, "")
        sent = _PUNCT.sub("", sent.strip())
        sent = " ".join(sent.split())  # collapse the spaces that removed characters leave behind
        if sent:  # R2Gen keeps empty sentences (its '!= []' test is always true); we drop them
            sentences.append(sent)
    return " . ".join(sentences) + " ." if sentences else ""


def _collapse(text: str, pair: str, single: str) -> str:
    while pair in text:
        text = text.replace(pair, single)
    return text


def _drop_list_markers(text: str) -> str:
    # R2Gen's exact rules: '1. ' goes; ' 2. ' .. ' 5. ' become a sentence break
    text = text.replace("1. ", "")
    for n in range(2, 6):
        text = text.replace(f". {n}. ", ". ")
    for n in range(2, 6):
        text = text.replace(f" {n}. ", ". ")
    return text


def clean_report_iu_xray(report: str) -> str:
    """
    R2Gen's IU-Xray cleaning:
    1. '..' -> '.', repeatedly;
    2. numbered list markers: '1. ' removed, ' 2. ' .. ' 5. ' turned into sentence breaks
       (R2Gen applies them to IU-Xray too);
    3. strip, lowercase, split into sentences on '. ';
    4. per sentence: remove quotes, slashes, backslashes and the characters .,?;*!%^&_+():<=>@[]{},
       strip, collapse runs of spaces;
    5. drop empty sentences, join with ' . ' and end with ' .'.
    "The heart is normal in size.. No effusion." -> "the heart is normal in size . no effusion ."
    """
    return _clean_sentences(_drop_list_markers(_collapse(report, "..", ".")))


def clean_report_mimic_cxr(report: str) -> str:
    """
    R2Gen's MIMIC-CXR cleaning: first newlines -> spaces, '__+' -> '_', runs of spaces -> one space,
    '..' -> '.' (all repeatedly), then the IU-Xray rules 2-5 (list markers, sentences, characters).
    """
    text = report.replace("\n", " ")
    text = _collapse(text, "__", "_")
    text = _collapse(text, "  ", " ")
    text = _collapse(text, "..", ".")
    return _clean_sentences(_drop_list_markers(text))


CLEANERS = {"iu_xray": clean_report_iu_xray, "mimic_cxr": clean_report_mimic_cxr,
            "demo": clean_report_mimic_cxr}      # the demo's reports are written like MIMIC-CXR's


def annotation_path(data_dir: str, annotation: str = "") -> str:
    """The annotation file train.py and evaluate.py read: `annotation` if named, else
    annotation_views.json (the copy view_classifier.py writes, with each image's view) when it exists,
    else the release's annotation.json."""
    if not annotation:
        views = "annotation_views.json"
        annotation = views if os.path.exists(os.path.join(data_dir, views)) else "annotation.json"
    return os.path.join(data_dir, annotation)

# -----------------------------------------------------------------------------
# annotation.json

SPLITS = ("train", "val", "test")
VIEWS = ("frontal", "lateral")


@dataclass
class Record:
    id: str
    report: str  # raw report as in the annotation
    image_paths: list[str]  # relative to the images root, in order
    split: str
    views: list[str] | None  # "frontal"/"lateral" per image if the annotation has "views", else None


def _entry_problem(entry, split: str, seen: set, k: int | None, images_root) -> str:
    """What is wrong with one annotation entry ('' if nothing); `k`: the split's usual image count."""
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    for key, typ in (("id", str), ("report", str), ("image_path", list), ("split", str)):
        if key not in entry:
            return f"missing key {key!r}"
        if not isinstance(entry[key], typ):
            return f"{key!r} should be a {typ.__name__}, got {type(entry[key]).__name__}"
    if entry["id"] in seen:
        return "duplicate id"
    seen.add(entry["id"])
    if entry["split"] != split:
        return f"its 'split' field says {entry['split']!r} but it is listed under {split!r}"
    if not entry["report"].strip():
        return "empty report"
    try:
        entry["report"].encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" escapes decode to lone surrogates; tokenizers refuse them
        return f"the report is not valid Unicode text ({e.reason} at character {e.start})"
    paths = entry["image_path"]
    if not paths or not all(isinstance(p, str) and p for p in paths):
        return f"'image_path' should be a non-empty list of paths, got {paths!r}"
    if k is not None and len(paths) != k:
        return f"has {len(paths)} image(s) where the split's other studies have {k}"
    views = entry.get("views")
    if views is not None:
        if not isinstance(views, list) or len(views) != len(paths):
            return f"'views' should be a list of {len(paths)} (one per image), got {views!r}"
        if any(v not in VIEWS for v in views):
            return f"'views' has a value not in {VIEWS}: {views!r}"
    for p in paths:
        if not os.path.isfile(os.path.join(images_root, p)):
            return f"image file {os.path.join(images_root, p)} does not exist"
    return ""


def load_annotation(path, split: str, images_root) -> list[Record]:
    """Read one split of R2Gen's annotation.json, refusing anything the training loop would trip on later.

    Every bad record stops the run here, at start-up, with one DataError that lists them all (the
    first 20), each by id and problem: missing or mistyped keys, duplicate ids, a record under the
    wrong split, an empty or whitespace-only report, text that is not valid Unicode, a missing image
    file. Fixing them all takes one pass, not one run per record. The file itself must be UTF-8
    (a leading byte-order mark is accepted)."""
    if split not in SPLITS:
        raise DataError(f"{path}: unknown split {split!r}; expected one of {SPLITS}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            ann = json.load(f)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e})") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read the annotation ({e.strerror})") from e
    if not isinstance(ann, dict) or split not in ann:
        has = sorted(ann) if isinstance(ann, dict) else type(ann).__name__
        raise DataError(f"{path}: no split {split!r} at the top level (it has {has}; expected {SPLITS})")
    if not isinstance(ann[split], list):
        raise DataError(f"{path}: split {split!r} is not a list of records")

    # The collate stacks a study's images into (B, K, C, H, W): K is the split's most common image count,
    # so that the odd record out is the one named, even when it comes first.
    counts = Counter(len(e["image_path"]) for e in ann[split]
                     if isinstance(e, dict) and isinstance(e.get("image_path"), list) and e["image_path"])
    k = counts.most_common(1)[0][0] if counts else None
    records, seen, problems = [], set(), []
    for i, entry in enumerate(ann[split]):
        problem = _entry_problem(entry, split, seen, k, images_root)
        if problem:
            rid = entry.get("id") if isinstance(entry, dict) else None
            problems.append(f"record {rid!r}: {problem}" if isinstance(rid, str) else f"record #{i}: {problem}")
        else:
            records.append(Record(entry["id"], entry["report"], list(entry["image_path"]), split,
                                  entry.get("views")))
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{path}: split {split!r}: {len(problems)} bad record(s); fix or remove them:\n  "
                        + "\n  ".join(problems[:20]) + more)
    return records


def check_images_per_study(records: dict[str, list[Record]], k: int, path) -> None:
    """Every study of every split must carry k images (Config.images_per_study): the model reads k x N
    visual tokens, and a test split with one image per study would be read with half of them."""
    for split, recs in records.items():
        if recs and len(recs[0].image_paths) != k:
            n = len(recs[0].image_paths)
            raise DataError(f"{path}: the {split!r} studies have {n} image(s) each, but images_per_study is {k} "
                            f"(IU-Xray 2, MIMIC-CXR 1): pass --images_per_study {n}, or fix the annotation")


# -----------------------------------------------------------------------------
# images

# MAE was pre-trained on ImageNet with these statistics, so its inputs must be normalised the same way
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# A limit on the pixels of one image, checked from the header before anything is decoded. MIMIC-CXR's
# largest images have about 4,300 x 3,500 = 15 M pixels; an image several times that is a wrong file
# or a corrupt header, and decoding it (PIL's own limit is 179 M) would take seconds and gigabytes
# in every worker. Raise it here if your data really is that large.
MAX_IMAGE_PIXELS = 50_000_000


def load_image(path) -> Image.Image:
    """Open an X-ray as 8-bit RGB, or raise DataError naming the file and the problem.

    Grayscale ('L') is copied to 3 channels; 16-bit grayscale ('I;16', 'I') is scaled, not clipped, from
    the full 0..65535 range (12-bit values stored in 16 bits would come out dark: rescale such files first);
    palette ('P') and bilevel ('1') images go through their palette; an alpha channel is dropped.
    Refused: a missing, truncated or corrupt file, and more than MAX_IMAGE_PIXELS pixels."""
    bad_file = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises for bad files
    try:
        with warnings.catch_warnings():  # PIL warns above 89 M pixels; MAX_IMAGE_PIXELS decides instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)       # reads the header only
    except bad_file as e:
        raise DataError(f"{path}: cannot read image ({e})") from e
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        img.close()
        raise DataError(f"{path}: image is {w} x {h} = {w * h / 1e6:.0f} M pixels, above the limit of "
                        f"{MAX_IMAGE_PIXELS / 1e6:.0f} M (data.MAX_IMAGE_PIXELS): a wrong file or a "
                        "corrupt header? downscale it, or raise the limit")
    try:
        img.load()  # decode now, so a truncated or corrupt file fails here and not in a worker later
    except bad_file as e:
        raise DataError(f"{path}: cannot read image ({e})") from e
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit PNGs (e.g. converted from DICOM): map the full 0..65535 range linearly onto 0..255.
        # PIL's own convert('L') clips at 255, which turns such an image almost white.
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def image_transform(img, train: bool, rng: random.Random, resize=256, crop=224) -> torch.Tensor:
    """PIL image -> (3, crop, crop) normalised tensor, as in the paper (Sec. 4.1): shorter edge to
    `resize` keeping the aspect, then a random crop (train) or the centre crop (eval).
    The paper crops at random at inference too; we use the centre so evaluation is deterministic.
    No horizontal flip (R2Gen has one): it would swap the patient's left and right, which reports name."""
    img = TF.resize(img, resize)  # an int resizes the shorter edge
    top, left = crop_offsets(img.height, img.width, crop, train, rng)
    x = TF.to_tensor(TF.crop(img, top, left, crop, crop))  # (3, crop, crop) in [0, 1]
    return TF.normalize(x, MEAN, STD)


def crop_offsets(h: int, w: int, crop: int, train: bool, rng: random.Random) -> tuple[int, int]:
    """(top, left) of image_transform's crop of an h x w image: random for training, the centre otherwise."""
    if train:
        return rng.randint(0, h - crop), rng.randint(0, w - crop)
    return round((h - crop) / 2), round((w - crop) / 2)


# -----------------------------------------------------------------------------
# dataset


# A training record whose image cannot be read is replaced by the next readable record (see
# ReportDataset); this many unreadable in a row means a broken images directory, not a few bad files.
MAX_BAD_IN_A_ROW = 10


def clean_reports(records, cleaner) -> list[str]:
    """Every record's report through `cleaner`; DataError naming the records whose report cleans to
    nothing (e.g. '...' or '___'): as a training target it would be EOS alone, as a reference empty."""
    reports = [cleaner(r.report) for r in records]
    empty = [r.id for r, text in zip(records, reports) if not text]
    if empty:
        raise DataError(f"{len(empty)} record(s) of split {records[0].split!r} have a report that is empty "
                        f"after cleaning (only punctuation or anonymisation marks); fix or remove them: "
                        f"{empty[:20]}{' ...' if len(empty) > 20 else ''}")
    return reports


class ReportDataset(torch.utils.data.Dataset):
    """Records -> dict(id, pixel_values (K, C, H, W), report (cleaned), views, skipped).

    An image that cannot be read (missing, truncated, corrupt, too large: load_image) is found only
    when it is decoded, possibly days into a run. With substitute_bad_images (training), the record is
    replaced by the next readable one of the list and item["skipped"] holds the message naming it and
    the problem, for the training log to print and count. Only the item's own record is named: a bad
    record passed over on the way to a readable one is named when it is itself fetched, so each bad
    record counts once per epoch however many sit in a row. Without it
    (evaluation), DataError names the record: a test set with a study silently replaced would no
    longer be the test set."""

    def __init__(self, records, images_root, cleaner, train: bool, resize=256, crop=224, seed=0,
                 substitute_bad_images=False):
        self.records = records
        self.images_root = images_root
        self.reports = clean_reports(records, cleaner) if records else []  # clean once, not every epoch
        self.train, self.resize, self.crop, self.seed = train, resize, crop, seed
        self.substitute_bad_images = substitute_bad_images
        self.epoch = 0

    def set_epoch(self, epoch: int):
        # call before iterating: workers get a copy of the dataset when the iterator is created
        # (with persistent_workers=True they would keep the old epoch)
        self.epoch = epoch

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i) -> dict:
        if not self.substitute_bad_images:
            return self._item(i)
        skipped = []
        while len(skipped) < MAX_BAD_IN_A_ROW:
            j = (i + len(skipped)) % len(self)
            try:
                return {**self._item(j), "skipped": skipped[:1]}
            except DataError as e:
                skipped.append(str(e))
        raise DataError(f"{MAX_BAD_IN_A_ROW} records in a row have unreadable images, the last: {skipped[-1]}; "
                        "this looks like a broken images directory rather than a few bad files")

    def _item(self, i) -> dict:
        rec = self.records[i]
        # training crops are a pure function of (seed, epoch, index): a resumed run sees exactly the
        # same crops, and DataLoader workers carry no RNG state. (A str seed is hashed with SHA-512,
        # so it does not depend on PYTHONHASHSEED.)
        rng = random.Random(f"{self.seed}-{self.epoch}-{i}")
        images = []
        for p in rec.image_paths:
            try:
                img = load_image(os.path.join(self.images_root, p))
            except DataError as e:
                raise DataError(f"record {rec.id!r}: {e}") from e
            images.append(image_transform(img, self.train, rng, self.resize, self.crop))
        return dict(id=rec.id, pixel_values=torch.stack(images), report=self.reports[i], views=rec.views,
                    skipped=[])


# -----------------------------------------------------------------------------
# collate: tokenization for both branches

# The text-to-vision branch appends the view to the report (Sec. 3, "Text-to-Vision Branch"), since
# reports rarely say it: "view: frontal." for one image, "views: frontal, lateral." for two.
VIEW_SENTENCE = "{label}: {views}."


def view_sentence(views: list[str]) -> str:
    return VIEW_SENTENCE.format(label="view" if len(views) == 1 else "views", views=", ".join(views))


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows into (ids, mask), both (B, L) long."""
    ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(row)] = 1
    return ids, mask


def report_targets(llm_tokenizer, reports: list[str], max_report_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision-to-text targets (Eq. 1): each report's tokens, cut to max_report_tokens - 1, then EOS;
    no BOS (the prompt and the visual tokens come first). Right-padded: ids and mask, (B, L)."""
    rows = llm_tokenizer(reports, add_special_tokens=False).input_ids
    rows = [r[: max_report_tokens - 1] + [llm_tokenizer.eos_token_id] for r in rows]
    return _pad(rows, llm_tokenizer.pad_token_id)


def make_collate(llm_tokenizer, text_tokenizer, max_report_tokens: int, max_text_tokens: int):
    for name, tok in (("llm_tokenizer", llm_tokenizer), ("text_tokenizer", text_tokenizer)):
        if tok.pad_token_id is None:  # Llama-2's tokenizer ships without one
            raise ValueError(f"{name} has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.unk_token)")
    # The special tokens the text tokenizer wraps a text in ([CLS] .. [SEP] for BERT/BLIP, <s> .. </s>
    # for the demo tokenizer), read off one encoding, so any post-processor works. We add them
    # ourselves because the report is cut *between* them, leaving the view sentence intact.
    probe = text_tokenizer("x", return_special_tokens_mask=True)
    first = probe.special_tokens_mask.index(0)
    last = len(probe.special_tokens_mask) - probe.special_tokens_mask[::-1].index(0)
    prefix, suffix = probe.input_ids[:first], probe.input_ids[last:]

    def collate(batch: list[dict]) -> dict:
        reports = [b["report"] for b in batch]  # full and uncut: these are also the references

        report_ids, report_mask = report_targets(llm_tokenizer, reports, max_report_tokens)

        # text-to-vision input: the report, plus its view sentence when the views are known
        body = text_tokenizer(reports, add_special_tokens=False).input_ids
        text_rows = []
        for b, ids in zip(batch, body):
            views = b["views"]
            tail = text_tokenizer(view_sentence(views), add_special_tokens=False).input_ids if views else []
            budget = max_text_tokens - len(prefix) - len(suffix) - len(tail)
            text_rows.append(prefix + ids[: max(budget, 0)] + tail + suffix)
        text_ids, text_mask = _pad(text_rows, text_tokenizer.pad_token_id)

        return dict(
            ids=[b["id"] for b in batch],
            skipped=[s for b in batch for s in b.get("skipped", [])],  # unreadable records replaced (ReportDataset)
            reports=reports,
            pixel_values=torch.stack([b["pixel_values"] for b in batch]),  # (B, K, C, H, W)
            report_ids=report_ids,  # (B, L)
            report_mask=report_mask,
            text_ids=text_ids,  # (B, Lt)
            text_mask=text_mask,
        )

    return collate


# -----------------------------------------------------------------------------
# one-time preparation at MIMIC-CXR scale: every image stored with its shorter edge at `resize`
#
# MIMIC-CXR's JPEGs are about 2500 x 3000 pixels; decoding one and resizing it costs far more than
# everything else the loader does, and training repeats it every epoch. Done once, the prepared images
# give the model exactly the same input: the resize below is image_transform's own, so the dataset's
# resize of a prepared image is a no-op (torchvision returns an image already at the size as is).
#
#     python data.py prepare --src data/mimic_cxr/images --dst data/mimic_cxr_256/images --workers 8


def annotation_image_paths(annotation, images_root) -> list[str]:
    """Every image path (relative to images_root) of every split of an annotation.json, once each, sorted.
    The annotation goes through load_annotation's checks, so a missing image is named before any work."""
    paths = {p for split in SPLITS for r in load_annotation(annotation, split, images_root) for p in r.image_paths}
    return sorted(paths)


def _is_prepared(path, size: int) -> bool:
    """True if `path` decodes and its shorter edge is `size`: what an earlier run wrote completely."""
    try:
        with Image.open(path) as img:
            img.load()
            return min(img.size) == size
    except (OSError, SyntaxError, ValueError):  # missing, truncated or not an image
        return False


def prepare_image(src, dst, size: int = 256) -> str:
    """Write `src` with its shorter edge resized to `size` to `dst` (the format of dst's extension).

    Returns "skipped" when dst is already a valid prepared image, else "written". The image goes
    through load_image (16-bit PNGs are scaled, not clipped) and the same TF.resize as image_transform.
    A grey image is stored as one channel (load_image copies it back to three: the same pixels).
    JPEG outputs are re-encoded at quality 95 (MIMIC-CXR-JPG's own); PNG outputs are lossless, so the
    dataset then gives bit-identical tensors. The file appears atomically (a temp file, then
    os.replace): an interrupted run leaves at most a stale dst + ".part", which the next run rewrites."""
    if _is_prepared(dst, size):
        return "skipped"
    fmt = Image.registered_extensions().get(os.path.splitext(dst)[1].lower())
    if fmt is None:
        raise DataError(f"{src}: no image format for the extension of {dst}")
    img = TF.resize(load_image(src), size)
    a = np.asarray(img)
    if (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all():
        img = img.convert("L")
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    tmp = dst + ".part"
    img.save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    os.replace(tmp, dst)
    return "written"


def _prepare_task(task) -> tuple[str, str]:
    """Pool worker: (status, error message naming the file) for one (src, dst, size)."""
    src, dst, size = task
    try:
        return prepare_image(src, dst, size), ""
    except DataError as e:            # load_image's message already starts with the file's path
        return "failed", str(e)
    except Exception as e:            # e.g. a full disk: name the file, keep going with the others
        return "failed", f"{src} -> {dst}: {type(e).__name__}: {e}"


def prepare_images(annotation, src_root, dst_root, size: int = 256, workers: int = 8,
                   progress: bool = True) -> dict[str, int]:
    """Store every image of `annotation` under dst_root, at the same relative path, shorter edge `size`.

    Parallel (a process pool, unordered), resumable (valid outputs are skipped, so a rerun after an
    interruption redoes only what is missing) and complete: a bad image does not stop the others; the
    failures are raised together at the end, each naming its file. Returns {"written", "skipped"}."""
    from contextlib import nullcontext
    from multiprocessing import Pool

    from tqdm import tqdm

    if os.path.realpath(src_root) == os.path.realpath(dst_root):
        raise DataError(f"--dst {dst_root} is the source images root: the originals would be overwritten")
    rel = annotation_image_paths(annotation, src_root)
    tasks = [(os.path.join(src_root, p), os.path.join(dst_root, p), size) for p in rel]
    counts, failures = {"written": 0, "skipped": 0}, []
    # leaving the Pool's `with` terminates its workers: at once on Ctrl-C, after the last result otherwise
    with tqdm(total=len(tasks), unit="img", desc="preparing", disable=not progress) as bar, \
            (Pool(workers) if workers > 1 else nullcontext()) as pool:
        results = pool.imap_unordered(_prepare_task, tasks, chunksize=16) if pool else map(_prepare_task, tasks)
        for status, error in results:
            if status == "failed":
                failures.append(error)
            else:
                counts[status] += 1
            bar.update()
    if failures:
        shown = "\n  ".join(sorted(failures)[:20])
        raise DataError(f"{len(failures)} of {len(tasks)} images could not be prepared "
                        f"({counts['written']} written, {counts['skipped']} already there):\n  {shown}"
                        + ("\n  ..." if len(failures) > 20 else ""))
    return counts


def main(argv=None):
    import argparse
    import sys
    import time

    p = argparse.ArgumentParser(description="One-time image preparation: every image of an annotation.json "
                                "with its shorter edge resized, at the same relative paths.", allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="resize every image once (resumable, parallel)")
    prep.add_argument("--src", required=True, help="the images root the annotation's image_path entries are relative to")
    prep.add_argument("--dst", required=True, help="the prepared images root (created; same relative paths)")
    prep.add_argument("--annotation", help="default: annotation.json beside --src")
    prep.add_argument("--size", type=int, default=256, help="shorter edge; must equal the Config field `resize`")
    prep.add_argument("--workers", type=int, default=8, help="processes (0 or 1: in this process)")
    args = p.parse_args(argv)
    annotation = args.annotation or os.path.join(os.path.dirname(os.path.abspath(args.src)), "annotation.json")
    t0 = time.time()
    try:
        counts = prepare_images(annotation, args.src, args.dst, args.size, args.workers)
    except DataError as e:  # bad input: the message names the files; no traceback needed
        sys.exit(f"data.py: error: {e}")
    print(f"{counts['written']} images written, {counts['skipped']} already prepared, in {time.time() - t0:.0f} s. "
          f"Use {args.dst} as the images root: <data_dir>/images beside <data_dir>/{os.path.basename(annotation)}.")


if __name__ == "__main__":
    main()
