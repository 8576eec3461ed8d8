import dataclasses
import math

import pytest
import torch
import torch.nn as nn

from model import (
    GPT,
    PEAK_BF16_FLOPS,
    GPTConfig,
    KVCache,
    filter_logits,
    load_model,
    peak_flops,
    sample_logits,
)
from vqgan import CheckpointError

# A non-square grid catches row/column mix-ups; captions shorter than text_len are allowed.
TINY = dict(codebook_size=32, grid_rows=3, grid_cols=4, n_layer=2, n_head=2, n_embd=32, text_len=6,
            text_vocab_size=20, text_n_layer=1, text_n_head=2, text_n_embd=16)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def captions() -> torch.Tensor:
    # a long caption, a short one, and an empty one (all padding)
    return torch.tensor([[3, 4, 5, 6, 7, 8], [9, 2, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])


def random_codes(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["codebook_size"], (batch, 12), generator=torch.Generator().manual_seed(seed))


def reference_generate(model: GPT, text: torch.Tensor, cfg_scale: float, generator: torch.Generator,
                       **sampling) -> torch.Tensor:
    """Sampling written the slow, obvious way: a full uncached forward over the prefix for every code."""
    codes = torch.zeros(text.shape[0], 0, dtype=torch.long)
    for _ in range(model.config.block_size):
        padded = torch.cat([codes, torch.zeros(text.shape[0], 1, dtype=torch.long)], dim=1)
        logits = model(padded, text)[0][:, -1]
        if cfg_scale != 1.0:
            uncond = model(padded, torch.zeros_like(text))[0][:, -1]
            logits = uncond + cfg_scale * (logits - uncond)
        codes = torch.cat([codes, sample_logits(logits, generator=generator, **sampling)[:, None]], dim=1)
    return codes.view(-1, model.config.grid_rows, model.config.grid_cols)


# --- forward ----------------------------------------------------------------------------------------------


def test_forward_shapes_and_initial_loss():
    model = tiny_model()
    logits, loss = model(random_codes(3), captions())
    assert logits.shape == (3, 12, 32)
    # small initial weights predict nearly uniformly
    assert abs(loss.item() - math.log(32)) < 0.2


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="n_embd 65 is not divisible by n_head 8"):
        GPTConfig(n_embd=65, n_head=8)
    with pytest.raises(ValueError, match="codebook_size 70000"):
        GPTConfig(codebook_size=70000)
    with pytest.raises(ValueError, match="text_vocab_size must be set"):
        GPT(GPTConfig(**{**TINY, "text_vocab_size": 0}))
    with pytest.raises(ValueError, match="unknown model settings"):
        GPTConfig.from_dict({"n_layers": 3})
    with pytest.raises(ValueError, match="at most text_len"):
        tiny_model()(random_codes(1), torch.ones(1, 7, dtype=torch.long))


