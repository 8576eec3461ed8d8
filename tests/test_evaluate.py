import base64
import contextlib
import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_F4_SIZE, good_rows, write_dataset
from PIL import Image

import demo
import evaluate
import prepare
import train
from model import GPT, GPTConfig, load_model
from vqgan import save_checkpoint_atomic

# --- Fréchet distance ------------------------------------------------------------------------------------------


def random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def test_identical_sets_are_at_distance_zero():
    features = np.random.default_rng(0).normal(size=(500, 32)) * np.linspace(0.1, 3, 32)
    assert evaluate.fid_of_features(features, features) == pytest.approx(0.0, abs=1e-8)
    # the order of the pictures does not matter
    assert evaluate.fid_of_features(features, features[::-1]) == pytest.approx(0.0, abs=1e-8)


def test_gaussians_differing_only_in_mean():
    rng = np.random.default_rng(1)
    sigma = random_covariance(rng, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    assert evaluate.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)


def test_diagonal_and_commuting_covariances_have_the_closed_form():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 4, size=12), rng.uniform(0.1, 4, size=12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert evaluate.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # the same eigenvalues in a shared rotated basis: the matrices commute, the distance is unchanged
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    sigma1, sigma2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert evaluate.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_general_covariances_match_the_eigenvalues_of_their_product():
    rng = np.random.default_rng(3)
    sigma1, sigma2 = random_covariance(rng, 10), random_covariance(rng, 10)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    # tr((sigma1 sigma2)^(1/2)): sigma1 sigma2 has real non-negative eigenvalues, the squares of its root's
    trace_of_root = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).real).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_of_root
    assert evaluate.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    assert evaluate.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(
        evaluate.frechet_distance(mu2, sigma2, mu1, sigma1), rel=1e-9)


def test_near_singular_covariances_stay_finite_and_non_negative():
    # Far fewer pictures than features, as with a small val set and 2048 Inception features: rank-deficient.
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(12, 256)), rng.normal(size=(12, 256)) + 0.5
    distance = evaluate.fid_of_features(a, b)
    assert math.isfinite(distance) and distance > 0
    assert evaluate.fid_of_features(a, a) == pytest.approx(0.0, abs=1e-8)
    # a covariance that is singular outright (a constant feature) and one nearly so
    a[:, 0] = 1.0
    b[:, 1] = b[:, 2] + 1e-9 * rng.normal(size=12)
    distance = evaluate.fid_of_features(a, b)
    assert math.isfinite(distance) and distance >= 0


def test_too_few_pictures_for_a_covariance_is_an_error():
    with pytest.raises(ValueError, match="N >= 2"):
        evaluate.feature_statistics(np.zeros((1, 4)))


