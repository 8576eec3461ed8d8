import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (
    GPT,
    PEAK_BF16_FLOPS,
    GPTConfig,
    adamw,
    attention_bias,
    draw,
    exponential_noise,
    filter_logits,
    load_model,
    load_trained,
    peak_flops,
    row_keys,
)
from scorer import Scorer, load_scorer
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


# --- forward ----------------------------------------------------------------------------------------------


def test_forward_shapes_and_initial_loss():
    model = tiny_model()
    logits, loss = model(random_codes(3), captions())
    assert logits.shape == (3, 12, 32)
    # small initial weights predict nearly uniformly
    assert abs(loss.item() - math.log(32)) < 0.2
    # codes of a larger grid (data prepared for another model) are named, not an index error deep inside
    with pytest.raises(ValueError, match="13 codes per image, but the grid holds 12"):
        model(torch.zeros(3, 13, dtype=torch.long), captions())


def test_score_is_each_grids_mean_log_likelihood_whatever_the_slices():
    model = tiny_model()
    codes, text = random_codes(3), captions()
    scores = model.score(codes.view(3, 3, 4), text, chunk=2)  # grids as the sampler returns them, in two slices
    for i in range(3):
        _, loss = model(codes[i : i + 1], text[i : i + 1])
        assert scores[i].item() == pytest.approx(-loss.item(), rel=1e-5)
    # greedy decoding, one code at a time, finds grids the model likes better than random ones
    likely = torch.zeros_like(codes)
    for t in range(12):
        likely[:, t] = model(likely, text)[0][:, t].argmax(-1)
    assert (model.score(likely, text) > model.score(codes, text)).all()


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
    with pytest.raises(ValueError, match="cond_drop 1.5"):
        GPTConfig(cond_drop=1.5)


def test_data_fields_are_plain_fields_and_the_model_fields_settings():
    # train.py takes the data's fields from meta.json: a recipe or flag must not be able to set them
    settings = {f.name for f in dataclasses.fields(GPTConfig) if "help" in f.metadata}
    data = {"codebook_size", "grid_rows", "grid_cols", "text_len", "text_encoder", "text_vocab_size", "text_config"}
    assert not settings & data and {"n_layer", "n_embd", "cond_drop"} <= settings


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
    bias = attention_bias(mask, torch.float32)
    torch.testing.assert_close(block(x, block.cross_attn.text_kv(context), bias),
                               block(x, block.cross_attn.text_kv(garbage), bias))
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


# --- sampling filters, draws and their random numbers ------------------------------------------------------


def test_top_k_and_top_p_keep_the_right_codes():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()

    def kept(**kw):
        return torch.isfinite(filter_logits(logits, **kw))[0].nonzero().flatten().tolist()

    assert kept(top_k=2) == [1, 3]
    assert kept(top_k=10) == [0, 1, 2, 3]
    assert kept(top_k=0) == [0, 1, 2, 3]  # 0 is off (--sweep top_k=0)
    assert kept(top_p=0.5) == [1]  # 0.5 alone reaches 0.5
    assert kept(top_p=0.7) == [1, 3]
    assert kept(top_p=0.81) == [1, 2, 3]
    assert kept(top_p=0.0) == [1]  # the most likely code always survives
    assert kept(top_p=1.0) == [0, 1, 2, 3]
    assert kept(top_k=3, top_p=0.6) == [1, 3]


N_DRAWS = 20000


@pytest.fixture(scope="module")
def many_keys() -> torch.Tensor:
    return row_keys(0, range(N_DRAWS))[:, 0]


def frequencies(codes: torch.Tensor, width: int) -> torch.Tensor:
    return torch.bincount(codes, minlength=width).double() / len(codes)


def assert_binomial_close(freq: torch.Tensor, probs: torch.Tensor, n: int) -> None:
    # 5 binomial standard deviations: a fair sampler fails this with odds below 1e-5 per code, while the
    # mistakes it is for (temperature or filter ignored, biased noise) move some frequency by 10 or more.
    sd = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * sd + 1e-12).all(), (freq, probs)


def test_draw_frequencies_follow_the_tempered_softmax(many_keys):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    noise = exponential_noise(many_keys, torch.tensor([0]), 5)
    for temperature in (1.0, 0.7):
        codes = draw(logits.expand(N_DRAWS, -1), noise, temperature)
        expected = F.softmax(logits.double() / temperature, dim=-1)
        assert_binomial_close(frequencies(codes, 5), expected, N_DRAWS)
    # the two temperatures are far apart at this many draws: the check above can tell them apart
    assert (F.softmax(logits.double(), -1) - F.softmax(logits.double() / 0.7, -1)).abs().max() > 0.1
    # temperature 0 is the argmax, whatever the noise
    assert (draw(logits.expand(N_DRAWS, -1), noise, 0.0) == 0).all()


