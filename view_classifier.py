"""
Label every image's view (frontal or lateral) with a classifier trained on training images only, and
write a copy of the annotation with a "views" list per entry. Run it once, before train.py.

The paper (Sec. 3, "Text-to-Vision Branch"): reports rarely say whether an image is frontal or
lateral, so the LLM could be asked to generate the visual embeddings of one view from a report that
fits both. A classifier trained "strictly on the training set images" labels each image's view, and the
text-to-vision branch reads the report with the view appended ("view: frontal.", see data.py). It is a
preprocessing step only: it never sees a report and plays no part in training or testing the model.

    python view_classifier.py --data_dir demo_data --labels demo       # ~40 s on a 2-core CPU
    python view_classifier.py --data_dir data/mimic_cxr --labels mimic --metadata mimic-cxr-2.0.0-metadata.csv
    python view_classifier.py --data_dir data/iu_xray --labels csv --labels_csv my_views.csv

The labels come from the dataset's metadata (MIMIC-CXR's ViewPosition), from a CSV of your own
(image_path,view), or, for the demo, from the generator's views.csv. Only training images' labels are
used for training; validation images' labels measure the classifier. Every image of every split then
gets the classifier's prediction (labelled or not), and <data_dir>/annotation_views.json is written
next to the untouched annotation.json, with the classifier (view_classifier.pt) beside it.
"""

import argparse
import csv
import json
import math
import os
import random
import sys
import time

import timm
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from tqdm import tqdm

from data import MEAN, SPLITS, STD, VIEWS, DataError, load_annotation, load_image

VIEWS_ANNOTATION = "annotation_views.json"  # what train.py reads when it exists
CHECKPOINT = "view_classifier.pt"

# -----------------------------------------------------------------------------
# view labels: image path (as in annotation.json) -> "frontal" / "lateral"

# DICOM ViewPosition (0018,5101) as MIMIC-CXR writes it. The projection decides, not how the patient
# lies: decubitus films (LLD/RLD: on one side, horizontal beam) and the lordotic AP AXIAL are still
# frontal images, and the cross-table lateral (supine, horizontal beam) is still a lateral one.
FRONTAL_POSITIONS = {"PA", "AP", "AP AXIAL", "AP LLD", "AP RLD", "PA LLD", "PA RLD"}
LATERAL_POSITIONS = {"LATERAL", "LL", "RL", "XTABLE LATERAL"}
# Obliques (LAO, RAO, LPO, RPO) and the swimmer's view are neither; with no value at all (4% of
# MIMIC-CXR) the view is unknown. These images are left out of training, and the classifier then says
# which of the two views each one looks like. In MIMIC-CXR 2.0.0 the named ones are 8 images in all.
UNLABELLED_POSITIONS = {"", "LAO", "RAO", "LPO", "RPO", "SWIMMERS"}


def view_of(value: str) -> str | None:
    """'frontal' or 'lateral' for a view ('Frontal') or a ViewPosition ('PA', 'LL', ...); None where the
    value says the view is neither or unknown; ValueError for a value we have never seen."""
    value = value.strip()
    if value.lower() in VIEWS:
        return value.lower()
    position = " ".join(value.upper().split())
    if position in FRONTAL_POSITIONS:
        return "frontal"
    if position in LATERAL_POSITIONS:
        return "lateral"
    if position in UNLABELLED_POSITIONS:
        return None
    known = sorted(VIEWS) + sorted(FRONTAL_POSITIONS | LATERAL_POSITIONS | UNLABELLED_POSITIONS - {""})
    raise ValueError(f"unknown view {value!r}; known values: {', '.join(known)} (or empty)")


def _read_csv(path, columns) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:   # utf-8-sig: a BOM (Excel) is not part of the header
            reader = csv.DictReader(f)
            rows = list(reader)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from e
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from e
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the header has {reader.fieldnames}")
    return rows