# --- Inception Score -------------------------------------------------------------------------------------------


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = evaluate.inception_score(np.zeros((100, 1008)))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_evenly_spread_predictions_is_the_number_of_classes():
    classes = 7
    logits = np.full((10 * 3 * classes, classes), -60.0)
    logits[np.arange(len(logits)), np.arange(len(logits)) % classes] = 60.0
    mean, std = evaluate.inception_score(logits, splits=10)
    assert mean == pytest.approx(classes, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_of_confident_predictions_of_one_class_is_one():
    logits = np.zeros((50, 5))
    logits[:, 2] = 80.0
    assert evaluate.inception_score(logits)[0] == pytest.approx(1.0, abs=1e-9)


# --- the feature pipeline --------------------------------------------------------------------------------------


class TinyExtractor(torch.nn.Module):
    """A randomly initialised stand-in for Inception: pictures in [-1, 1] -> (features, logits)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.head = torch.nn.Linear(8, 5)
        self.calls: list[int] = []

    def forward(self, x):
        assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
        self.calls.append(len(x))
        features = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return features, self.head(features)


def pictures(n: int, size: int = 24, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_feature_pipeline_shapes_and_batching():
    extractor = TinyExtractor().eval()
    images = pictures(7)
    features, logits = evaluate.extract_features(images, extractor, torch.device("cpu"), batch_size=3)
    assert features.shape == (7, 8) and logits.shape == (7, 5) and features.dtype == np.float64
    assert extractor.calls == [3, 3, 1]
    for batch_size in (1, 7, 100):
        again = evaluate.extract_features(iter(images), extractor, torch.device("cpu"), batch_size)
        np.testing.assert_allclose(again[0], features, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(again[1], logits, rtol=1e-5, atol=1e-6)


def test_feature_pipeline_keeps_the_order_and_statistics_ignore_it():
    extractor = TinyExtractor().eval()
    images = pictures(9)
    features, _ = evaluate.extract_features(images, extractor, torch.device("cpu"), batch_size=4)
    order = np.random.default_rng(0).permutation(9)
    shuffled, _ = evaluate.extract_features([images[i] for i in order], extractor, torch.device("cpu"), 4)
    np.testing.assert_allclose(shuffled, features[order], rtol=1e-5, atol=1e-6)
    mu1, sigma1 = evaluate.feature_statistics(features)
    mu2, sigma2 = evaluate.feature_statistics(shuffled)
    np.testing.assert_allclose(mu1, mu2, atol=1e-6)
    np.testing.assert_allclose(sigma1, sigma2, atol=1e-6)
    assert evaluate.fid_of_features(features, shuffled) == pytest.approx(0.0, abs=1e-6)
    # and a different set of pictures is farther away
    other, _ = evaluate.extract_features(pictures(9, seed=1), extractor, torch.device("cpu"), 4)
    assert evaluate.fid_of_features(features, other) > 1e-4


def test_no_pictures_give_empty_features():
    features, logits = evaluate.extract_features([], TinyExtractor(), torch.device("cpu"), 4)
    assert features.shape[0] == 0 and logits.shape[0] == 0


# --- PSNR ----------------------------------------------------------------------------------------------------


def test_psnr_closed_form():
    a = np.full((2, 8, 8, 3), 100, np.uint8)
    b = a.copy()
    b[0] += 10  # MSE 100 everywhere
    b[1, 0, 0, 0] += 1  # MSE 1 / 192
    expected = [10 * math.log10(255**2 / 100), 10 * math.log10(255**2 * 192)]
    np.testing.assert_allclose(evaluate.psnr(a, b), expected, rtol=1e-12)


# --- Inception: missing package, missing weights, and our glue around pytorch-fid -------------------------------


@pytest.fixture
def no_pytorch_fid(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # `import pytorch_fid...` raises ImportError
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", None)


def test_missing_package_and_weights_say_what_to_install_and_where(no_pytorch_fid, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(evaluate.InceptionUnavailable) as caught:
        evaluate.load_inception(None, torch.device("cpu"))
    message = str(caught.value)
    assert "pip install pytorch-fid" in message
    expected_path = tmp_path / "torch" / "hub" / "checkpoints" / evaluate.FID_WEIGHTS_FILE
    assert str(expected_path) in message and evaluate.FID_WEIGHTS_URL in message
    assert "--inception_weights" in message


def test_missing_package_alone(no_pytorch_fid, tmp_path):
    weights = tmp_path / evaluate.FID_WEIGHTS_FILE
    weights.write_bytes(b"x")
    with pytest.raises(evaluate.InceptionUnavailable) as caught:
        evaluate.load_inception(str(weights), torch.device("cpu"))
    assert "pip install pytorch-fid" in str(caught.value) and "weights" not in str(caught.value)


def test_package_that_fails_to_import_is_explained(monkeypatch, tmp_path):
    # What a torchvision built for another torch does: it raises at import, and not ImportError.
    package = tmp_path / "site" / "pytorch_fid"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "inception.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "pytorch_fid", raising=False)
    monkeypatch.delitem(sys.modules, "pytorch_fid.inception", raising=False)
    with pytest.raises(evaluate.InceptionUnavailable, match="torchvision::nms.*reinstall torchvision"):
        evaluate.load_inception(str(tmp_path / "absent.pth"), torch.device("cpu"))


def fake_pytorch_fid(monkeypatch) -> types.ModuleType:
    """pytorch_fid.inception as far as load_inception uses it: fid_inception_v3 loads weights by URL only."""

    class Network(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1),
                                            torch.nn.Flatten())
            self.fc = torch.nn.Linear(4, 6)

        def forward(self, x):
            assert x.shape[-2:] == (299, 299)
            return self.fc(self.pool(x))

    module = types.ModuleType("pytorch_fid.inception")
    module.FID_WEIGHTS_URL = "https://example.invalid/weights.pth"

    def load_state_dict_from_url(url, **kwargs):
        raise AssertionError("would download")

    def fid_inception_v3():
        network = Network()
        network.load_state_dict(module.load_state_dict_from_url(module.FID_WEIGHTS_URL, progress=True))
        return network

    module.load_state_dict_from_url = load_state_dict_from_url
    module.fid_inception_v3 = fid_inception_v3
    module.Network = Network
    package = types.ModuleType("pytorch_fid")
    package.inception = module
    monkeypatch.setitem(sys.modules, "pytorch_fid", package)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", module)
    return module


def test_weights_come_from_the_given_file_without_download(monkeypatch, tmp_path):
    module = fake_pytorch_fid(monkeypatch)
    torch.manual_seed(1)
    reference = module.Network()
    weights = tmp_path / evaluate.FID_WEIGHTS_FILE
    save_checkpoint_atomic(reference.state_dict(), weights)
    extractor = evaluate.load_inception(str(weights), torch.device("cpu"))
    assert module.load_state_dict_from_url.__name__ == "load_state_dict_from_url"  # put back afterwards
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    features, logits = extractor(x)
    resized = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        pool = reference.pool(resized)
    torch.testing.assert_close(features, pool)
    torch.testing.assert_close(logits, pool @ reference.fc.weight.T)  # the Inception Score's logits: no bias


def test_weights_of_another_network_are_refused(monkeypatch, tmp_path):
    fake_pytorch_fid(monkeypatch)
    weights = tmp_path / "other.pth"
    save_checkpoint_atomic({"something": torch.zeros(3)}, weights)
    with pytest.raises(evaluate.InceptionUnavailable, match="not the FID Inception weights"):
        evaluate.load_inception(str(weights), torch.device("cpu"))
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(evaluate.InceptionUnavailable, match="other.pth"):
        evaluate.load_inception(str(weights), torch.device("cpu"))


def real_pytorch_fid_inception():
    try:
        import pytorch_fid.inception
    except Exception:  # absent, or a torchvision built for another torch
        return None
    return pytorch_fid.inception


@pytest.mark.skipif(real_pytorch_fid_inception() is None,
                    reason="pytorch-fid is not installed here, or its torchvision does not import beside this torch")
def test_features_equal_pytorch_fids_own_network(monkeypatch, tmp_path):
    # The FID architecture with random weights (the real ones cannot be downloaded in tests), read back by
    # load_inception from a file and by pytorch-fid's InceptionV3 wrapper, which takes pictures in [0, 1].
    fid_inception = real_pytorch_fid_inception()
    torch.manual_seed(0)
    weights = tmp_path / evaluate.FID_WEIGHTS_FILE
    monkeypatch.setattr(fid_inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda self, state, *args, **kwargs: None)
    network = fid_inception.fid_inception_v3()
    monkeypatch.undo()
    # Default initialisation shrinks the features to ~1e-7, where any input gives about the same ones: set the
    # batch norms' statistics from a batch so that the features are O(1) and follow the input.
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        network.train()(torch.rand(4, 3, 299, 299) * 2 - 1)
    save_checkpoint_atomic(network.state_dict(), weights)
    extractor = evaluate.load_inception(str(weights), torch.device("cpu"))
    monkeypatch.setattr(fid_inception, "load_state_dict_from_url",
                        lambda *args, **kwargs: torch.load(weights, weights_only=True))
    reference = fid_inception.InceptionV3([fid_inception.InceptionV3.DEFAULT_BLOCK_INDEX]).eval()
    pictures = np.random.default_rng(0).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    features, _ = evaluate.features_of_batch(extractor, pictures, torch.device("cpu"))
    with torch.no_grad():
        expected = reference(torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 255)[0].flatten(1)
    assert np.abs(expected.numpy()).max() > 0.1
    np.testing.assert_allclose(features, expected.double().numpy(), rtol=1e-4, atol=1e-5)


# --- the demo's attribute scorer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def matcher():
    return evaluate.fit_category_matcher(*evaluate.demo_renders(64, seed=0, per_product=2))


def test_colour_and_category_of_demo_renders_are_recognised(matcher):
    images, products = evaluate.demo_renders(64, seed=7, per_product=1)
    accuracy = evaluate.attribute_accuracy(images, products, matcher)
    assert accuracy["colour"] == 1.0
    assert accuracy["category"] >= 0.97, accuracy
    assert accuracy["both"] >= 0.97


def test_renders_at_another_size_are_recognised_too():
    images, products = evaluate.demo_renders(48, seed=3, per_product=1)
    matcher = evaluate.fit_category_matcher(*evaluate.demo_renders(48, seed=0, per_product=2))
    assert evaluate.attribute_accuracy(images, products, matcher)["category"] >= 0.95


def test_noise_and_blank_pictures_score_near_chance(matcher):
    products = list(demo.ALL_PRODUCTS)  # every colour and category equally often
    rng = np.random.default_rng(0)
    chance = evaluate.chance_levels()
    for images in ([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in products],
                   [np.full((64, 64, 3), 255, np.uint8)] * len(products)):
        accuracy = evaluate.attribute_accuracy(images, products, matcher)
        assert abs(accuracy["colour"] - chance["colour"]) < 0.07, accuracy
        assert abs(accuracy["category"] - chance["category"]) < 0.07, accuracy
        assert accuracy["both"] < 0.06, accuracy
    assert chance == {"colour": 1 / 8, "category": 1 / 8, "both": 1 / 64}


def test_silhouette_fills_white_patterns_and_white_products():
    white = np.asarray(demo.render(demo.Product("T恤", "白", "纯色"), 64))  # only its grey outline is foreground
    assert evaluate.silhouette(white).sum() > 3 * demo.foreground_mask(white).sum()
    striped = np.asarray(demo.render(demo.Product("T恤", "红", "条纹"), 64))  # half its body is white stripes
    assert evaluate.silhouette(striped).sum() > 1.5 * demo.foreground_mask(striped).sum()
    assert not evaluate.silhouette(np.full((16, 16, 3), 255, np.uint8)).any()


# --- the val NLL ----------------------------------------------------------------------------------------------


def tiny_model(codebook_size: int = 32, grid: int = 4, text_len: int = 8, vocab: int = 20) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(codebook_size=codebook_size, grid_rows=grid, grid_cols=grid, n_layer=1, n_head=2, n_embd=32,
                       text_len=text_len, text_vocab_size=vocab, text_n_layer=1, text_n_head=2, text_n_embd=16)
    return GPT(config).eval()


def test_val_nll_is_the_mean_code_log_likelihood_in_bits():
    model = tiny_model()
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 32, (5, 16)).astype(np.uint16)
    text = rng.integers(1, 20, (5, 8)).astype(np.uint16)
    text[:, 5:] = 0
    text[3] = 0  # a row without caption
    nll = evaluate.val_nll(model, codes, text, batch_size=2, device=torch.device("cpu"), dtype=torch.float32)
    # directly: -log p of every code given the codes before it and the caption, one row at a time
    total = 0.0
    with torch.no_grad():
        for row in range(5):
            logits, _ = model(torch.from_numpy(codes[row : row + 1].astype(np.int64)),
                              torch.from_numpy(text[row : row + 1].astype(np.int64)))
            log_p = torch.log_softmax(logits[0].double(), dim=-1)
            total -= log_p[torch.arange(16), torch.from_numpy(codes[row].astype(np.int64))].sum().item()
    assert nll == pytest.approx(total / (5 * 16), rel=1e-5)
    # an untrained model is close to uniform over the codebook: about log2(32) = 5 bits per code
    assert nll / math.log(2) == pytest.approx(5.0, abs=0.2)


# --- end to end ----------------------------------------------------------------------------------------------

TEXT_LEN = 32


def run_evaluate(*flags: str) -> tuple[int, dict | None, str]:
    """evaluate.py's main in this process: its exit code, the JSON on stdout, stderr."""
    argv = ["--device", "cpu", "--batch_size", "4", *flags]
    stdout, stderr = io.StringIO(), io.StringIO()
    # main() writes the JSON to the real file descriptor 1; evaluate() and print_summary are what it wraps.
    with contextlib.redirect_stderr(stderr):
        try:
            args = evaluate.build_parser().parse_args(argv)
            result = evaluate.evaluate(args)
            evaluate.print_summary(result)
            json.dump(result, stdout)
            code = 0
        except evaluate.EvaluateError as e:
            print(f"evaluate.py: error: {e}", file=sys.stderr)
            code = 1
    return code, (json.loads(stdout.getvalue()) if code == 0 else None), stderr.getvalue()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, vqgan_ckpt):
    """The demo data at the tiny VQGAN's 32 px, prepared, and a GPT trained for two steps on it."""
    root = tmp_path_factory.mktemp("evaluate")
    demo.write_dataset(root / "source", n_train=24, n_val=10, n_test=2, image_size=TINY_F4_SIZE, seed=5)
    assert prepare.main(["--data_dir", str(root / "source"), "--vqgan_ckpt", str(vqgan_ckpt), "--out_dir",
                         str(root / "data"), "--image_size", str(TINY_F4_SIZE), "--text_len", str(TEXT_LEN),
                         "--batch_size", "16", "--num_workers", "0"]) == 0
    train.main([str(ROOT / "config" / "tiny_cpu.py"), "--data_dir", str(root / "data"), "--out_dir",
                str(root / "out"), "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1"])
    return root