def test_draws_land_only_on_kept_codes_in_proportion(many_keys):
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3], dtype=torch.float64)
    logits = probs.float().log().expand(N_DRAWS, -1)
    noise = exponential_noise(many_keys, torch.tensor([7 * 4]), 4)
    for kw, kept in (({"top_k": 2}, [1, 3]), ({"top_p": 0.7}, [1, 3]), ({"top_p": 0.81}, [1, 2, 3])):
        freq = frequencies(draw(logits, noise, 1.0, **kw), 4)
        assert freq.nonzero().flatten().tolist() == kept, kw
        renormalised = torch.zeros(4, dtype=torch.float64)
        renormalised[kept] = probs[kept] / probs[kept].sum()
        assert_binomial_close(freq, renormalised, N_DRAWS)


def test_exponential_noise_is_exp_1(many_keys):
    width = 64
    noise = exponential_noise(many_keys, torch.tensor([3 * width]), width).double().flatten()
    n = len(noise)
    assert noise.shape == (N_DRAWS * width,) and noise.dtype == torch.float64
    assert torch.isfinite(noise).all() and (noise > 0).all()  # draw() takes its log
    # Exp(1) has mean 1 and s.d. 1: the mean of n draws is within 5 / sqrt(n) of 1
    assert abs(noise.mean().item() - 1) < 5 / math.sqrt(n)
    assert abs(noise.std().item() - 1) < 0.02
    # Kolmogorov-Smirnov against 1 - exp(-x): 1.95 / sqrt(n) is the 0.1 % critical value
    ordered = noise.sort().values
    cdf = 1 - torch.exp(-ordered)
    steps = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum(steps - cdf, cdf - (steps - 1 / n)).max().item()
    assert ks < 1.95 / math.sqrt(n), ks


def test_exponential_noise_depends_on_the_key_and_counter_only(many_keys):
    keys = many_keys[:4096]
    width = 32
    base = exponential_noise(keys, torch.tensor([0]), width)
    # a row's noise is the same alone or in any batch, and offsets are plain counters
    torch.testing.assert_close(exponential_noise(keys[10:11], torch.tensor([0]), width), base[10:11], rtol=0, atol=0)
    torch.testing.assert_close(exponential_noise(keys, torch.tensor([8]), 8), base[:, 8:16], rtol=0, atol=0)
    torch.testing.assert_close(exponential_noise(keys, 0, width), base, rtol=0, atol=0)

    def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
        return torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1].item()

    # other counters, other keys, neighbouring keys: different and uncorrelated (s.d. of r: 1 / sqrt(131072))
    for other in (exponential_noise(keys, torch.tensor([width]), width), exponential_noise(keys + 1, 0, width),
                  exponential_noise(keys.roll(1), 0, width), exponential_noise(torch.arange(4096), 0, width)):
        assert (other != base).float().mean() > 0.99
        assert abs(correlation(other, base)) < 0.015
    # nor is a key's stream another key's shifted by a few counters (as hash(key + counter) would make it)
    assert (exponential_noise(keys + 1, 0, width)[:, :-1] != base[:, 1:]).float().mean() > 0.99
    sequential = exponential_noise(torch.arange(4096), 0, width)
    assert abs(correlation(sequential[1:], sequential[:-1])) < 0.015


def test_row_keys():
    keys = row_keys(7, range(5), candidates=3)
    assert keys.shape == (5, 3) and keys.dtype == torch.int64
    assert ((keys >= 0) & (keys < 2**32)).all() and len(set(keys.flatten().tolist())) == 15
    # a row's first candidate is the row drawn alone; a row's keys do not depend on the rows around it
    assert torch.equal(keys[:, 0], row_keys(7, range(5))[:, 0])
    assert torch.equal(keys[2:4], row_keys(7, range(2, 4), candidates=3))
    assert not torch.equal(keys, row_keys(8, range(5), candidates=3))


# --- optimizer, flops, text encoders, loading ------------------------------------------------------------


def test_optimizer_groups():
    model = tiny_model()
    optimizer = adamw(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = (group["params"] for group in optimizer.param_groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert {id(p) for p in decay} == linear_weights
    everything = [id(p) for p in model.parameters()]
    assert sorted(id(p) for p in decay + no_decay) == sorted(everything)
    for param in (model.null_context, model.code_emb.weight, model.row_emb.weight, model.ln_f.weight,
                  model.text_encoder.embeddings.word_embeddings.weight):
        assert any(param is p for p in no_decay)


def test_flops():
    model = tiny_model()
    assert model.flops_per_sample() > 6 * 12 * sum(p.numel() for p in model.blocks.parameters())
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
    optimizer = adamw(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all((id(p) in optimized) == p.requires_grad for p in model.parameters())


def test_checkpoint_rebuilds_the_model_offline(pretrained_folder, tmp_path):
    folder, _ = pretrained_folder
    model = tiny_model(text_encoder=str(folder), text_finetune_layers=1, text_vocab_size=0)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config), "kind": "gpt"}, path)
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


