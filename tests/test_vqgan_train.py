import contextlib
import dataclasses
import itertools
import random
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import ROOT, TAMING_TINY, requires_fixtures
from PIL import Image

import demo
import utils
from utils import UserError, configure, cosine_lr
from vqgan import (
    VQGAN,
    VQGANConfig,
    images_to_tensor,
    infer_config,
    load_checkpoint_file,
    load_vqgan,
    psnr,
    save_checkpoint_atomic,
)
from vqgan.train import (
    EMACodebook,
    VQGANTrainConfig,
    evaluate,
    main,
    make_optimizers,
    quantize,
    reconstruct,
    restart_dead_codes,
    shuffled_images,
    stream_images,
    train_step,
)

TINY = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(), z_channels=8, embed_dim=8, n_embed=32)
TINY_FLAGS = ["--ch", "32", "--ch_mult", "1,2", "--num_res_blocks", "1", "--attn_levels=", "--z_channels", "8",
              "--embed_dim", "8", "--n_embed", "32"]
DEMO_CKPT = ROOT / "assets" / "vqgan_demo.pt"
# Measured 24.7 dB on these 64 images (24.4 dB on the 256 held-out val images) when the checkpoint was made
# (BENCHMARKS.md); the floor leaves room for another CPU's arithmetic, not for a worse model.
DEMO_PSNR_FLOOR = 23.5


def demo_images(n: int, size: int, seed: int = 7) -> np.ndarray:
    rng = random.Random(seed)
    products = demo.split_products("test-images", n, seed)
    return np.stack([np.asarray(demo.render(p, size, rng)) for p in products])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("vq_data")
    demo.write_dataset(out, n_train=24, n_val=8, n_test=1, image_size=32, seed=0)
    return out


def tiny_args(data_dir, out_dir, *extra: str) -> list[str]:
    return ["--data", str(data_dir / "T2I_train.img.tsv"), "--val_data", str(data_dir / "T2I_val.img.tsv"),
            "--image_size", "32", "--batch_size", "4", "--val_images", "8", "--shuffle_buffer", "8",
            "--out_dir", str(out_dir), "--learning_rate", "1e-3", "--warmup_iters", "1", "--eval_interval", "2",
            *TINY_FLAGS, *extra]


def failure(capsys, argv: list[str]) -> tuple[str, str]:
    """The one line vqgan.train ends with when it exits with status 1, and all it wrote to stderr."""
    capsys.readouterr()  # what earlier calls wrote
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    message = err.splitlines()[-1]
    assert message.startswith("vqgan.train: error: ") and err.endswith(message + "\n")
    return message, err


def error_of(capsys, argv: list[str]) -> str:
    return failure(capsys, argv)[0]


def parse(argv: list[str]) -> VQGANTrainConfig:
    (args,), _ = configure(argv, (VQGANTrainConfig,), "-m vqgan.train", "")
    return args


# --- settings -----------------------------------------------------------------------------------------------


def test_settings_as_train_py_takes_them(tmp_path, capsys):
    args = parse(["--data=a.tsv,b", "--val_data", "v.tsv", "--ch_mult=1,2,4", "--attn_levels=", "--max_iters=7",
                  "--learning_rate", "2e-4", "--warmup_iters=3", "--eval_interval=5", "--init_from=resume"])
    assert (args.data, args.val_data, args.ch_mult, args.attn_levels) == (["a.tsv", "b"], ["v.tsv"], (1, 2, 4), ())
    assert (args.max_iters, args.learning_rate, args.warmup_iters, args.eval_interval) == (7, 2e-4, 3, 5)
    assert args.init_from == "resume"
    recipe = tmp_path / "recipe.py"
    recipe.write_text("data = ['x.tsv']\nch_mult = (1, 2)\nattn_levels = ()\nn_embed = 64\n")
    args = parse([str(recipe), "--n_embed=128"])
    assert (args.data, args.ch_mult, args.n_embed) == (["x.tsv"], (1, 2), 128)
    # the old names are gone, and say so
    for old in ("--max_steps=3", "--lr=1e-3", "--warmup_steps=1", "--eval_every=2", "--ckpt_every=2", "--resume=1"):
        assert f"unknown setting {old.split('=')[0]}" in error_of(capsys, ["--data=x.tsv", old])
    recipe.write_text("data = ['x.tsv']\nmax_steps = 3\n")
    assert f"{recipe}:2: unknown setting 'max_steps'" in error_of(capsys, [str(recipe)])
    assert "--data is needed" in error_of(capsys, [])
    assert "--attn_levels (5,) must name levels of --ch_mult (1, 2)" in error_of(
        capsys, ["--data=x", "--ch_mult=1,2", "--attn_levels=5"])


