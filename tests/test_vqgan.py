import copy
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, ROOT, TAMING_TINY, requires_fixtures
from PIL import Image

from vqgan import (
    VQGAN,
    CheckpointError,
    VQGANConfig,
    images_to_tensor,
    infer_config,
    load_checkpoint_file,
    load_vqgan,
    save_checkpoint_atomic,
    tensor_to_images,
)
from vqgan.model import _exact_fp32

TINY_CKPT = TAMING_TINY / "checkpoints" / "last.ckpt"

# f8 with attention at two levels other than the last, two res blocks, odd widths: nothing like the fixture.
F8 = VQGANConfig(
    ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=2, attn_levels=(2, 3), z_channels=4, embed_dim=8, n_embed=300
)


def small_vqgan(cfg: VQGANConfig = F8, seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(cfg).eval()


# --- parity with taming-transformers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    return torch.load(TAMING_TINY / "reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def tiny():
    return load_vqgan(TINY_CKPT)


@requires_fixtures
def test_encode_reproduces_reference_codes_exactly(tiny, reference):
    codes = tiny.encode(reference["x"])
    assert codes.dtype == torch.long and codes.shape == (2, 16, 16)
    assert torch.equal(codes, reference["codes"])


@requires_fixtures
def test_decode_matches_reference(tiny, reference):
    assert (tiny.decode(reference["codes"]) - reference["decoded_from_codes"]).abs().max() < 1e-4
    assert (tiny.decode(tiny.encode(reference["x"])) - reference["reconstruction"]).abs().max() < 1e-4


@requires_fixtures
def test_fixture_architecture_is_read_off_the_shapes(tiny):
    cfg = tiny.config
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_levels) == (32, (1, 1, 2, 2, 4), 1, (4,))
    assert (cfg.z_channels, cfg.embed_dim, cfg.n_embed) == (32, 32, 1024)
    assert tiny.codebook_size == 1024 and tiny.downsample_factor == 16
    assert not tiny.training and not any(p.requires_grad for p in tiny.parameters())


@requires_fixtures
def test_encode_stays_fp32_under_autocast(tiny, reference):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(tiny.encode(reference["x"]), reference["codes"])


@requires_fixtures
def test_bf16_decode_is_close_and_returns_fp32(tiny, reference):
    # A corner of the grid: bfloat16 convolutions are slow on CPUs, minutes for the whole reference grid. Its
    # fp32 decode stands in for the reference, which test_decode_matches_reference checks against taming.
    codes = reference["codes"][:1, :4, :4]
    images = copy.deepcopy(tiny).to(torch.bfloat16).decode(codes)  # decodes in its weights' dtype
    exact = tiny.decode(codes)
    assert images.dtype == torch.float32 and images.shape == exact.shape == (1, 3, 64, 64)
    assert (images - exact).abs().mean() < 0.05
    assert not torch.equal(images, exact)  # it did run in bfloat16
    assert tiny.quant_conv.weight.dtype == torch.float32  # and on a copy


def test_exact_fp32_encodes_in_full_precision_and_restores_the_global_flags(monkeypatch):
    precision, conv = torch.get_float32_matmul_precision(), torch.backends.cudnn.conv.fp32_precision
    model = small_vqgan()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = model.encode(x)
    seen = []
    quantizer_codes = model.quantize.codes

    def recording(z):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.conv.fp32_precision))
        return quantizer_codes(z)

    monkeypatch.setattr(model.quantize, "codes", recording)
    torch.set_float32_matmul_precision("medium")  # what a training run may have set (train.py sets "high")
    try:
        assert torch.equal(model.encode(x), codes)
        assert seen == [("highest", "ieee")]
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.conv.fp32_precision) == ("medium", conv)
        with pytest.raises(KeyError), _exact_fp32():
            raise KeyError  # restored on the way out of an error too
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.conv.fp32_precision) == ("medium", conv)
        # the legacy getters, which raise RuntimeError when the two APIs were mixed, still read
        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert isinstance(torch.backends.cudnn.allow_tf32, bool)
    finally:
        torch.set_float32_matmul_precision(precision)


# --- real-size architectures with random tensors ------------------------------------------------------------


