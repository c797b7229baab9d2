"""
Scoring generated reports and reproducing the paper's evaluation:

- the language metrics of Table 1 (BLEU-1..4, METEOR, ROUGE-L, plus CIDEr, which R2Gen-style code
  reports alongside), computed exactly as pycocoevalcap computes them;
- the clinical metrics of Table 2: BERTScore in the CXR-Report-Metric setting, and, when their
  packages and weights are on this machine, CheXbert F1, RadGraph F1 and RadCliQ-v1 (each one that
  is not is reported as skipped, with the reason and how to provide it; nothing is downloaded);
- a clinical-label F1 for the demo (its analogue of CheXbert F1) and two trivial baselines that
  every table should be read against;
- Figure 4: the distance of every visual embedding E_v to the nearest word embedding of the LLM, and
  how alike the visual tokens of each study are.

    python evaluate.py --ckpt out/demo/best.pt                                  # generate and score a split
    python evaluate.py --distance out/demo_v2t/best.pt out/demo/best.pt --out out/figure4   # Figure 4

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
from contextlib import contextmanager, nullcontext

import numpy as np
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
TABLE2_KEYS = ["BERTScore", "CheXbert_P", "CheXbert_R", "CheXbert_F1", "RadGraph_F1", "RadCliQ_v1"]

# -----------------------------------------------------------------------------
# language metrics


def _check_pairs(refs: list[str], hyps: list[str]) -> None:
    if len(refs) != len(hyps):
        raise ValueError(f"got {len(refs)} references but {len(hyps)} hypotheses; "
                         "scoring needs exactly one generated report per reference")
    if not refs:
        raise ValueError("nothing to score: refs and hyps are empty")


def _meteor(gts: dict[int, list[str]],
            results: list[dict[int, list[str]]]) -> list[tuple[float | None, str | None]]:
    """Corpus METEOR of each of `results` (several systems' hypotheses for the same references) from
    ONE METEOR 1.5 jar, the one pycocoevalcap ships: (score, None), or (None, reason) where it can't run.

    One jar for all of them: its start-up (~10 s with the first corpus: loading the paraphrase table,
    the JIT warming up) is paid once, then each 300-report corpus takes ~0.5 s (measured 2026-12-01).
    Each corpus is a complete exchange (a SCORE line per sample, then one EVAL line over their
    statistics), so a score does not depend on what the jar scored before it (tested: the same
    numbers as a fresh jar each).

    nltk's meteor_score is not a fallback: it is a different METEOR (0.606 vs the jar's 0.329 on
    the same pairs, see NOTES.md), and a number from it would sit in a column next to published
    jar numbers as if it were comparable.
    """
    if shutil.which("java") is None:
        return [(None, "java not found on PATH (METEOR 1.5 is a Java jar)")] * len(results)
    out, meteor = [], None
    try:
        meteor = Meteor()
        for res in results:
            score, _ = meteor.compute_score(gts, res)
            out.append((float(score), None))
        return out
    except Exception as e:  # the jar died, or answered something that is not a score
        reason = f"METEOR 1.5 jar failed: {type(e).__name__}: {e}"
        if meteor is not None:
            meteor.meteor_p.kill()
            java_says = meteor.meteor_p.stderr.read().decode(errors="replace").strip()
            if java_says:
                reason += f" (java: {java_says[-300:]})"
        # a jar that failed half-way through an exchange would answer the next one with the wrong
        # lines: the corpora it had not finished get no score, those before keep theirs
        return out + [(None, reason)] * (len(results) - len(out))
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
    """BLEU_1..4, METEOR, ROUGE_L, CIDEr of one system: caption_scores_of(refs, {name: hyps})[name]."""
    return caption_scores_of(refs, {"hyps": hyps}, meteor)["hyps"]


def caption_scores_of(refs: list[str], systems: dict[str, list[str]],
                      meteor: bool = True) -> dict[str, dict[str, float | str | None]]:
    """BLEU_1..4, METEOR, ROUGE_L, CIDEr as the R2Gen literature computes them (paper Sec. 4), for each
    system ({name: hypotheses}) against the same references; METEOR from one jar for all of them.

    refs, hyps: cleaned reports ("the heart is normal . no effusion ."), one reference per sample,
    the full reference: truncating references to the model's max length inflates every score and
    makes it depend on a hyperparameter. Tokens are whitespace tokens of the cleaned text, as in
    R2Gen's compute_scores (no PTB tokenizer). Returns floats; METEOR is None when the jar can't
    run, with the reason (a str) under "METEOR_unavailable". meteor=False skips the jar's ~10 s
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
    for hyps in systems.values():
        _check_pairs(refs, hyps)
    # one space between tokens: Rouge splits on " " (two spaces would make an empty token), and
    # the METEOR jar reads one line per sample (a newline inside a report would desync it)
    gts = {i: [" ".join(r.split())] for i, r in enumerate(refs)}
    results = [{i: [" ".join(h.split())] for i, h in enumerate(hyps)} for hyps in systems.values()]
    meteors = _meteor(gts, results) if meteor else [(None, "skipped (meteor=False)")] * len(results)
    out = {}
    for name, res, (meteor_score, reason) in zip(systems, results, meteors):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=0: no printed n-gram counts
        scores: dict[str, float | str | None] = {f"BLEU_{n + 1}": float(b) for n, b in enumerate(bleu)}
        scores["METEOR"] = meteor_score
        if reason is not None:
            scores["METEOR_unavailable"] = reason
        # ROUGE_L is a macro average: pycocoevalcap scores each pair (LCS F-measure with beta = 1.2,
        # i.e. recall weighted more than precision) and takes the mean over pairs
        scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        # CIDEr's idf comes from the references being scored, so it depends on the split (and is 0
        # for a single sample, where every n-gram is in every reference)
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        out[name] = scores
    return out


# -----------------------------------------------------------------------------
# BERTScore, as the CXR-Report-Metric code behind the paper's Table 2 computes it


