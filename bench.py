"""
Speed, memory and FLOPs of training and inference, with random weights (nothing is downloaded).

    python bench.py                        # CPU: the tiny preset, the whole suite (~2 min, --threads 1)
    python bench.py --meta                 # the paper preset on the meta device: parameters, FLOPs per
                                           # step, estimated peak memory per GPU (seconds, any machine)
    python bench.py --json bench_gpu.json  # GPU: the paper preset (Llama-2-7B, MAE-large, BLIP-base) in
                                           # bf16; the whole suite, ~3 min on an H100/H200
    python bench.py --t2v false --rec false --parts train    # one ablation; any Config field by name
    python bench.py --threads 1            # CPU shared with other jobs: see --help

Parts (--parts): `train` times training steps (forward + backward + AdamW step; warm-up, then the
median of repeats) for V2T only, V2T+T2V and V2T+T2V+Rec in the same run, so the cost of bidirectional
training is a ratio of two numbers measured side by side; `accum` trains the full model with micro-batch
1 and gradient accumulation to the global batch (the 24 GB mode); `generate` times beam search of the
full model against the V2T-only model holding the same weights (inference runs the V2T branch alone,
so the ratio is 1.00 by construction); `eval` is reports/s batched against one report at a time;
`loader` is the image loader's images/s per worker over raw 2500 x 3000 JPEGs against images prepared
once with `python data.py prepare`. Each result is printed when it is measured and the JSON (--json)
is rewritten after each, so a run that is stopped or runs out of memory keeps what it measured.

Random inputs of realistic lengths: every report is max_report_tokens long and every text-encoder
input max_text_tokens (a padded batch is as long as its longest member), and generation never stops
early (EOS is switched off), so each report is max_new_tokens long: upper bounds of real batches.

FLOPs (step_flops, below) count the matrix multiplications, the only operations that matter at this
size. A weight of N entries applied to T tokens costs 2*N*T forward; backward costs 2*N*T for the
input's gradient (needed whenever anything upstream is trained) and 2*N*T for the weight's gradient
(needed only if the weight is trained). Hence, per token and weight entry:
    trained weight                                         6   (2 forward + 2 input grad + 2 weight grad)
    trained weight on the raw image (patch embedding)     4   (the pixels need no gradient)
    frozen LLM, the gradient passes through to E_v / E_t  4   (no weight gradient: 2/3 of a trained LLM)
Attention's two activation-by-activation products (Q K^T and P V) cost 4 * T^2 * d per layer and
sequence forward (counted in full, as PaLM's MFU does, though a causal kernel can skip half) and twice
that backward. Gradient checkpointing runs the LLM layers' forward a second time during backward
(2*N*T + 4*T^2*d per layer, less each layer's last matmul, whose recompute backward does not need).
With one_llm_pass, both LLM sequences run padded to the longer one, and the padding is computed too.
MFU counts model FLOPs only; HFU adds the recompute and the padding. tests/test_bench.py checks the formula against
torch's FlopCounterMode on a real forward and backward, to the FLOP.
"""

import argparse
import dataclasses
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from dataclasses import fields

import torch
import torch.nn as nn

import model as M

# Dense bf16 tensor-core peaks (fp32 accumulate) from the vendors' datasheets, TFLOP/s: the denominator
# of MFU. Matched as substrings of torch.cuda.get_device_name(), first match wins (A100 before A10).
PEAK_BF16_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H200 NVL": 835, "H200": 989, "H100": 989, "H800": 989, "A100": 312, "A800": 312, "L40S": 362, "L40": 181,
                    "L4": 121, "A10": 125, "RTX 4090": 165, "RTX 3090": 71, "RTX A6000": 155}
TINY_VOCAB = 128                     # about the demo tokenizer's (115 words and specials)
SETTINGS = {"V2T": dict(t2v=False, rec=False), "V2T+T2V": dict(t2v=True, rec=False),
            "V2T+T2V+Rec": dict(t2v=True, rec=True)}
GiB = 2 ** 30


# -----------------------------------------------------------------------------
# Models with random weights, and random batches


