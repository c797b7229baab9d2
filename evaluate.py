"""
Scoring generated reports: the language metrics of the paper's Table 1 (BLEU-1..4, METEOR,
ROUGE-L, plus CIDEr, which R2Gen-style code reports alongside), a clinical-label F1 in the spirit
of CheXbert F1, and two trivial baselines that every table should be read against.

Scores are computed once, on the whole split, from plain strings. Callers gather every rank's
reports first (STYLE.md point 8): BLEU and CIDEr are corpus statistics, and an average of
per-shard scores is not the corpus score.
"""
import argparse
import csv
import json
import os
import shutil
import time
from collections import Counter
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from data import ReportDataset

CAPTION_KEYS = ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"]

# -----------------------------------------------------------------------------
# language metrics


def _check_pairs(refs: list[str], hyps: list[str]) -> None:
    if len(refs) != len(hyps):
        raise ValueError(f"got {len(refs)} references but {len(hyps)} hypotheses; "
                         "scoring needs exactly one generated report per reference")
    if not refs:
        raise ValueError("nothing to score: refs and hyps are empty")


def _meteor(gts: dict[int, list[str]],
            res: dict[int, list[str]]) -> tuple[float | None, str | None]:
    """Corpus METEOR from the 1.5 jar that pycocoevalcap ships; (None, reason) if it can't run.

    nltk's meteor_score is not a fallback: it is a different METEOR (0.606 vs the jar's 0.329 on
    the same pairs, see NOTES.md), and a number from it would sit in a column next to published
    jar numbers as if it were comparable.
    """
    if shutil.which("java") is None:
        return None, "java not found on PATH (METEOR 1.5 is a Java jar)"
    meteor = None
    try:
        # a fresh jar per call (~7 s start-up, mostly loading the paraphrase table): the jar talks
        # over a line protocol, and a process left half-way through an earlier exchange would
        # answer the next one with the wrong lines
        meteor = Meteor()
        score, _ = meteor.compute_score(gts, res)
        return float(score), None
    except Exception as e:  # the jar died, or answered something that is not a score
        reason = f"METEOR 1.5 jar failed: {type(e).__name__}: {e}"
        if meteor is not None:
            meteor.meteor_p.kill()
            java_says = meteor.meteor_p.stderr.read().decode(errors="replace").strip()
            if java_says:
                reason += f" (java: {java_says[-300:]})"
        return None, reason
    finally:
        if meteor is not None:
            # pycocoevalcap's compute_score keeps its lock when it raises, and Meteor.__del__
            # waits on that lock: without this, a failed jar would hang garbage collection
            if meteor.lock.locked():
                meteor.lock.release()
            meteor.meteor_p.kill()
            meteor.meteor_p.wait()
            for pipe in (meteor.meteor_p.stdin, meteor.meteor_p.stdout, meteor.meteor_p.stderr):
                try:
                    pipe.close()  # Meteor.__del__ closes only stdin
                except OSError:  # BrokenPipeError: unsent input for a jar that is gone
                    pass


