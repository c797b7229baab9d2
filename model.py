"""
Bidirectional visual-representation learning for radiology report generation with a frozen LLM.

Every component of the paper's Figure 1 and the three losses live in this file:

    image -> ViT-MAE encoder -> Z_v -> visual mapper -> E_v ------> frozen LLM -> report     (Eq. 1, VTC)
    report + view -> BLIP text encoder -> Z_t -> textual mapper -> E_t -> frozen LLM -> E_g  (Eq. 2, TVC)
    E_v -> reconstruction mapper -> Z^_v -> MAE decoder -> image                             (L_REC)
    total = L_VTC + lambda1 * L_TVC + lambda2 * L_REC                                        (Eq. 3)

Only the vision-to-text branch runs at inference (`generate`), so the trained model costs exactly
what a plain frozen-LLM captioner costs.

Shape notation, used in every comment below:
    B   batch (studies)               K   images per study (1 for MIMIC-CXR, 2 for IU-Xray)
    C,H,W  image                      N   patches per image, Np = K * N visual tokens per study
    P   prompt length (LLM tokens)    L   report length (LLM tokens)   Lt  report length (text-encoder tokens)
    dv  vision width                  dt  text-encoder width            dL  LLM width
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (AutoTokenizer, BlipTextConfig, BlipTextModel, LlamaConfig, LlamaForCausalLM,
                          SwinConfig, SwinModel, ViTMAEConfig, ViTMAEForPreTraining)


# -----------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    # --- data
    dataset: str = "demo"            # demo | iu_xray | mimic_cxr: picks the report cleaner and the default paths
    data_dir: str = "demo_data"      # holds annotation.json and images/ (R2Gen release layout)
    annotation: str = ""             # file in data_dir; "" = annotation_views.json (views added) if present, else annotation.json
    images_per_study: int = 1        # K: IU-Xray studies carry a frontal and a lateral image, MIMIC-CXR entries one
    resize: int = 128                # shorter edge resized to this (Sec. 4.1: 256, the paper preset; the CPU demo: half) ...
    image_size: int = 112            # ... then a square crop (Sec. 4.1: 224), random for training, centre for evaluation
    max_report_tokens: int = 60      # training reports are truncated to this many LLM tokens (references never are)
    max_text_tokens: int = 64        # text-encoder input (report + view sentence) length cap
    # --- frozen LLM (vision-to-text decoder and text-to-vision generator)
    llm: str = "demo_data/llm"       # Hub id or local dir of a causal LM and its tokenizer, loaded frozen
    llm_dtype: str = "float32"       # bfloat16 at full size: the LLM is frozen, so its weights never need fp32
    # --- vision encoder / decoder (ViT-MAE; or Swin, R2GenGPT's backbone, for Table 4)
    backbone: str = "mae"            # mae | swin (Swin has no decoder: rec must be off)
    vision: str = "demo_data/vit_mae"  # Hub id or local dir of ViTMAEForPreTraining / SwinModel; "" = random from below
    patch_size: int = 16             # tiny: 7 x 7 = 49 visual tokens per 112 x 112 image keeps the CPU demo fast
    vision_width: int = 64           # dv (Swin: the width of its last stage)
    vision_layers: int = 2           # (Swin: the depth of its third stage; the others have 2 blocks)
    vision_heads: int = 4            # attention heads per encoder layer
    decoder_width: int = 64          # MAE decoder width
    decoder_layers: int = 1          # MAE decoder depth
    decoder_heads: int = 4           # MAE decoder attention heads
    # --- text encoder (BLIP's BERT text model) for the text-to-vision branch
    text_encoder: str = ""           # Hub id or local dir of a BLIP checkpoint; "" builds it at random from below
    text_tokenizer: str = ""         # its tokenizer; "" reuses the LLM's tokenizer (the demo)
    text_width: int = 64             # dt
    text_layers: int = 2             # text-encoder depth
    text_heads: int = 4              # text-encoder attention heads
    # --- which losses (the paper's ablations, Table 3)
    t2v: bool = True                 # text-to-vision branch, Eq. 2
    rec: bool = True                 # image reconstruction branch
    clip: bool = False               # the V2T+CLIP reference row of Table 3 (footnote 4)
    lambda_t2v: float = 1.0          # lambda1 in Eq. 3 (Sec. 4.1: 1, "without fine-tuning")
    lambda_rec: float = 1.0          # lambda2 in Eq. 3
    lambda_clip: float = 1.0         # weight of the CLIP loss when clip is on (the paper gives none)
    clip_dim: int = 512              # footnote 4: both sides projected to 512 dimensions
    t2v_readout: str = "word"        # E_g from the last hidden state: "word" = its expected word embedding, "hidden" = itself
    t2v_reduction: str = "mean"      # squared error over dL: "mean" (default, see loss_t2v) or "sum" (Eq. 2)
    prompt_v2t: str = "write the findings of this chest x-ray"     # S_v2t, before E_v (the paper does not publish it)
    prompt_v2t_after: str = ":"      # the rest of S_v2t, between E_v and the report (as R2GenGPT's "<Img>E_v</Img> ...")
    prompt_t2v: str = "describe the chest x-ray that this report belongs to :"  # S_t2v
    grad_checkpointing: bool = False # recompute the frozen LLM's activations in backward (on at full size)
    one_llm_pass: bool = False       # V2T and T2V through the LLM in one batched forward (same losses): 1.37x
                                     # faster full step on an H200 (launch-bound), 1.15x slower on CPU (padding)
    # --- generation
    num_beams: int = 3               # Sec. 4.1: beam search of size 3
    max_new_tokens: int = 60         # longest generated report, in LLM tokens
    # --- training
    out_dir: str = "out/demo"        # last.pt, best.pt, predictions and metrics go here
    epochs: int = 5                  # Sec. 4.1: 5 on MIMIC-CXR (the demo too), 2 on IU-Xray (the paper preset sets them)
    batch_size: int = 16             # per step, over all ranks (Sec. 4.1: 4 at full size)
    micro_batch_size: int = 0        # per rank per forward; 0 = batch_size / ranks. Smaller: gradient accumulation
    eval_batch_size: int = 64        # studies per generate() call in validation and test
    lr: float = 1e-3                 # the tiny demo learns from scratch in minutes; the paper uses 1e-4
    min_lr: float = 0.0              # cosine annealing floor
    weight_decay: float = 0.01       # AdamW's (the paper does not give one: PyTorch's default)
    grad_clip: float = 1.0           # max global gradient norm ("inf": no clipping, the norm is still checked)
    num_workers: int = 1             # data-loader processes per rank
    seed: int = 0                    # initial weights, random crops and data order
    log_every: int = 20              # steps between loss prints
    ckpt_every: int = 200            # steps between mid-epoch resumable checkpoints

    def __post_init__(self):
        # Refuse combinations that would build a different model than the one asked for.
        if self.backbone not in ("mae", "swin"):
            raise ValueError(f"backbone must be 'mae' or 'swin', got {self.backbone!r}")
        if self.backbone == "swin" and self.rec:
            raise ValueError("rec needs the MAE decoder; the Swin backbone (Table 4) trains with rec false")
        if self.t2v_readout not in ("hidden", "word"):
            raise ValueError(f"t2v_readout must be 'hidden' or 'word', got {self.t2v_readout!r}")
        if self.t2v_reduction not in ("mean", "sum"):
            raise ValueError(f"t2v_reduction must be 'mean' or 'sum', got {self.t2v_reduction!r}")
        if self.resize < self.image_size:
            raise ValueError(f"resize ({self.resize}, the shorter edge) must be at least image_size ({self.image_size}, "
                             "the crop taken from it)")
        if self.images_per_study not in (1, 2):
            raise ValueError(f"images_per_study must be 1 (MIMIC-CXR) or 2 (IU-Xray), got {self.images_per_study}")


def tiny(**overrides) -> Config:
    """CPU-sized model trained on the built-in demo in a few minutes (the defaults above)."""
    return Config(**overrides)


# Full-size shapes, as the Hub configs of the paper's checkpoints give them. The Config fields of the
# `paper` preset repeat them, so that the same model can be built with random weights (bench.py, the
# meta-device test) or loaded from the checkpoints.
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 bos_token_id=1, eos_token_id=2)
VIT_MAE_LARGE = dict(patch_size=16, vision_width=1024, vision_layers=24, vision_heads=16,
                     decoder_width=512, decoder_layers=8, decoder_heads=16)
SWIN_BASE = dict(vision="microsoft/swin-base-patch4-window7-224", patch_size=4, vision_width=1024,
                 vision_layers=18, vision_heads=32)   # R2GenGPT's visual encoder (Table 4)
BLIP_BASE_TEXT = dict(text_width=768, text_layers=12, text_heads=12)

# Per dataset: report lengths as R2Gen (max_seq_length 60 / 100) and R2GenGPT (max_length 60 / 100,
# max_new_tokens 100 / 120) use them; epochs from Sec. 4.1 (2 on IU-Xray, 5 on MIMIC-CXR).
PAPER_DATASETS = {
    "iu_xray": dict(epochs=2, max_report_tokens=60, max_new_tokens=100, images_per_study=2),
    "mimic_cxr": dict(epochs=5, max_report_tokens=100, max_new_tokens=120, images_per_study=1),
}


def paper(**overrides) -> Config:
    """Sec. 4.1: Llama-2-7B-chat (frozen, bf16), MAE-large encoder/decoder, BLIP-base text encoder,
    batch 4, AdamW at 1e-4 with cosine annealing, beam 3, lambda1 = lambda2 = 1.
    `backbone="swin"` gives Table 4's R2GenGPT backbone (Swin-B) with the same LLM and T2V."""
    cfg = dict(
        llm="meta-llama/Llama-2-7b-chat-hf", llm_dtype="bfloat16",
        vision="facebook/vit-mae-large", **VIT_MAE_LARGE,
        text_encoder="Salesforce/blip-image-captioning-base",
        text_tokenizer="Salesforce/blip-image-captioning-base", **BLIP_BASE_TEXT,
        grad_checkpointing=True, one_llm_pass=True, batch_size=4, eval_batch_size=16, lr=1e-4, num_workers=8,
        max_text_tokens=128, resize=256, image_size=224,
    )
    cfg.update(PAPER_DATASETS.get(overrides.get("dataset", "mimic_cxr"), {}))
    if overrides.get("backbone") == "swin":
        cfg.update(SWIN_BASE, rec=False)
    cfg.update(overrides)
    return Config(**cfg)


