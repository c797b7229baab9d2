"""The paper's full configuration (issue 3): full-size shapes on the meta device, checkpoints written
with the Hub's exact key names for each pretrained part, and the ablations of Tables 3 and 4."""

import os
import re

import pytest
import torch
from safetensors.torch import save_file
from transformers import BlipConfig, BlipTextConfig, BlipTextModel, LlamaConfig, LlamaForCausalLM

import model as M
from test_model import batch as make_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# full size, counted on the meta device


def readme_parameter_table():
    """{component: count} from the README's table under 'Parameters of the paper preset'."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("### Parameters of the paper preset", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `?([^|`]+?)`? +\| +([\d,]+) +\|", section, flags=re.M)
    return {name.strip(): int(n.replace(",", "")) for name, n in rows}


def test_paper_preset_on_meta_device_matches_readme_table():
    with torch.device("meta"):
        model = M.random_full_size(M.paper(dataset="mimic_cxr"))
    counts = model.parameter_counts()
    assert counts == readme_parameter_table()
    # the published sizes: Llama-2-7B, ViT-L/16 encoder, BERT-base text model with BLIP's vocabulary
    assert counts["llm (frozen)"] == 6_738_415_616
    assert 303e6 < counts["vision_encoder"] < 304e6
    assert 108e6 < counts["text_encoder"] < 110e6
    # nothing of the LLM is trained, and the trained set is everything else minus MAE's fixed
    # sin-cos position tables and the unused mask token
    assert not any(p.requires_grad for p in model.llm.parameters())
    fixed = 197 * 1024 + 197 * 512 + 512
    assert counts["trained"] == sum(v for k, v in counts.items() if k not in ("llm (frozen)", "trained")) - fixed


def test_paper_preset_per_dataset_settings():
    mimic, iu = M.paper(dataset="mimic_cxr"), M.paper(dataset="iu_xray")
    assert (mimic.epochs, iu.epochs) == (5, 2)                      # Sec. 4.1
    assert (mimic.batch_size, mimic.lr, mimic.num_beams) == (4, 1e-4, 3)
    assert (mimic.lambda_t2v, mimic.lambda_rec) == (1.0, 1.0)
    assert (mimic.images_per_study, iu.images_per_study) == (1, 2)
    assert mimic.llm_dtype == "bfloat16" and mimic.grad_checkpointing
    swin = M.paper(dataset="iu_xray", backbone="swin")
    assert swin.vision == "microsoft/swin-base-patch4-window7-224" and not swin.rec
    with pytest.raises(ValueError, match="rec needs the MAE decoder"):
        M.paper(backbone="swin", rec=True)


# -----------------------------------------------------------------------------
# checkpoints with the Hub's key names


def _write(directory, config, tensors):
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, "model.safetensors"))


def test_llama_checkpoint_with_hub_names_loads_every_weight(tmp_path, tokenizer):
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(1)
    ref = LlamaForCausalLM(cfg)
    hub = {k: v for k, v in ref.state_dict().items()}      # Llama-2's Hub names: model.layers.0.self_attn.q_proj.weight, ...
    assert "model.layers.1.mlp.down_proj.weight" in hub and "lm_head.weight" in hub
    _write(tmp_path / "llama", cfg, hub)
    llm = M.load_frozen_llm(M.Config(llm=str(tmp_path / "llama")))
    loaded = llm.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in hub.items())
    assert not any(p.requires_grad for p in llm.parameters())

    del hub["model.layers.1.mlp.down_proj.weight"]
    _write(tmp_path / "broken", cfg, hub)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        M.load_frozen_llm(M.Config(llm=str(tmp_path / "broken")))


# transformers v5 renamed ViT-MAE's modules; the Hub checkpoints (facebook/vit-mae-*) keep the v4 names.
MAE_V5_TO_HUB = [
    (r"^vit\.layers\.", "vit.encoder.layer."), (r"^decoder\.decoder_layers\.", "decoder.decoder_layers."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."), (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."), (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."), (r"\.mlp\.fc2\.", ".output.dense."),
]


def hub_name(key, table):
    for pattern, replacement in table:
        key = re.sub(pattern, replacement, key)
    return key


def test_vit_mae_checkpoint_with_hub_names_loads_every_weight(tmp_path):
    small = M.Config(vision="", vision_layers=2, decoder_layers=2)
    torch.manual_seed(2)
    ref = M.build_vision(small)
    with torch.no_grad():                                   # make every weight distinguishable from an init
        for p in ref.parameters():
            p.add_(torch.randn_like(p))
    hub = {hub_name(k, MAE_V5_TO_HUB): v for k, v in ref.state_dict().items()}
    # spot-check against the names in facebook/vit-mae-large's model.safetensors
    for name in ("vit.encoder.layer.1.attention.attention.query.weight", "vit.encoder.layer.0.intermediate.dense.bias",
                 "vit.encoder.layer.0.attention.output.dense.weight", "vit.layernorm.weight",
                 "decoder.decoder_layers.1.attention.attention.value.bias", "decoder.decoder_pred.weight",
                 "decoder.decoder_embed.weight", "decoder.mask_token", "vit.embeddings.patch_embeddings.projection.weight"):
        assert name in hub, name
    _write(tmp_path / "mae", ref.config, hub)
    loaded = M.build_vision(M.Config(vision=str(tmp_path / "mae"))).state_dict()
    assert loaded.keys() == ref.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in ref.state_dict().items())
    # the sin-cos position tables stay fixed, as in a freshly built MAE (from_pretrained makes them trainable)
    frozen = lambda m: sorted(n for n, p in m.named_parameters() if not p.requires_grad)
    assert frozen(M.build_vision(M.Config(vision=str(tmp_path / "mae")))) == frozen(ref) == [
        "decoder.decoder_pos_embed", "vit.embeddings.position_embeddings"]

    # a checkpoint stored in bf16 is still trained in float32 (AdamW on bf16 weights loses small updates)
    ref.config.dtype = torch.bfloat16
    _write(tmp_path / "mae_bf16", ref.config, {k: v.bfloat16() for k, v in hub.items()})
    assert {p.dtype for p in M.build_vision(M.Config(vision=str(tmp_path / "mae_bf16"))).parameters()} == {torch.float32}

    del hub["decoder.decoder_layers.1.attention.attention.value.bias"]
    _write(tmp_path / "broken", ref.config, hub)
    with pytest.raises(ValueError, match="decoder_layers.1"):
        M.build_vision(M.Config(vision=str(tmp_path / "broken")))


def _blip_checkpoint(directory, prefix, drop=None):
    """A BLIP checkpoint in the Hub's layout: the BERT text model under `prefix`, next to the other
    parts of a BLIP model (vision tower, heads) that the text encoder must ignore."""
    text = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, encoder_hidden_size=32, bos_token_id=0, sep_token_id=0, pad_token_id=0)
    config = BlipConfig(text_config=text, vision_config=dict(hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=16))
    torch.manual_seed(3)
    # the captioning model's text decoder has cross-attention and an LM head; ITM's encoder has neither
    bert = BlipTextModel(BlipTextConfig(**text, is_decoder=prefix.startswith("text_decoder")), add_pooling_layer=False)
    tensors = {prefix + k: v for k, v in bert.state_dict().items()}
    tensors["vision_model.embeddings.class_embedding"] = torch.zeros(1, 1, 32)
    tensors["text_decoder.cls.predictions.bias" if prefix.startswith("text_decoder") else "itm_head.weight"] = torch.zeros(2)
    if drop:
        del tensors[prefix + drop]
    _write(directory, config, tensors)
    return {k: v for k, v in bert.state_dict().items() if "crossattention" not in k}


@pytest.mark.parametrize("prefix", ["text_decoder.bert.", "text_encoder."])   # captioning, ITM
def test_blip_checkpoint_layouts_load_every_text_weight(tmp_path, prefix):
    expected = _blip_checkpoint(tmp_path / "blip", prefix)
    encoder = M.load_blip_text_encoder(str(tmp_path / "blip"))
    assert not encoder.config.is_decoder                    # a bidirectional encoder, no cross-attention
    loaded = encoder.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_blip_checkpoint_with_a_missing_key_is_refused(tmp_path):
    _blip_checkpoint(tmp_path / "blip", "text_decoder.bert.", drop="encoder.layer.1.output.dense.weight")
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.output\.dense\.weight"):
        M.load_blip_text_encoder(str(tmp_path / "blip"))


def test_llama2_tokenizer_without_pad_gets_unk(tmp_path):
    from conftest import make_tokenizer
    fresh = make_tokenizer()                                # not the shared fixture: this one is changed
    fresh.pad_token = None                                  # as Llama-2's tokenizer ships
    fresh.save_pretrained(tmp_path)
    assert M.AutoTokenizer.from_pretrained(str(tmp_path)).pad_token is None
    tok = M.load_tokenizer(str(tmp_path))
    assert tok.pad_token == tok.unk_token and tok.pad_token_id != tok.eos_token_id


# -----------------------------------------------------------------------------
# ablations: every trainable parameter gets a gradient (DDP refuses one that does not)

ABLATIONS = {
    "v2t": dict(t2v=False, rec=False),
    "v2t+clip": dict(t2v=False, rec=False, clip=True),
    "v2t+t2v": dict(t2v=True, rec=False),
    "v2t+t2v+rec": dict(t2v=True, rec=True),
    "swin+t2v": dict(backbone="swin", t2v=True, rec=False, patch_size=2),   # 112 / 2 / 8: 7 x 7 tokens
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_every_trainable_parameter_of_each_ablation_gets_a_gradient(name, tokenizer, llm_dir):
    torch.manual_seed(0)
    cfg = M.Config(llm=llm_dir, vision="", **ABLATIONS[name])
    model = M.ReportGenerator(cfg, M.load_frozen_llm(cfg), tokenizer)
    losses = model(**make_batch(tokenizer))
    expected = {"v2t", "loss"} | {k for k in ("t2v", "rec", "clip") if ABLATIONS[name].get(k)}
    assert set(losses) == expected
    losses["loss"].backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained and not any(n.startswith("llm.") for n, _ in trained)
    assert [n for n, p in trained if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_swin_visual_tokens_are_its_last_stage_grid(tokenizer, llm_dir):
    cfg = M.Config(llm=llm_dir, vision="", **ABLATIONS["swin+t2v"])
    model = M.ReportGenerator(cfg, M.load_frozen_llm(cfg), tokenizer)
    z = model.encode_image(torch.randn(2, 2, 3, 112, 112))   # two images per study (IU-Xray)
    assert z.shape == (2, 2 * 49, 64)                       # 112 / 2 / 8 = 7 x 7 per image, concatenated


def test_clip_loss_prefers_matching_pairs(tokenizer, llm_dir):
    torch.manual_seed(0)
    cfg = M.Config(llm=llm_dir, vision="", **ABLATIONS["v2t+clip"])
    model = M.ReportGenerator(cfg, M.load_frozen_llm(cfg), tokenizer)
    b = make_batch(tokenizer)
    ids, mask = b["report_ids"], b["report_mask"]                # two different reports
    E_v = torch.randn(2, 49, model.llm.config.hidden_size)
    # make the visual side carry the report: then matching pairs score higher than the other pairing
    with torch.no_grad():
        model.clip_visual.weight.copy_(model.clip_text.weight)
        model.clip_visual.bias.copy_(model.clip_text.bias)
        m = mask.unsqueeze(-1).float()
        words = (model._embed(ids) * m).sum(1) / m.sum(1)
        aligned = model.loss_clip(words.unsqueeze(1).expand_as(E_v), ids, mask)
        shuffled = model.loss_clip(words.roll(1, 0).unsqueeze(1).expand_as(E_v), ids, mask)
    assert aligned < torch.log(torch.tensor(2.0)) < shuffled


def test_each_ablation_trains_under_torchrun_with_2_processes(llm_dir):
    import subprocess
    import sys
    worker = os.path.join(ROOT, "tests", "ddp_ablations.py")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", worker, llm_dir],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    done = [line.split(":")[0][3:] for line in out.stdout.splitlines() if line.startswith("ok ")]
    assert done == list(ABLATIONS)
    assert "clip_visual" in out.stdout and "vision_decoder" in out.stdout
