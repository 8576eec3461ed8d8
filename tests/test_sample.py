"""The static-cache sampler (model.Sampler) and best-of-N drawing (sample.Pipeline.draw), on tiny models."""

import numpy as np
import pytest
import torch
from conftest import TINY_F4

from model import GPT, GPTConfig, Sampler, draw, exponential_noise, row_keys
from sample import Pipeline
from utils import UserError
from vqgan import VQGAN

# A non-square grid catches row/column mix-ups; captions shorter than text_len are allowed.
TINY = dict(codebook_size=32, grid_rows=3, grid_cols=4, n_layer=2, n_head=2, n_embd=32, text_len=6,
            text_vocab_size=20, text_n_layer=1, text_n_head=2, text_n_embd=16)
T = 12  # codes per picture


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**TINY)).eval()
    # A fresh model predicts nearly uniformly, and so would hide a wrong cache slot or a swapped stream: larger
    # weights make every logit depend strongly on the caption, the position and the codes so far.
    with torch.no_grad():
        for name, param in gpt.named_parameters():
            if not name.startswith("text_encoder") and param.dim() > 1:
                param.normal_(0, 0.3)
    return gpt


def captions() -> torch.Tensor:
    # a long caption, a short one, and an empty one (all padding)
    return torch.tensor([[3, 4, 5, 6, 7, 8], [9, 2, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])


def random_codes(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["codebook_size"], (batch, T), generator=torch.Generator().manual_seed(seed))


def keys_of(rows: range, seed: int = 0) -> torch.Tensor:
    return row_keys(seed, rows)[:, 0]


def reference_sample(model: GPT, text: torch.Tensor, keys: torch.Tensor, cfg_scale: float, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Sampling written the slow, obvious way: full uncached forwards over the prefix for every code, the
    conditional and the unconditional stream apart."""
    V, n = model.config.codebook_size, len(text)
    if cfg_scale == 0:
        text = torch.zeros_like(text)
    codes = torch.zeros(n, 0, dtype=torch.long)
    with torch.no_grad():
        for t in range(T):
            padded = torch.cat([codes, torch.zeros(n, 1, dtype=torch.long)], dim=1)
            logits = cond = model(padded, text)[0][:, -1]
            if cfg_scale not in (0, 1):
                uncond = model(padded, torch.zeros_like(text))[0][:, -1]
                logits = uncond + cfg_scale * (cond - uncond)
            code = draw(logits, exponential_noise(keys, torch.tensor([t * V]), V), temperature, top_k, top_p)
            codes = torch.cat([codes, code[:, None]], dim=1)
    return codes.view(n, 3, 4)


# --- the static caches ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_logits_equal_the_full_forward_at_every_position(model, cfg_scale):
    codes, text = random_codes(3), captions()
    text[0, -1] = 0  # its last column all padding
    full = model(codes, text)[0]
    null = model(codes, torch.zeros_like(text))[0]
    sampler = Sampler(model, 3, cfg_scale)
    sampler.prefill(text[:, :5])  # shorter than text_len: prefill pads it
    tokens, cond, uncond = torch.full((3,), model.start_token), [], []
    for t in range(T):
        step = sampler.logits(tokens, torch.tensor([t]))
        cond.append(step[0])
        uncond.append(step[1])
        tokens = codes[:, t]
    # fp32 on both sides; they differ only in summation order (a masked static cache of 12 slots against a
    # causal mask, one query against all), which moves logits of size ~6 by a few 1e-6. A stale slot, a wrong
    # position or a swapped stream moves them by order 1 (checked below), far beyond 1e-4.
    tolerance = dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(torch.stack(cond, dim=1), full, **tolerance)
    if cfg_scale == 1.0:
        assert all(u is None for u in uncond)  # no unconditional stream at all
    else:
        torch.testing.assert_close(torch.stack(uncond, dim=1), null, **tolerance)
    assert (full - null).abs().max() > 1 and (full[:, 1:] - full[:, :-1]).abs().max() > 1


def test_broadcast_null_keys_and_values_equal_the_duplicated_null_caption(model):
    sampler = Sampler(model, 3, cfg_scale=2.0)
    sampler.prefill(captions())
    block = model.blocks[0]
    x = torch.randn(6, 1, TINY["n_embd"], generator=torch.Generator().manual_seed(0))
    text_kv = (sampler.text_k[0], sampler.text_v[0])
    null_kv = (sampler.null_k[0], sampler.null_v[0])
    assert null_kv[0].shape[0] == 1  # held once, not once per row
    got = block.cross_attn(x, text_kv, sampler.text_bias, null_kv)
    # the reference: three more caption rows that are the null caption, every token visible
    duplicated = tuple(torch.cat([t, n.expand_as(t)]) for t, n in zip(text_kv, null_kv, strict=True))
    bias = torch.cat([sampler.text_bias, torch.zeros_like(sampler.text_bias)])
    torch.testing.assert_close(got, block.cross_attn(x, duplicated, bias), atol=1e-6, rtol=1e-5)
    # and the null caption's K/V are those of the model's null context, projected
    context, _ = model.encode_text(torch.zeros(1, TINY["text_len"], dtype=torch.long))
    torch.testing.assert_close(null_kv[0], block.cross_attn.text_kv(context)[0])


# --- sampling ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
def test_sample_shapes_and_dtypes(model, batch):
    sampler = Sampler(model, 4, cfg_scale=2.0, top_k=5, top_p=0.9)
    text = captions()[:batch].to(torch.uint16)[:, :4]  # uint16 as stored by prepare.py, shorter than text_len
    out = sampler.sample(text, keys_of(range(batch)))
    assert out.shape == (batch, 3, 4) and out.dtype == torch.long
    assert out.min() >= 0 and out.max() < 32
    assert not model.training
    with pytest.raises(ValueError, match="5 captions, but the sampler was built for batches of 4"):
        sampler.sample(captions().repeat(2, 1)[:5], keys_of(range(5)))


@pytest.mark.parametrize("cfg_scale, sampling", [(1.0, {"top_k": 10}), (3.0, {"temperature": 0.8, "top_p": 0.9}),
                                                 (0.0, {}), (1.0, {"temperature": 0.0})])
def test_sampling_matches_the_slow_reference(model, cfg_scale, sampling):
    text, keys = captions(), keys_of(range(3), seed=3)
    sampler = Sampler(model, 3, cfg_scale, **sampling)
    assert torch.equal(sampler.sample(text, keys), reference_sample(model, text, keys, cfg_scale, **sampling))


def test_the_same_keys_give_the_same_codes(model):
    sampler = Sampler(model, 3, cfg_scale=2.0)
    first, again = (sampler.sample(captions(), keys_of(range(3), seed=11)) for _ in range(2))
    other = sampler.sample(captions(), keys_of(range(3), seed=12))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # and another sampler of another batch size, built later, agrees
    assert torch.equal(Sampler(model, 5, cfg_scale=2.0).sample(captions(), keys_of(range(3), seed=11)), first)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_a_rows_codes_depend_on_its_key_alone(model, cfg_scale):
    text, keys = captions(), keys_of(range(3))
    together = Sampler(model, 4, cfg_scale).sample(text, keys)  # a short batch: one row of padding
    alone = Sampler(model, 1, cfg_scale)
    for row in range(3):
        assert torch.equal(alone.sample(text[row : row + 1], keys[row : row + 1]), together[row : row + 1])
    # nor on the other rows: another order, other neighbours
    order = [2, 0, 1]
    shuffled = Sampler(model, 3, cfg_scale).sample(text[order], keys[order])
    assert torch.equal(shuffled, together[order])
    neighbours = torch.tensor([[5, 5, 5, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    mixed = Sampler(model, 3, cfg_scale).sample(torch.cat([text[:1], neighbours]), torch.cat([keys[:1], keys[1:] + 7]))
    assert torch.equal(mixed[0], together[0]) and not torch.equal(mixed[1:], together[1:])


def test_guidance_one_has_no_unconditional_stream(model, monkeypatch):
    rows = []
    encode_text = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda ids: rows.append(len(ids)) or encode_text(ids))
    plain, guided = Sampler(model, 3, cfg_scale=1.0), Sampler(model, 3, cfg_scale=3.0)
    assert (plain.guided, guided.guided) == (False, True)
    assert plain.caches[0].k.shape[0] == plain.caches[0].v.shape[0] == 3 and guided.caches[0].k.shape[0] == 6
    plain.sample(captions(), keys_of(range(3)))
    guided.sample(captions(), keys_of(range(3)))
    # both encode the batch's captions alone: the null caption's K/V were computed once, when built
    assert rows == [3, 3]
    assert guided.null_k.shape[1] == 1


def test_guidance_zero_ignores_the_captions(model):
    keys = keys_of(range(3))
    unconditional = Sampler(model, 3, cfg_scale=0.0).sample(captions(), keys)
    others = torch.tensor([[1, 2, 3, 0, 0, 0], [19, 18, 17, 16, 15, 14], [7, 0, 0, 0, 0, 0]])
    assert torch.equal(Sampler(model, 3, cfg_scale=0.0).sample(others, keys), unconditional)
    # exactly what empty captions give without guidance
    assert torch.equal(Sampler(model, 3, cfg_scale=1.0).sample(torch.zeros_like(others), keys), unconditional)
    assert not torch.equal(Sampler(model, 3, cfg_scale=1.0).sample(captions(), keys), unconditional)


def test_the_compiled_step_compiles_once_and_draws_what_eager_draws(model):
    # The tiniest model: on the CPU inductor builds C++ for the step, tens of seconds the first time on two
    # cores (the compiled code is cached under /tmp afterwards). A C++ compiler is there wherever torch.compile
    # is worth testing; check_compiler is what generate.py asks first.
    from torch._dynamo.utils import counters

    from utils import check_compiler

    try:
        check_compiler(torch.device("cpu"))
    except UserError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    tiniest = GPT(GPTConfig(**{**TINY, "n_layer": 1})).eval()
    text = torch.cat([captions(), captions()[:2].flip(0)])  # 5 captions: batches of 2, 2 and a short 1
    keys = keys_of(range(5))
    torch._dynamo.reset()
    counters.clear()
    compiled = Sampler(tiniest, 2, cfg_scale=3.0, top_k=8, compile=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = [compiled.sample(text[i : i + 2], keys[i : i + 2]) for i in range(0, 5, 2)]
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    eager = Sampler(tiniest, 2, cfg_scale=3.0, top_k=8)
    for i, codes in zip(range(0, 5, 2), got, strict=True):
        assert torch.equal(codes, eager.sample(text[i : i + 2], keys[i : i + 2]))


# --- best-of-N --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    """A Pipeline of a tiny GPT over the tiny VQGAN's 64 codes; no tokenizer: the tests pass token ids."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**{**TINY, "codebook_size": TINY_F4.n_embed})).eval()
    vq = VQGAN(TINY_F4).eval()
    return Pipeline(gpt, vq, vq, None, {})


def candidates_of(text: np.ndarray, keys: torch.Tensor, sampler: Sampler) -> torch.Tensor:
    """Every candidate's codes [N, n, rows, cols], drawn one caption at a time."""
    codes = []
    for row, row_keys_ in zip(text, keys, strict=True):
        codes.append(sampler.sample(torch.from_numpy(row.astype(np.int64)).expand(len(row_keys_), -1), row_keys_))
    return torch.stack(codes)


def text_ids() -> np.ndarray:
    return np.array([[3, 4, 5, 0, 0, 0], [9, 2, 0, 0, 0, 0], [7, 7, 7, 7, 0, 0]], dtype=np.uint16)


def test_one_candidate_is_plain_drawing(pipe):
    text, keys = text_ids(), row_keys(5, range(3))
    sampler = pipe.sampler(2, cfg_scale=3.0)
    drawn = np.concatenate(list(pipe.draw(text, keys, sampler)))
    plain = pipe.sampler(3, cfg_scale=3.0).sample(torch.from_numpy(text.astype(np.int64)), keys[:, 0])
    np.testing.assert_array_equal(drawn, pipe.decode(plain))
    # and the first candidate of best-of-N is that very picture: candidate 0's key is the row's own
    everything = candidates_of(text, row_keys(5, range(3), candidates=2), pipe.sampler(2, cfg_scale=3.0))
    assert torch.equal(everything[:, 0], plain)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_best_of_n_keeps_the_candidate_the_gpt_finds_likeliest(pipe, cfg_scale):
    text, keys = text_ids(), row_keys(0, range(3), candidates=3)
    drawn = np.concatenate(list(pipe.draw(text, keys, pipe.sampler(6, cfg_scale=cfg_scale))))  # 2 captions a batch
    everything = candidates_of(text, keys, pipe.sampler(3, cfg_scale=cfg_scale))
    rows = torch.from_numpy(text.astype(np.int64)).repeat_interleave(3, 0)
    best = pipe.model.score(everything.flatten(0, 1), rows).view(3, 3).argmax(1)
    assert len(set(best.tolist())) > 1  # not always the first candidate: the choice is tested
    np.testing.assert_array_equal(drawn, pipe.decode(everything[torch.arange(3), best]))
    assert drawn.shape == (3, 12, 16, 3) and drawn.dtype == np.uint8
    assert pipe.timings["sampling"] > 0 and pipe.timings["decoding"] > 0
