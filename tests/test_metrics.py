"""evaluate.py's metrics against independent implementations, and its baselines against brute force.

BLEU is checked against nltk, ROUGE-L against rouge-score, METEOR against the jar run directly
on files. The jar starts three times (~7 s each: the shared `scores` fixture, and twice in the
jar comparison); the other tests skip METEOR or hide Java to stay fast.
"""
import math
import random
import shutil
import subprocess
import threading
from pathlib import Path

import pycocoevalcap.meteor.meteor as pycoco_meteor
import pytest
import torch
from nltk.translate.bleu_score import corpus_bleu
from rouge_score import rouge_scorer

from evaluate import (CAPTION_KEYS, caption_scores, clinical_scores, format_table,
                      most_frequent_report, nearest_neighbour_reports)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR 1.5 needs java")

SENTENCES = [
    "the heart is normal in size", "the heart size is mildly enlarged", "the lungs are clear",
    "there is no pleural effusion", "no pneumothorax is seen", "the mediastinum is unremarkable",
    "there is a small left pleural effusion", "mild atelectasis at the right lung base",
    "the osseous structures are intact", "there is no focal consolidation",
    "degenerative changes of the thoracic spine", "the cardiomediastinal silhouette is stable",
]
WORDS = "the heart lungs are clear no small left right mild pleural effusion base is".split()