def test_checkpoints_say_which_model_they_hold(tmp_path):
    torch.manual_seed(0)
    scorer = Scorer(GPTConfig(**TINY))
    path = tmp_path / "scorer.pt"
    torch.save({"model": scorer.state_dict(), "model_config": dataclasses.asdict(scorer.config), "kind": "scorer"},
               path)
    with pytest.raises(CheckpointError, match="holds a scorer, not a gpt"):
        load_model(path)
    loaded, _ = load_scorer(path)
    codes, text = random_codes(2), captions()[:2]
    torch.testing.assert_close(loaded.score(codes, text), scorer.eval().score(codes, text))
    # a compiled model's state dict (`_orig_mod.` names) loads too
    gpt = tiny_model()
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in gpt.state_dict().items()},
                "model_config": dataclasses.asdict(gpt.config), "kind": "gpt"}, path)
    torch.testing.assert_close(load_trained(path, GPT)[0](codes, text)[0], gpt(codes, text)[0])
    with pytest.raises(CheckpointError, match="holds a gpt, not a scorer"):
        load_scorer(path)


# --- the scorer -----------------------------------------------------------------------------------------------


def tiny_scorer(seed: int = 0, **overrides) -> Scorer:
    torch.manual_seed(seed)
    return Scorer(GPTConfig(**{**TINY, **overrides})).eval()


def test_fresh_scorer_loss_is_about_ln_batch():
    d, batch = 128, 16
    scorer = tiny_scorer(n_embd=d)
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 32, (batch, 3, 4), generator=generator)
    text = torch.randint(1, 20, (batch, 6), generator=generator)
    logits, loss = scorer(codes, text)
    assert logits.shape == (batch, batch)
    # Fresh embeddings are random unit vectors: cosines of s.d. 1/sqrt(d), times the logit scale 1/0.07, and a
    # log-sum-exp of such logits exceeds ln(B) by about half their variance.
    spread = (1 / 0.07) ** 2 / d
    assert abs(loss.item() - math.log(batch)) < spread / 2
    # the loss is InfoNCE both ways: pictures choosing captions and captions choosing pictures
    targets = torch.arange(batch)
    both = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    torch.testing.assert_close(loss, both)


def test_scorer_learns_a_toy_pairing():
    # caption i (tokens i+1 and 19-i) goes with the picture of code 3i everywhere
    batch = 8
    codes = (torch.arange(batch)[:, None] * 3).expand(batch, 12)
    text = torch.zeros(batch, 6, dtype=torch.long)
    text[:, 0], text[:, 1] = torch.arange(batch) + 1, 19 - torch.arange(batch)
    scorer = tiny_scorer().train()
    optimizer = adamw(scorer, 0.0, 3e-3, (0.9, 0.95), "cpu")
    first = scorer(codes, text)[1].item()
    for _ in range(25):
        loss = scorer(codes, text)[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = scorer.eval()(codes, text)[1].item()
    assert trained < 0.25 * first and trained < 0.5 * math.log(batch)
    # and each picture's own caption now scores highest
    logits, _ = scorer(codes, text)
    assert torch.equal(logits.argmax(1), torch.arange(batch))


def test_score_is_the_diagonal_of_forward_over_the_scale():
    scorer = tiny_scorer()
    codes = random_codes(4).view(4, 3, 4)
    text = torch.cat([captions()[:2], captions()[:2].flip(1)])  # captions with text: no empty one
    logits, _ = scorer(codes, text)
    scores = scorer.score(codes, text)
    torch.testing.assert_close(scores, logits.diagonal() / scorer.logit_scale.exp(), rtol=1e-5, atol=1e-6)
    assert scores.abs().max() <= 1 + 1e-6  # cosines
    # embeddings are unit vectors, and a flat grid [B, rows*cols] reads as its [B, rows, cols] shape
    images = scorer.embed_images(codes.flatten(1))
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(images, scorer.embed_images(codes))
    torch.testing.assert_close(scorer.embed_captions(text).norm(dim=-1), torch.ones(4))
    # padding does not change a caption's embedding
    torch.testing.assert_close(scorer.embed_captions(text[1:2, :2]), scorer.embed_captions(text[1:2]))
    assert np.isfinite(scorer.flops_per_sample()) and scorer.flops_per_sample() > 0