def caption_scores(refs: list[str], hyps: list[str],
                   meteor: bool = True) -> dict[str, float | str | None]:
    """BLEU_1..4, METEOR, ROUGE_L, CIDEr as the R2Gen literature computes them (paper Sec. 4).

    refs, hyps: cleaned reports ("the heart is normal . no effusion ."), one reference per sample,
    the full reference: truncating references to the model's max length inflates every score and
    makes it depend on a hyperparameter. Tokens are whitespace tokens of the cleaned text, as in
    R2Gen's compute_scores (no PTB tokenizer). Returns floats; METEOR is None when the jar can't
    run, with the reason (a str) under "METEOR_unavailable". meteor=False skips the jar's ~7 s
    start-up (e.g. per-epoch validation, where only BLEU-4 picks the checkpoint).

    Empty hypotheses (a model that emits EOS at once) are scored, never skipped or replaced:
    - BLEU, CIDEr: split() gives no tokens, so the sample is a zero-length candidate: it adds
      nothing to the matched or candidate n-gram counts and 0 to the corpus candidate length
      (brevity penalty); its own CIDEr is 0 (pycocoevalcap skips the division by a zero norm).
    - ROUGE_L: pycocoevalcap splits on " ", so "" is the single token "": LCS 0, score 0.
    - METEOR: the 1.5 jar takes an empty hypothesis as a zero-length candidate (its statistics
      line reads hypothesis length 0) and scores it 0, so it is sent as is. Replacing it by a
      token that matches nothing would also give 0 for the sample, but would add one candidate
      word to the corpus precision and change the corpus METEOR; we keep the jar's own answer.
    """
    _check_pairs(refs, hyps)
    # one space between tokens: Rouge splits on " " (two spaces would make an empty token), and
    # the METEOR jar reads one line per sample (a newline inside a report would desync it)
    gts = {i: [" ".join(r.split())] for i, r in enumerate(refs)}
    res = {i: [" ".join(h.split())] for i, h in enumerate(hyps)}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=0: no printed n-gram counts
    scores: dict[str, float | str | None] = {f"BLEU_{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores["METEOR"], reason = _meteor(gts, res) if meteor else (None, "skipped (meteor=False)")
    if reason is not None:
        scores["METEOR_unavailable"] = reason
    # ROUGE_L is a macro average: pycocoevalcap scores each pair (LCS F-measure with beta = 1.2,
    # i.e. recall weighted more than precision) and takes the mean over pairs
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    # CIDEr's idf comes from the references being scored, so it depends on the split (and is 0
    # for a single sample, where every n-gram is in every reference)
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


# -----------------------------------------------------------------------------
# clinical metric


def clinical_scores(refs: list[str], hyps: list[str], labeller) -> dict[str, float]:
    """Micro precision/recall/F1 of finding labels: the demo's analogue of CheXbert F1.

    labeller(report) -> frozenset[str] of the findings the report asserts. Each (report, label)
    pair counts once: a label of both the reference and the hypothesis is a TP, of the
    hypothesis only an FP, of the reference only an FN; counts are summed over reports before
    dividing (micro average), so frequent findings weigh more, as in CheXbert micro-F1.
    Also returns "f1/<label>" for every label that some reference or hypothesis mentions.
    A zero denominator gives 0.0.
    """
    _check_pairs(refs, hyps)
    tp, fp, fn = Counter(), Counter(), Counter()
    for ref, hyp in zip(refs, hyps):
        true, pred = labeller(ref), labeller(hyp)
        tp.update(true & pred)
        fp.update(pred - true)
        fn.update(true - pred)

    def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        return p, r, f1

    p, r, f1 = prf(sum(tp.values()), sum(fp.values()), sum(fn.values()))
    scores = {"precision": p, "recall": r, "f1": f1}
    for label in sorted(set(tp) | set(fp) | set(fn)):
        scores[f"f1/{label}"] = prf(tp[label], fp[label], fn[label])[2]
    return scores


# -----------------------------------------------------------------------------
# baselines: what a model must beat to have learned anything from the image


def most_frequent_report(train_reports: list[str]) -> str:
    """The most frequent training report; ties go to the first in sorted order (deterministic).

    Normal studies dominate both datasets, so this one report already scores well on BLEU.
    """
    if not train_reports:
        raise ValueError("no training reports")
    counts = Counter(train_reports)
    top = max(counts.values())
    return min(report for report, count in counts.items() if count == top)


@torch.no_grad()
def nearest_neighbour_reports(train_images: torch.Tensor, train_reports: list[str],
                              query_images: torch.Tensor, chunk: int = 256) -> list[str]:
    """For each query image, the report of the nearest training image in pixel space.

    train_images (N, ...), query_images (Q, ...): e.g. small grayscale images (N, 64*64); each is
    flattened and compared by Euclidean distance as given. Ties go to the lowest training index.
    A retrieval baseline: it shows how much of a score comes from finding a similar-looking study
    rather than from reading the image.
    """
    if len(train_images) != len(train_reports):
        raise ValueError(f"{len(train_images)} training images but {len(train_reports)} reports")
    # float64: cdist takes the fast |x|^2 + |y|^2 - 2 x.y route, whose cancellation in float32
    # could reorder near-equal distances
    train = train_images.flatten(1).double()  # (N, D)
    query = query_images.flatten(1).double()  # (Q, D)
    if train.shape[1] != query.shape[1]:
        raise ValueError(f"train images have {train.shape[1]} pixels, queries {query.shape[1]}")
    nearest = []
    for q in query.split(chunk):  # chunks of queries bound the (chunk, N) distance matrix
        nearest.append(torch.cdist(q, train).argmin(dim=1))  # argmin: first index on ties
    return [train_reports[i] for i in torch.cat(nearest).tolist()]


# -----------------------------------------------------------------------------
# printing


def format_table(rows: dict[str, dict[str, float | None]], keys: list[str]) -> str:
    """A fixed-width text table: one row per system, one column per metric key, 3 decimals.

    A None or missing value prints "n/a" (e.g. METEOR without Java).
    """
    name_width = max([len("system")] + [len(name) for name in rows])
    widths = [max(len(k), 5) for k in keys]  # 5 = len("0.123")
    lines = ["system".ljust(name_width) + "".join(f"  {k:>{w}}" for k, w in zip(keys, widths))]
    lines.append("-" * len(lines[0]))
    for name, row in rows.items():
        cells = ["n/a" if row.get(k) is None else f"{row[k]:.3f}" for k in keys]
        lines.append(name.ljust(name_width) + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths)))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# generation for a split: sharded across ranks, gathered, then scored once


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def generate_reports(model, dataset, collate, tokenizer, cleaner, cfg, device, autocast=None):
    """Beam-search a report for every study of `dataset`; every rank returns the whole split in order.

    Rank r generates studies r, r+W, r+2W, ...; the shards are gathered before anything is scored.
    Generated text is put through the dataset's report cleaner, the same normalisation as the
    references (a no-op for the demo's word-level tokenizer; for Llama it splits '.' off words)."""
    rank, world = _rank_world()
    shard = list(range(rank, len(dataset), world))
    loader = DataLoader(dataset, batch_size=cfg.eval_batch_size, sampler=shard, collate_fn=collate,
                        num_workers=cfg.num_workers)
    was_training = model.training
    model.eval()
    rows, i = [], 0
    with tqdm(total=len(shard), unit="report", disable=rank != 0, desc="generating", leave=False) as bar:
        for batch in loader:
            with autocast or nullcontext():
                ids = model.generate(batch["pixel_values"].to(device))
            for text, ref, study in zip(tokenizer.batch_decode(ids, skip_special_tokens=True),
                                        batch["reports"], batch["ids"]):
                rows.append({"index": shard[i], "id": study, "reference": ref, "generated": cleaner(text)})
                i += 1
            bar.update(len(ids))
    model.train(was_training)
    if world > 1:
        shards = [None] * world
        dist.all_gather_object(shards, rows)
        rows = [r for s in shards for r in s]
    return sorted(rows, key=lambda r: r["index"])