def test_help_documents_every_setting(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(VQGANTrainConfig):
        assert f"--{f.name}=" in text and f.metadata["help"] in text, f.name


# --- training -----------------------------------------------------------------------------------------------


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = VQGAN(TINY).train()
    args = VQGANTrainConfig(data=["unused"], learning_rate=2e-3, warmup_iters=0)
    x = images_to_tensor(demo_images(8, 32))
    device, dtype = torch.device("cpu"), torch.float32
    optimizers = make_optimizers(model, args, device, dtype)
    restart_dead_codes(model, torch.ones(TINY.n_embed, dtype=torch.bool), model.latents(x), optimizers.optimizer)
    losses = [train_step(model, x, args, step, optimizers, device, dtype)[0]["loss"].item() for step in range(10)]
    assert losses[-1] < 0.8 * losses[0]


def test_the_learning_rate_follows_train_pys_schedule():
    # utils.cosine_lr, shared with train.py: warmup (step + 1) / (warmup + 1), never 0 at the first step
    torch.manual_seed(0)
    model = VQGAN(TINY).train()
    args = VQGANTrainConfig(data=["unused"], learning_rate=1e-3, min_lr=1e-4, warmup_iters=3, max_iters=10)
    device, dtype = torch.device("cpu"), torch.float32
    optimizers = make_optimizers(model, args, device, dtype)
    x = images_to_tensor(demo_images(1, 32))
    rates = []
    for step in (0, 2, 3, 10):
        train_step(model, x, args, step, optimizers, device, dtype)
        rates.append(optimizers.optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([1e-3 / 4, 3e-3 / 4, 1e-3, 1e-4])
    assert rates == [cosine_lr(step, 1e-3, 1e-4, 3, 10) for step in (0, 2, 3, 10)]


def test_quantize_passes_gradients_straight_through():
    model = VQGAN(TINY)
    z = torch.randn(2, TINY.embed_dim, 3, 3, requires_grad=True)
    z_q, codes, codebook_loss, commitment_loss = quantize(model, z)
    assert torch.allclose(z_q, model.quantize.lookup(codes))
    assert torch.equal(codes, model.quantize.codes(z.detach()))
    z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # the identity, as if there were no quantizer
    codebook_loss.backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert commitment_loss.item() == pytest.approx(codebook_loss.item())


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    model = VQGAN(TINY)
    x = images_to_tensor(demo_images(4, 32))
    weight = model.quantize.embedding.weight
    with torch.no_grad():
        weight[16:] = 1000.0  # far from every latent: never chosen
    optimizer = torch.optim.Adam(model.parameters())
    model.quantize.embedding.weight.sum().backward()
    optimizer.step()  # creates the moments that a restart must clear
    z = model.latents(x).detach()
    dead = torch.bincount(model.quantize.codes(z).flatten(), minlength=TINY.n_embed) == 0
    assert dead[16:].all()
    assert restart_dead_codes(model, dead, z, optimizer) == int(dead.sum())
    assert (optimizer.state[weight]["exp_avg"][dead] == 0).all()
    assert weight[16:].abs().max() < 100
    used_after = torch.bincount(model.quantize.codes(z).flatten(), minlength=TINY.n_embed) > 0
    assert used_after[dead].sum() >= dead.sum() // 2


def test_checkpoints_load_with_load_vqgan_and_resume(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    # The patch discriminator switches on at step 2, so both of its paths run and are saved.
    flags = ["--disc_start", "2", "--codebook_ema", "0.9"]
    first = main(tiny_args(tiny_data, out, "--max_iters", "3", "--restart_every", "2", *flags))
    assert first["step"] == 3 and 0 < first["usage"] <= 1 and np.isfinite(first["psnr"])
    ckpt = load_checkpoint_file(out / "ckpt.pt")
    assert ckpt["step"] == 3 and ckpt["config"] == asdict(TINY)
    assert set(ckpt) == {"state_dict", "config", "step", "metrics", "command", "optimizer", "discriminator",
                         "disc_optimizer", "scaler", "codebook_ema", "usage_counts", "train_config", "rng"}
    assert ckpt["metrics"]["step"] == 3 and ckpt["train_config"]["max_iters"] == 3
    assert ckpt["codebook_ema"]["cluster_size"].shape == (TINY.n_embed,)
    export = load_checkpoint_file(out / "vqgan.pt")
    assert set(export) == {"state_dict", "config", "step", "metrics", "command"}
    assert torch.load(out / "vqgan.pt", weights_only=True)["config"] == asdict(TINY)
    for path in (out / "ckpt.pt", out / "vqgan.pt"):
        model = load_vqgan(path)
        assert model.config == TINY and infer_config(model.state_dict()) == TINY
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, ckpt["state_dict"][name]), name
    assert Image.open(out / "reconstructions.png").size == (8 * 32, 2 * 32)  # 8 held-out images

    saved = (out / "ckpt.pt").read_bytes()
    message = error_of(capsys, tiny_args(tiny_data, out, "--max_iters", "5", *flags))  # it would replace ckpt.pt
    assert "ckpt.pt exists: --init_from=resume continues that run" in message
    assert (out / "ckpt.pt").read_bytes() == saved
    main(tiny_args(tiny_data, out, "--max_iters", "5", "--init_from=resume", *flags))
    assert f"resuming {out / 'ckpt.pt'} at step 3" in capsys.readouterr().err
    resumed = load_checkpoint_file(out / "ckpt.pt")
    assert resumed["step"] == 5
    adam_steps = {int(s["step"]) for s in resumed["optimizer"]["state"].values()}
    assert adam_steps == {5}  # continued the saved optimizer, not a fresh one
    assert {int(s["step"]) for s in resumed["disc_optimizer"]["state"].values()} == {3}
    # a training state of another layout (an older version's discriminator) is refused with what to do instead
    resumed["discriminator"] = {f"layers.{name}": value for name, value in resumed["discriminator"].items()}
    save_checkpoint_atomic(resumed, out / "ckpt.pt")
    message = error_of(capsys, tiny_args(tiny_data, out, "--max_iters", "6", "--init_from=resume", *flags))
    assert "this version cannot continue its training state" in message and "--init_from=" in message


def test_ema_codebook_moves_used_codes_to_the_mean_of_their_latents():
    weight = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-3.0, 1.0]])
    ema = EMACodebook(weight, decay=0.5)
    z = torch.tensor([[1.0, 3.0], [2.0, 5.0]]).reshape(1, 2, 1, 2)  # latents (1, 2) and (3, 5)
    codes = torch.tensor([[[0, 1]]])
    for _ in range(30):
        ema.update(weight, z, codes)
    assert torch.allclose(weight[0], torch.tensor([1.0, 2.0]), atol=1e-4)
    assert torch.allclose(weight[1], torch.tensor([3.0, 5.0]), atol=1e-4)
    assert torch.equal(weight[2], torch.tensor([-3.0, 1.0]))  # unused: stays where it is