class Unavailable(Exception):
    """A metric whose package, model or weights are not on this machine; the message says how to provide it."""


@contextmanager
def hub_offline():
    """Inside, every Hugging Face Hub request raises: evaluation loads what is on disk and downloads nothing."""
    from huggingface_hub import constants
    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was


# Yu et al. (2023)'s CXR-Report-Metric scores with BERTScorer(model_type="distilroberta-base",
# lang="en", rescale_with_baseline=True) and idf off; the layer is bert-score's default for the model.
BERTSCORE_MODEL = "distilroberta-base"
HUB_ALIASES = {"distilroberta-base": ["distilbert/distilroberta-base"]}  # the Hub moved it; the cache may hold either


def local_model_dir(name: str) -> str:
    """A local directory as given, or a Hub id's snapshot already in the Hugging Face cache; never a download."""
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download
    for repo in [name] + HUB_ALIASES.get(name, []):
        try:
            return snapshot_download(repo, local_files_only=True)
        except Exception:  # not cached (or not a valid repo id): try the next name
            pass
    raise Unavailable(
        f"model {name!r} is neither a local directory nor in the Hugging Face cache. To provide it: "
        f"`hf download {HUB_ALIASES.get(name, [name])[0]}` on a machine with internet and copy the cache "
        f"(~/.cache/huggingface) here, or pass a saved model directory with --bertscore_model DIR "
        f"(and --bertscore_layers N if bert-score's table does not list the model)")


def bertscore_baseline(name: str, layers: int, path: str | None = None) -> float | None:
    """The published F1 baseline b of (model, layer) for rescaling, (F - b) / (1 - b); None if there is none.

    bert-score ships one file per model, rescale_baseline/en/<model>.tsv, a row per layer (columns LAYER,
    P, R, F); distilroberta-base's layer 5 reads F = 0.8473319."""
    if path is None:
        import importlib.util
        spec = importlib.util.find_spec("bert_score")
        if spec is None:
            return None
        path = os.path.join(spec.submodule_search_locations[0], "rescale_baseline", "en", f"{name}.tsv")
        if not os.path.exists(path):
            return None
    with open(path, newline="") as f:
        rows = {int(r["LAYER"]): float(r["F"]) for r in csv.DictReader(f)}
    if layers not in rows:
        raise Unavailable(f"{path} has no baseline for layer {layers} (it has layers {min(rows)}-{max(rows)})")
    return rows[layers]