def test_demo_run_end_to_end(demo_run, no_pytorch_fid, tmp_path):
    grid = tmp_path / "pairs.png"
    code, result, stderr = run_evaluate("--ckpt", str(demo_run / "out" / "ckpt.pt"), "--demo", "--cfg_scale", "1",
                                        "--grid", str(grid))
    assert code == 0, stderr
    assert result["images"] == result["real_images"] == result["val_rows"] == 10
    assert result["fid"] is None and "pip install pytorch-fid" in result["skipped"]["fid"]
    assert result["val_bits_per_code"] == pytest.approx(result["val_nll"] / math.log(2))
    assert 0 < result["val_bits_per_code"] < 8  # 64 codes: log2 64 = 6 bits for a uniform guess
    assert 0 < result["recon_psnr"] < 60
    scores = result["demo"]
    assert scores["images"] == 10 and scores["unparsed_captions"] == 0
    for key in ("colour_accuracy", "category_accuracy", "both_accuracy"):
        assert 0 <= scores[key] <= 1
    assert scores["ceiling"]["renders"]["colour"] > 0.85  # 32 px blurs some patterns into the colour
    assert scores["ceiling"]["round_trip"] is not None  # random VQGAN: a poor ceiling, but measured
    assert "val NLL" in stderr and "demo attributes" in stderr and "skipped fid" in stderr
    with Image.open(grid) as sheet:
        assert 4 * 256 < sheet.width < 5 * 256  # four pictures a row: two pairs
    assert "contact sheet of the first 16 pictures" in stderr  # 8 pairs