PRESETS = {"tiny": tiny, "paper": paper}


def parse_bool(s: str) -> bool:
    """A boolean Config field on the command line (train.py, bench.py): true/false, yes/no, on/off, 1/0."""
    import argparse
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config saved in a checkpoint, refusing fields this version does not know."""
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"checkpoint config has unknown fields {unknown}; known fields: {sorted(known)}")
    return Config(**d)


# -----------------------------------------------------------------------------
# Building the pretrained parts (Hub id or local dir, or random from the config)


def _refuse_missing(name: str, info: dict):
    """from_pretrained leaves any weight it did not find at random init and only logs it: refuse instead."""
    missing = list(info["missing_keys"])
    if missing or info.get("mismatched_keys"):
        raise ValueError(f"{name}: {len(missing)} weights missing from the checkpoint (they would stay random): "
                         f"{missing[:20]}{' ...' if len(missing) > 20 else ''}"
                         f"{'; shape mismatches: ' + str(info['mismatched_keys'][:5]) if info.get('mismatched_keys') else ''}")


def build_vision(cfg: Config):
    """The vision encoder (and, for MAE, its decoder): a Hub id or local dir, or random from the fields."""
    if cfg.backbone == "swin":
        if cfg.vision:   # SwinModel strips the classification checkpoint's "swin." prefix itself
            swin, info = SwinModel.from_pretrained(cfg.vision, add_pooling_layer=False, dtype=torch.float32,
                                                   output_loading_info=True)
            _refuse_missing(cfg.vision, info)
            return swin
        h = cfg.vision_heads
        return SwinModel(SwinConfig(
            image_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.vision_width // 8,
            depths=[2, 2, cfg.vision_layers, 2], num_heads=[max(1, h // 8), max(1, h // 4), max(1, h // 2), h],
            window_size=7), add_pooling_layer=False)
    if cfg.vision:
        # mask_ratio=0: every patch is encoded (the paper's encoder sees the whole image). Trained weights
        # are float32 whatever the checkpoint stores (transformers 5 loads in the checkpoint's dtype).
        mae, info = ViTMAEForPreTraining.from_pretrained(cfg.vision, mask_ratio=0.0, dtype=torch.float32,
                                                         output_loading_info=True)
        _refuse_missing(cfg.vision, info)
        # MAE's position embeddings are a fixed sin-cos table (requires_grad False when built), but
        # transformers 5.24's from_pretrained hands them back trainable, and AdamW would then decay
        # and train them. Frozen again here, as in MAE.
        mae.vit.embeddings.position_embeddings.requires_grad_(False)
        mae.decoder.decoder_pos_embed.requires_grad_(False)
        return mae
    mae = ViTMAEForPreTraining(ViTMAEConfig(
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.vision_width,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
        intermediate_size=4 * cfg.vision_width, decoder_hidden_size=cfg.decoder_width,
        decoder_num_hidden_layers=cfg.decoder_layers, decoder_num_attention_heads=cfg.decoder_heads,
        decoder_intermediate_size=4 * cfg.decoder_width, mask_ratio=0.0, norm_pix_loss=False))
    # transformers 5.24 leaves a freshly built ViT-MAE's position embeddings at zero: the encoder's
    # sin-cos init is skipped once the patch projection is marked initialised, and the decoder's is
    # zeroed. They are frozen (requires_grad False), so the model would never learn where a patch is
    # and could not tell a left effusion from a right one. Checkpoints carry them; a random model
    # gets MAE's fixed 2-D sin-cos table here.
    if not mae.vit.embeddings.position_embeddings.is_meta:
        with torch.no_grad():
            mae.vit.embeddings.patch_embeddings.projection._is_hf_initialized = False
            mae.vit.embeddings.initialize_weights()
            mae.decoder.initialize_weights(mae.vit.embeddings.patch_embeddings.num_patches)
    return mae


# Where BLIP checkpoints keep the BERT text model: the captioning model (the paper's footnote,
# Salesforce/blip-image-captioning-base) under text_decoder.bert.*, the ITM/retrieval models under
# text_encoder.*; a bare BlipTextModel's keys need no mapping. (BLIP-VQA holds both; not supported.)
BLIP_TEXT_KEYS = {r"^text_decoder\.bert\.": "", r"^text_encoder\.": ""}


def build_text_encoder(cfg: Config, vocab_size: int, pad_id: int) -> BlipTextModel:
    # is_decoder=False: a text *encoder* (bidirectional attention, no cross-attention blocks, whose
    # parameters would never receive a gradient); no pooler, which nothing here uses.
    if cfg.text_encoder:
        return load_blip_text_encoder(cfg.text_encoder)
    return BlipTextModel(BlipTextConfig(
        vocab_size=vocab_size, hidden_size=cfg.text_width, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, intermediate_size=4 * cfg.text_width,
        encoder_hidden_size=cfg.text_width, max_position_embeddings=max(512, cfg.max_text_tokens),
        is_decoder=False, pad_token_id=pad_id, bos_token_id=pad_id, sep_token_id=pad_id),
        add_pooling_layer=False)


def load_blip_text_encoder(name: str) -> BlipTextModel:
    """BLIP's BERT text model from a full BLIP checkpoint (captioning or ITM layout) or a bare one.

    BlipTextModel.from_pretrained(<full BLIP checkpoint>) finds none of its keys and returns a random
    model without an error: we map the prefixes and refuse any weight that is still missing."""
    model, info = BlipTextModel.from_pretrained(name, is_decoder=False, add_pooling_layer=False, dtype=torch.float32,
                                                key_mapping=BLIP_TEXT_KEYS, output_loading_info=True)
    _refuse_missing(f"{name} (BLIP text model, looked for under text_decoder.bert.* and text_encoder.*)", info)
    return model


def load_frozen_llm(cfg: Config) -> LlamaForCausalLM:
    llm, info = LlamaForCausalLM.from_pretrained(cfg.llm, dtype=getattr(torch, cfg.llm_dtype),
                                                 output_loading_info=True)
    _refuse_missing(cfg.llm, info)
    # The one place the LLM is frozen (Sec. 3: "this design ensures the LLM remains frozen").
    llm.requires_grad_(False)
    if cfg.grad_checkpointing:
        # Non-reentrant checkpointing (the v5 default): gradients still reach inputs_embeds, and so
        # E_v and E_t, although no LLM parameter requires grad.
        llm.activation_checkpointing_enable()
    return llm


def load_tokenizer(name: str):
    """The LLM's (or text encoder's) tokenizer. Llama-2's ships without a pad token: padded positions
    are masked everywhere, so any id would do; we use <unk> (id 0), as R2GenGPT does, never EOS, whose
    position in each report the loss must learn."""
    tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    return tok


def random_llm(dtype=torch.float32, **shape) -> LlamaForCausalLM:
    """A frozen LLM with random weights and the given shape (e.g. LLAMA2_7B), for bench.py and the
    meta-device parameter count; nothing is downloaded. Built directly in `dtype` (7B in fp32 is 27 GB)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        llm = LlamaForCausalLM(LlamaConfig(**shape))
    finally:
        torch.set_default_dtype(default)
    llm.requires_grad_(False)
    return llm