class BERTScorer:
    """BERTScore F1 (Zhang et al. 2020) per report pair, exactly as the bert-score package (0.3.13) computes it.

    The package itself breaks under transformers 5, so these lines do what it does (a test checks them
    against it on MiniLM): v5 removed build_inputs_with_special_tokens (the package crashes on any empty
    report); v5 ignores the add_prefix_space=True the package passes for RoBERTa, so the first word would
    get another token than in every published number; and a v5 tokenizer without a tokenizer_config
    reports a max length of 1e30 (OverflowError). The computation:
    - each report is tokenized with its special tokens ([CLS] .. [SEP], <s> .. </s>), a space put in
      front for byte-level BPE tokenizers (RoBERTa, GPT-2), and cut at the model's 512 tokens;
    - its token embeddings are the hidden states after the first `layers` layers;
    - precision: each candidate token's best cosine similarity with any reference token, averaged over
      candidate tokens; recall the other way round; F1 their harmonic mean. The special tokens take part
      in the matching but weigh 0 in the averages; every other token weighs 1 (idf off);
    - an empty report (no token besides the special ones) scores 0 before rescaling;
    - F1 is rescaled with the published baseline of (model, layer) when bert-score ships one.
    """

    def __init__(self, model: str = BERTSCORE_MODEL, layers: int | None = None, device="cpu",
                 baseline_file: str | None = None, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer, GPT2Tokenizer, RobertaTokenizer
        path = local_model_dir(model)
        self.name = os.path.basename(os.path.normpath(model))   # the name bert-score's tables use
        if layers is None:
            try:
                from bert_score.utils import model2layers
            except ImportError as e:
                raise Unavailable(f"bert-score is not installed ({e}); pip install -r requirements.txt") from e
            if self.name not in model2layers:
                raise Unavailable(f"bert-score's table has no default layer for {self.name!r}: pass --bertscore_layers N")
            layers = model2layers[self.name]
        self.layers, self.device, self.batch_size = layers, device, batch_size
        self.baseline = bertscore_baseline(self.name, layers, baseline_file)
        try:
            with hub_offline():
                self.tokenizer = AutoTokenizer.from_pretrained(path)
                self.model = AutoModel.from_pretrained(path).to(device).eval()
        except Exception as e:  # a directory that is not a model, a missing tokenizer file, ...
            raise Unavailable(f"cannot load {path} as a BERTScore model: {type(e).__name__}: {e}") from e
        n_layers = self.model.config.num_hidden_layers
        if not 0 <= layers <= n_layers:
            raise Unavailable(f"--bertscore_layers {layers}: {self.name} has {n_layers} layers")
        # bert-score puts a space before the text for these two tokenizer families (as their v4 slow
        # tokenizers did with add_prefix_space), so that the first word is tokenized like every other
        self.prefix_space = isinstance(self.tokenizer, (GPT2Tokenizer, RobertaTokenizer))
        # v4 knew 512 for every BERT/RoBERTa checkpoint; a v5 tokenizer without a config says 1e30
        self.max_length = self.tokenizer.model_max_length if self.tokenizer.model_max_length < 1e6 else 512
        self.special_ids = {self.tokenizer.cls_token_id, self.tokenizer.sep_token_id}
        rescaled = f"rescaled with baseline {self.baseline}" if self.baseline is not None else "not rescaled (no baseline)"
        self.setting = f"{self.name}, layer {layers}, idf off, F1 {rescaled}"

    def encode(self, text: str) -> list[int]:
        text = text.strip()
        if text and self.prefix_space:
            text = " " + text
        return self.tokenizer(text, max_length=self.max_length, truncation=True).input_ids

    @torch.no_grad()
    def embed(self, texts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{text: (unit-norm token embeddings (T, d), token weights (T,))} for every distinct text."""
        texts = sorted(set(texts), key=lambda t: (len(t), t))  # similar lengths share a batch: less padding
        out = {}
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i:i + self.batch_size]
            ids = [self.encode(t) for t in chunk]
            T = max(map(len, ids))
            pad = self.tokenizer.pad_token_id
            x = torch.tensor([r + [pad] * (T - len(r)) for r in ids], device=self.device)          # (b, T)
            mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in ids], device=self.device)
            h = self.model(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states[self.layers]
            h = F.normalize(h.float(), dim=-1)                                                        # (b, T, d)
            for text, r, e in zip(chunk, ids, h):
                w = torch.tensor([0.0 if t in self.special_ids else 1.0 for t in r], device=self.device)
                out[text] = (e[:len(r)], w)
        return out

    def __call__(self, refs: list[str], hyps: list[str]) -> list[float]:
        """F1 of every (reference, candidate) pair (rescaled when a baseline exists); the mean is the score."""
        _check_pairs(refs, hyps)
        emb = self.embed(refs + hyps)
        scores = []
        for ref, hyp in zip(refs, hyps):
            (r, wr), (h, wh) = emb[ref], emb[hyp]
            sim = h @ r.T                                                  # (Th, Tr) cosine similarities
            if wh.sum() == 0 or wr.sum() == 0:                              # an empty report
                f1 = 0.0
            else:
                p = (sim.max(1).values * wh).sum() / wh.sum()
                rc = (sim.max(0).values * wr).sum() / wr.sum()
                f1 = (2 * p * rc / (p + rc)).item() if p + rc != 0 else 0.0
            scores.append(f1 if self.baseline is None else (f1 - self.baseline) / (1 - self.baseline))
        return scores


# -----------------------------------------------------------------------------
# clinical metric


def label_scores(true: list[frozenset], pred: list[frozenset]) -> dict[str, float]:
    """Micro precision/recall/F1 of per-report label sets, and "f1/<label>" for every label seen.

    Each (report, label) pair counts once: a label of both the reference and the hypothesis is a TP,
    of the hypothesis only an FP, of the reference only an FN; counts are summed over reports before
    dividing (micro average), so frequent findings weigh more, as in CheXbert micro-F1.
    A zero denominator gives 0.0.
    """
    tp, fp, fn = Counter(), Counter(), Counter()
    for t, p in zip(true, pred, strict=True):
        tp.update(t & p)
        fp.update(p - t)
        fn.update(t - p)

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


def clinical_scores(refs: list[str], hyps: list[str], labeller) -> dict[str, float]:
    """Micro precision/recall/F1 of finding labels: the demo's analogue of CheXbert F1.

    labeller(report) -> frozenset[str] of the findings the report asserts (demo.parse_findings)."""
    _check_pairs(refs, hyps)
    return label_scores([labeller(r) for r in refs], [labeller(h) for h in hyps])


# -----------------------------------------------------------------------------
# clinical metrics of Table 2: CheXbert F1, RadGraph F1, RadCliQ-v1
#
# Each needs a package and weights this project does not install (pip install f1chexbert==0.0.2 /
# radgraph==0.1.18, and the weights that StanfordAIMI/RRG_scorers on the Hub distributes). They are
# imported only here, loaded without network, and reported as skipped when absent or broken.

CHEXBERT_LABELS = ["Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                   "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                   "Pleural Other", "Fracture", "Support Devices", "No Finding"]
CHEXBERT_5 = frozenset(["Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion"])


def chexbert_positive(head_classes: list[int]) -> frozenset[str]:
    """The labels one report asserts, from the argmax class of each of CheXbert's 14 heads.

    f1chexbert's "rrg" mode: for the 13 findings class 0 is blank, 1 positive, 2 negative, 3 uncertain,
    and uncertain counts as positive; the "No Finding" head has classes 0 (blank) and 1 (positive)."""
    return frozenset(label for label, c in zip(CHEXBERT_LABELS, head_classes) if c in (1, 3))


class CheXbert:
    """The CheXbert labeller (Smit et al. 2020) with f1chexbert 0.0.2's model, weights and preprocessing.

    f1chexbert's own scoring calls tokenizer.encode_plus, which transformers 5 removed; its tokenization
    is repeated here ([CLS] + wordpieces + [SEP], cut at 512), batched with an attention mask as
    CheXbert's own labeller batches. Returns, per report, its positive labels and the [CLS] embedding that
    CXR-Report-Metric compares by cosine (s_emb, an input of RadCliQ)."""

    def __init__(self, device="cpu", batch_size=32):
        try:
            from f1chexbert.f1chexbert import CACHE_DIR, bert_labeler
        except ImportError as e:
            raise Unavailable(f"f1chexbert is not installed ({e}); to provide it: pip install f1chexbert==0.0.2 "
                              "and put chexbert.pth (Hub repo StanfordAIMI/RRG_scorers) in its cache") from e
        ckpt = os.path.join(CACHE_DIR, "chexbert.pth")
        if not os.path.exists(ckpt):
            raise Unavailable(f"no CheXbert weights at {ckpt}; to provide them: download chexbert.pth from the "
                              "Hub repo StanfordAIMI/RRG_scorers to that path, and bert-base-uncased into the "
                              "Hugging Face cache")
        from transformers import BertTokenizer
        try:
            with hub_offline():
                self.tokenizer = BertTokenizer.from_pretrained("bert-base-uncased")
                self.model = bert_labeler(inference=True)
            state = torch.load(ckpt, map_location="cpu")["model_state_dict"]
            # f1chexbert loads with strict=False (old checkpoints carry a position_ids buffer); a weight
            # the checkpoint lacks would leave a random labeller, so missing keys are refused
            info = self.model.load_state_dict({k.replace("module.", ""): v for k, v in state.items()}, strict=False)
        except Exception as e:
            raise Unavailable(f"CheXbert could not be loaded: {type(e).__name__}: {e}") from e
        if info.missing_keys:
            raise Unavailable(f"{ckpt} lacks {len(info.missing_keys)} CheXbert weights ({info.missing_keys[:5]} ...): "
                              "not the StanfordAIMI/RRG_scorers chexbert.pth?")
        self.model.to(device).eval()
        self.device, self.batch_size = device, batch_size

    def encode(self, report: str) -> list[int]:
        tokens = self.tokenizer.tokenize(" ".join(report.split()))
        ids = [self.tokenizer.cls_token_id] + self.tokenizer.convert_tokens_to_ids(tokens) + [self.tokenizer.sep_token_id]
        return ids if len(ids) <= 512 else ids[:511] + [self.tokenizer.sep_token_id]

    @torch.no_grad()
    def __call__(self, reports: list[str]) -> tuple[list[frozenset[str]], torch.Tensor]:
        labels, embeddings = [], []
        for i in range(0, len(reports), self.batch_size):
            ids = [self.encode(r) for r in reports[i:i + self.batch_size]]
            T = max(map(len, ids))
            x = torch.tensor([r + [0] * (T - len(r)) for r in ids], device=self.device)           # (b, T), [PAD] = 0
            mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in ids], device=self.device)
            cls = self.model.bert(x, attention_mask=mask)[0][:, 0]                                # (b, 768)
            classes = torch.stack([head(cls).argmax(1) for head in self.model.linear_heads], 1)   # (b, 14)
            labels += [chexbert_positive(c) for c in classes.tolist()]
            embeddings.append(cls.float().cpu())
        return labels, torch.cat(embeddings)


def radgraph_combined_f1(ref: dict, hyp: dict) -> float:
    """CXR-Report-Metric's RadGraph F1 of one pair: the mean of the entity F1 and the relation F1.

    ref, hyp: one report's RadGraph annotation, {"entities": {id: {"tokens", "label", "relations":
    [[relation, target id], ...]}}}. Entities are compared as (tokens, label) sets, relations as
    ((tokens, label), (target tokens, target label), relation) sets; an F1 with nothing to match is 0."""
    def sets(annotation):
        ents = annotation.get("entities", {})
        entities = {(e["tokens"], e["label"]) for e in ents.values()}
        relations = {((e["tokens"], e["label"]), (ents[t]["tokens"], ents[t]["label"]), rel)
                     for e in ents.values() for rel, t in e["relations"] if t in ents}
        return entities, relations

    def f1(test: set, retrieved: set) -> float:
        tp = len(test & retrieved)
        p = tp / len(retrieved) if retrieved else 0.0
        r = tp / len(test) if test else 0.0
        return 2 * p * r / (p + r) if p + r else 0.0

    (ref_e, ref_r), (hyp_e, hyp_r) = sets(ref), sets(hyp)
    return (f1(ref_e, hyp_e) + f1(ref_r, hyp_r)) / 2


class RadGraph:
    """Annotates reports with the radgraph package's original RadGraph model (Jain et al. 2021), the one
    RadCliQ-v1 was fitted with. The paper does not say which RadGraph F1 its Table 2 reports; we report
    CXR-Report-Metric's (radgraph_combined_f1, averaged over reports), the one that enters RadCliQ."""

    def __init__(self, device="cpu"):
        try:
            import radgraph
        except ImportError as e:
            raise Unavailable(f"radgraph is not installed ({e}); to provide it: pip install radgraph==0.1.18 "
                              "and extract radgraph.tar.gz (Hub repo StanfordAIMI/RRG_scorers) into its cache") from e
        model_dir = os.path.join(radgraph.radgraph.CACHE_DIR, "radgraph")
        if not os.path.isdir(model_dir) or not os.listdir(model_dir):
            raise Unavailable(f"no RadGraph weights in {model_dir}; to provide them: download radgraph.tar.gz "
                              "from the Hub repo StanfordAIMI/RRG_scorers and extract it there (its BERT "
                              "tokenizer must be in the Hugging Face cache too)")
        try:
            with hub_offline():
                device = torch.device(device)
                cuda = -1 if device.type == "cpu" else (device.index or 0)   # the package's own device argument
                self.annotator = radgraph.RadGraph(model_type="radgraph", cuda=cuda)
        except Exception as e:
            raise Unavailable(f"RadGraph could not be loaded: {type(e).__name__}: {e}") from e

    def __call__(self, reports: list[str]) -> list[dict]:
        with hub_offline():
            out = self.annotator(reports)
        return [out[str(i)] for i in range(len(reports))]