@pytest.mark.parametrize("name", ["imagenet_f16_1024_keys.json", "imagenet_f16_16384_keys.json"])
def test_full_size_checkpoints_load_and_round_trip(tmp_path, name):
    keys_file = FIXTURES / "taming" / name
    if not keys_file.is_file():
        pytest.skip(f"{keys_file} not found (only present in development)")
    spec = json.loads(keys_file.read_text())
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator) * 0.02 for k, shape in spec["state_dict"].items()}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "global_step": 1, "optimizer_states": []}, path)

    model = load_vqgan(path)
    dd = spec["ddconfig"]
    levels = len(dd["ch_mult"])
    attn_levels = tuple(i for i in range(levels) if dd["resolution"] // 2**i in dd["attn_resolutions"])
    cfg = model.config
    assert (cfg.ch, list(cfg.ch_mult), cfg.num_res_blocks) == (dd["ch"], dd["ch_mult"], dd["num_res_blocks"])
    assert (cfg.attn_levels, cfg.z_channels) == (attn_levels, dd["z_channels"])
    assert (cfg.embed_dim, cfg.n_embed) == (spec["embed_dim"], spec["n_embed"])

    # 64 px rather than the 256 px it was trained at: the same layers (f16, attention at the last level) in a
    # second rather than fifteen
    codes = model.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert codes.shape == (1, 4, 4) and codes.min() >= 0 and codes.max() < spec["n_embed"]
    assert model.decode(codes).shape == (1, 3, 64, 64)


# --- other layouts and file formats -------------------------------------------------------------------------


def test_f8_layout_round_trips_through_a_file(tmp_path):
    model = small_vqgan()
    path = tmp_path / "f8.pt"
    torch.save(model.state_dict(), path)  # a bare state dict
    loaded = load_vqgan(path)
    assert loaded.config == F8 and loaded.downsample_factor == 8
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    codes = loaded.encode(x)
    assert codes.shape == (2, 8, 6)
    assert torch.equal(codes, model.encode(x))
    assert torch.equal(loaded.decode(codes), model.decode(codes))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "config": {"ch": 32}, "optimizer": {}, "step": 3},  # our own training
        lambda sd: {"state_dict": {**sd, "loss.discriminator.main.0.weight": torch.ones(2)}},  # taming
        lambda sd: {"state_dict": {f"first_stage_model.{k}": v for k, v in sd.items()} | {"cond.x": torch.ones(1)}},
    ],
    ids=["ours", "taming-with-loss", "nested-first-stage"],
)
def test_accepted_checkpoint_layouts(tmp_path, wrap):
    model = small_vqgan()
    path = tmp_path / "model.ckpt"
    torch.save(wrap(model.state_dict()), path)
    loaded = load_vqgan(path)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_unexpected_and_missing_tensors_are_listed(tmp_path):
    state = small_vqgan().state_dict()
    path = tmp_path / "extra.pt"
    torch.save({**state, "transformer.head.weight": torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match=r"extra\.pt.*transformer\.head\.weight"):
        load_vqgan(path)
    del state["decoder.up.1.block.2.conv1.bias"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing.*decoder\.up\.1\.block\.2\.conv1\.bias"):
        load_vqgan(path)


def test_a_checkpoint_of_something_else_is_named(tmp_path):
    path = tmp_path / "gpt.pt"
    torch.save({"model": {"wte.weight": torch.ones(2, 2)}, "iter_num": 3}, path)
    with pytest.raises(CheckpointError, match="gpt.pt"):
        load_vqgan(path)


def test_infer_config_needs_a_vqgan():
    with pytest.raises(CheckpointError, match="missing tensor"):
        infer_config({"encoder.conv_in.weight": torch.ones(8, 3, 3, 3)})


# --- safe loading -------------------------------------------------------------------------------------------


class _Payload:
    """Pickles as a call to os.system: what a malicious checkpoint carries."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("container", ["torch-zip", "plain-pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, container):
    marker = tmp_path / "pwned"
    payload = {"state_dict": {"w": [1.0, 2.0]}, "evil": _Payload(f"touch {marker}")}
    path = tmp_path / "evil.ckpt"
    if container == "torch-zip":
        torch.save({**payload, "state_dict": small_vqgan().state_dict()}, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match=r"evil\.ckpt.*refusing to load (os|posix)\.system"):
        load_vqgan(path)
    assert not marker.exists()


def test_lightning_classes_become_inert_placeholders(tmp_path):
    # A stand-in Lightning package whose callback runs a command when constructed from the pickle; the
    # checkpoint is written by an interpreter that can import it and read here, where it cannot be imported.
    marker = tmp_path / "pwned"
    package = tmp_path / "site" / "pytorch_lightning" / "callbacks"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "model_checkpoint.py").write_text(
        "import os\n"
        "class ModelCheckpoint:\n"
        "    def __init__(self, command=None):\n"
        "        if command: os.system(command)\n"
        f"    def __reduce__(self): return ModelCheckpoint, ({f'touch {marker}'!r},)\n"
    )
    path = tmp_path / "cb.ckpt"
    writer = (
        "import torch\n"
        "from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint as MC\n"
        "torch.save({'callbacks': {MC: {'best_model_score': torch.tensor(0.5)}}, 'instance': MC()}, "
        f"{str(path)!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    subprocess.run([sys.executable, "-c", writer], env=env, check=True)

    loaded = load_checkpoint_file(path)
    ((key, value),) = loaded["callbacks"].items()
    assert key.qualname == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert value["best_model_score"].item() == 0.5
    assert isinstance(loaded["instance"], key)
    assert not marker.exists()


@requires_fixtures
def test_fixture_loads_without_pytorch_lightning():
    # A fresh interpreter in which importing Lightning fails, as on a user's machine without it.
    code = (
        "import sys\n"
        "for name in ('pytorch_lightning', 'lightning', 'omegaconf'): sys.modules[name] = None\n"
        "from vqgan import load_vqgan\n"
        f"model = load_vqgan({str(TINY_CKPT)!r})\n"
        "assert 'pytorch_lightning' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print(model.codebook_size)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1024"


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty"),
        (b"this is not a checkpoint at all\n" * 10, "not a readable"),
        (None, "not a readable"),  # truncated: half of a real checkpoint
    ],
    ids=["empty", "garbage", "truncated"],
)
def test_unreadable_files_give_errors_naming_them(tmp_path, content, reason):
    if content is None:
        whole = tmp_path / "whole.ckpt"
        torch.save({"state_dict": small_vqgan().state_dict()}, whole)
        content = whole.read_bytes()[: whole.stat().st_size // 2]
    path = tmp_path / "broken.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"broken\.ckpt.*{reason}"):
        load_vqgan(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.ckpt: no such"):
        load_vqgan(tmp_path / "nowhere.ckpt")


# --- atomic saving ------------------------------------------------------------------------------------------


def test_atomic_save_replaces_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint_atomic({"step": 1}, path)
    save_checkpoint_atomic({"step": 2}, path)
    assert load_checkpoint_file(path) == {"step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_atomic_save_gives_the_usual_file_permissions(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint_atomic({"step": 1}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint_atomic({"step": 1}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        save_checkpoint_atomic({"step": 2, "unpicklable": lambda: None}, path)
    assert load_checkpoint_file(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


# --- pixels <-> model range ---------------------------------------------------------------------------------


def test_uint8_images_round_trip_exactly():
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 8, 6, 3), dtype=np.uint8)
    x = images_to_tensor(pixels)
    assert x.shape == (2, 3, 8, 6) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert np.array_equal(tensor_to_images(x), pixels)


def test_pil_images_are_accepted():
    image = Image.new("RGB", (5, 4), (255, 0, 10))
    x = images_to_tensor(image)
    assert x.shape == (1, 3, 4, 5)
    assert x[0, :, 0, 0].tolist() == pytest.approx([1.0, -1.0, 10 / 127.5 - 1])
    assert images_to_tensor([image, image]).shape == (2, 3, 4, 5)


def test_tensor_to_images_clamps():
    assert tensor_to_images(torch.tensor([-3.0, 0.0, 3.0]).view(1, 3, 1, 1)).tolist() == [[[[0, 128, 255]]]]


def test_wrong_array_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        images_to_tensor(np.zeros((4, 4, 3), dtype=np.float32))


def test_codes_of_saved_and_loaded_model_match(tmp_path):
    # Path, str and device arguments are all accepted.
    model = small_vqgan(seed=1)
    path = Path(tmp_path) / "m.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(load_vqgan(str(path), device=torch.device("cpu")).encode(x), model.encode(x))
