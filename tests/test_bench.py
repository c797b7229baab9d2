"""bench.py's structural facts: the FLOP formula (against torch's FLOP counter and a hand count), the meta
build, the memory estimate, generation from the full and the V2T-only model, and the command line."""
import json
import os

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import model as M


def tiny_model(device="cpu", **overrides):
    torch.manual_seed(0)
    cfg = M.tiny(**overrides)
    return bench.build_model(cfg, bench.build_llm(cfg, device), device)


@pytest.mark.parametrize("t2v,rec,checkpointing,one_pass,readout", [
    (False, False, False, False, "hidden"), (True, False, False, False, "hidden"), (True, True, False, False, "hidden"),
    (True, True, True, False, "hidden"), (True, True, False, True, "hidden"), (True, True, True, True, "hidden"),
    (True, False, False, False, "word")])
def test_flop_formula_equals_torch_flop_counter(t2v, rec, checkpointing, one_pass, readout):
    """FlopCounterMode counts every matmul, conv and attention product that autograd really runs (the
    frozen LLM's missing weight gradients, the patch embedding's missing input gradient, the recompute
    of checkpointing, the padding of one LLM pass). Eager attention, so that the attention products are
    visible to it on a CPU."""
    model = tiny_model(t2v=t2v, rec=rec, grad_checkpointing=checkpointing, images_per_study=2,
                       one_llm_pass=one_pass, t2v_readout=readout)
    for part in (model.llm, model.vision_encoder) + ((model.text_encoder,) if t2v else ()):
        part.set_attn_implementation("eager")
    if rec:
        model.vision_decoder.config._attn_implementation = "eager"
    model.train()
    batch = bench.random_batch(model, 2, report_tokens=7, text_tokens=9, device="cpu")
    with FlopCounterMode(display=False) as counter:
        model(**batch)["loss"].backward()
    f = bench.step_flops(model, 2, report_tokens=7, text_tokens=9)
    assert counter.get_total_flops() == f["hardware"]
    assert (f["recompute"] > 0) == checkpointing and f["model"] == sum(f["components"].values())
    assert (f["padding"] > 0) == one_pass          # the two sequences differ in length here