# RadCliQ-v1 (Yu et al. 2023): a linear model of four per-report metrics, standardised first. The numbers
# are those of CXR-Report-Metric's CXRMetric/radcliq-v1.pkl (a StandardScaler fitted on 160 reports and
# the coefficients with intercept), as RadEval transcribes them (RadEval/metrics/RadCliQv1/radcliq.py).
# Columns: RadGraph combined F1, BERTScore (distilroberta-base, rescaled F1), s_emb, BLEU-2.
RADCLIQ_V1_MEAN = (0.53792312, 0.61757256, 0.76479421, 0.44738335)
RADCLIQ_V1_SCALE = (0.30282584, 0.22430938, 0.25394391, 0.29892717)
RADCLIQ_V1_COEF = (-0.377083683, -0.370300100, -0.252616218, 4.31504841e-12)
RADCLIQ_V1_INTERCEPT = 2.46655256e-10


def radcliq_v1(radgraph: list[float], bertscore: list[float], semb: list[float], bleu2: list[float]) -> list[float]:
    """RadCliQ-v1 of every report (lower is better); the table reports the mean over reports.

    BLEU-2's coefficient is 4e-12, so which BLEU-2 is fed in changes no printed digit."""
    x = np.array([radgraph, bertscore, semb, bleu2], dtype=np.float64).T     # (n, 4)
    z = (x - np.array(RADCLIQ_V1_MEAN)) / np.array(RADCLIQ_V1_SCALE)
    return (z @ np.array(RADCLIQ_V1_COEF) + RADCLIQ_V1_INTERCEPT).tolist()