def make_pairs(n: int = 60, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic (reference, candidate) reports in the cleaned " . " format.

    Candidates are perturbed references: a sentence dropped, replaced or reordered, a word
    swapped. Every candidate keeps >= 4 tokens because nltk and pycocoevalcap disagree below
    that: for a candidate with no n-grams of order n, nltk counts 1 in the precision
    denominator (max(1, count)), pycocoevalcap counts 0.
    """
    rng = random.Random(seed)
    refs, hyps = [], []
    for _ in range(n):
        ref = rng.sample(SENTENCES, rng.randint(2, 5))
        hyp = list(ref)
        if len(hyp) > 2 and rng.random() < 0.5:
            hyp.pop(rng.randrange(len(hyp)))
        if rng.random() < 0.4:
            hyp[rng.randrange(len(hyp))] = rng.choice(SENTENCES)
        if rng.random() < 0.3:
            rng.shuffle(hyp)
        words = " . ".join(hyp).split()
        if rng.random() < 0.5:
            words[rng.randrange(len(words))] = rng.choice(WORDS)
        refs.append(" . ".join(ref) + " .")
        hyps.append(" ".join(words) + " .")
    return refs, hyps


def run_meteor_jar(refs: list[str], hyps: list[str], tmp_path: Path) -> float:
    """The METEOR 1.5 jar's own corpus score, from files, with the options pycocoevalcap uses."""
    (tmp_path / "hyp.txt").write_text("".join(h + "\n" for h in hyps))
    (tmp_path / "ref.txt").write_text("".join(r + "\n" for r in refs))
    jar_dir = Path(pycoco_meteor.__file__).parent
    out = subprocess.run(["java", "-Xmx2G", "-jar", pycoco_meteor.METEOR_JAR,
                          str(tmp_path / "hyp.txt"), str(tmp_path / "ref.txt"),
                          "-l", "en", "-norm", "-q"],  # -q: only the final score on stdout
                         cwd=jar_dir, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def no_java(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: which("java") finds nothing


@pytest.fixture(scope="module")
def pairs():
    return make_pairs()


@pytest.fixture(scope="module")
def scores(pairs):
    return caption_scores(*pairs)


def test_pairs_are_nontrivial(pairs):
    refs, hyps = pairs
    assert len(refs) >= 50 and len(set(refs)) > 40
    assert sum(r == h for r, h in zip(refs, hyps)) < len(refs) // 2
    assert min(len(h.split()) for h in hyps) >= 4


def test_all_keys_present_and_nothing_printed(pairs, capsys):
    out = caption_scores(*pairs, meteor=False)  # the jar answers through pipes, never our stdout
    assert set(CAPTION_KEYS) <= set(out)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_bleu_matches_nltk(pairs, scores, n):
    refs, hyps = pairs
    expected = corpus_bleu([[r.split()] for r in refs], [h.split() for h in hyps],
                           weights=tuple([1 / n] * n))
    assert 0.1 < expected < 1.0  # a score that can tell implementations apart
    assert scores[f"BLEU_{n}"] == pytest.approx(expected, abs=1e-6)


class WhitespaceTokenizer:
    def tokenize(self, text):
        return text.split()


def test_rouge_l_matches_rouge_score(pairs, scores):
    refs, hyps = pairs
    # rouge-score gives the LCS precision and recall; pycocoevalcap's F uses beta = 1.2, and
    # averages the per-pair F over pairs (no corpus-level LCS)
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=WhitespaceTokenizer())
    beta2 = 1.2 ** 2
    fs = []
    for ref, hyp in zip(refs, hyps):
        s = scorer.score(ref, hyp)["rougeL"]  # score(target, prediction)
        p, r = s.precision, s.recall
        fs.append((1 + beta2) * p * r / (r + beta2 * p) if p and r else 0.0)
    expected = sum(fs) / len(fs)
    assert 0.3 < expected < 1.0
    assert scores["ROUGE_L"] == pytest.approx(expected, abs=1e-6)
    # and it is not the plain F1 that rouge-score reports
    f1 = sum(scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(refs, hyps)) / len(refs)
    assert abs(scores["ROUGE_L"] - f1) > 1e-4


def test_cider_is_positive(scores):
    assert math.isfinite(scores["CIDEr"]) and scores["CIDEr"] > 0


@needs_java
def test_meteor_matches_jar_with_an_empty_hypothesis(pairs, tmp_path):
    refs, hyps = pairs
    refs, hyps = refs + ["the lungs are clear ."], hyps + [""]  # scored as a zero-length candidate
    ours = caption_scores(refs, hyps)
    assert ours["METEOR"] is not None, ours.get("METEOR_unavailable")
    assert 0.0 <= ours["METEOR"] <= 1.0
    assert ours["METEOR"] == pytest.approx(run_meteor_jar(refs, hyps, tmp_path), abs=1e-9)


def test_meteor_none_without_java(pairs, no_java):
    out = caption_scores(*pairs)
    assert out["METEOR"] is None
    assert "java" in out["METEOR_unavailable"]
    assert all(isinstance(out[k], float) for k in CAPTION_KEYS if k != "METEOR")


def test_meteor_can_be_skipped(pairs):
    out = caption_scores(*pairs, meteor=False)
    assert out["METEOR"] is None and "skipped" in out["METEOR_unavailable"]


@needs_java
def test_meteor_none_when_jar_fails(pairs, monkeypatch):
    monkeypatch.setattr(pycoco_meteor, "METEOR_JAR", "no-such-meteor.jar")  # java starts, jar fails
    # in a thread, so that a hang (pycocoevalcap's Meteor.__del__ waiting on the lock its failed
    # compute_score kept) fails the test instead of stalling the suite
    result = {}
    worker = threading.Thread(target=lambda: result.update(caption_scores(*pairs)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "caption_scores hung after the METEOR jar failed"
    out = result
    assert out["METEOR"] is None
    assert "jar failed" in out["METEOR_unavailable"]
    assert isinstance(out["BLEU_4"], float)


def test_identical_reports_score_one(pairs):
    refs, _ = pairs
    out = caption_scores(refs, refs, meteor=False)
    assert out["BLEU_4"] == pytest.approx(1.0, abs=1e-6)  # pycocoevalcap's 1e-9 smoothing
    assert out["ROUGE_L"] == pytest.approx(1.0, abs=1e-12)


def test_empty_hypotheses_do_not_crash():
    refs = ["the heart is normal . the lungs are clear .", "no pleural effusion .",
            "there is no pneumothorax .", "mild atelectasis ."]
    hyps = ["the heart is normal . the lungs are clear .", "", "   ", "\n"]
    out = caption_scores(refs, hyps, meteor=False)  # METEOR's empty case: the jar test above
    assert all(math.isfinite(out[k]) for k in CAPTION_KEYS if k != "METEOR")
    assert out["ROUGE_L"] == pytest.approx(1 / 4)  # one perfect pair, three empty ones scoring 0
    assert caption_scores(refs, [""] * 4, meteor=False)["BLEU_1"] == pytest.approx(0.0, abs=1e-9)


def test_length_mismatch_is_refused():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        caption_scores(["a .", "b ."], ["a ."])
    with pytest.raises(ValueError, match="references but"):
        clinical_scores(["a ."], [], labeller=lambda r: frozenset())


def test_clinical_scores_hand_counted():
    labels = {"r1": {"effusion", "cardiomegaly"}, "h1": {"effusion"},  # TP effusion, FN cardio
              "r2": {"edema"}, "h2": {"edema", "pneumothorax"},          # TP edema, FP pneumo
              "r3": set(), "h3": {"effusion"},                          # FP effusion
              "r4": set(), "h4": set()}                                 # nothing
    out = clinical_scores(["r1", "r2", "r3", "r4"], ["h1", "h2", "h3", "h4"],
                          labeller=lambda report: frozenset(labels[report]))
    tp, fp, fn = 2, 2, 1
    assert out["precision"] == pytest.approx(tp / (tp + fp))
    assert out["recall"] == pytest.approx(tp / (tp + fn))
    assert out["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert out["f1/effusion"] == pytest.approx(2 / 3)  # TP 1, FP 1, FN 0
    assert out["f1/edema"] == 1.0
    assert out["f1/cardiomegaly"] == 0.0 and out["f1/pneumothorax"] == 0.0  # zero denominators


def test_clinical_scores_nothing_found():
    out = clinical_scores(["a", "b"], ["c", "d"], labeller=lambda r: frozenset())
    assert out == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_nearest_neighbour_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(40, 8, 8, generator=g)
    train[7] = train[3]  # an exact tie: the lower index must win
    reports = [f"report {i} ." for i in range(40)]
    query = torch.cat([torch.rand(25, 8, 8, generator=g), train[3:4] + 1e-3])
    got = nearest_neighbour_reports(train, reports, query, chunk=7)  # several chunks
    expected = []
    for q in query:
        dists = [((t - q) ** 2).sum().item() for t in train]
        expected.append(reports[dists.index(min(dists))])
    assert got == expected
    assert got[-1] == "report 3 ."


def test_most_frequent_report_ties_go_to_sorted_first():
    assert most_frequent_report(["b .", "a .", "c .", "b .", "a ."]) == "a ."
    assert most_frequent_report(["b .", "a .", "b ."]) == "b ."
    with pytest.raises(ValueError):
        most_frequent_report([])


def test_format_table():
    table = format_table({"model": {"BLEU_4": 0.12345, "METEOR": None},
                          "nearest image": {"BLEU_4": 0.1}}, ["BLEU_4", "METEOR"])
    lines = table.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1  # fixed width
    assert lines[2].split() == ["model", "0.123", "n/a"]
    assert lines[3].split() == ["nearest", "image", "0.100", "n/a"]