def test_flop_formula_by_hand_on_the_tiny_preset():
    """V2T only, 1 study, a 10-token report, no checkpointing; every size written out."""
    model = tiny_model(t2v=False, rec=False, grad_checkpointing=False)
    N, T_vit = (112 // 16) ** 2, 1 + (112 // 16) ** 2                 # 49 patches, + CLS
    vit_layer = 4 * 64 * 64 + 2 * 64 * 256                            # q, k, v, o; fc1, fc2 (dv 64, 4x MLP)
    vision = (4 * (3 * 16 * 16 * 64) * N                              # patch embedding: no input gradient
              + 6 * 2 * vit_layer * T_vit                              # 2 trained layers
              + 3 * 4 * T_vit ** 2 * 64 * 2)                           # attention, forward + 2x backward
    mapper = 6 * 64 * 128 * N                                          # dv -> dL
    T = 8 + N + 1 + 10 - 1                                             # [BOS + 7 prompt words, E_v, ":", report]
    llm_layer = 4 * 128 * 128 + 3 * 128 * 384                          # the demo LLM: dL 128, dff 384
    llm = 4 * 4 * llm_layer * T + 3 * 4 * T ** 2 * 128 * 4 + 4 * 128 * 128 * 10   # + vocabulary head (V 128)
    f = bench.step_flops(model, 1, report_tokens=10, text_tokens=0)
    assert f["components"] == {"vision_encoder": vision, "visual_mapper": mapper, "llm (V2T)": llm}
    assert bench.sequence_lengths(model, 10, 0) == dict(N=49, Np=49, v2t=T, t2v=0)


def test_meta_build_counts_equal_the_real_build():
    """The meta device gives the same parameter counts, FLOPs and memory estimate as real weights."""
    cfg = M.tiny()
    real = bench.build_model(cfg, bench.build_llm(cfg, "cpu"), "cpu")
    meta = bench.build_model(cfg, bench.build_llm(cfg, "meta"), "meta")
    assert all(p.is_meta for p in meta.parameters())
    assert meta.parameter_counts() == real.parameter_counts()
    assert sum(p.numel() for p in real.parameters()) == sum(v for k, v in real.parameter_counts().items()
                                                           if k != "trained")
    for name in ("llm", "vision_encoder", "visual_mapper", "text_encoder", "text_mapper", "rec_mapper",
                 "vision_decoder"):
        assert bench.matmul_weights(getattr(meta, name)) == bench.matmul_weights(getattr(real, name)) > 0
    assert bench.step_flops(meta, 4, 60, 64) == bench.step_flops(real, 4, 60, 64)
    assert bench.estimate_memory(meta, 4, 60, 64) == bench.estimate_memory(real, 4, 60, 64)


def test_paper_preset_memory_estimate_fits_the_24_gb_mode():
    """The paper's full model on the meta device: the whole micro-batch-1 step under 24 GiB (measured on
    an H200: 20.6 GiB allocated), batch 4 above it."""
    cfg = M.paper()
    model = bench.build_model(cfg, bench.build_llm(cfg, "meta"), "meta")
    one, four = (bench.estimate_memory(model, b, cfg.max_report_tokens, cfg.max_text_tokens) for b in (1, 4))
    assert one["total"] < 24 * bench.GiB < four["total"] + 3 * bench.GiB
    # activations grow with the micro-batch, weights do not
    grown = {k for k in one["terms"] if four["terms"][k] != one["terms"][k]}
    assert grown == {"LLM activations", "vocabulary head", "encoder/decoder activations"}


def test_full_and_v2t_only_generation_make_the_same_llm_calls():
    """Inference costs the same by construction: with the same weights, the full model's generate()
    calls the frozen LLM exactly as the V2T-only model's does, and writes the same reports."""
    full = tiny_model(t2v=True, rec=True).eval()
    twin = bench.v2t_twin(full, "cpu").eval()
    assert not hasattr(twin, "text_encoder") and not hasattr(twin, "vision_decoder")
    pixels = torch.randn(3, 1, 3, 112, 112)
    calls = {}
    for name, m in (("full", full), ("V2T", twin)):
        seen = calls[name] = []
        hook = m.llm.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append({k: v.clone() for k, v in kwargs.items()
                                                   if isinstance(v, torch.Tensor)}), with_kwargs=True)
        calls[name + " reports"] = m.generate(pixels, num_beams=2, max_new_tokens=5)
        hook.remove()
    assert len(calls["full"]) == len(calls["V2T"]) == 5                  # one LLM call per new token
    for a, b in zip(calls["full"], calls["V2T"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert calls["full reports"] == calls["V2T reports"] and all(len(r) == 5 for r in calls["V2T reports"])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only: resets the peak RSS")
def test_cpu_peak_memory_is_per_measurement():
    mem = bench.PeakMemory(torch.device("cpu"))
    mem.reset()
    a = np.ones(200 * 2 ** 20 // 8)                                    # 200 MiB, touched
    high = mem.read()["peak_rss"]
    del a
    mem.reset()
    low = mem.read()["peak_rss"]
    assert high - low > 150 * 2 ** 20


def test_command_line_runs_each_part_and_writes_the_figures(tmp_path, capsys):
    out, threads = tmp_path / "bench.json", torch.get_num_threads()
    try:
        bench.main(["--parts", "train,accum,generate,eval,loader", "--repeats", "1", "--warmup", "0",
                    "--batch_size", "2", "--eval_batch_size", "2", "--max_new_tokens", "2", "--singles", "1",
                    "--loader_images", "2", "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    figures = json.loads(out.read_text())
    rows = figures["rows"]
    assert not [r for r in rows if "error" in r]
    assert [(r["part"], r["setting"]) for r in rows[:-1]] == [
        ("train", "V2T"), ("train", "V2T+T2V"), ("train", "V2T+T2V+Rec"), ("accum", "V2T+T2V+Rec"),
        ("generate", "full"), ("generate", "V2T"), ("eval", "batch 2"), ("eval", "one at a time"),
        ("loader", "raw 2500x3000 JPEG"), ("loader", "prepared (shorter edge 256)")]
    assert rows[-1]["setting"].startswith("prepare (") and rows[-1]["images"] == 2
    train = {r["setting"]: r for r in rows if r["part"] == "train"}
    # V2T: [BOS + 7 prompt words, E_v (49), ":", report (60) but its last token]; T2V adds a second
    # sequence per study: [BOS + 10 prompt words, E_t (64 tokens), E_v without its last token]
    assert train["V2T"]["llm_tokens_per_step"] == 2 * (8 + 49 + 1 + 59)
    assert train["V2T+T2V"]["llm_tokens_per_step"] == train["V2T"]["llm_tokens_per_step"] + 2 * (11 + 64 + 48)
    assert all(r["peak_rss"] > 0 and r["s_per_step"] > 0 for r in train.values())
    assert rows[4]["same_reports_as_v2t"] and rows[4]["same_visual_embeddings"]
    assert set(figures["summary"]) >= {"step time V2T+T2V+Rec / V2T", "generation time full / V2T",
                                       "eval reports/s batched / one at a time", "loader prepared / raw"}
    assert "step time V2T+T2V / V2T" in capsys.readouterr().out


def test_meta_mode_prints_the_paper_counts(capsys):
    bench.main(["--meta"])
    text = capsys.readouterr().out
    assert "6,738,415,616" in text and "303,301,632" in text            # Llama-2-7B, ViT-L/16 encoder
    assert "estimated peak memory per GPU, micro-batch 1 x 4 accumulation" in text