def load_scorers(device="cpu", bertscore_model: str = BERTSCORE_MODEL, bertscore_layers: int | None = None,
                 bertscore_baseline_file: str | None = None) -> dict[str, object]:
    """BERTScore, CheXbert and RadGraph: each a ready scorer, or the reason (a str) why it is unavailable."""
    builders = {"BERTScore": lambda: BERTScorer(bertscore_model, bertscore_layers, device, bertscore_baseline_file),
                "CheXbert": lambda: CheXbert(device),
                "RadGraph": lambda: RadGraph(device)}
    scorers = {}
    for name, build in builders.items():
        try:
            scorers[name] = build()
        except Unavailable as e:
            scorers[name] = str(e)
    return scorers


def table2_scores(refs: list[str], hyps: list[str], scorers: dict, cache: dict | None = None) -> dict:
    """BERTScore, CheXbert 14-label micro P/R/F1, RadGraph F1 and RadCliQ-v1 (Table 2) of one system.

    A metric that cannot be computed gets None, and "<scorer>_unavailable" says why. `cache` keeps what
    depends on the references only (CheXbert and RadGraph outputs) across the systems of one table.
    A scorer that fails while scoring (third-party code we cannot test without its weights) is reported,
    never allowed to stop the evaluation after generation."""
    _check_pairs(refs, hyps)
    cache = {} if cache is None else cache
    out, per_report = {}, {}

    def run(name, keys, fn):
        scorer = scorers.get(name, f"{name} was not loaded")
        try:
            if isinstance(scorer, str):
                raise Unavailable(scorer)
            fn(scorer)
        except Exception as e:
            reason = str(e) if isinstance(e, Unavailable) else f"{name} failed: {type(e).__name__}: {e}"
            out.update({k: None for k in keys}, **{f"{name}_unavailable": reason})

    def bertscore(scorer):
        per_report["bertscore"] = scorer(refs, hyps)
        out["BERTScore"] = float(np.mean(per_report["bertscore"]))
        out["BERTScore_setting"] = scorer.setting
        # RadCliQ-v1's scaler was fitted on rescaled distilroberta layer-5 F1 (baseline F = 0.8473319)
        per_report["radcliq_setting"] = scorer.baseline is not None and \
            (scorer.name, scorer.layers, scorer.baseline) == ("distilroberta-base", 5, bertscore_baseline("distilroberta-base", 5))

    def chexbert(scorer):
        if "chexbert" not in cache:
            cache["chexbert"] = scorer(refs)
        (ref_labels, ref_emb), (hyp_labels, hyp_emb) = cache["chexbert"], scorer(hyps)
        s = label_scores(ref_labels, hyp_labels)          # micro average: sklearn's "micro avg"
        out.update(CheXbert_P=s["precision"], CheXbert_R=s["recall"], CheXbert_F1=s["f1"])
        out["CheXbert_5_F1"] = label_scores([labels & CHEXBERT_5 for labels in ref_labels],
                                            [labels & CHEXBERT_5 for labels in hyp_labels])["f1"]
        per_report["semb"] = F.cosine_similarity(ref_emb, hyp_emb, dim=1).tolist()

    def radgraph(scorer):
        if "radgraph" not in cache:
            cache["radgraph"] = scorer(refs)
        per_report["radgraph"] = [radgraph_combined_f1(r, h) for r, h in zip(cache["radgraph"], scorer(hyps))]
        out["RadGraph_F1"] = float(np.mean(per_report["radgraph"]))

    run("BERTScore", ["BERTScore"], bertscore)
    run("CheXbert", ["CheXbert_P", "CheXbert_R", "CheXbert_F1"], chexbert)
    run("RadGraph", ["RadGraph_F1"], radgraph)
    missing = [k for k in ("bertscore", "semb", "radgraph") if k not in per_report]
    out["RadCliQ_v1"] = None
    if missing:
        out["RadCliQ_v1_unavailable"] = f"needs {', '.join(missing)}, unavailable above"
    elif not per_report["radcliq_setting"]:
        out["RadCliQ_v1_unavailable"] = ("fitted on BERTScore with distilroberta-base, layer 5, rescaled; got "
                                         + out["BERTScore_setting"])
    else:
        gts = {i: [" ".join(r.split())] for i, r in enumerate(refs)}
        res = {i: [" ".join(h.split())] for i, h in enumerate(hyps)}
        bleu2 = Bleu(2).compute_score(gts, res, verbose=0)[1][1]      # per-report BLEU-2
        out["RadCliQ_v1"] = float(np.mean(radcliq_v1(per_report["radgraph"], per_report["bertscore"],
                                                     per_report["semb"], bleu2)))
    return out


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
def generate_reports(model, dataset, collate, tokenizer, cleaner, cfg, device, autocast=None,
                     batch_size=None):
    """Beam-search a report for every study of `dataset`; every rank returns the whole split in order.

    Rank r generates studies r, r+W, r+2W, ...; the shards are gathered before anything is scored.
    Generated text is put through the dataset's report cleaner, the same normalisation as the
    references (a no-op for the demo's word-level tokenizer; for Llama it splits '.' off words).
    batch_size (default cfg.eval_batch_size) changes the speed, not the reports: batch_size=1
    generates one report at a time (see generation_throughput)."""
    rank, world = _rank_world()
    shard = list(range(rank, len(dataset), world))
    loader = DataLoader(dataset, batch_size=batch_size or cfg.eval_batch_size, sampler=shard,
                        collate_fn=collate, num_workers=cfg.num_workers)
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