def test_val_nll_matches_train_loss_of_the_same_rows(demo_run, no_pytorch_fid):
    """The same rows and model: evaluate's bits per code times ln 2 is train.py's loss on them."""
    model, ckpt = load_model(demo_run / "out" / "ckpt.pt")
    meta = train.read_meta(str(demo_run / "data"))
    codes, text = train.open_split(str(demo_run / "data"), "val", meta)
    with torch.no_grad():
        loss = model(torch.from_numpy(codes.astype(np.int64)), torch.from_numpy(text.astype(np.int64)))[1].item()
    code, result, _ = run_evaluate("--ckpt", str(demo_run / "out" / "ckpt.pt"), "--no_inception")
    assert code == 0
    assert result["val_nll"] == pytest.approx(loss, rel=1e-5)
    # with nothing to look at the pictures, none are drawn
    assert result["images"] == 0 and "generation" in result["skipped"]


def write_generated(path: Path, rows: list[tuple[str, np.ndarray]]) -> Path:
    lines = []
    for img_id, picture in rows:
        buffer = io.BytesIO()
        Image.fromarray(picture).resize((128, 128)).save(buffer, "PNG")  # larger than the data, like generate.py
        lines.append(f"{img_id}\t{base64.b64encode(buffer.getvalue()).decode()}\n")
    path.write_text("".join(lines) + "not-a-val-id\tAAAA\nbroken line\n")
    return path