def test_padding_does_not_change_outputs():
    model = tiny_model()
    codes = random_codes(2)
    short = torch.tensor([[3, 4, 0, 0], [5, 0, 0, 0]])
    longer = torch.cat([short, torch.zeros(2, 2, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(codes, short)[0], model(codes, longer)[0], atol=1e-5, rtol=0)
    # and whatever sits in the text states at masked positions is ignored by the cross-attention
    context, mask = model.encode_text(captions())
    garbage = torch.where(mask[:, :, None], context, torch.randn_like(context) * 100)
    block, x = model.blocks[0], torch.randn(3, 5, 32)
    attn_mask = mask[:, None, None, :]
    torch.testing.assert_close(block(x, block.cross_attn.text_kv(context), attn_mask),
                               block(x, block.cross_attn.text_kv(garbage), attn_mask))
    # while the caption itself does matter
    assert not torch.allclose(model(codes, short)[0], model(codes, short.flip(0))[0])


def test_empty_caption_is_the_null_context():
    model = tiny_model()
    text = captions()
    context, mask = model.encode_text(text)
    dropped, dropped_mask = model.encode_text(text, drop_caption=torch.tensor([True, True, False]))
    torch.testing.assert_close(context[2], model.null_context.detach())
    torch.testing.assert_close(dropped[:2], model.null_context.detach().expand(2, -1, -1))
    assert mask[2].all() and dropped_mask.all()


def test_caption_dropout():
    codes, text = random_codes(3), captions()[:2].repeat(2, 1)[:3]
    model = tiny_model(cond_drop=1.0)
    conditional = model(codes, text)[0]
    unconditional = model(codes, torch.zeros_like(text))[0]
    model.train()  # dropout is 0, so caption dropout is the only thing train mode changes
    torch.testing.assert_close(model(codes, text)[0], unconditional)
    model.config.cond_drop = 0.0
    torch.testing.assert_close(model(codes, text)[0], conditional)
    # at 0.5 each row is either fully conditional or fully unconditional, and both happen
    model.config.cond_drop = 0.5
    torch.manual_seed(0)
    many_codes, many_text = random_codes(1).repeat(64, 1), text[:1].repeat(64, 1)
    logits = model(many_codes, many_text)[0]
    is_cond = torch.isclose(logits, conditional[:1], atol=1e-5).flatten(1).all(1)
    is_uncond = torch.isclose(logits, model.eval()(many_codes[:1], torch.zeros_like(many_text[:1]))[0],
                              atol=1e-5).flatten(1).all(1)
    assert (is_cond ^ is_uncond).all()
    assert 16 < is_uncond.sum() < 48


def test_activation_checkpointing_gives_the_same_gradients():
    codes, text = random_codes(3), captions()
    grads = []
    for recompute in (False, True):
        model = tiny_model(activation_checkpointing=recompute, cond_drop=0.0).train()
        model(codes, text)[1].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


# --- generation ---------------------------------------------------------------------------------------------


def test_cached_logits_equal_the_full_forward_at_every_position():
    model = tiny_model()
    codes, text = random_codes(3), captions()
    full = model(codes, text)[0]
    context, mask = model.encode_text(text)
    text_kv = [block.cross_attn.text_kv(context) for block in model.blocks]
    caches = [KVCache(12) for _ in model.blocks]
    token, stepped = torch.full((3, 1), model.start_token), []
    for t in range(12):
        stepped.append(model.run_blocks(model.embed_codes(token, start=t), text_kv, mask, caches)[:, -1])
        token = codes[:, t : t + 1]
    torch.testing.assert_close(torch.stack(stepped, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch", [1, 3])
def test_generate_shapes_and_dtypes(batch):
    model = tiny_model()
    text = captions()[:batch].to(torch.uint16)[:, :4]  # uint16 as stored by prepare.py, shorter than text_len
    out = model.generate(text, cfg_scale=2.0, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert out.shape == (batch, 3, 4) and out.dtype == torch.long
    assert out.min() >= 0 and out.max() < 32
    assert not model.training


def test_guidance_scale_one_is_plain_conditional_sampling(monkeypatch):
    model = tiny_model()
    text = captions()
    want = reference_generate(model, text, 1.0, torch.Generator().manual_seed(7), top_k=10)
    encoded_rows = []
    encode_text = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda ids: encoded_rows.append(len(ids)) or encode_text(ids))
    got = model.generate(text, cfg_scale=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, want)
    model.generate(text, cfg_scale=2.0)
    assert encoded_rows == [3, 6]  # no unconditional stream at scale 1; one batch of both streams otherwise


def test_guided_sampling_matches_the_slow_reference():
    model = tiny_model()
    text = captions()
    got = model.generate(text, cfg_scale=3.0, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(3))
    want = reference_generate(model, text, 3.0, torch.Generator().manual_seed(3), temperature=0.8, top_p=0.9)
    assert torch.equal(got, want)


def test_generator_makes_sampling_reproducible():
    model = tiny_model()
    text = captions()
    first, again, other = (model.generate(text, cfg_scale=2.0, generator=torch.Generator().manual_seed(s))
                           for s in (11, 11, 12))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_zero_temperature_is_greedy():
    model = tiny_model()
    text = captions()
    greedy = model.generate(text, temperature=0.0)
    assert torch.equal(greedy, reference_generate(model, text, 1.0, None, temperature=0.0))


# --- sampling filters ---------------------------------------------------------------------------------------


def test_top_k_and_top_p_keep_the_right_codes():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()

    def kept(**kw):
        return torch.isfinite(filter_logits(logits, **kw))[0].nonzero().flatten().tolist()

    assert kept(top_k=2) == [1, 3]
    assert kept(top_k=10) == [0, 1, 2, 3]
    assert kept(top_p=0.5) == [1]  # 0.5 alone reaches 0.5
    assert kept(top_p=0.7) == [1, 3]
    assert kept(top_p=0.81) == [1, 2, 3]
    assert kept(top_p=0.0) == [1]  # the most likely code always survives
    assert kept(top_p=1.0) == [0, 1, 2, 3]
    assert kept(top_k=3, top_p=0.6) == [1, 3]
    # draws only ever land on kept codes, in proportion to their renormalised probability
    draws = sample_logits(logits.expand(4000, -1), top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).float().mean().item() - 0.5 / 0.8) < 0.03


# --- optimizer, flops, text encoders, loading ------------------------------------------------------------


def test_optimizer_groups():
    model = tiny_model()
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = (group["params"] for group in optimizer.param_groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert {id(p) for p in decay} == linear_weights
    everything = [id(p) for p in model.parameters()]
    assert sorted(id(p) for p in decay + no_decay) == sorted(everything)
    for param in (model.null_context, model.code_emb.weight, model.row_emb.weight, model.ln_f.weight,
                  model.text_encoder.embeddings.word_embeddings.weight):
        assert any(param is p for p in no_decay)


def test_flops_and_mfu():
    model = tiny_model()
    assert model.flops_per_sample() > 6 * 12 * sum(p.numel() for p in model.blocks.parameters())
    assert model.estimate_mfu(samples_per_iter=10, dt=1.0, peak_flops=model.flops_per_sample() * 20) == 0.5
    assert peak_flops(torch.device("cpu")) is None
    assert dict(PEAK_BF16_FLOPS)["H100"] == 989e12


@pytest.fixture(scope="module")
def pretrained_folder(tmp_path_factory):
    """A tiny BertModel saved as a Hugging Face folder stands in for a downloaded pretrained encoder."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(5)
    folder = tmp_path_factory.mktemp("hf") / "tiny-bert"
    bert = BertModel(BertConfig(vocab_size=30, hidden_size=24, num_hidden_layers=3, num_attention_heads=2,
                                intermediate_size=48, max_position_embeddings=16))
    bert.save_pretrained(folder)
    return folder, bert.state_dict()


@pytest.mark.parametrize("finetune, trained_layers", [(0, []), (1, [2]), (-1, [0, 1, 2])])
def test_pretrained_text_encoder_is_frozen_but_for_the_top_layers(pretrained_folder, finetune, trained_layers):
    folder, saved = pretrained_folder
    model = tiny_model(text_encoder=str(folder), text_finetune_layers=finetune, text_vocab_size=0).train()
    encoder = model.text_encoder
    torch.testing.assert_close(encoder.embeddings.word_embeddings.weight, saved["embeddings.word_embeddings.weight"])
    for i, layer in enumerate(encoder.encoder.layer):
        assert all(p.requires_grad == (i in trained_layers) for p in layer.parameters())
    assert encoder.embeddings.word_embeddings.weight.requires_grad == (finetune == -1)
    assert encoder.training == bool(trained_layers)  # a frozen encoder stays in eval mode (no dropout)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all((id(p) in optimized) == p.requires_grad for p in model.parameters())


def test_checkpoint_rebuilds_the_model_offline(pretrained_folder, tmp_path):
    folder, _ = pretrained_folder
    model = tiny_model(text_encoder=str(folder), text_finetune_layers=1, text_vocab_size=0)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}, path)
    assert torch.load(path, weights_only=True)["model_config"]["text_config"]["model_type"] == "bert"
    gone = folder.rename(folder.with_name("moved-away"))  # the encoder folder is not needed any more
    try:
        loaded, ckpt = load_model(path)
    finally:
        gone.rename(folder)
    assert not loaded.training and ckpt["model_config"]["text_encoder"] == str(folder)
    codes, text = random_codes(2), torch.tensor([[3, 4, 0], [0, 0, 0]])
    torch.testing.assert_close(loaded(codes, text)[0], model(codes, text)[0])


def test_load_model_refuses_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not a train.py checkpoint"):
        load_model(path)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="other.pt"):
        load_model(path)