class StandInTokenizer:
    """Just enough of a tokenizer to build a full-size model with random weights when the real one is
    not on the machine (bench.py, the meta-device count): one id per word, Llama-2's special ids."""

    def __init__(self, vocab_size: int, bos_token_id=1, eos_token_id=2, pad_token_id=0):
        self.vocab_size, self.bos_token_id, self.eos_token_id, self.pad_token_id = \
            vocab_size, bos_token_id, eos_token_id, pad_token_id

    def __len__(self):
        return self.vocab_size

    def __call__(self, text, add_special_tokens=False):
        import types
        import zlib
        ids = [3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in text.split()]
        return types.SimpleNamespace(input_ids=ids)


BLIP_TEXT_VOCAB = 30524              # BLIP's BERT vocabulary (bert-base-uncased + 2 added tokens)


def random_full_size(cfg: Config, dtype=torch.bfloat16, llm=None) -> "ReportGenerator":
    """The model of `cfg` (e.g. the paper preset) at full size with random weights and stand-in
    tokenizers, built on the current default device (use `with torch.device("meta"):` to count
    parameters without memory, or "cuda" for bench.py). Nothing is downloaded. `llm`: a frozen LLM to
    build around (bench.py shares one between settings); None builds Llama-2-7B's shape at random."""
    import dataclasses
    if llm is None:
        if not cfg.llm.startswith("meta-llama/Llama-2-7b"):
            raise ValueError(f"random_full_size knows the shape of Llama-2-7B only, not {cfg.llm!r}")
        llm = random_llm(dtype, **LLAMA2_7B)
    vocab = llm.config.vocab_size
    text_vocab = BLIP_TEXT_VOCAB if vocab == LLAMA2_7B["vocab_size"] else vocab   # the demo shares one tokenizer
    random_cfg = dataclasses.replace(cfg, vision="", text_encoder="")    # same shapes, random weights
    return ReportGenerator(random_cfg, llm, StandInTokenizer(vocab), StandInTokenizer(text_vocab))