def test_fine_tuning_starts_from_the_loaded_weights(tiny_data, tmp_path):
    main(tiny_args(tiny_data, tmp_path / "a", "--max_iters", "1"))
    before = load_vqgan(tmp_path / "a" / "vqgan.pt")
    main(tiny_args(tiny_data, tmp_path / "b", "--max_iters", "1", "--learning_rate", "1e-9", "--init_from",
                   str(tmp_path / "a" / "vqgan.pt"), "--ch", "64"))  # size flags yield to the checkpoint
    after = load_vqgan(tmp_path / "b" / "vqgan.pt")
    assert after.config == before.config
    for name, tensor in after.state_dict().items():
        assert torch.allclose(tensor, before.state_dict()[name], atol=1e-5), name


@requires_fixtures
def test_fine_tuning_a_taming_checkpoint(tiny_data, tmp_path):
    taming = TAMING_TINY / "checkpoints" / "last.ckpt"
    main(["--init_from", str(taming), "--data", str(tiny_data / "T2I_train.img.tsv"), "--image_size", "32",
          "--val_images", "4", "--batch_size", "2", "--max_iters", "1", "--disc_start", "0",
          "--out_dir", str(tmp_path)])
    tuned = load_vqgan(tmp_path / "vqgan.pt")
    assert tuned.config == load_vqgan(taming).config and tuned.codebook_size == 1024


