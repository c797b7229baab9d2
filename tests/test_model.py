"""The model's behaviour: what is frozen, where gradients go, the alignments of Eq. 2, inference."""
import copy

import pytest
import torch

from model import ReportGenerator, left_align, load_frozen_llm, tiny


def build(llm_dir, tokenizer, **overrides):
    torch.manual_seed(0)
    cfg = tiny(llm=llm_dir, vision="", **overrides)     # a random encoder, not the demo's
    return ReportGenerator(cfg, load_frozen_llm(cfg), tokenizer)


def batch(tokenizer, B=2, K=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    reports = ["the heart is normal . no pleural effusion .",
               "the heart is enlarged . small left pleural effusion . tube in place ."][:B]
    ids, mask = [], []
    for r in reports:
        row = tokenizer(r, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        ids.append(row)
    L = max(map(len, ids))
    report_mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in ids])
    report_ids = torch.tensor([r + [tokenizer.pad_token_id] * (L - len(r)) for r in ids])
    text = tokenizer([r + " view : frontal ." for r in reports], padding=True, return_tensors="pt")
    return dict(pixel_values=torch.randn(B, K, 3, 112, 112, generator=g), report_ids=report_ids,
                report_mask=report_mask, text_ids=text.input_ids, text_mask=text.attention_mask)


def test_llm_is_frozen_and_bit_identical_after_a_step(llm_dir, tokenizer):
    model = build(llm_dir, tokenizer, grad_checkpointing=True)
    before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**batch(tokenizer))["loss"].backward()
    assert all(p.grad is None for p in model.llm.parameters())
    opt.step()
    after = model.llm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.llm.parameters())