def test_generated_tsv_of_the_real_pictures_scores_the_demo_ceiling(demo_run, no_pytorch_fid, tmp_path):
    """Scoring the val pictures themselves gives about the matcher's own accuracy on renders."""
    ids = (demo_run / "data" / "val.ids.txt").read_text().split()
    captions = prepare.read_captions(demo_run / "source" / "T2I_val.text.tsv")[0]
    rows = demo.make_split("val", 10, TINY_F4_SIZE, seed=5)
    by_id = {img_id: np.asarray(image) for img_id, _, image, _ in rows}
    generated = write_generated(tmp_path / "generated.tsv", [(i, by_id[i]) for i in reversed(ids)])
    code, result, stderr = run_evaluate("--generated", str(generated), "--data_dir", str(demo_run / "data"),
                                        "--demo")
    assert code == 0, stderr
    assert result["images"] == 10 and result["val_bits_per_code"] is None
    assert "val_bits_per_code" in result["skipped"]
    assert result["demo"]["colour_accuracy"] >= 0.8 and result["demo"]["category_accuracy"] >= 0.8
    assert result["warnings"] == {"not a val img_id being scored": 1, "skipped line": 1}
    assert set(captions) >= set(ids)


def test_val_captions_are_the_ones_prepare_stored(tmp_path):
    # prepare.py keeps the first row of a repeated img_id and rejects the rest: score against that caption
    text = tmp_path / "T2I_val.text.tsv"
    text.write_text("a\t红色T恤\nb\t\nb\t蓝色帽子\na\t绿色裤子\n", encoding="utf-8")
    split = evaluate.ValSplit(["a"], np.zeros((1, 4)), np.zeros((1, 8)), tmp_path / "T2I_val.img.tsv", text)
    assert evaluate.val_captions(split) == ["红色T恤"]
    with pytest.raises(evaluate.EvaluateError, match="no caption for 1 val img_id"):
        evaluate.val_captions(dataclasses.replace(split, ids=["a", "b"]))  # b's first row was empty: rejected