def use_safe_attention_kernels():
    """On CUDA, keep PyTorch's cuDNN attention kernel out of the run (train.py, evaluate.py, bench.py).

    torch 2.11-2.14 prefer it on H100/H200, and its backward returns NaN query gradients when a mask is
    passed, the sequence length is 64 mod 128 and a query row's logsumexp is very negative
    (pytorch/pytorch#196678): a fully masked row is one, and the left padding of the text-to-vision rows
    makes such rows. The memory-efficient and flash kernels, which are correct there, remain enabled.
    (Not measured here: no GPU. The CPU kernels give zeros for fully masked rows.)"""
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


def left_align(x, mask):
    """Move each row's padding to the left: (B, T, d), (B, T) -> same, valid items right-aligned.

    The text-to-vision input is [S_t2v, E_t (right-padded), E_v]; left-aligning [S_t2v, E_t] makes the
    visual positions the same last Np positions in every row."""
    B, T = mask.shape
    shift = T - mask.sum(1, keepdim=True)                                   # (B, 1) pads per row
    idx = (torch.arange(T, device=mask.device).unsqueeze(0) - shift) % T    # (B, T) roll right by shift
    x = torch.gather(x, 1, idx.unsqueeze(-1).expand_as(x))
    return x, torch.gather(mask, 1, idx)