@pytest.mark.parametrize("t2v,rec", [(False, False), (True, False), (False, True), (True, True)])
def test_every_trainable_parameter_gets_a_gradient(llm_dir, tokenizer, t2v, rec):
    model = build(llm_dir, tokenizer, t2v=t2v, rec=rec, grad_checkpointing=True)
    model.train()
    losses = model(**batch(tokenizer))
    assert set(losses) == {"v2t", "loss"} | ({"t2v"} if t2v else set()) | ({"rec"} if rec else set())
    losses["loss"].backward()
    silent = [n for n, p in model.named_parameters()
              if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert silent == []
    # switching a branch off removes its modules, so DDP never sees an unused trainable parameter
    assert hasattr(model, "text_encoder") == t2v and hasattr(model, "vision_decoder") == rec


def test_gradient_checkpointing_gives_the_same_gradients(llm_dir, tokenizer):
    grads = []
    for gc in (False, True):
        model = build(llm_dir, tokenizer, grad_checkpointing=gc)
        assert model.llm.is_activation_checkpointing == gc          # load_frozen_llm turned it on (or not)
        model.train()
        model(**batch(tokenizer))["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_t2v_alignment_is_shifted_by_one(llm_dir, tokenizer):
    """With an 'LLM' whose hidden state is its input plus delta, the right alignment (the position just
    before visual token i predicts E_v,i; padding never sits between the text and E_v) makes L_TVC exactly
    zero for E_v,i = E_v,0 + i*delta and a last text embedding of E_v,0 - delta. Any off-by-one or a pad
    position used as a predictor gives a large loss. (The hidden readout: E_g is the hidden state.)"""
    model = build(llm_dir, tokenizer, rec=False, t2v_readout="hidden")
    dL, Np = model.llm.config.hidden_size, 6
    delta, v0 = torch.randn(dL), torch.randn(dL)
    E_v = (v0 + torch.arange(Np).unsqueeze(1) * delta).expand(2, Np, dL).clone()

    def fake_hidden(x, mask):
        return torch.where(mask.unsqueeze(-1).bool(), x + delta, torch.full_like(x, 1e3))

    model._llm_hidden = fake_hidden
    with torch.no_grad():                         # every text position maps to v0 - delta
        model.text_mapper.weight.zero_()
        model.text_mapper.bias.copy_(v0 - delta)
    text_ids = torch.tensor([[2, 5, 6, 7, 3], [2, 5, 3, 0, 0]])         # different lengths: padding
    text_mask = (text_ids != 0).long()
    assert model.loss_t2v(E_v, text_ids, text_mask).item() == pytest.approx(0.0, abs=1e-8)
    shifted = torch.cat([E_v[:, 1:], E_v[:, -1:] + delta], 1)            # targets one step early
    assert model.loss_t2v(shifted, text_ids, text_mask).item() > 0.1


def test_t2v_sends_its_gradient_to_E_v_through_the_target_only(llm_dir, tokenizer):
    """Eq. 5: L_TVC is a function of E_v(theta_v) as the target; the teacher-forced input E_v is detached.
    So dL_TVC/dE_v must be exactly that of mean ||E_v - E_g||^2 with E_g held fixed: a detached target
    gives zero, an input that is not detached adds the LLM's Jacobian."""
    model = build(llm_dir, tokenizer, rec=False)
    b = batch(tokenizer)
    B, Np, dL = 2, 49, model.llm.config.hidden_size
    E_v = torch.randn(B, Np, dL, requires_grad=True)
    with torch.no_grad():
        E_g = model._read_E_g(model._llm_hidden(*model._t2v_inputs(E_v, b["text_ids"], b["text_mask"]))[:, -Np:])
    (grad,) = torch.autograd.grad(model.loss_t2v(E_v, b["text_ids"], b["text_mask"]), E_v)
    assert torch.allclose(grad, 2 * (E_v - E_g).detach() / (B * Np * dL), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("branch", ["t2v", "rec"])
def test_each_regulariser_alone_reaches_the_vision_encoder(llm_dir, tokenizer, branch):
    """Eq. 5's regularisation terms act on theta_v: L_TVC alone and L_REC alone each give the vision
    encoder and the visual mapper a gradient (the decoder alone could learn, say, a constant image)."""
    model = build(llm_dir, tokenizer, t2v=branch == "t2v", rec=branch == "rec")
    model.train()
    b = batch(tokenizer)
    E_v = model.visual_embeddings(b["pixel_values"])
    loss = model.loss_t2v(E_v, b["text_ids"], b["text_mask"]) if branch == "t2v" else model.loss_rec(E_v, b["pixel_values"])
    loss.backward()
    for name in ("vision_encoder", "visual_mapper"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name


def test_t2v_loss_of_a_padded_batch_equals_each_row_alone(llm_dir, tokenizer):
    model = build(llm_dir, tokenizer, rec=False)
    b = batch(tokenizer)
    E_v = torch.randn(2, 49, model.llm.config.hidden_size)
    both = model.loss_t2v(E_v, b["text_ids"], b["text_mask"])
    alone = [model.loss_t2v(E_v[i:i + 1], b["text_ids"][i:i + 1, :b["text_mask"][i].sum()],
                            b["text_mask"][i:i + 1, :b["text_mask"][i].sum()]) for i in range(2)]
    assert b["text_mask"][0].sum() != b["text_mask"][1].sum()
    assert torch.allclose(both, (alone[0] + alone[1]) / 2, atol=1e-5)

    def E_g(E, ids, mask):                                          # what each row's visual tokens are compared with
        return model._read_E_g(model._llm_hidden(*model._t2v_inputs(E, ids, mask))[:, -E.shape[1]:])
    together = E_g(E_v, b["text_ids"], b["text_mask"])
    for i in range(2):
        n = b["text_mask"][i].sum()
        assert torch.allclose(together[i], E_g(E_v[i:i + 1], b["text_ids"][i:i + 1, :n], b["text_mask"][i:i + 1, :n])[0],
                              atol=1e-5)


def test_left_align():
    x = torch.arange(8.).reshape(2, 4, 1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    y, m = left_align(x, mask)
    assert y[0, :, 0].tolist()[2:] == [0., 1.] and m[0].tolist() == [0, 0, 1, 1]
    assert torch.equal(y[1], x[1])


def test_visual_tokens_are_in_natural_patch_order(llm_dir, tokenizer):
    """With the transformer blocks made identities, token i sees patch i only: changing patch i of the
    image must change visual token i and no other (a shuffled order would move the change elsewhere)."""
    model = build(llm_dir, tokenizer, t2v=False, rec=False)
    with torch.no_grad():
        for layer in model.vision_encoder.layers:
            for lin in (layer.attention.o_proj, layer.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    x = torch.randn(1, 1, 3, 112, 112)
    p, per_row = model.patch_size, 112 // model.patch_size
    for i in (0, 9, 30, 48):
        y = x.clone()
        r, c = divmod(i, per_row)
        y[..., r * p:(r + 1) * p, c * p:(c + 1) * p] += 1.0
        changed = (model.encode_image(x) - model.encode_image(y)).abs().sum(-1)[0] > 1e-6
        assert changed.nonzero().flatten().tolist() == [i]
        changed = (model.visual_embeddings(x) - model.visual_embeddings(y)).abs().sum(-1)[0] > 1e-6
        assert changed.nonzero().flatten().tolist() == [i]            # E_v too: the mapper keeps the order


def test_a_random_vit_mae_knows_where_each_patch_is():
    """transformers 5.24 builds ViT-MAE with all-zero (and frozen) position embeddings; build_vision
    must give the encoder and the decoder MAE's 2-D sin-cos tables. Then the same patch content at two
    places gives two different visual tokens (with zero tables it gave the same one)."""
    from model import build_vision
    mae = build_vision(tiny(vision=""))
    for table in (mae.vit.embeddings.position_embeddings[0, 1:], mae.decoder.decoder_pos_embed[0, 1:]):
        assert not table.requires_grad
        assert table.norm(dim=-1).min() > 1.0                        # sin-cos rows have norm sqrt(d / 2)
        assert torch.cdist(table, table).fill_diagonal_(1.0).min() > 1e-3  # every patch has its own row
    model = ReportGenerator.__new__(ReportGenerator)
    torch.nn.Module.__init__(model)
    model.cfg, model.vision_encoder, model.patch_size = tiny(vision=""), mae.vit, mae.config.patch_size
    z = model.encode_image(torch.zeros(1, 1, 3, 112, 112))[0]           # every patch the same content
    assert (z[0] - z[48]).abs().max() > 1e-2


def test_patchify_matches_mae(llm_dir, tokenizer):
    from model import build_vision
    model = build(llm_dir, tokenizer, t2v=False)
    x = torch.randn(2, 3, 112, 112)
    assert torch.equal(model.patchify(x), build_vision(model.cfg).patchify(x))


def test_reconstruction_of_a_constant_image_is_learnable(llm_dir, tokenizer):
    model = build(llm_dir, tokenizer, t2v=False)
    x = torch.full((2, 1, 3, 112, 112), 0.7)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    first = None
    for _ in range(150):
        loss = model.loss_rec(model.visual_embeddings(x), x)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3 < first


def test_generation_with_left_padding_equals_one_at_a_time(llm_dir, tokenizer):
    model = build(llm_dir, tokenizer).eval()
    dL = model.llm.config.hidden_size
    g = torch.Generator().manual_seed(1)
    prefixes = [torch.randn(n, dL, generator=g) for n in (9, 6, 7)]
    T = max(len(p) for p in prefixes)
    padded = torch.stack([torch.cat([torch.zeros(T - len(p), dL), p]) for p in prefixes])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prefixes])
    together = model.generate_from_embeds(padded, mask, num_beams=3, max_new_tokens=12)
    alone = [model.generate_from_embeds(p[None], torch.ones(1, len(p), dtype=torch.long),
                                        num_beams=3, max_new_tokens=12)[0] for p in prefixes]
    assert together == alone
    assert any(len(r) > 0 for r in alone)


def test_generation_does_not_depend_on_t2v_or_rec(llm_dir, tokenizer):
    """Inference runs the vision-to-text branch alone: a model trained with T2V and Rec generates exactly
    what the same weights generate without those modules, and never calls them."""
    full = build(llm_dir, tokenizer, t2v=True, rec=True).eval()
    v2t = build(llm_dir, tokenizer, t2v=False, rec=False).eval()
    v2t.load_state_dict({k: v for k, v in full.state_dict().items() if k in v2t.state_dict()})
    called = []
    for name in ("text_encoder", "text_mapper", "rec_mapper", "vision_decoder"):
        getattr(full, name).register_forward_hook(lambda *a, name=name: called.append(name))
    x = batch(tokenizer, B=2)["pixel_values"]
    assert full.generate(x, max_new_tokens=10) == v2t.generate(x, max_new_tokens=10)
    assert called == []


def test_checkpoint_state_excludes_the_llm(llm_dir, tokenizer):
    model = build(llm_dir, tokenizer)
    sd = model.trainable_state_dict()
    assert sd and not any(k.startswith("llm.") for k in sd)
    other = build(llm_dir, tokenizer)
    with torch.no_grad():                                           # so that a load that does nothing shows
        for p in other.parameters():
            if p.requires_grad:
                p.add_(1.0)
    other.load_trainable_state_dict(copy.deepcopy(sd))
    assert all(torch.equal(other.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(ValueError, match="missing"):
        other.load_trainable_state_dict({k: v for k, v in sd.items() if "visual_mapper" not in k})


@pytest.mark.parametrize("grad_checkpointing,longer", [(False, "t2v"), (True, "t2v"), (False, "v2t")])
def test_one_llm_pass_gives_the_losses_and_gradients_of_two_passes(llm_dir, tokenizer, grad_checkpointing, longer):
    """forward() stacks the V2T and T2V sequences into one LLM call (padded right and left to one
    length); each loss and every gradient must equal the two separate passes of Eq. 1 and Eq. 2, whichever
    of the two sequences is the longer (the other one is the padded one)."""
    results = []
    for one_pass in (False, True):
        model = build(llm_dir, tokenizer, one_llm_pass=one_pass, grad_checkpointing=grad_checkpointing)
        model.train()
        b = batch(tokenizer, B=2)
        assert b["report_mask"].sum(1).tolist()[0] != b["report_mask"].sum(1).tolist()[1]  # padding in play
        if longer == "v2t":                          # a short text: the T2V rows get the padding
            b["text_ids"], b["text_mask"] = b["text_ids"][:, :3], b["text_mask"][:, :3]
        T1 = model._v2t_inputs(torch.zeros(2, 49, model.llm.config.hidden_size), b["report_ids"], b["report_mask"])[0].shape[1]
        T2 = model._t2v_inputs(torch.zeros(2, 49, model.llm.config.hidden_size), b["text_ids"], b["text_mask"])[0].shape[1]
        assert (T1 > T2) == (longer == "v2t")
        calls = []
        model.llm.model.register_forward_pre_hook(lambda *a: calls.append(1))
        losses = model(**b)
        assert len(calls) == (1 if one_pass else 2)
        losses["loss"].backward()
        results.append(({k: v.item() for k, v in losses.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (l2, g2), (l1, g1) = results
    assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-7)
    assert g1.keys() == g2.keys()
    for n in g1:
        assert torch.allclose(g1[n], g2[n], rtol=1e-4, atol=1e-7), n


def test_word_readout_puts_E_g_in_the_word_embedding_space(llm_dir, tokenizer):
    """t2v_readout="word": E_g is the expected word embedding of the LLM's next-token distribution,
    a convex combination of rows of the input embedding matrix (the default); "hidden" reads the hidden
    state itself."""
    model = build(llm_dir, tokenizer)
    assert model.cfg.t2v_readout == "word"
    h = torch.randn(2, 3, model.llm.config.hidden_size)
    W = model.llm.get_input_embeddings().weight
    expected = torch.softmax(model.llm.lm_head(h), -1) @ W
    assert torch.allclose(model._read_E_g(h), expected, atol=1e-6)
    assert (model._read_E_g(h) - h).abs().max() > 1e-3             # not the hidden state itself
    hidden = build(llm_dir, tokenizer, t2v_readout="hidden")
    assert torch.equal(hidden._read_E_g(h), h)