def mimic_view_labels(metadata_csv) -> dict[str, str]:
    """MIMIC-CXR's mimic-cxr-2.0.0-metadata.csv -> {R2Gen image path: view} for the images whose
    ViewPosition names a frontal or lateral projection. Keys are written as in R2Gen's MIMIC-CXR
    annotation.json: "p10/p10000032/s50414267/<dicom_id>.jpg". An unknown value is an error, not a
    silent skip: it means the file is not the release we know, and each row left out is a lost label."""
    labels, unknown = {}, []
    rows = _read_csv(metadata_csv, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        try:
            view = view_of(row["ViewPosition"] or "")  # a short row gives None
        except ValueError as e:
            unknown.append(f"line {line}, dicom_id {row['dicom_id']!r}: {e}")
            continue
        if view is not None:
            dicom, subject, study = ((row[c] or "").strip() for c in ("dicom_id", "subject_id", "study_id"))
            if not (dicom and subject and study):
                raise DataError(f"{metadata_csv}: line {line}: empty dicom_id, subject_id or study_id: {row}")
            labels[f"p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"] = view
    if unknown:
        more = f" (and {len(unknown) - 1} more rows)" if len(unknown) > 1 else ""
        raise DataError(f"{metadata_csv}: {unknown[0]}{more}")
    return labels


def csv_view_labels(path) -> dict[str, str]:
    """A CSV with columns image_path,view (paths as in annotation.json; views frontal/lateral, or
    ViewPosition values such as PA, AP, LATERAL, LL). An empty view means unknown: left out."""
    labels = {}
    for line, row in enumerate(_read_csv(path, ("image_path", "view")), start=2):
        image = (row["image_path"] or "").strip()
        if not image:
            raise DataError(f"{path}: line {line}: empty image_path")
        try:
            view = view_of(row["view"] or "")
        except ValueError as e:
            raise DataError(f"{path}: line {line}, image {image!r}: {e}") from e
        if view is not None and labels.setdefault(image, view) != view:
            raise DataError(f"{path}: line {line}, image {image!r}: labelled both {labels[image]} and {view}")
    return labels


def demo_view_labels(data_dir) -> dict[str, str]:
    """The demo's true views, written by demo.make_demo_dataset (its analogue of MIMIC-CXR's metadata)."""
    return csv_view_labels(os.path.join(data_dir, "views.csv"))


# -----------------------------------------------------------------------------
# images and the classifier

# One grey channel: X-rays have no colour. Its statistics are the mean of ImageNet's three, because
# timm sums a pretrained RGB stem over its channels when it is built with in_chans=1; a grey image
# normalised this way then gives that stem the same input as the RGB image gave the original.
GRAY_MEAN, GRAY_STD = sum(MEAN) / 3, sum(STD) / 3


def view_transform(img, image_size: int, train: bool, rng: random.Random) -> torch.Tensor:
    """PIL image -> (1, S, S) normalised tensor. The whole image is squashed to S x S rather than
    cropped: the views differ in their overall shape (two lungs and a central spine; one oval and a
    posterior spine), which a crop could cut off, while aspect ratios differ by a few percent only.
    Training shifts the image by up to S/8 each way, so position is no cue."""
    img = TF.resize(img.convert("L"), [image_size, image_size])
    if train:
        pad = image_size // 8
        img = TF.pad(img, pad, padding_mode="edge")
        img = TF.crop(img, rng.randint(0, 2 * pad), rng.randint(0, 2 * pad), image_size, image_size)
    return TF.normalize(TF.to_tensor(img), [GRAY_MEAN], [GRAY_STD])


class ViewImages(torch.utils.data.Dataset):
    """(image, label) pairs; items are (record id, image path, label index or -1)."""

    def __init__(self, items, images_root, image_size, train: bool, seed=0):
        self.items, self.images_root, self.image_size, self.train, self.seed = items, images_root, image_size, train, seed
        self.epoch = 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        rid, path, label = self.items[i]
        try:
            img = load_image(os.path.join(self.images_root, path))
        except DataError as e:
            raise DataError(f"record {rid!r}: {e}") from e
        # the shift is a pure function of (seed, epoch, index), as in data.ReportDataset: workers hold no RNG
        rng = random.Random(f"{self.seed}-{self.epoch}-{i}")
        return view_transform(img, self.image_size, self.train, rng), label


def image_items(records, labels=None) -> list[tuple[str, str, int]]:
    """Each distinct image of `records` once, as (record id, path, label index); with `labels`, only the
    labelled images (unlabelled ones get -1 when `labels` is None)."""
    items, seen = [], set()
    for rec in records:
        for p in rec.image_paths:
            if p in seen or (labels is not None and p not in labels):
                continue
            seen.add(p)
            items.append((rec.id, p, VIEWS.index(labels[p]) if labels is not None else -1))
    return items


def build_classifier(arch="resnet18", pretrained_path=None) -> torch.nn.Module:
    """A timm backbone with a 2-way head (VIEWS order) on one grey channel. `pretrained_path` is a local
    state_dict (e.g. ImageNet weights, .pth or .safetensors): timm drops its classifier, whose number of
    classes differs, and sums its RGB stem into one channel. Nothing is ever downloaded."""
    if pretrained_path is None:
        return timm.create_model(arch, pretrained=False, num_classes=len(VIEWS), in_chans=1)
    if not os.path.isfile(pretrained_path):
        raise FileNotFoundError(f"--pretrained {pretrained_path}: no such file (only local weights are used)")
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=pretrained_path),
                             num_classes=len(VIEWS), in_chans=1)