def build_llm(cfg: M.Config, device):
    """The frozen LLM of the preset with random weights: Llama-2-7B's shape for the paper preset, the
    demo LLM's for tiny. As load_frozen_llm leaves it: frozen, checkpointed if cfg.grad_checkpointing."""
    if cfg.llm.startswith("meta-llama/Llama-2-7b"):
        shape = dict(M.LLAMA2_7B)
    else:
        import demo
        shape = dict(demo.LLM_CONFIG, vocab_size=TINY_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device(device):
        llm = M.random_llm(getattr(torch, cfg.llm_dtype), **shape)
    if cfg.grad_checkpointing:
        llm.activation_checkpointing_enable()
    llm.generation_config.eos_token_id = None      # random weights: every report runs to max_new_tokens
    return llm


def build_model(cfg: M.Config, llm, device) -> M.ReportGenerator:
    """ReportGenerator around `llm` (shared between settings: it is frozen, nothing changes it), the rest
    random from the Config fields (vision="" and text_encoder="" build from the widths and depths)."""
    with torch.device(device):
        model = M.random_full_size(cfg, llm=llm)
    model.eos_id = None                            # see build_llm: never stop early
    return model


def random_batch(model, batch_size, report_tokens, text_tokens, device, seed=0) -> dict:
    cfg, g = model.cfg, torch.Generator().manual_seed(seed)
    vocab = model.llm.config.vocab_size
    text_vocab = model.text_encoder.config.vocab_size if cfg.t2v else vocab
    B, K, S = batch_size, cfg.images_per_study, cfg.image_size
    batch = dict(pixel_values=torch.randn(B, K, 3, S, S, generator=g),
                 report_ids=torch.randint(3, vocab, (B, report_tokens), generator=g),
                 report_mask=torch.ones(B, report_tokens, dtype=torch.long),
                 text_ids=torch.randint(3, text_vocab, (B, text_tokens), generator=g),
                 text_mask=torch.ones(B, text_tokens, dtype=torch.long))
    return {k: v.to(device) for k, v in batch.items()}


# -----------------------------------------------------------------------------
# FLOPs per training step (the formula of the module docstring)


def matmul_weights(module) -> int:
    """Entries of the weights that multiply activations (Linear, Conv2d): the N of 2*N FLOPs per token.
    Embedding tables are looked up, not multiplied, and do not count."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def sequence_lengths(model, report_tokens, text_tokens) -> dict:
    """Tokens per study through each part: N patches per image, the V2T and T2V LLM sequences."""
    cfg = model.cfg
    N = (cfg.image_size // model.patch_size) ** 2
    Np = cfg.images_per_study * N
    v2t = len(model.prompt_v2t) + Np + len(model.prompt_v2t_after) + report_tokens - 1   # [S_v2t, E_v, S', T_<L]
    t2v = len(model.prompt_t2v) + text_tokens + Np - 1 if cfg.t2v else 0                 # [S_t2v, E_t, E_v,<Np]
    return dict(N=N, Np=Np, v2t=v2t, t2v=t2v)


def step_flops(model, batch_size, report_tokens, text_tokens) -> dict:
    """Matmul FLOPs of one training step over `batch_size` studies, by component (model FLOPs: forward
    + backward once), plus the recompute of the checkpointed LLM layers and, with one_llm_pass, the
    padding of the shorter sequence (both are hardware FLOPs only). Works on the meta device."""
    cfg, seq, L, Lt = model.cfg, sequence_lengths(model, report_tokens, text_tokens), report_tokens, text_tokens
    if cfg.backbone != "mae" or cfg.clip:
        raise NotImplementedError("step_flops counts the paper's model (ViT-MAE, no CLIP loss)")
    K, N, Np = cfg.images_per_study, seq["N"], seq["Np"]

    def attention(T, d, layers):                   # Q K^T and P V of one sequence, forward
        return 4 * T * T * d * layers

    def trained(weights, T):                       # forward + input grad + weight grad
        return 6 * weights * T

    ve = model.vision_encoder
    patch = ve.embeddings.patch_embeddings.projection.weight.numel()
    vcfg = ve.config
    flops = {
        # ViT: the patch embedding (no input gradient) on N patches; the layers on CLS + N tokens
        "vision_encoder": K * (4 * patch * N + trained(matmul_weights(ve) - patch, 1 + N)
                               + 3 * attention(1 + N, vcfg.hidden_size, vcfg.num_hidden_layers)),
        "visual_mapper": trained(matmul_weights(model.visual_mapper), Np),
    }
    lcfg = model.llm.config
    d_attn = lcfg.num_attention_heads * getattr(lcfg, "head_dim", lcfg.hidden_size // lcfg.num_attention_heads)
    n_llm, n_head = matmul_weights(model.llm.model), model.llm.lm_head.weight.numel()

    def frozen_llm(T):                             # forward + input grad; attention forward + 2x backward
        return 4 * n_llm * T + 3 * attention(T, d_attn, lcfg.num_hidden_layers)

    # Checkpointing runs each layer's forward again in backward, but non-reentrant checkpointing stops
    # as soon as backward has what it needs: a frozen layer's last matmul (down_proj) keeps nothing for
    # backward (its weight gets no gradient), so it is not re-run.
    n_down = sum(layer.mlp.down_proj.weight.numel() for layer in model.llm.model.layers)

    def recompute(T):
        return (2 * (n_llm - n_down) * T + attention(T, d_attn, lcfg.num_hidden_layers)) if cfg.grad_checkpointing else 0

    flops["llm (V2T)"] = frozen_llm(seq["v2t"]) + 4 * n_head * L      # the vocabulary head on the L report positions
    extra, padding = recompute(seq["v2t"]), 0
    if cfg.t2v:
        tcfg = model.text_encoder.config
        flops["text_encoder"] = trained(matmul_weights(model.text_encoder), Lt) + \
            3 * attention(Lt, tcfg.hidden_size, tcfg.num_hidden_layers)
        flops["text_mapper"] = trained(matmul_weights(model.text_mapper), Lt)
        flops["llm (T2V)"] = frozen_llm(seq["t2v"])
        if cfg.t2v_readout == "word":              # E_g = softmax(lm_head(h)) @ W on Np positions, W frozen
            flops["llm (T2V)"] += 4 * n_head * Np + 4 * model.llm.get_input_embeddings().weight.numel() * Np
        extra += recompute(seq["t2v"])
        if cfg.one_llm_pass:
            # Both sequences run as one batch, padded to the longer one: the padding is computed (hardware
            # FLOPs) but is not model work, so MFU counts the two sequences at their own lengths.
            T = max(seq["v2t"], seq["t2v"])
            padding = 2 * frozen_llm(T) - frozen_llm(seq["v2t"]) - frozen_llm(seq["t2v"])
            extra += 2 * recompute(T) - recompute(seq["v2t"]) - recompute(seq["t2v"])
    if cfg.rec:
        dec = model.vision_decoder
        flops["rec_mapper"] = trained(matmul_weights(model.rec_mapper), Np)
        flops["vision_decoder"] = K * (trained(matmul_weights(dec), 1 + N) + 3 * attention(
            1 + N, dec.decoder_embed.out_features, len(dec.decoder_layers)))
    flops = {k: v * batch_size for k, v in flops.items()}
    total = sum(flops.values())
    return dict(components=flops, model=total, recompute=extra * batch_size, padding=padding * batch_size,
                hardware=total + (extra + padding) * batch_size)


# -----------------------------------------------------------------------------
# Peak memory: an estimate from the shapes, and the measurement


def estimate_memory(model, micro_batch, report_tokens, text_tokens, act_bytes=2) -> dict:
    """Bytes at the peak of a training step on one GPU (bf16 autocast, bf16 frozen LLM), by term.

    weights and optimizer: 16 bytes per trained parameter (fp32 weight, gradient, AdamW's two moments)
                           + 2 (the bf16 copy autocast makes of each trained weight, kept for backward)
                           + 2 per frozen LLM parameter (bf16) + 4 per other frozen parameter (fp32)
    activations of one micro-batch of b studies, T = T_v2t + T_t2v LLM tokens each (one_llm_pass: both
    padded to the longer, T = 2 max(T_v2t, T_t2v), all in one pass; two passes: T_pass = max(T_v2t, T_t2v)):
      LLM, checkpointed:   n_layers * b * T * dL * 2                 (each layer's input)
                           + b * T_pass * (16 dL + 6 dff)            (one layer recomputed in backward)
      LLM, not checkpointed: n_layers * b * T * (16 dL + 6 dff)
      ViT / BERT layers (trained): tokens * layers * (20 d + 4 dff)
      vocabulary head:     b * L * V * 10                              (bf16 logits, fp32 copy, log-softmax)

    The per-token-per-layer constants count what autograd keeps: a frozen Llama layer saves no linear
    input (no weight gradient), only its RMSNorm inputs in fp32 (2 x 4 dL), SDPA's q, k, v and output
    (4 x 2 dL) and the SwiGLU's gate, up and SiLU(gate) (3 x 2 dff); a trained pre-LN layer under
    autocast saves two fp32 LayerNorm inputs (2 x 4 d), their bf16 casts (2 x 2 d), q, k, v, output
    (4 x 2 d) and the MLP's two bf16 activations (2 x 2 dff). SDPA keeps no T x T matrix. Gradients and
    activations are added as if both peaked together. Against torch.cuda.max_memory_allocated on an
    H200 (paper preset, full model, --one_llm_pass false): batch 4 estimated 21.9 GiB, measured 20.5; micro-batch 1 x 4
    estimated 20.55 GiB, measured 20.64 (the CUDA context and the allocator's cache come on top)."""
    cfg, seq, b = model.cfg, sequence_lengths(model, report_tokens, text_tokens), micro_batch
    if cfg.backbone != "mae" or cfg.clip:
        raise NotImplementedError("estimate_memory knows the paper's model (ViT-MAE, no CLIP loss)")
    llm_params = sum(p.numel() for p in model.llm.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    other = sum(p.numel() for p in model.parameters() if not p.requires_grad) - llm_params
    lcfg = model.llm.config
    dL, dff, nL = lcfg.hidden_size, lcfg.intermediate_size, lcfg.num_hidden_layers
    llm_layer = 16 * dL + 6 * dff                                  # bytes per token, one frozen layer
    if cfg.t2v and cfg.one_llm_pass:         # one batch of 2b rows, each padded to the longer sequence
        T, T_pass = 2 * max(seq["v2t"], seq["t2v"]), 2 * max(seq["v2t"], seq["t2v"])
    else:                                    # two passes: the layer recomputed in backward holds one of them
        T, T_pass = seq["v2t"] + seq["t2v"], max(seq["v2t"], seq["t2v"])
    if cfg.grad_checkpointing:
        llm_act = nL * b * T * dL * act_bytes + b * T_pass * llm_layer
    else:
        llm_act = nL * b * T * llm_layer

    def vit_like(tokens, d, dff, layers):
        return tokens * layers * (20 * d + 4 * dff)

    vcfg = model.vision_encoder.config
    other_act = vit_like(b * cfg.images_per_study * (1 + seq["N"]), vcfg.hidden_size, vcfg.intermediate_size,
                         vcfg.num_hidden_layers)
    if cfg.t2v:
        tcfg = model.text_encoder.config
        other_act += vit_like(b * text_tokens, tcfg.hidden_size, tcfg.intermediate_size, tcfg.num_hidden_layers)
    if cfg.rec:
        dec = model.vision_decoder
        dd = dec.decoder_embed.out_features
        other_act += vit_like(b * cfg.images_per_study * (1 + seq["N"]), dd, dec.decoder_layers[0].mlp.fc1.out_features,
                              len(dec.decoder_layers))
    terms = {"trained weights, grads, AdamW (fp32)": 16 * trained, "autocast bf16 weight copies": 2 * trained,
             "frozen LLM (bf16)": llm_params * 2, "other frozen (fp32)": other * 4,
             "LLM activations": llm_act, "vocabulary head": b * report_tokens * lcfg.vocab_size * 10,
             "encoder/decoder activations": other_act}
    return dict(terms=terms, total=sum(terms.values()))


class PeakMemory:
    """Peak memory of what runs between reset() and read(), in bytes: torch's allocator on a GPU; on a
    CPU the process's peak resident set (Linux lets us reset it through /proc/self/clear_refs; elsewhere
    getrusage's peak covers the whole process life)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def reset(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")                                    # VmHWM := current RSS
            except OSError:
                pass

    def read(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
            return dict(peak_allocated=torch.cuda.max_memory_allocated(), peak_reserved=torch.cuda.max_memory_reserved())
        try:
            with open("/proc/self/status") as f:
                hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            return dict(peak_rss=hwm * 1024)
        except (OSError, StopIteration):
            return dict(peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def peak_flops(device, override_tflops=None):
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


# -----------------------------------------------------------------------------
# Timing


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn, warmup, repeats, device) -> list[float]:
    """Seconds per call of fn, `repeats` times after `warmup` untimed calls (synchronised on a GPU)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def train_step_fn(model, batch, micro_batch, autocast):
    """One optimizer step as train.py takes it: train.accumulate_gradients over the micro-batches,
    gradient clipping at cfg.grad_clip, AdamW."""
    import train

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=batch["pixel_values"].is_cuda)
    B, device = batch["pixel_values"].shape[0], batch["pixel_values"].device
    chunks = [{**{k: v[i:i + micro_batch] for k, v in batch.items()}, "ids": list(range(i, min(i + micro_batch, B)))}
              for i in range(0, B, micro_batch)]

    def step():
        train.accumulate_gradients(model, chunks, B, 1, device, autocast)
        torch.nn.utils.clip_grad_norm_(params, model.cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


# -----------------------------------------------------------------------------
# The parts of the suite: each yields rows (dicts), which Runner.measure prints and saves as they come


def _train_setup(run, cfg, llm, overrides, batch_size, micro_batch) -> dict:
    model = build_model(dataclasses.replace(cfg, **overrides), llm, run.device)
    model.train()
    step, optimizer = train_step_fn(model, random_batch(model, batch_size, run.L, run.Lt, run.device),
                                    micro_batch, run.autocast)
    return dict(step=step, batch=batch_size, micro_batch=micro_batch, flops=step_flops(model, batch_size, run.L, run.Lt),
                seq=sequence_lengths(model, run.L, run.Lt), estimate=estimate_memory(model, micro_batch, run.L, run.Lt))


def _train_row(run, name, setup, times, mem) -> dict:
    t, f, seq, B = statistics.median(times), setup["flops"], setup["seq"], setup["batch"]
    row = dict(part="train" if setup["micro_batch"] == B else "accum", setting=name, batch=B,
               micro_batch=setup["micro_batch"], s_per_step=t, s_spread=[min(times), max(times)],
               samples_per_s=B / t, llm_tokens_per_step=B * (seq["v2t"] + seq["t2v"]),
               llm_tokens_per_s=B * (seq["v2t"] + seq["t2v"]) / t, model_flops=f["model"],
               hardware_flops=f["hardware"], achieved_tflops=f["model"] / t / 1e12,
               estimated_peak_bytes=setup["estimate"]["total"], **mem)
    if run.peak:
        row.update(mfu=f["model"] / t / run.peak, hfu=f["hardware"] / t / run.peak)
    return row


def bench_train(run, cfg, llm, settings, batch_size, micro_batch):
    """Training steps of each setting ({name: Config overrides}). On a GPU one setting after the other,
    each alone in memory, so that its peak memory is its own. On a CPU, whose speed drifts with what
    else the machine runs, the settings take turns step by step, so drift hits all of them alike (and
    the peak RSS is that of all of them together)."""
    if run.device.type == "cuda":
        for name, overrides in settings.items():
            setup = None
            try:
                setup = _train_setup(run, cfg, llm, overrides, batch_size, micro_batch)
                run.memory.reset()
                times = timed(setup["step"], run.warmup, run.repeats, run.device)
                yield _train_row(run, name, setup, times, run.memory.read())
            except torch.OutOfMemoryError as e:        # this setting does not fit; the next may
                yield dict(part="train" if micro_batch == batch_size else "accum", setting=name,
                           error=f"out of memory: {str(e).splitlines()[0]}")
            del setup
            free_memory(run.device)
        return
    setups = {name: _train_setup(run, cfg, llm, o, batch_size, micro_batch) for name, o in settings.items()}
    run.memory.reset()
    times = {name: timed(s["step"], run.warmup, 0, run.device) for name, s in setups.items()}
    for _ in range(run.repeats):
        for name, s in setups.items():
            times[name] += timed(s["step"], 0, 1, run.device)
    mem = run.memory.read()
    for name, s in setups.items():
        yield _train_row(run, name, s, times[name], mem)


def bench_profile(run, cfg, llm, name, overrides, batch_size):
    """torch.profiler's table of one training step, by self time on the device (the CPU without one)."""
    from torch.profiler import ProfilerActivity, profile
    model = build_model(dataclasses.replace(cfg, **overrides), llm, run.device)
    model.train()
    step, optimizer = train_step_fn(model, random_batch(model, batch_size, run.L, run.Lt, run.device),
                                    batch_size, run.autocast)
    timed(step, run.warmup, 0, run.device)
    cuda = run.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        timed(step, 0, 1, run.device)
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=25, max_name_column_width=60)
    yield dict(part="profile", setting=name, table=table)


def v2t_twin(full, device):
    """The V2T-only model holding `full`'s weights: its vision encoder and visual mapper, the same LLM."""
    twin = build_model(dataclasses.replace(full.cfg, t2v=False, rec=False), full.llm, device)
    keep = twin.trainable_state_dict().keys()
    twin.load_trainable_state_dict({k: v for k, v in full.trainable_state_dict().items() if k in keep})
    return twin


def bench_generate(run, cfg, llm, batch_size):
    """Beam search of the full model and of the V2T-only model holding the same weights, alternated."""
    full = build_model(dataclasses.replace(cfg, t2v=True, rec=True), llm, run.device).eval()
    v2t = v2t_twin(full, run.device).eval()
    pixels = random_batch(full, batch_size, 2, 2, run.device)["pixel_values"]
    with torch.no_grad(), run.autocast:
        same_prefix = torch.equal(full.visual_embeddings(pixels), v2t.visual_embeddings(pixels))
    outputs = {"full": [], "V2T": []}

    def gen(model, key):
        with run.autocast:
            outputs[key].append(model.generate(pixels))

    reps = max(1, run.repeats // 2)
    run.memory.reset()
    times = {"full": [], "V2T": []}
    for _ in range(reps):                          # alternate, so drift in machine load hits both alike
        times["full"] += timed(lambda: gen(full, "full"), 1 if not times["full"] else 0, 1, run.device)
        times["V2T"] += timed(lambda: gen(v2t, "V2T"), 1 if not times["V2T"] else 0, 1, run.device)
    mem = run.memory.read()
    # A random LLM's next-token scores are nearly tied, so on a GPU the last bits of bf16 arithmetic can
    # reorder beams from one call to the next: compare outputs only where the model itself is repeatable.
    repeatable = all(o == outputs["full"][0] for o in outputs["full"])
    same = outputs["full"][-1] == outputs["V2T"][-1]
    for name in ("full", "V2T"):
        t = statistics.median(times[name])
        yield dict(part="generate", setting=name, batch=batch_size, beams=cfg.num_beams,
                   max_new_tokens=cfg.max_new_tokens, s_per_batch=t, s_spread=[min(times[name]), max(times[name])],
                   reports_per_s=batch_size / t, new_tokens_per_s=batch_size * cfg.max_new_tokens / t,
                   same_visual_embeddings=same_prefix, same_reports_as_v2t=same, full_model_repeatable=repeatable,
                   **mem)


def bench_eval(run, cfg, llm, batch_size, singles):
    """Reports/s from batches of `batch_size` against one report at a time (`singles` reports)."""
    model = build_model(cfg, llm, run.device).eval()
    pixels = random_batch(model, batch_size, 2, 2, run.device)["pixel_values"]

    def gen(x):
        with run.autocast:
            model.generate(x)

    batched = statistics.median(timed(lambda: gen(pixels), 1, max(1, run.repeats // 3), run.device))
    gen(pixels[:1])                                # warm-up at batch 1
    yield dict(part="eval", setting=f"batch {batch_size}", reports_per_s=batch_size / batched)
    one = timed(lambda: [gen(pixels[i:i + 1]) for i in range(singles)], 0, 1, run.device)[0]
    yield dict(part="eval", setting="one at a time", reports_per_s=singles / one)


def write_xray_like_jpegs(root, n, size=(2500, 3000), seed=0) -> list[str]:
    """n grey JPEGs (quality 95, like MIMIC-CXR-JPG) of MIMIC-CXR's size: smooth shapes plus noise."""
    import random as _random
    from PIL import Image, ImageChops
    rng = _random.Random(seed)
    os.makedirs(root, exist_ok=True)
    paths = []
    for i in range(n):
        low = Image.frombytes("L", (5, 6), bytes(rng.randrange(40, 220) for _ in range(30)))
        img = ImageChops.add(low.resize(size, Image.BICUBIC), Image.effect_noise(size, 4), 1.0, -128)
        paths.append(f"img{i:04d}.jpg")
        img.save(os.path.join(root, paths[-1]), quality=95)
    return paths


def bench_loader(run, n_images):
    """ReportDataset's images/s in one process (= one DataLoader worker), over raw and prepared images."""
    import data
    with tempfile.TemporaryDirectory() as tmp:
        raw, prepared = os.path.join(tmp, "raw"), os.path.join(tmp, "prepared")
        t0 = time.perf_counter()
        paths = write_xray_like_jpegs(raw, n_images)
        t_write = time.perf_counter() - t0
        records = {split: [dict(id=f"{split}{i}", report="no acute findings.", image_path=[p], split=split)
                           for i, p in enumerate(paths if split == "train" else paths[:1])] for split in data.SPLITS}
        ann = os.path.join(tmp, "annotation.json")
        with open(ann, "w") as f:
            json.dump(records, f)
        workers = os.cpu_count() or 1
        t0 = time.perf_counter()
        data.prepare_images(ann, raw, prepared, size=run.cfg.resize, workers=workers, progress=False)
        t_prep = time.perf_counter() - t0
        threads = torch.get_num_threads()
        torch.set_num_threads(1)                   # as in a DataLoader worker, which runs with one thread
        try:
            for name, root in (("raw 2500x3000 JPEG", raw), ("prepared (shorter edge 256)", prepared)):
                recs = data.load_annotation(ann, "train", root)
                ds = data.ReportDataset(recs, root, data.clean_report_mimic_cxr, train=True,
                                        resize=run.cfg.resize, crop=run.cfg.image_size)
                t = timed(lambda: [ds[i] for i in range(len(ds))], 0, 1, torch.device("cpu"))[0]
                size = sum(os.path.getsize(os.path.join(root, p)) for p in paths) / len(paths)
                yield dict(part="loader", setting=name, images=len(ds), images_per_s_per_worker=len(ds) / t,
                           mean_file_bytes=size)
        finally:
            torch.set_num_threads(threads)
        yield dict(part="loader", setting=f"prepare ({workers} processes, one time)", images=n_images,
                   images_per_s=n_images / t_prep, images_per_s_per_worker=n_images / t_prep / workers,
                   write_raw_s=t_write)


# -----------------------------------------------------------------------------
# The --meta mode: the paper preset's counts, with no memory and no weights


def meta_report(cfg, report_tokens, text_tokens):
    lines, out = [], {}
    llm = build_llm(cfg, "meta")
    for name, overrides in SETTINGS.items():
        model = build_model(dataclasses.replace(cfg, **overrides), llm, "meta")
        counts = model.parameter_counts()
        seq = sequence_lengths(model, report_tokens, text_tokens)
        f = step_flops(model, cfg.batch_size, report_tokens, text_tokens)
        mem = {f"batch {cfg.batch_size}": estimate_memory(model, cfg.batch_size, report_tokens, text_tokens),
               f"micro-batch 1 x {cfg.batch_size} accumulation": estimate_memory(model, 1, report_tokens, text_tokens)}
        out[name] = dict(parameters=counts, sequences=seq, flops=f, memory=mem)
        lines.append(f"\n== {name}: parameters")
        lines += [f"  {k:<28}{v:>16,}" for k, v in counts.items()]
        lines.append(f"== {name}: LLM tokens per study: V2T {seq['v2t']}, T2V {seq['t2v']} "
                     f"(Np {seq['Np']}, report {report_tokens}, text {text_tokens})")
        lines.append(f"== {name}: FLOPs per training step of {cfg.batch_size} studies (matmuls; formula in bench.py)")
        lines += [f"  {k:<28}{v / 1e12:>12.2f} TFLOP" for k, v in f["components"].items()]
        lines.append(f"  {'model FLOPs (MFU)':<28}{f['model'] / 1e12:>12.2f} TFLOP")
        if f["padding"]:
            lines.append(f"  {'+ padding (one LLM pass)':<28}{f['padding'] / 1e12:>12.2f} TFLOP")
        lines.append(f"  {'+ checkpoint recompute':<28}{f['recompute'] / 1e12:>12.2f} TFLOP  (hardware {f['hardware'] / 1e12:.2f})")
        for setting, m in mem.items():
            lines.append(f"== {name}: estimated peak memory per GPU, {setting}: {m['total'] / GiB:.1f} GiB")
            lines += [f"  {k:<38}{v / GiB:>8.2f} GiB" for k, v in m["terms"].items()]
    return "\n".join(lines), out


# -----------------------------------------------------------------------------
# Command line and the suite


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--preset", choices=sorted(M.PRESETS), help="default: paper on a GPU or with --meta, else tiny")
    p.add_argument("--parts", help="comma-separated of train,accum,profile,generate,eval,loader; "
                   "default: train,accum,generate,eval on a GPU, train,generate,eval,loader on a CPU")
    p.add_argument("--meta", action="store_true", help="parameter and FLOP counts and a memory estimate only")
    p.add_argument("--json", help="write every figure to this file (rewritten after each measurement)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps before the timed ones")
    p.add_argument("--repeats", type=int, default=10, help="timed training steps (the median is reported)")
    p.add_argument("--report_tokens", type=int, help="report length; default: max_report_tokens")
    p.add_argument("--text_tokens", type=int, help="text-encoder input length; default: max_text_tokens")
    p.add_argument("--singles", type=int, default=4, help="reports generated one at a time (eval part)")
    p.add_argument("--loader_images", type=int, default=200, help="synthetic 2500x3000 JPEGs (loader part)")
    p.add_argument("--peak_tflops", type=float, help="the device's dense bf16 peak, if not in PEAK_BF16_TFLOPS")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's). On a CPU that other jobs "
                   "share, 1 avoids OpenMP threads waiting for each other (we saw 60x slower generation with 2)")
    for f in fields(M.Config):
        kind = M.parse_bool if f.type is bool else f.type
        p.add_argument(f"--{f.name}", type=kind, default=None, metavar=f.type.__name__.upper(),
                       help=f"default: {f.default!r} (tiny preset)")
    args = p.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(M.Config) if getattr(args, f.name) is not None}
    return args, overrides


class Runner:
    """Runs each measurement, prints its rows as they come, rewrites the JSON after each; an error
    (out of memory included) is recorded as a row and the suite goes on."""

    def __init__(self, args, cfg, device):
        self.args, self.cfg, self.device = args, cfg, device
        self.warmup, self.repeats = args.warmup, args.repeats
        self.L = args.report_tokens or cfg.max_report_tokens
        self.Lt = args.text_tokens or cfg.max_text_tokens
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        self.memory = PeakMemory(device)
        self.peak = peak_flops(device, args.peak_tflops)
        self.results = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else
                            f"cpu ({torch.get_num_threads()} threads)", torch=torch.__version__,
                            load_average=os.getloadavg(), config=dataclasses.asdict(cfg),
                            report_tokens=self.L, text_tokens=self.Lt, peak_bf16_flops=self.peak, rows=[])

    def measure(self, label, fn, *a):
        """Run the part fn(self, *a), a generator of rows; print and save each row as it comes."""
        t0 = time.time()
        try:
            for row in fn(self, *a):
                self.add(dict(row, wall_s=round(time.time() - t0, 1)))
        except torch.OutOfMemoryError as e:
            self.add(dict(part=label, error=f"out of memory: {str(e).splitlines()[0]}"))
        except Exception as e:                      # report and go on: one part must not cost the others
            traceback.print_exc()
            self.add(dict(part=label, error=f"{type(e).__name__}: {e}"))
        free_memory(self.device)

    def add(self, row):
        self.results["rows"].append(row)
        print(format_row(row), flush=True)
        self.save()

    def save(self):
        self.results["summary"] = summary(self.results["rows"])
        if self.args.json:
            tmp = self.args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.results, f, indent=1)
            os.replace(tmp, self.args.json)


def format_row(r) -> str:
    if "error" in r:
        return f"{r['part']:<9}{r.get('setting', ''):<30}ERROR {r['error']}"
    mem = r.get("peak_allocated", r.get("peak_rss"))
    mem = f"{mem / GiB:6.2f} GiB {'peak alloc' if 'peak_allocated' in r else 'peak RSS'}" if mem else ""
    if r["part"] in ("train", "accum"):
        eff = f"  MFU {r['mfu']:.1%} HFU {r['hfu']:.1%}" if "mfu" in r else f"  {r['achieved_tflops']:.3f} TFLOP/s"
        return (f"{r['part']:<9}{r['setting']:<14}b {r['batch']:>2}/{r['micro_batch']:<2} {r['s_per_step'] * 1e3:9.1f} ms/step "
                f"{r['samples_per_s']:8.2f} samples/s {r['llm_tokens_per_s']:10.0f} LLM tok/s{eff}  {mem}"
                + (f" (estimate {r['estimated_peak_bytes'] / GiB:.2f})" if "peak_allocated" in r else ""))
    if r["part"] == "generate":
        return (f"{r['part']:<9}{r['setting']:<14}b {r['batch']:>2} beam {r['beams']} x {r['max_new_tokens']} tok "
                f"{r['s_per_batch']:8.3f} s/batch {r['reports_per_s']:8.2f} reports/s  same E_v: "
                f"{r['same_visual_embeddings']}, same reports: {r['same_reports_as_v2t']} (full model repeatable: "
                f"{r['full_model_repeatable']})  {mem}")
    if r["part"] == "profile":
        return f"{r['part']:<9}{r['setting']}: one training step, by self device time\n{r['table']}"
    if r["part"] == "eval":
        return f"{r['part']:<9}{r['setting']:<30}{r['reports_per_s']:8.2f} reports/s"
    return (f"{r['part']:<9}{r['setting']:<40}{r['images_per_s_per_worker']:8.1f} images/s per worker"
            + (f"  ({r['mean_file_bytes'] / 1e6:.2f} MB/file)" if "mean_file_bytes" in r else ""))


def summary(rows) -> dict:
    """The ratios the issue asks for, from whatever has been measured so far."""
    get = {(r["part"], r.get("setting")): r for r in rows if "error" not in r}
    out = {}
    v2t = get.get(("train", "V2T"))
    for name in ("V2T+T2V", "V2T+T2V+Rec"):
        if v2t and ("train", name) in get:
            r = get[("train", name)]
            out[f"step time {name} / V2T"] = r["s_per_step"] / v2t["s_per_step"]
            out[f"FLOPs {name} / V2T"] = r["model_flops"] / v2t["model_flops"]
    if ("generate", "full") in get and ("generate", "V2T") in get:
        out["generation time full / V2T"] = get[("generate", "full")]["s_per_batch"] / get[("generate", "V2T")]["s_per_batch"]
    evals = [r for r in rows if r["part"] == "eval" and "error" not in r]
    if len(evals) == 2:
        out["eval reports/s batched / one at a time"] = evals[0]["reports_per_s"] / evals[1]["reports_per_s"]
    loads = [r for r in rows if r["part"] == "loader" and "error" not in r]
    if len(loads) >= 2:
        out["loader prepared / raw"] = loads[1]["images_per_s_per_worker"] / loads[0]["images_per_s_per_worker"]
    return out


def main(argv=None):
    args, overrides = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)        # the torch.cuda memory and sync calls below use the current device
    M.use_safe_attention_kernels()           # as train.py runs
    preset = args.preset or ("paper" if device.type == "cuda" or args.meta else "tiny")
    cfg = M.PRESETS[preset](**overrides)
    L, Lt = args.report_tokens or cfg.max_report_tokens, args.text_tokens or cfg.max_text_tokens
    if args.meta:
        text, out = meta_report(cfg, L, Lt)
        print(f"{preset} preset on the meta device (no weights, no memory):{text}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return
    default_parts = "train,accum,generate,eval" if device.type == "cuda" else "train,generate,eval,loader"
    parts = (args.parts or default_parts).split(",")
    unknown = set(parts) - {"train", "accum", "generate", "eval", "loader", "profile"}
    if unknown:
        sys.exit(f"bench.py: unknown parts {sorted(unknown)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Runner(args, cfg, device)
    print(f"bench: {preset} preset on {run.results['device']}, torch {torch.__version__}, load average "
          f"{run.results['load_average'][0]:.2f}; reports {run.L} tokens, text {run.Lt}, "
          f"generation {cfg.max_new_tokens} new tokens x beam {cfg.num_beams}", flush=True)
    t0 = time.time()
    llm = build_llm(cfg, device)
    print(f"random frozen LLM built in {time.time() - t0:.0f} s", flush=True)
    ablation = {k: overrides[k] for k in ("t2v", "rec") if k in overrides}
    settings = {"+".join(["V2T"] + ["T2V"] * cfg.t2v + ["Rec"] * cfg.rec): ablation} if ablation else SETTINGS
    if "train" in parts:
        run.measure("train", bench_train, cfg, llm, settings, cfg.batch_size, cfg.micro_batch_size or cfg.batch_size)
    if "accum" in parts:
        full = dict(list(settings.items())[-1:])
        micro = cfg.micro_batch_size if 0 < cfg.micro_batch_size < cfg.batch_size else 1
        run.measure("accum", bench_train, cfg, llm, full, cfg.batch_size, micro)
    if "profile" in parts:
        name, o = list(settings.items())[-1]
        run.measure("profile", bench_profile, cfg, llm, name, o, cfg.batch_size)
    if "generate" in parts:
        run.measure("generate", bench_generate, cfg, llm, cfg.batch_size)
    if "eval" in parts:
        run.measure("eval", bench_eval, cfg, llm, cfg.eval_batch_size, args.singles)
    if "loader" in parts:
        run.measure("loader", bench_loader, args.loader_images)
    print("\n" + "\n".join(f"{k}: {v:.2f}" for k, v in run.results["summary"].items()))
    if args.json:
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