def generation_throughput(model, dataset, collate, tokenizer, cleaner, cfg, device, autocast=None,
                          batch_sizes=(1, None)) -> dict[int, dict]:
    """Reports per second generating all of `dataset` at each batch size (None: cfg.eval_batch_size).

    Batched beam search against one report at a time, on the same studies, device and model; each
    entry also says whether that batch size wrote the same reports as the first one (it should: a
    batched row computes what the row computes alone). Pass a torch.utils.data.Subset to time a part."""
    results, first = {}, None
    for b in dict.fromkeys(b or cfg.eval_batch_size for b in batch_sizes):   # each size once, in order
        t0 = time.perf_counter()
        rows = generate_reports(model, dataset, collate, tokenizer, cleaner, cfg, device, autocast, batch_size=b)
        seconds = time.perf_counter() - t0                 # tolist() in generate() waits for the device
        texts = [r["generated"] for r in rows]
        first = texts if first is None else first
        results[b] = {"reports": len(rows), "seconds": seconds, "reports_per_second": len(rows) / seconds,
                      "same_reports_as_first": texts == first}
    return results


def small_images(dataset, size=32):
    """Every study's images as one small grayscale vector (for the nearest-image baseline)."""
    vecs = []
    for i in range(len(dataset)):
        x = dataset[i]["pixel_values"].mean(1, keepdim=True)           # (K, 1, H, W)
        vecs.append(F.adaptive_avg_pool2d(x, size).flatten())            # (K * size * size,)
    return torch.stack(vecs)