def encode_patches_in_order(vit, x):
    """The ViT-MAE encoder on every patch of x (B, C, H, W): (B, N, dv), CLS dropped, patch i at row i.

    At mask_ratio 0 ViT-MAE still shuffles the patches by random noise; an increasing ramp keeps them
    in their natural (raster) order, so visual token i is always patch i."""
    p = vit.config.patch_size
    N = (x.shape[-1] // p) * (x.shape[-2] // p)
    noise = torch.arange(N, device=x.device, dtype=torch.float32).expand(x.shape[0], N)
    return vit(pixel_values=x, noise=noise).last_hidden_state[:, 1:]


def decode_all_patches(decoder, z):
    """The MAE decoder from the tokens z (B, N, dv) of every patch, in order: (B, N, p*p*C) pixels.

    Its CLS slot gets a zero vector, so nothing but z reaches it; ids_restore is the identity (nothing
    was shuffled, nothing masked)."""
    B, N = z.shape[:2]
    z = torch.cat([z.new_zeros(B, 1, z.shape[-1]), z], 1)              # (B, 1+N, dv)
    return decoder(z, torch.arange(N, device=z.device).expand(B, N)).logits


def position_ids_from_mask(mask):
    """Positions that skip padding, so a padded row computes exactly what it computes alone."""
    return (mask.cumsum(1) - 1).clamp(min=0)


# -----------------------------------------------------------------------------
# The model


class ReportGenerator(nn.Module):

    def __init__(self, cfg: Config, llm: LlamaForCausalLM, tokenizer, text_tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.llm = llm
        dL = llm.config.hidden_size
        vision = build_vision(cfg)
        if cfg.backbone == "swin":
            self.vision_encoder = vision                              # g_v: Swin-B in R2GenGPT (Table 4)
            dv = vision.num_features
        else:
            self.vision_encoder = vision.vit                          # g_v, theta_v
            dv = vision.config.hidden_size
            self.patch_size = vision.config.patch_size
        self.visual_mapper = nn.Linear(dv, dL)                        # m_v
        if cfg.t2v:
            text_tokenizer = text_tokenizer or tokenizer
            self.text_encoder = build_text_encoder(cfg, len(text_tokenizer), text_tokenizer.pad_token_id)  # g_t
            self.text_mapper = nn.Linear(self.text_encoder.config.hidden_size, dL)                          # m_t
        if cfg.rec:
            self.rec_mapper = nn.Linear(dL, dv)                       # m'_v
            self.vision_decoder = vision.decoder                      # g_vd, theta_vd
            # No patch is ever masked (mask_ratio 0), so the mask token takes no part in the loss.
            self.vision_decoder.mask_token.requires_grad_(False)
        if cfg.clip:                                                  # Table 3's V2T+CLIP row (footnote 4)
            self.clip_visual = nn.Linear(dL, cfg.clip_dim)
            self.clip_text = nn.Linear(dL, cfg.clip_dim)
            self.clip_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self._init_mappers_to_word_scale()
        # Prompts are tokenized once here, never in forward. They start with the tokenizer's BOS, as
        # every sequence the LLM was pre-trained on does.
        for name, text, bos in (("prompt_v2t", cfg.prompt_v2t, True), ("prompt_t2v", cfg.prompt_t2v, True),
                                ("prompt_v2t_after", cfg.prompt_v2t_after, False)):
            ids = [tokenizer.bos_token_id] * bos + tokenizer(text, add_special_tokens=False).input_ids
            self.register_buffer(name, torch.tensor(ids, dtype=torch.long), persistent=False)  # (P,)
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    @torch.no_grad()
    def _init_mappers_to_word_scale(self):
        """Start E_v and E_t at the norm of the LLM's word embeddings, whose place they take.

        The LLM normalises its inputs (RMSNorm), so what moves its output is the *relative* change of
        E_v; Adam moves weights by about lr per step whatever their scale. With PyTorch's default init
        E_v starts ~10x longer than a word embedding in the demo, and learns ~10x slower. (Our choice;
        the paper does not describe its initialisation.)"""
        W = self.llm.get_input_embeddings().weight
        if W.is_meta:                        # a model built on the meta device has no values to measure
            return
        word_norm = W.float().norm(dim=1).mean().item()
        for mapper in (self.visual_mapper, getattr(self, "text_mapper", None)):
            if mapper is not None:           # its input is LayerNorm-ed: about unit variance per feature
                nn.init.normal_(mapper.weight, std=word_norm / math.sqrt(mapper.in_features * mapper.out_features))
                nn.init.zeros_(mapper.bias)

    # --- vision -------------------------------------------------------------

    def encode_image(self, pixel_values):
        """g_v: (B, K, C, H, W) -> Z_v (B, Np, dv), every patch of every image in natural order."""
        B, K = pixel_values.shape[:2]
        x = pixel_values.flatten(0, 1)                                 # (B*K, C, H, W)
        if self.cfg.backbone == "swin":                                # its last stage's tokens, raster order
            z = self.vision_encoder(pixel_values=x).last_hidden_state  # (B*K, N, dv): 7 x 7 at 224
            return z.reshape(B, -1, z.shape[-1])
        z = encode_patches_in_order(self.vision_encoder, x)            # (B*K, N, dv)
        return z.reshape(B, -1, z.shape[-1])                           # (B, Np, dv): images in order

    def visual_embeddings(self, pixel_values):
        """E_v = m_v(g_v(I)): (B, K, C, H, W) -> (B, Np, dL), the LLM's input-embedding space."""
        return self.visual_mapper(self.encode_image(pixel_values))

    def patchify(self, imgs):
        """(B, C, H, W) -> (B, N, p*p*C), MAE's patch layout (the decoder predicts this)."""
        p = self.patch_size
        B, C, H, W = imgs.shape
        x = imgs.reshape(B, C, H // p, p, W // p, p)
        x = torch.einsum("bchpwq->bhwpqc", x)
        return x.reshape(B, (H // p) * (W // p), p * p * C)

    # --- the three losses ---------------------------------------------------

    def _embed(self, ids):
        return self.llm.get_input_embeddings()(ids)

    def _llm_hidden(self, embeds, mask):
        """Last hidden states of the frozen LLM (after its final norm), without the vocabulary head."""
        out = self.llm.model(inputs_embeds=embeds.to(self.llm.dtype), attention_mask=mask,
                             position_ids=position_ids_from_mask(mask), use_cache=False)
        return out.last_hidden_state                                   # (B, T, dL)

    def _v2t_prefix(self, E_v):
        """[S_v2t, E_v, S_v2t_after]: what the LLM reads before the report, (B, P+Np+P', dL)."""
        B = E_v.shape[0]
        before = self._embed(self.prompt_v2t).expand(B, -1, -1)
        after = self._embed(self.prompt_v2t_after).expand(B, -1, -1)
        return torch.cat([before, E_v.to(before.dtype), after], 1)

    def loss_v2t(self, E_v, report_ids, report_mask):
        """Eq. 1, L_VTC: next-token NLL of the report given [S_v2t, E_v, T_<k] (S_v2t around E_v).

        report_ids (B, L) end with EOS and are right-padded (report_mask 0). The mean over real report
        tokens is used instead of Eq. 1's sum, so the loss scale does not depend on report length."""
        x, mask = self._v2t_inputs(E_v, report_ids, report_mask)
        h = self._llm_hidden(x, mask)[:, -report_ids.shape[1]:]        # (B, L, dL): positions that predict t_1..t_L
        return self._v2t_nll(h, report_ids, report_mask)

    def _v2t_inputs(self, E_v, report_ids, report_mask):
        """[S_v2t, E_v, S_v2t_after, t_1..t_L-1]: (B, P+Np+P'+L-1, dL) and its mask."""
        prefix = self._v2t_prefix(E_v)                                  # (B, P+Np+P', dL)
        x = torch.cat([prefix, self._embed(report_ids[:, :-1])], 1)     # (B, P+Np+P'+L-1, dL)
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=report_mask.dtype, device=E_v.device),
                          report_mask[:, :-1]], 1)
        return x, mask

    def _v2t_nll(self, h, report_ids, report_mask):
        logits = self.llm.lm_head(h).float()                            # vocabulary head on report positions only
        targets = report_ids.masked_fill(report_mask == 0, -100)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    def loss_t2v(self, E_v, text_ids, text_mask):
        """Eq. 2, L_TVC = 1/Np sum_i ||E_v,i - E_g,i||^2 (batch mean).

        The frozen LLM reads [S_t2v, E_t, E_v,1..Np-1] (teacher forcing) and its last hidden state at
        the position just before visual token i is E_g,i: the last text position predicts E_v,1, the
        position of E_v,1 predicts E_v,2, and so on."""
        x, mask = self._t2v_inputs(E_v, text_ids, text_mask)
        E_g = self._read_E_g(self._llm_hidden(x, mask)[:, -E_v.shape[1]:])  # (B, Np, dL)
        return self._t2v_error(E_v, E_g)

    def _t2v_inputs(self, E_v, text_ids, text_mask):
        """[S_t2v, E_t, E_v,1..Np-1], left-padded: (B, T, dL) and its mask."""
        B, Np, _ = E_v.shape
        E_t = self.text_mapper(self.text_encoder(input_ids=text_ids, attention_mask=text_mask)
                               .last_hidden_state)                      # (B, Lt, dL)
        prompt = self._embed(self.prompt_t2v).expand(B, -1, -1)        # (B, P, dL)
        x = torch.cat([prompt, E_t.to(prompt.dtype)], 1)                # (B, P+Lt, dL)
        mask = torch.cat([torch.ones(B, prompt.shape[1], dtype=text_mask.dtype,
                                     device=text_mask.device), text_mask], 1)
        x, mask = left_align(x, mask)                                   # padding first, text last
        # E_v enters twice. As the *input* it is detached: Eq. 5 writes the prediction as E_g(theta_t),
        # a function of the text side only, and letting theta_v shape its own teacher-forcing inputs
        # would let the vision encoder make the target easy to predict instead of informative.
        # As the *target* it is not detached: Eq. 5 treats L_TVC as a function of E_v(theta_v) -- the
        # regularisation that pulls the visual embeddings towards what the LLM derives from the report.
        x = torch.cat([x, E_v[:, :-1].detach().to(x.dtype)], 1)        # (B, P+Lt+Np-1, dL)
        mask = torch.cat([mask, torch.ones(B, Np - 1, dtype=mask.dtype, device=mask.device)], 1)
        return x, mask

    def _read_E_g(self, h):
        """E_g from the LLM's last hidden states h (B, Np, dL) at the positions that predict E_v."""
        if self.cfg.t2v_readout == "word":
            # the expected word embedding of the LLM's next-token distribution: a point in the
            # word-embedding space (the last hidden state, after the final RMSNorm, is not: see README)
            W = self.llm.get_input_embeddings().weight
            # in the LLM's dtype (bf16 at full size, as autocast would compute it anyway): an fp32 copy of
            # Llama-2's table would add 512 MiB to every step
            return (torch.softmax(self.llm.lm_head(h).float(), -1).to(W.dtype) @ W).float()
        return h

    def _t2v_error(self, E_v, E_g):
        sq = (E_v.float() - E_g.float()).pow(2)                         # (B, Np, dL)
        # Eq. 2 sums the squared error over the dL dimensions. Summed over Llama-2's 4096 dimensions the
        # term is thousands of times L_VTC, and lambda1 = 1 "without fine-tuning" (Sec. 4.1) could not
        # balance the two; the mean over dimensions (what F.mse_loss computes) can. The paper does not
        # say which its code used: "mean" is our default, "sum" is Eq. 2 to the letter.
        return (sq.sum(-1) if self.cfg.t2v_reduction == "sum" else sq.mean(-1)).mean()

    def losses_v2t_t2v_one_pass(self, E_v, report_ids, report_mask, text_ids, text_mask):
        """L_VTC and L_TVC from ONE pass through the frozen LLM: both sequences stacked along the batch,
        the V2T rows padded on the right and the T2V rows on the left to a common length. Padding is
        masked and positions skip it, so each row computes what it computes alone (tested); the LLM's
        per-layer work is launched once instead of twice (the step is launch-bound at batch 4 on a GPU)."""
        x1, m1 = self._v2t_inputs(E_v, report_ids, report_mask)        # (B, T1, dL)
        x2, m2 = self._t2v_inputs(E_v, text_ids, text_mask)            # (B, T2, dL)
        T1, T2, T = x1.shape[1], x2.shape[1], max(x1.shape[1], x2.shape[1])
        x = torch.cat([F.pad(x1.to(x2.dtype), (0, 0, 0, T - T1)), F.pad(x2, (0, 0, T - T2, 0))], 0)
        mask = torch.cat([F.pad(m1, (0, T - T1)), F.pad(m2, (T - T2, 0))], 0)
        h = self._llm_hidden(x, mask)                                   # (2B, T, dL)
        B, L, Np = E_v.shape[0], report_ids.shape[1], E_v.shape[1]
        return (self._v2t_nll(h[:B, T1 - L:T1], report_ids, report_mask),
                self._t2v_error(E_v, self._read_E_g(h[B:, T - Np:])))

    def loss_rec(self, E_v, pixel_values):
        """L_REC: pixel MSE of the MAE decoder's reconstruction from E_v alone.

        Z^_v = m'_v(E_v); the decoder's CLS slot gets a zero vector, so nothing but E_v reaches the
        decoder (the encoder's own CLS would be a shortcut around E_v). MAE's built-in loss averages
        over masked patches only, which is NaN at mask ratio 0."""
        B, K = pixel_values.shape[:2]
        z = self.rec_mapper(E_v)                                        # (B, Np, dv)
        pred = decode_all_patches(self.vision_decoder, z.reshape(B * K, -1, z.shape[-1]))  # (B*K, N, p*p*C)
        target = self.patchify(pixel_values.flatten(0, 1))              # (B*K, N, p*p*C)
        return F.mse_loss(pred.float(), target.float())

    def loss_clip(self, E_v, report_ids, report_mask):
        """Footnote 4, the V2T+CLIP reference: the visual embeddings and the LLM's word embeddings of
        the report, each mean-pooled and projected to 512 dimensions by its own linear layer, are
        aligned by CLIP's symmetric contrastive loss over the batch.

        Our choices where the footnote is silent: E_v (what the LLM reads) is the visual side; the
        pooling is a mean over visual tokens and over report tokens; the negatives are the other studies
        of the *global* batch (gathered from every rank, with gradient), as CLIP does."""
        m = report_mask.unsqueeze(-1).to(E_v.dtype)                     # (B, L, 1)
        words = (self._embed(report_ids).to(E_v.dtype) * m).sum(1) / m.sum(1)  # (B, dL), frozen table
        v = F.normalize(self.clip_visual(E_v.mean(1)).float(), dim=-1)  # (B, 512)
        t = F.normalize(self.clip_text(words).float(), dim=-1)          # (B, 512)
        v_all, t_all, offset = v, t, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            import torch.distributed.nn.functional as dist_fn            # all_gather that passes gradients back
            offset = torch.distributed.get_rank() * v.shape[0]
            v_all, t_all = torch.cat(dist_fn.all_gather(v), 0), torch.cat(dist_fn.all_gather(t), 0)  # (B*world, 512)
        scale = self.clip_logit_scale.clamp(max=math.log(100)).exp()    # CLIP caps the scale at 100
        labels = torch.arange(v.shape[0], device=v.device) + offset
        # this rank's rows of the global similarity matrix, image->text and text->image
        with torch.autocast(v.device.type, enabled=False):             # fp32 logits (autocast would make them bf16)
            return 0.5 * (F.cross_entropy(scale * v @ t_all.T, labels) + F.cross_entropy(scale * t @ v_all.T, labels))

    def forward(self, pixel_values, report_ids, report_mask, text_ids=None, text_mask=None):
        """Eq. 3: L_TOTAL = L_VTC + lambda1 L_TVC + lambda2 L_REC. Returns every term for logging."""
        E_v = self.visual_embeddings(pixel_values)                      # (B, Np, dL)
        if self.cfg.t2v and self.cfg.one_llm_pass:
            v2t, t2v = self.losses_v2t_t2v_one_pass(E_v, report_ids, report_mask, text_ids, text_mask)
            losses = {"v2t": v2t, "t2v": t2v}
        else:
            losses = {"v2t": self.loss_v2t(E_v, report_ids, report_mask)}
            if self.cfg.t2v:
                losses["t2v"] = self.loss_t2v(E_v, text_ids, text_mask)
        total = losses["v2t"]
        if self.cfg.t2v:
            total = total + self.cfg.lambda_t2v * losses["t2v"]
        if self.cfg.rec:
            losses["rec"] = self.loss_rec(E_v, pixel_values)
            total = total + self.cfg.lambda_rec * losses["rec"]
        if self.cfg.clip:
            losses["clip"] = self.loss_clip(E_v, report_ids, report_mask)
            total = total + self.cfg.lambda_clip * losses["clip"]
        losses["loss"] = total
        return losses

    # --- inference: the vision-to-text branch alone -------------------------

    @torch.no_grad()
    def generate(self, pixel_values, num_beams=None, max_new_tokens=None):
        """Batched beam search from [S_v2t, E_v, S_v2t_after]: (B, K, C, H, W) -> list of B token-id lists.

        Touches only the vision encoder, the visual mapper and the frozen LLM."""
        prefix = self._v2t_prefix(self.visual_embeddings(pixel_values))  # (B, P+Np+P', dL)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        return self.generate_from_embeds(prefix, mask, num_beams, max_new_tokens)

    @torch.no_grad()
    def generate_from_embeds(self, prefix, mask, num_beams=None, max_new_tokens=None):
        """Beam search after a (left-padded) batch of prefix embeddings (B, T, dL), mask (B, T)."""
        out = self.llm.generate(
            inputs_embeds=prefix.to(self.llm.dtype), attention_mask=mask,
            num_beams=num_beams or self.cfg.num_beams, do_sample=False,
            max_new_tokens=max_new_tokens or self.cfg.max_new_tokens,
            eos_token_id=self.eos_id, pad_token_id=self.pad_id)       # (B, <=max_new_tokens): new tokens only
        rows = []
        for row in out.tolist():
            row = row[:row.index(self.eos_id)] if self.eos_id in row else row
            rows.append([t for t in row if t != self.pad_id])
        return rows

    # --- what is trained and saved ------------------------------------------

    def trainable_state_dict(self):
        """Every weight except the frozen LLM's: what a checkpoint holds."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("llm.")}

    def load_trainable_state_dict(self, sd):
        missing, unexpected = self.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("llm.")]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match this model: missing {missing[:10]}"
                             f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}")

    def parameter_counts(self):
        """Parameters per component, and how many are trained."""
        counts = {"llm (frozen)": sum(p.numel() for p in self.llm.parameters())}
        for name, module in self.named_children():
            if name != "llm":
                counts[name] = sum(p.numel() for p in module.parameters())
        for name, p in self.named_parameters(recurse=False):            # e.g. the CLIP temperature
            counts[name] = p.numel()
        counts["trained"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return counts