def test_hash_split_reads_the_held_out_training_rows(tmp_path, vqgan_ckpt, no_pytorch_fid):
    source = write_dataset(tmp_path / "muge", good_rows(16))
    assert prepare.main(["--data_dir", str(source), "--vqgan_ckpt", str(vqgan_ckpt), "--out_dir",
                         str(tmp_path / "data"), "--image_size", str(TINY_F4_SIZE), "--text_len", "16",
                         "--val_fraction", "0.3", "--batch_size", "8", "--num_workers", "0"]) == 0
    n_val = len((tmp_path / "data" / "val.ids.txt").read_text().split())
    assert n_val > 0
    code, result, stderr = run_evaluate("--generated", str(write_generated(tmp_path / "g.tsv", [])),
                                        "--data_dir", str(tmp_path / "data"))
    assert code == 0, stderr
    # PSNR of the stored codes against the held-out training pictures, fitted as prepare.py fitted them
    assert result["real_images"] == n_val and result["recon_psnr"] is not None
    assert result["settings"]["val_pictures"].endswith("T2I_train.img.tsv")


def test_clear_errors(tmp_path, demo_run):
    code, _, stderr = run_evaluate("--ckpt", str(tmp_path / "none.pt"))
    assert code == 1 and "no checkpoint at" in stderr
    code, _, stderr = run_evaluate("--generated", str(tmp_path / "none.tsv"))
    assert code == 1 and "none.tsv: no such file (--generated)" in stderr
    empty = tmp_path / "g.tsv"
    empty.write_text("")
    code, _, stderr = run_evaluate("--generated", str(empty))
    assert code == 1 and "--generated needs --data_dir" in stderr
    code, _, stderr = run_evaluate("--ckpt", str(demo_run / "out" / "ckpt.pt"), "--source_dir", str(tmp_path))
    assert code == 1 and "check --source_dir" in stderr


def test_cli_writes_one_json_object_on_stdout(demo_run):
    completed = subprocess.run(
        [sys.executable, "evaluate.py", "--ckpt", str(demo_run / "out" / "ckpt.pt"), "--device", "cpu",
         "--no_inception", "--max_images", "3"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["val_rows"] == 3 and completed.stdout.count("\n") == 1
    assert "val NLL" in completed.stderr


def test_demo_flag_on_other_data_is_refused_before_drawing(tmp_path, vqgan_ckpt):
    source = write_dataset(tmp_path / "muge", good_rows(8))
    assert prepare.main(["--data_dir", str(source), "--vqgan_ckpt", str(vqgan_ckpt), "--out_dir",
                         str(tmp_path / "data"), "--image_size", str(TINY_F4_SIZE), "--text_len", "16",
                         "--val_fraction", "0.5", "--batch_size", "8", "--num_workers", "0"]) == 0
    generated = tmp_path / "g.tsv"
    generated.write_text("")
    code, _, stderr = run_evaluate("--generated", str(generated), "--data_dir", str(tmp_path / "data"), "--demo")
    assert code == 1 and "is this the demo data?" in stderr