def evaluate_split(model, cfg, split, records, images_root, cleaner, collate, tokenizer, device,
                   autocast=None, out_dir=None, labeller=None, scorers=None, meteor=True, rows=None,
                   rows_path=None):
    """Generate the split, write the predictions, score them next to two baselines, print a table.

    Predictions are written before any scoring starts, so a scorer failing after hours of generation
    loses nothing. scorers: load_scorers()'s dict (BERTScore, CheXbert, RadGraph); None loads the
    defaults on rank 0, where the scoring happens. Returns the metrics dict (on rank 0; other ranks
    return None). rows: reports already generated (read_predictions of rows_path), scored without
    generating again; the metrics still go to out_dir."""
    ds = ReportDataset(records[split], images_root, cleaner, train=False, resize=cfg.resize,
                       crop=cfg.image_size)
    out_dir = out_dir or cfg.out_dir
    pred_path = os.path.join(out_dir, f"predictions_{split}.csv")
    gen_seconds = None
    if rows is None:
        t0 = time.time()
        rows = generate_reports(model, ds, collate, tokenizer, cleaner, cfg, device, autocast)
        gen_seconds = time.time() - t0
        if _rank_world()[0] != 0:
            return None
        os.makedirs(out_dir, exist_ok=True)
        with open(pred_path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "reference", "generated"])
            w.writerows([r["id"], r["reference"], r["generated"]] for r in rows)
    elif [r["id"] for r in rows] != [rec.id for rec in records[split]]:
        raise ValueError(f"the predictions do not list the {split} split's studies in order; regenerate them")
    refs, hyps = [r["reference"] for r in rows], [r["generated"] for r in rows]

    # The baselines: the most frequent training report, and the report of the nearest training image.
    train_ds = ReportDataset(records["train"], images_root, cleaner, train=False, resize=cfg.resize,
                             crop=cfg.image_size)
    systems = {"model": hyps,
               "most frequent report": [most_frequent_report(train_ds.reports)] * len(rows),
               "nearest training image": nearest_neighbour_reports(small_images(train_ds), train_ds.reports,
                                                                   small_images(ds))}
    scorers = load_scorers(device) if scorers is None else scorers
    metrics, cache = caption_scores_of(refs, systems, meteor=meteor), {}   # one METEOR jar for the three
    for name, h in systems.items():
        metrics[name].update(table2_scores(refs, h, scorers, cache))
        if labeller is not None:
            # the table prints the micro P/R/F1; metrics_<split>.json also keeps each finding's F1
            metrics[name].update({f"clinical_{k}": v for k, v in clinical_scores(refs, h, labeller).items()})
    speed = "scored from saved predictions"
    if gen_seconds:
        metrics["model"]["reports_per_second"] = len(rows) / gen_seconds
        speed = f"{len(rows) / gen_seconds:.1f} reports/s generated"
    keys = CAPTION_KEYS + TABLE2_KEYS + (["clinical_precision", "clinical_recall", "clinical_f1"] if labeller else [])
    print(f"\n{split} split, {len(rows)} studies ({speed}); predictions: {rows_path or pred_path}")
    print(format_table(metrics, keys))
    for key, value in metrics["model"].items():
        if key.endswith("_unavailable"):
            print(f"skipped {key[:-len('_unavailable')]}: {value}")
    if metrics["model"].get("BERTScore_setting"):
        print(f"BERTScore: {metrics['model']['BERTScore_setting']}")
    with open(os.path.join(out_dir, f"metrics_{split}.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


# -----------------------------------------------------------------------------
# Figure 4: how far the visual embeddings lie from the LLM's word embeddings


@torch.no_grad()
def nearest_word_distances(E: torch.Tensor, W: torch.Tensor, chunk: int = 4096, shortlist: int = 8) -> torch.Tensor:
    """Euclidean distance from each row of E (M, dL) to its nearest row of W (V, dL): (M,) float32.

    ||e - w||^2 = ||e||^2 + ||w||^2 - 2 e.w makes the search one matmul per chunk of E rows instead of a
    loop over the vocabulary. The matmul runs in W's dtype (bf16 for Llama-2), where that expansion loses
    digits to cancellation, so it only shortlists each row's `shortlist` nearest words; their distances
    are then computed exactly, in float32, from the differences."""
    W32 = W.float()
    w2 = W32.pow(2).sum(1)                                              # (V,)
    k = min(shortlist, W.shape[0])
    out = []
    for e in E.split(chunk):                                           # (c, dL)
        approx = w2 - 2 * (e.to(W.dtype) @ W.T).float()                 # (c, V): ||e - w||^2 - ||e||^2
        idx = approx.topk(k, dim=1, largest=False).indices              # (c, k)
        d = (e.float().unsqueeze(1) - W32[idx]).norm(dim=-1)            # (c, k, dL) -> (c, k)
        out.append(d.min(1).values)
    return torch.cat(out)


@torch.no_grad()
def token_alikeness(E_v: torch.Tensor) -> dict[str, torch.Tensor]:
    """How alike the Np visual tokens of each study are, E_v (B, Np, dL) -> (B,) each:
    "norm", the tokens' mean norm; "mean_share", the share of their energy sum_i |E_v,i|^2 in the
    study's mean token (Np |mean|^2 / sum_i |E_v,i|^2: 1 when all tokens are equal, 0 when they cancel);
    "cosine", the mean cosine between two different tokens of the study."""
    E = E_v.float()
    Np = E.shape[1]
    u = F.normalize(E, dim=-1).sum(1).pow(2).sum(-1)                    # |sum_i E_i/|E_i||^2 = Np + pairs
    return {"norm": E.norm(dim=-1).mean(1),
            "mean_share": Np * E.mean(1).pow(2).sum(-1) / E.pow(2).sum((1, 2)),
            "cosine": (u - Np) / (Np * (Np - 1))}


def visual_word_distances(model, dataset, collate, cfg, device, autocast=None, batch_size=None):
    """The nearest-word distance of every visual embedding E_v of every study of `dataset`, (n * Np,),
    and token_alikeness of every study, {name: (n,)}.

    E_v is computed as generation computes it (same autocast), and compared with the frozen LLM's input
    word-embedding matrix, the space E_v is fed into (Sec. 4, "Visualisation"; Figure 4)."""
    W = model.llm.get_input_embeddings().weight                         # (V, dL)
    loader = DataLoader(dataset, batch_size=batch_size or cfg.eval_batch_size, collate_fn=collate,
                        num_workers=cfg.num_workers)
    was_training = model.training
    model.eval()
    out, alike = [], []
    for batch in tqdm(loader, desc="visual embeddings", unit="batch", leave=False):
        with autocast or nullcontext():
            E_v = model.visual_embeddings(batch["pixel_values"].to(device))   # (B, Np, dL)
        out.append(nearest_word_distances(E_v.flatten(0, 1), W).cpu())        # (B * Np,)
        alike.append({k: v.cpu() for k, v in token_alikeness(E_v).items()})
    model.train(was_training)
    return torch.cat(out), {k: torch.cat([a[k] for a in alike]) for k in alike[0]}


QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def distance_stats(d) -> dict:
    """Count, mean, median, std, min, max and quantiles (linear interpolation, numpy's default)."""
    d = np.asarray(d, dtype=np.float64)
    return {"count": int(d.size), "mean": float(d.mean()), "median": float(np.median(d)), "std": float(d.std()),
            "min": float(d.min()), "max": float(d.max()),
            "quantiles": {str(q): float(np.quantile(d, q)) for q in QUANTILES}}


def branches(cfg) -> str:
    """The training losses of a checkpoint, as Table 3 names its rows: V2T, V2T+T2V, V2T+T2V+Rec, ..."""
    on = [name for name, flag in (("T2V", cfg.t2v), ("Rec", cfg.rec), ("CLIP", getattr(cfg, "clip", False))) if flag]
    return "+".join(["V2T"] + on)


def plot_distance_histograms(distances: dict[str, np.ndarray], path: str, title: str) -> None:
    """One histogram per checkpoint, overlaid on shared bins, as in the paper's Figure 4."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    edges = np.histogram_bin_edges(np.concatenate(list(distances.values())), bins=100)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, d in distances.items():
        ax.hist(d, bins=edges, alpha=0.5, label=f"{label} (median {np.median(d):.3g})")
    ax.set_xlabel("Euclidean distance of a visual embedding to the nearest LLM word embedding")
    ax.set_ylabel("visual embeddings")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def figure4(ckpt_paths: list[str], split: str, out_dir: str, device, data_dir=None, llm=None, batch_size=None):
    """Figure 4 for several checkpoints (e.g. V2T only and the full model): a PNG and a JSON in out_dir.

    Returns {label: stats}; a label is the checkpoint's branches and its path as given."""
    stats, distances = {}, {}
    for path in ckpt_paths:
        model, cfg, tokenizer, text_tokenizer = load_model(path, device, data_dir=data_dir, llm=llm)
        ds, collate, _, _ = split_dataset(cfg, split, tokenizer, text_tokenizer)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        d, alike = visual_word_distances(model, ds, collate, cfg, device, autocast, batch_size)
        d = d.numpy()
        label = f"{branches(cfg)}: {path}"
        distances[label] = d
        stats[label] = {"checkpoint": os.path.abspath(path), "branches": branches(cfg), "split": split,
                        "studies": len(ds), "visual_tokens_per_study": len(d) // len(ds), **distance_stats(d),
                        "tokens": {k: float(v.mean()) for k, v in alike.items()}}   # means over studies
        t = stats[label]["tokens"]
        print(f"{label}: {len(d)} visual embeddings, mean {stats[label]['mean']:.4f}, "
              f"median {stats[label]['median']:.4f}; per study: token norm {t['norm']:.3f}, "
              f"energy in the mean token {t['mean_share']:.3f}, cosine between tokens {t['cosine']:.3f}")
        del model
    os.makedirs(out_dir, exist_ok=True)
    png, js = os.path.join(out_dir, f"figure4_{split}.png"), os.path.join(out_dir, f"figure4_{split}.json")
    plot_distance_histograms(distances, png, f"Figure 4: visual embeddings of the {split} split")
    with open(js, "w") as f:
        json.dump(stats, f, indent=1)
    print(f"wrote {png} and {js}")
    return stats


# -----------------------------------------------------------------------------
# command line: score any saved checkpoint, time generation, or draw Figure 4


def load_model(ckpt_path, device, data_dir=None, llm=None, eval_batch_size=None):
    """A train.py checkpoint rebuilt around its frozen LLM: (model, cfg, tokenizer, text_tokenizer)."""
    from model import ReportGenerator, config_from_dict, load_frozen_llm, load_tokenizer
    from train import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    overrides = {k: v for k, v in (("data_dir", data_dir), ("llm", llm), ("eval_batch_size", eval_batch_size)) if v}
    cfg = config_from_dict({**ckpt["config"], **overrides})
    tokenizer = load_tokenizer(cfg.llm)                 # as train.py loads it (Llama-2 needs a pad token)
    text_tokenizer = load_tokenizer(cfg.text_tokenizer) if cfg.text_tokenizer else tokenizer
    model = ReportGenerator(cfg, load_frozen_llm(cfg), tokenizer, text_tokenizer)
    model.load_trainable_state_dict(ckpt["model"])
    return model.to(device), cfg, tokenizer, text_tokenizer


def split_dataset(cfg, split, tokenizer, text_tokenizer):
    """For a checkpoint's config: the split's evaluation dataset, the collate, the report cleaner, and the
    records of the training split and this one."""
    from data import CLEANERS, annotation_path, check_images_per_study, load_annotation, make_collate

    images_root = os.path.join(cfg.data_dir, "images")
    ann = annotation_path(cfg.data_dir, cfg.annotation)          # the file train.py read
    records = {s: load_annotation(ann, s, images_root) for s in {"train", split}}
    check_images_per_study(records, cfg.images_per_study, ann)
    cleaner = CLEANERS[cfg.dataset]
    ds = ReportDataset(records[split], images_root, cleaner, train=False, resize=cfg.resize, crop=cfg.image_size)
    collate = make_collate(tokenizer, text_tokenizer, cfg.max_report_tokens, cfg.max_text_tokens)
    return ds, collate, cleaner, records


def read_predictions(path):
    """predictions_<split>.csv as evaluate_split wrote it: rows of id, reference, generated."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or set(rows[0]) != {"id", "reference", "generated"}:
        raise ValueError(f"{path}: expected the columns id, reference, generated (a predictions file)")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate and score reports with a saved checkpoint, or draw Figure 4.",
                                allow_abbrev=False)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--ckpt", help="a checkpoint written by train.py (best.pt): generate the split and score it")
    mode.add_argument("--distance", nargs="+", metavar="CKPT",
                      help="Figure 4: nearest-word distances of the split's visual embeddings, "
                           "one histogram per checkpoint")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", default="out/figure4", help="--distance: where figure4_<split>.png/.json go")
    p.add_argument("--data_dir", help="override the checkpoint's data_dir (data moved)")
    p.add_argument("--llm", help="override the checkpoint's llm path (weights moved)")
    p.add_argument("--eval_batch_size", type=int)
    p.add_argument("--bertscore_model", default=BERTSCORE_MODEL,
                   help="local model directory (or Hub id already in the cache) for BERTScore; "
                        "default: distilroberta-base, CXR-Report-Metric's setting")
    p.add_argument("--bertscore_layers", type=int, help="hidden layer to take (default: bert-score's table)")
    p.add_argument("--bertscore_baseline", help="a bert-score baseline .tsv for a model it ships none for")
    p.add_argument("--predictions", metavar="CSV",
                   help="--ckpt: score this predictions_<split>.csv again without generating (e.g. after "
                        "installing a scorer)")
    p.add_argument("--throughput", type=int, metavar="N",
                   help="--ckpt: time generation of the split's first N studies at batch 1 and at "
                        "eval_batch_size, print reports/s, and stop (no scoring)")
    args = p.parse_args(argv)
    # Under torchrun every rank generates its shard of the split and rank 0 scores the whole of it.
    from train import setup_distributed                   # here, not at the top: train.py imports this file
    rank, world, device = setup_distributed()
    try:
        if world > 1 and (args.distance or args.throughput or args.predictions):
            raise SystemExit("evaluate.py: --distance, --throughput and --predictions run in one process; "
                             "start them with python, not torchrun")
        _main(args, rank, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _main(args, rank, device):
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    if args.distance:
        figure4(args.distance, args.split, args.out, device, args.data_dir, args.llm, args.eval_batch_size)
        return
    model, cfg, tokenizer, text_tokenizer = load_model(args.ckpt, device, args.data_dir, args.llm, args.eval_batch_size)
    ds, collate, cleaner, records = split_dataset(cfg, args.split, tokenizer, text_tokenizer)
    if args.throughput:
        subset = torch.utils.data.Subset(ds, range(min(args.throughput, len(ds))))
        for b, r in generation_throughput(model, subset, collate, tokenizer, cleaner, cfg, device, autocast).items():
            print(f"batch {b}: {r['reports_per_second']:.2f} reports/s "
                  f"({r['reports']} reports in {r['seconds']:.1f} s, same reports: {r['same_reports_as_first']})")
        return
    labeller = None
    if cfg.dataset == "demo":
        from demo import parse_findings as labeller
    scorers = load_scorers(device, args.bertscore_model, args.bertscore_layers, args.bertscore_baseline) \
        if rank == 0 else None                             # the other ranks only generate
    rows = read_predictions(args.predictions) if args.predictions else None
    evaluate_split(model, cfg, args.split, records, ds.images_root, cleaner, collate, tokenizer, device,
                   autocast, out_dir=os.path.dirname(os.path.abspath(args.ckpt)), labeller=labeller,
                   scorers=scorers, rows=rows, rows_path=args.predictions)


if __name__ == "__main__":
    main()