def load_classifier(path) -> tuple[torch.nn.Module, int]:
    """(model, image_size) from a checkpoint written by main(); plain tensors and strings, no code."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = build_classifier(ckpt["arch"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt["image_size"]


# -----------------------------------------------------------------------------
# training and prediction


def train_classifier(model, records, images_root, labels, epochs, batch_size, lr, image_size, seed,
                     num_workers=0) -> torch.nn.Module:
    """Train on the labelled images of `records` (the caller passes the training split only) with
    AdamW and a cosine learning rate. Deterministic under `seed` (shuffle order and shifts)."""
    items = image_items(records, labels)
    if not items:
        raise DataError(f"none of the {len(records)} training records has an image with a view label; "
                        "check that the label file's paths match annotation.json's image_path")
    counts = {v: sum(label == i for _, _, label in items) for i, v in enumerate(VIEWS)}
    print(f"training the view classifier on {len(items)} labelled training images ("
          + ", ".join(f"{v} {n}" for v, n in counts.items()) + ")", flush=True)
    device = next(model.parameters()).device
    ds = ViewImages(items, images_root, image_size, train=True, seed=seed)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(ds) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    step = 0
    for epoch in range(epochs):
        ds.epoch = epoch  # before the loader is iterated: workers copy the dataset then
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g,
                                             num_workers=num_workers)
        bar = tqdm(loader, desc=f"view classifier epoch {epoch + 1}/{epochs}", leave=False)
        losses = []
        for x, y in bar:
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = F.cross_entropy(model(x.to(device)), y.to(device))  # x: (B, 1, S, S)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        print(f"view classifier epoch {epoch + 1}/{epochs}: mean training loss {sum(losses) / len(losses):.4f}",
              flush=True)
    return model.eval()


@torch.no_grad()
def predict_views(model, records, images_root, image_size, batch_size, num_workers=0) -> dict[str, str]:
    """{image path: predicted view} for every image of `records`."""
    items = image_items(records)
    ds = ViewImages(items, images_root, image_size, train=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    device = next(model.parameters()).device
    model.eval()
    preds = []
    for x, _ in tqdm(loader, desc="predicting views", leave=False):
        preds += model(x.to(device)).argmax(dim=1).tolist()  # (B, 2) logits -> (B,)
    return {path: VIEWS[k] for (_, path, _), k in zip(items, preds)}


def view_accuracy(predicted: dict[str, str], labels: dict[str, str], records) -> dict:
    """Accuracy, and recall per view, of the predictions on the labelled images of `records`."""
    paths = [p for _, p, _ in image_items(records, labels)]
    out = dict(n=len(paths), accuracy=sum(predicted[p] == labels[p] for p in paths) / max(len(paths), 1))
    for v in VIEWS:
        of_v = [p for p in paths if labels[p] == v]
        out[f"n_{v}"] = len(of_v)
        out[f"recall_{v}"] = sum(predicted[p] == v for p in of_v) / len(of_v) if of_v else float("nan")
    return out


# -----------------------------------------------------------------------------
# the annotation copy


def write_annotation_with_views(annotation_path, out_path, views: dict[str, str]) -> None:
    """Copy annotation_path to out_path with a "views" list in every entry (one per image_path, in
    order). The original is only read; the copy appears whole or not at all (written, then renamed)."""
    if os.path.abspath(out_path) == os.path.abspath(annotation_path):
        raise ValueError(f"{out_path}: refusing to overwrite the original annotation; write a copy")
    with open(annotation_path, encoding="utf-8-sig") as f:    # a BOM is accepted, as load_annotation does
        ann = json.load(f)
    for split, entries in ann.items():
        for entry in entries:
            missing = [p for p in entry["image_path"] if p not in views]
            if missing:
                raise DataError(f"{annotation_path}: split {split!r}, record {entry['id']!r}: no view for {missing}")
            entry["views"] = [views[p] for p in entry["image_path"]]
    tmp = f"{out_path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(ann, f, indent=1)
    os.replace(tmp, out_path)


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--data_dir", default="demo_data", help="holds annotation.json and images/")
    p.add_argument("--labels", choices=("demo", "mimic", "csv"), default="demo",
                   help="where the training labels come from: the demo's views.csv, MIMIC-CXR's metadata "
                        "CSV (--metadata), or your own image_path,view CSV (--labels_csv)")
    p.add_argument("--metadata", help="mimic-cxr-2.0.0-metadata.csv, for --labels mimic")
    p.add_argument("--labels_csv", help="a CSV with columns image_path,view, for --labels csv")
    p.add_argument("--arch", default="resnet18", help="any timm model name")
    p.add_argument("--pretrained", help="local state_dict file to start from (nothing is downloaded); "
                                        "default: random initialisation, enough for two views this different")
    p.add_argument("--image_size", type=int, default=64,
                   help="side of the square input; the views differ in overall shape, not in fine detail, "
                        "so 64 px is enough and makes a CPU run take seconds")
    p.add_argument("--epochs", type=int, default=2, help="2 reach 100%% validation accuracy on the demo")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate, cosine-annealed to 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers (use several for MIMIC-CXR)")
    p.add_argument("--out", default=VIEWS_ANNOTATION, help="file name of the annotation copy, in data_dir")
    args = p.parse_args(argv)
    if args.labels == "mimic" and not args.metadata:
        p.error("--labels mimic needs --metadata mimic-cxr-2.0.0-metadata.csv")
    if args.labels == "csv" and not args.labels_csv:
        p.error("--labels csv needs --labels_csv PATH")
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    annotation = os.path.join(args.data_dir, "annotation.json")
    images_root = os.path.join(args.data_dir, "images")
    out_path = os.path.join(args.data_dir, args.out)
    if args.labels == "mimic":
        labels = mimic_view_labels(args.metadata)
    elif args.labels == "csv":
        labels = csv_view_labels(args.labels_csv)
    else:
        labels = demo_view_labels(args.data_dir)
    # load_annotation checks every image exists, so a missing file is reported here, naming its record
    records = {split: load_annotation(annotation, split, images_root) for split in SPLITS}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    torch.manual_seed(args.seed)
    model = build_classifier(args.arch, args.pretrained).to(device)
    # Sec. 3: "trained strictly on the training set images"; val and test labels only measure it
    train_classifier(model, records["train"], images_root, labels, args.epochs, args.batch_size, args.lr,
                     args.image_size, args.seed, args.num_workers)
    all_records = [r for split in SPLITS for r in records[split]]
    predicted = predict_views(model, all_records, images_root, args.image_size, 2 * args.batch_size,
                              args.num_workers)

    scores = {}
    for split in SPLITS:
        s = view_accuracy(predicted, labels, records[split])
        if s["n"]:
            scores[split] = s["accuracy"]
            majority = max(s["n_frontal"], s["n_lateral"]) / s["n"]
            print(f"{split}: view accuracy {s['accuracy']:.4f} on {s['n']} labelled images (frontal recall "
                  f"{s['recall_frontal']:.3f}, lateral recall {s['recall_lateral']:.3f}; "
                  f"majority class {majority:.3f})", flush=True)
    counts = {v: sum(p == v for p in predicted.values()) for v in VIEWS}
    print(f"predicted {len(predicted)} images ({sum(p not in labels for p in predicted)} without a label): "
          + ", ".join(f"{v} {n}" for v, n in counts.items()), flush=True)

    # the classifier first, the annotation last: its presence (ensure_views' test) means both are done
    ckpt_path = os.path.join(os.path.dirname(out_path), CHECKPOINT)
    ckpt = dict(model=model.state_dict(), arch=args.arch, image_size=args.image_size, labels=args.labels,
                seed=args.seed, accuracy=scores)
    torch.save(ckpt, ckpt_path + ".tmp")
    os.replace(ckpt_path + ".tmp", ckpt_path)
    write_annotation_with_views(annotation, out_path, predicted)
    print(f"wrote {out_path} and {ckpt_path} in {time.time() - t0:.0f} s", flush=True)
    return out_path


def ensure_views(data_dir, labels="demo") -> str:
    """Path of data_dir/annotation_views.json, made with the default settings if it is not there yet."""
    path = os.path.join(data_dir, VIEWS_ANNOTATION)
    if not os.path.exists(path):
        main(["--data_dir", data_dir, "--labels", labels])
    return path


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except DataError as e:  # bad input: the message says which file and record; no traceback needed
        sys.exit(f"view_classifier.py: error: {e}")