def small_images(dataset, size=32):
    """Every study's images as one small grayscale vector (for the nearest-image baseline)."""
    vecs = []
    for i in range(len(dataset)):
        x = dataset[i]["pixel_values"].mean(1, keepdim=True)           # (K, 1, H, W)
        vecs.append(F.adaptive_avg_pool2d(x, size).flatten())            # (K * size * size,)
    return torch.stack(vecs)


def evaluate_split(model, cfg, split, records, images_root, cleaner, collate, tokenizer, device,
                   autocast=None, out_dir=None, labeller=None):
    """Generate the split, write the predictions, score them next to two baselines, print a table.

    Predictions are written before any scoring starts, so a scorer failing after hours of generation
    loses nothing. Returns the metrics dict (on rank 0; other ranks return None)."""
    ds = ReportDataset(records[split], images_root, cleaner, train=False, resize=cfg.resize,
                       crop=cfg.image_size)
    t0 = time.time()
    rows = generate_reports(model, ds, collate, tokenizer, cleaner, cfg, device, autocast)
    gen_seconds = time.time() - t0
    if _rank_world()[0] != 0:
        return None
    out_dir = out_dir or cfg.out_dir
    os.makedirs(out_dir, exist_ok=True)
    pred_path = os.path.join(out_dir, f"predictions_{split}.csv")
    with open(pred_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "reference", "generated"])
        w.writerows([r["id"], r["reference"], r["generated"]] for r in rows)
    refs, hyps = [r["reference"] for r in rows], [r["generated"] for r in rows]

    # The baselines: the most frequent training report, and the report of the nearest training image.
    train_ds = ReportDataset(records["train"], images_root, cleaner, train=False, resize=cfg.resize,
                             crop=cfg.image_size)
    systems = {"model": hyps,
               "most frequent report": [most_frequent_report(train_ds.reports)] * len(rows),
               "nearest training image": nearest_neighbour_reports(small_images(train_ds), train_ds.reports,
                                                                   small_images(ds))}
    metrics = {}
    for name, h in systems.items():
        metrics[name] = caption_scores(refs, h)
        if labeller is not None:
            metrics[name].update({f"clinical_{k}": v for k, v in clinical_scores(refs, h, labeller).items()
                                  if "/" not in k})
    metrics["model"]["reports_per_second"] = len(rows) / gen_seconds
    keys = CAPTION_KEYS + (["clinical_precision", "clinical_recall", "clinical_f1"] if labeller else [])
    print(f"\n{split} split, {len(rows)} studies ({len(rows) / gen_seconds:.1f} reports/s generated); "
          f"predictions: {pred_path}")
    print(format_table(metrics, keys))
    if metrics["model"].get("METEOR") is None:
        print(f"METEOR: {metrics['model'].get('METEOR_unavailable')}")
    with open(os.path.join(out_dir, f"metrics_{split}.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


# -----------------------------------------------------------------------------
# command line: score any saved checkpoint


def main(argv=None):
    from transformers import AutoTokenizer

    from data import CLEANERS, load_annotation, make_collate
    from model import ReportGenerator, config_from_dict, load_frozen_llm
    from train import load_checkpoint

    p = argparse.ArgumentParser(description="Generate and score reports with a saved checkpoint.",
                                allow_abbrev=False)
    p.add_argument("--ckpt", required=True, help="a checkpoint written by train.py (best.pt)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--data_dir", help="override the checkpoint's data_dir (data moved)")
    p.add_argument("--llm", help="override the checkpoint's llm path (weights moved)")
    p.add_argument("--eval_batch_size", type=int)
    args = p.parse_args(argv)
    ckpt = load_checkpoint(args.ckpt)
    cfg = config_from_dict({**ckpt["config"], **{k: v for k, v in vars(args).items()
                                                  if k in ("data_dir", "llm", "eval_batch_size") and v}})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    tokenizer = AutoTokenizer.from_pretrained(cfg.llm)
    text_tokenizer = AutoTokenizer.from_pretrained(cfg.text_tokenizer) if cfg.text_tokenizer else tokenizer
    model = ReportGenerator(cfg, load_frozen_llm(cfg), tokenizer, text_tokenizer)
    model.load_trainable_state_dict(ckpt["model"])
    model.to(device)
    images_root = os.path.join(cfg.data_dir, "images")
    records = {s: load_annotation(os.path.join(cfg.data_dir, cfg.annotation or "annotation.json"), s, images_root)
               for s in ("train", args.split)}
    cleaner = CLEANERS["mimic_cxr" if cfg.dataset == "demo" else cfg.dataset]
    collate = make_collate(tokenizer, text_tokenizer, cfg.max_report_tokens, cfg.max_text_tokens)
    labeller = None
    if cfg.dataset == "demo":
        from demo import parse_findings as labeller
    evaluate_split(model, cfg, args.split, records, images_root, cleaner, collate, tokenizer, device,
                   autocast, out_dir=os.path.dirname(os.path.abspath(args.ckpt)), labeller=labeller)


if __name__ == "__main__":
    main()