def test_resume_without_a_checkpoint_is_a_clear_error(tiny_data, tmp_path, capsys):
    message = error_of(capsys, tiny_args(tiny_data, tmp_path, "--max_iters", "1", "--init_from=resume"))
    assert f"{tmp_path / 'ckpt.pt'}: nothing to resume (--init_from=scratch starts a run)" in message


@pytest.mark.parametrize("where", ["a file", "under a file", "in use"])
def test_an_unusable_out_dir_fails_at_once(tiny_data, tmp_path, capsys, where):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = {"a file": blocker, "under a file": blocker / "out", "in use": tmp_path / "out"}[where]
    # "in use": a run on that folder holds its lock (in this process, which flock treats alike)
    with utils.locked(tmp_path / "out", "vqgan.train run") if where == "in use" else contextlib.nullcontext():
        message, err = failure(capsys, tiny_args(tiny_data, out, "--max_iters", "3"))
    assert str(out) in message
    if where == "in use":
        assert "another vqgan.train run is using" in message
    # at once, in one line: not at the first checkpoint, an eval interval of training later
    assert err == message + "\n" and not (tmp_path / "out" / "ckpt.pt").exists()


def test_image_folders_hold_out_and_skip_bad_files(tmp_path, capsys):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    images = demo_images(5, 48)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / ("sub" if i % 2 else "") / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a picture")
    (folder / "notes.txt").write_text("ignored")
    found = list(stream_images([str(folder)], 32, "pad"))
    assert len(found) == 5 and all(image.shape == (32, 32, 3) for _, image in found)
    assert "broken.jpg: skipped" in capsys.readouterr().err

    held_out = frozenset(label for label, _ in found[:2])
    args = VQGANTrainConfig(data=[str(folder)], image_size=32, shuffle_buffer=2)
    seen = list(itertools.islice(shuffled_images(args, 0, held_out, None), 9))
    originals = {image.tobytes() for _, image in found}
    held_out_images = {image.tobytes() for _, image in found[:2]}
    assert {image.tobytes() for image in seen} == originals - held_out_images
    with pytest.raises(UserError, match="no training images left in .* after holding out the first 256"):
        next(shuffled_images(args, 0, frozenset(label for label, _ in found), None))


def test_worker_processes_decode_the_same_stream(tiny_data):
    args = VQGANTrainConfig(data=[str(tiny_data / "T2I_train.img.tsv")], image_size=32, shuffle_buffer=4)
    here = list(itertools.islice(shuffled_images(args, 3, frozenset(), None), 30))  # more than an epoch
    pool = utils.process_pool(1)
    try:
        there = list(itertools.islice(shuffled_images(args, 3, frozenset(), pool), 30))
    finally:
        pool.shutdown(cancel_futures=True)
    assert [image.tobytes() for image in here] == [image.tobytes() for image in there]


def test_psnr_and_usage_measures(tmp_path):
    torch.manual_seed(0)
    model = VQGAN(TINY).eval()
    images = demo_images(4, 32)
    recon, codes = reconstruct(model, images, batch_size=3)
    assert recon.shape == images.shape and codes.shape == (4, 16, 16)
    metrics = evaluate(model, images, batch_size=3)
    assert metrics["psnr"] == pytest.approx(psnr(images, recon).mean())
    assert metrics["codes_used"] == len(codes.unique()) and 1 <= metrics["perplexity"] <= TINY.n_embed
    assert psnr(images, images)[0] > 100


def test_committed_demo_vqgan_reconstructs_demo_products():
    assert DEMO_CKPT.stat().st_size < 8 * 2**20
    ckpt = load_checkpoint_file(DEMO_CKPT)
    assert "optimizer" not in ckpt and "discriminator" not in ckpt
    model = load_vqgan(DEMO_CKPT)
    assert model.downsample_factor == 8 and VQGANConfig(**ckpt["config"]) == model.config
    images = demo_images(64, 64)
    metrics = evaluate(model, images, batch_size=32)
    assert metrics["psnr"] > DEMO_PSNR_FLOOR
    assert metrics["codes_used"] > model.codebook_size // 4
    recon, _ = reconstruct(model, images, batch_size=32)
    products = demo.split_products("test-images", 64, 7)
    colours_kept = np.mean([demo.foreground_colour(r) == p.colour for r, p in zip(recon, products, strict=True)])
    assert colours_kept > 0.9
