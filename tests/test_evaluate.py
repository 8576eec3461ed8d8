import base64
import io
import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_F4_SIZE, good_rows, write_dataset
from PIL import Image

import data
import demo
import evaluate
import prepare
import sample
import train
from model import GPT, GPTConfig, load_model
from utils import batched
from vqgan import images_to_tensor, save_checkpoint_atomic

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


@pytest.fixture
def tiny_inception(monkeypatch, tmp_path):
    """load_inception's extractor, with a small random network in pytorch-fid's place."""
    module = fake_pytorch_fid(monkeypatch)
    torch.manual_seed(0)
    weights = tmp_path / evaluate.FID_WEIGHTS_FILE
    save_checkpoint_atomic(module.Network().state_dict(), weights)
    return evaluate.load_inception(str(weights), torch.device("cpu"))


def extract_features(pictures, extractor, batch_size):
    """Features and logits of every picture, in order, batch after batch as evaluate.Judges takes them."""
    batches = [extractor(np.stack(chunk)) for chunk in batched(pictures, batch_size)]
    return tuple(np.concatenate(parts) for parts in zip(*batches, strict=True))


def pictures(n: int, size: int = 24, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_feature_pipeline_shapes_and_batching(tiny_inception):
    images = pictures(7)
    features, logits = extract_features(images, tiny_inception, batch_size=3)
    assert features.shape == (7, 4) and logits.shape == (7, 6)
    assert features.dtype == logits.dtype == np.float64
    for batch_size in (1, 7, 100):
        again = extract_features(iter(images), tiny_inception, batch_size)
        np.testing.assert_allclose(again[0], features, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(again[1], logits, rtol=1e-5, atol=1e-6)


def test_feature_pipeline_keeps_the_order_and_statistics_ignore_it(tiny_inception):
    images = pictures(9)
    features, _ = extract_features(images, tiny_inception, batch_size=4)
    order = np.random.default_rng(0).permutation(9)
    shuffled, _ = extract_features([images[i] for i in order], tiny_inception, 4)
    np.testing.assert_allclose(shuffled, features[order], rtol=1e-5, atol=1e-6)
    mu1, sigma1 = evaluate.feature_statistics(features)
    mu2, sigma2 = evaluate.feature_statistics(shuffled)
    np.testing.assert_allclose(mu1, mu2, atol=1e-6)
    np.testing.assert_allclose(sigma1, sigma2, atol=1e-6)
    assert evaluate.fid_of_features(features, shuffled) == pytest.approx(0.0, abs=1e-6)
    # and a different set of pictures is farther away
    other, _ = extract_features(pictures(9, seed=1), tiny_inception, 4)
    assert evaluate.fid_of_features(features, other) > 1e-4


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
    pictures = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    features, logits = extractor(pictures)
    resized = torch.nn.functional.interpolate(images_to_tensor(pictures), size=(299, 299), mode="bilinear",
                                              align_corners=False)
    with torch.no_grad():
        pool = reference.pool(resized)
    assert features.dtype == logits.dtype == np.float64
    torch.testing.assert_close(torch.from_numpy(features), pool.double())
    torch.testing.assert_close(torch.from_numpy(logits), (pool @ reference.fc.weight.T).double())  # IS logits: no bias


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
    features, _ = extractor(pictures)
    with torch.no_grad():
        expected = reference(torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 255)[0].flatten(1)
    assert np.abs(expected.numpy()).max() > 0.1
    np.testing.assert_allclose(features, expected.double().numpy(), rtol=1e-4, atol=1e-5)


# --- R-precision -----------------------------------------------------------------------------------------------


class FakeGrader:
    """Embeds a picture's codes and a caption's token ids as given by two functions of the row they stand for."""

    def __init__(self, image_vector, caption_vector):
        self.image_vector, self.caption_vector = image_vector, caption_vector

    def embed_images(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.image_vector(int(c[0])) for c in codes])

    def embed_captions(self, text: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.caption_vector(int(t[0])) for t in text])


def rows_and_captions(n: int, scored: range) -> tuple[dict[int, torch.Tensor], np.ndarray]:
    # a picture's codes and a caption's ids both start with their row's number
    codes = {row: torch.full((4,), row) for row in scored}
    return codes, np.arange(n, dtype=np.uint16)[:, None].repeat(3, 1)


def test_r_precision_of_a_perfect_grader_is_one_and_of_a_random_one_chance():
    n = 1000
    one_hot = lambda row: torch.nn.functional.one_hot(torch.tensor(row), n).float()  # noqa: E731
    codes, text = rows_and_captions(n, range(n))
    cpu = torch.device("cpu")
    assert evaluate.r_precision(FakeGrader(one_hot, one_hot), codes, text, cpu) == 1.0
    # only some rows scored: each is still ranked among captions of every row
    assert evaluate.r_precision(FakeGrader(one_hot, one_hot), dict(list(codes.items())[:7]), text, cpu) == 1.0

    def noise(salt: int):
        return lambda row: torch.randn(n, generator=torch.Generator().manual_seed(salt * n + row))

    # Chance is 1 / (1 + 99 others) = 0.01; over 1000 pictures the s.d. of the share is 0.003, so 5 s.d. is
    # 0.016. Ranking among fewer captions, or counting ties as hits, lands far outside.
    random = evaluate.r_precision(FakeGrader(noise(1), noise(2)), codes, text, cpu)
    assert abs(random - 1 / (1 + evaluate.R_PRECISION_OTHERS)) < 0.016
    # half the pictures are recognised: about 0.5 + 0.5 * 0.01
    half = evaluate.r_precision(FakeGrader(lambda r: one_hot(r) if r % 2 else noise(1)(r), one_hot), codes, text, cpu)
    assert abs(half - 0.505) < 0.03


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


def error_line(stderr: str) -> str:
    """The one error line a failed run ends with; no traceback, no second error."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and stderr.rstrip("\n").splitlines()[-1] == errors[0], stderr[-3000:]
    assert errors[0].startswith("evaluate.py: error: ")
    return errors[0]


@pytest.fixture
def run_evaluate(capfd):
    """evaluate.py's main in this process: its exit code, the JSON on stdout (None on failure), stderr."""

    def run(*flags: str) -> tuple[int, dict | None, str]:
        capfd.readouterr()
        code = evaluate.main(["--device", "cpu", "--batch_size", "4", *flags])
        out, err = capfd.readouterr()
        if code == 0:
            assert out.count("\n") == 1  # one JSON object, nothing else
            return code, json.loads(out), err
        assert out == ""
        return code, None, err

    return run


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, vqgan_ckpt):
    """The demo data at the tiny VQGAN's 32 px, prepared, with a GPT trained for two steps on it (out/best.pt)
    and the text-image scorer that grades R-precision (out/grader)."""
    root = tmp_path_factory.mktemp("evaluate")
    demo.write_dataset(root / "source", n_train=24, n_val=10, n_test=2, image_size=TINY_F4_SIZE, seed=5)
    assert prepare.main(["--data_dir", str(root / "source"), "--vqgan_ckpt", str(vqgan_ckpt), "--out_dir",
                         str(root / "data"), "--image_size", str(TINY_F4_SIZE), "--text_len", str(TEXT_LEN),
                         "--batch_size", "16", "--num_workers", "0"]) == 0
    steps = ["--max_iters=2", "--eval_interval=2", "--eval_iters=1", f"--data_dir={root / 'data'}"]
    recipe = str(ROOT / "config" / "tiny_cpu.py")
    train.main([recipe, f"--out_dir={root / 'out'}", *steps])
    train.main([recipe, "--model=scorer", f"--out_dir={root / 'out' / 'grader'}", *steps])
    return root


@pytest.fixture(scope="module")
def matcher_once():
    """The demo's category matcher is fitted on renders: fit it once for the module, not once per run."""
    fitted = {}

    def build_matcher(image_size, round_trip=None):
        key = (image_size, round_trip is not None)
        if key not in fitted:
            fitted[key] = build(image_size, round_trip)
        return fitted[key]

    build = demo.build_matcher
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo, "build_matcher", build_matcher)
        yield


def test_demo_run_end_to_end(demo_run, no_pytorch_fid, matcher_once, run_evaluate, tmp_path):
    grid = tmp_path / "pairs.png"
    code, result, stderr = run_evaluate("--ckpt", str(demo_run / "out" / "best.pt"), "--demo", "--cfg_scale", "1",
                                        "--grid", str(grid))
    assert code == 0, stderr
    assert result["images"] == result["real_images"] == result["val_rows"] == 10
    assert result["fid"] is None and "pip install pytorch-fid" in result["skipped"]["fid"]
    assert result["inception_score"] is None and "inception_score" in result["skipped"]
    assert result["val_bits_per_code"] == pytest.approx(result["val_nll"] / math.log(2))
    assert 0 < result["val_bits_per_code"] < 8  # 64 codes: log2 64 = 6 bits for a uniform guess
    assert 0 < result["recon_psnr"] < 60
    # the grader beside the checkpoint scores both the drawn and the real pictures
    assert 0 <= result["r_precision"] <= 1 and 0 <= result["real_r_precision"] <= 1
    assert "r_precision" not in result["skipped"]
    assert result["settings"] == {"cfg_scale": 1.0, "candidates": 1, "top_k": None, "top_p": None,
                                  "temperature": sample.DEFAULT_TEMPERATURE}
    scores = result["demo"]
    assert scores["images"] == 10
    for key in ("colour", "category", "both"):
        assert 0 <= scores[key] <= 1
    assert scores["chance"] == demo.chance_levels()
    assert scores["ceiling"]["renders"]["colour"] > 0.85  # 32 px blurs some patterns into the colour
    assert scores["ceiling"]["round_trip"] is not None  # random VQGAN: a poor ceiling, but measured
    assert "val NLL" in stderr and "colour" in stderr and "skipped fid" in stderr
    with Image.open(grid) as sheet:
        assert 4 * 256 < sheet.width < 5 * 256  # four pictures a row: two pairs (8 pairs, the first val rows)


def test_val_nll_matches_train_loss_of_the_same_rows(demo_run, no_pytorch_fid, run_evaluate):
    """The same rows and model: evaluate's bits per code times ln 2 is train.py's loss on them."""
    model, ckpt = load_model(demo_run / "out" / "best.pt")
    meta = data.read_meta(str(demo_run / "data"))
    codes, text = data.open_split(str(demo_run / "data"), "val", meta)
    with torch.no_grad():
        loss = model(torch.from_numpy(codes.astype(np.int64)), torch.from_numpy(text.astype(np.int64)))[1].item()
    code, result, stderr = run_evaluate("--ckpt", str(demo_run / "out" / "best.pt"), "--no_inception")
    assert code == 0, stderr
    assert result["val_nll"] == pytest.approx(loss, rel=1e-5)
    assert result["fid"] is None and result["skipped"]["fid"] == "--no_inception"


def write_generated(path: Path, rows: list[tuple[str, np.ndarray]], extra: str = "") -> Path:
    lines = []
    for img_id, picture in rows:
        buffer = io.BytesIO()
        Image.fromarray(picture).resize((128, 128)).save(buffer, "PNG")  # larger than the data, like generate.py
        lines.append(f"{img_id}\t{base64.b64encode(buffer.getvalue()).decode()}\n")
    path.write_text("".join(lines) + extra)
    return path


def val_pictures(demo_run: Path) -> dict[str, np.ndarray]:
    return {img_id: np.asarray(image) for img_id, _, image, _ in demo.make_split("val", 10, TINY_F4_SIZE, seed=5)}


def test_generated_tsv_of_the_real_pictures_scores_the_demo_ceiling(demo_run, no_pytorch_fid, matcher_once,
                                                                     run_evaluate, tmp_path):
    """Scoring the val pictures themselves gives about the matcher's own accuracy on renders."""
    ids = (demo_run / "data" / "val.ids.txt").read_text().split()
    by_id = val_pictures(demo_run)
    generated = write_generated(tmp_path / "generated.tsv", [(i, by_id[i]) for i in reversed(ids)],
                                extra="not-a-val-id\tAAAA\nbroken line\n")
    code, result, stderr = run_evaluate("--generated", str(generated), "--data_dir", str(demo_run / "data"),
                                        "--demo", "--grader", str(demo_run / "out" / "grader" / "best.pt"))
    assert code == 0, stderr
    assert result["images"] == 10 and result["val_bits_per_code"] is None and result["ckpt"] is None
    assert result["demo"]["colour"] >= 0.8 and result["demo"]["category"] >= 0.8
    assert result["warnings"] == {"line skipped": 2}
    assert f"{generated}:11: line skipped: not-a-val-id: not a val row" in stderr
    assert 0 <= result["r_precision"] <= 1 and result["real_r_precision"] is not None
    assert set(prepare.read_captions(demo_run / "source" / "T2I_val.text.tsv")[0]) >= set(ids)


def test_val_captions_are_the_ones_prepare_stored(demo_run, tmp_path):
    # prepare.py keeps the first row of a repeated img_id and rejects the rest: score against that caption
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(demo_run / "source" / "T2I_val.img.tsv", source)
    ids = (demo_run / "data" / "val.ids.txt").read_text().split()
    rows = [f"{ids[0]}\t红色T恤", *(f"{i}\t标题{n}" for n, i in enumerate(ids[1:])), f"{ids[0]}\t绿色裤子"]
    (source / "T2I_val.text.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    split = evaluate.open_val_split(str(demo_run / "data"), str(source), 0)
    assert split.ids == ids and split.captions[:2] == ["红色T恤", "标题0"]
    # an img_id whose first row has an empty caption was rejected, whatever comes later
    (source / "T2I_val.text.tsv").write_text("\n".join([f"{ids[0]}\t", *rows]) + "\n", encoding="utf-8")
    with pytest.raises(evaluate.UserError, match="no caption for 1 val img_id"):
        evaluate.open_val_split(str(demo_run / "data"), str(source), 0)
    # --max_images scores the first rows only
    assert evaluate.open_val_split(str(demo_run / "data"), None, 3).ids == ids[:3]


def test_hash_split_reads_the_held_out_training_rows(tmp_path, vqgan_ckpt, no_pytorch_fid, run_evaluate):
    rows = good_rows(16)
    source = write_dataset(tmp_path / "muge", rows)
    assert prepare.main(["--data_dir", str(source), "--vqgan_ckpt", str(vqgan_ckpt), "--out_dir",
                         str(tmp_path / "data"), "--image_size", str(TINY_F4_SIZE), "--text_len", "16",
                         "--val_fraction", "0.3", "--batch_size", "8", "--num_workers", "0"]) == 0
    held_out = (tmp_path / "data" / "val.ids.txt").read_text().split()
    assert held_out
    split = evaluate.open_val_split(str(tmp_path / "data"), None, 0)
    assert split.image_tsv.name == "T2I_train.img.tsv"
    # the held-out training pictures themselves, as a generated file
    pictures = {img_id: np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))) for img_id, b64, _ in rows}
    generated = write_generated(tmp_path / "g.tsv", [(i, pictures[i]) for i in held_out])
    code, result, stderr = run_evaluate("--generated", str(generated), "--data_dir", str(tmp_path / "data"))
    assert code == 0, stderr
    # PSNR of the stored codes against the held-out training pictures, fitted as prepare.py fitted them
    assert result["real_images"] == result["images"] == len(held_out) and result["recon_psnr"] is not None


def test_sweep_scores_every_combination(demo_run, no_pytorch_fid, run_evaluate):
    code, result, stderr = run_evaluate("--ckpt", str(demo_run / "out" / "best.pt"), "--max_images", "4",
                                        "--sweep", "cfg_scale=1,3", "candidates=1,2", "top_k=0,5")
    assert code == 0, stderr
    rows = result["sweep"]
    assert [(r["settings"]["cfg_scale"], r["settings"]["candidates"], r["settings"]["top_k"]) for r in rows] == [
        (cfg, n, k) for cfg in (1.0, 3.0) for n in (1, 2) for k in (0, 5)]
    for row in rows:
        assert row["images"] == 4 and 0 <= row["r_precision"] <= 1 and row["sampling_seconds"] >= 0
        assert row["settings"]["temperature"] == sample.DEFAULT_TEMPERATURE and row["fid"] is None
    # the metrics of the pictures are per row; those of the real pictures and the model once
    assert "r_precision" not in result and result["val_rows"] == 4 and result["real_r_precision"] is not None
    for flags, message in [(["--sweep", "cfg=1,3"], "expected NAME=V1,V2,... with NAME one of cfg_scale"),
                           (["--sweep", "top_k="], "expected NAME=V1,V2"),
                           (["--sweep", "top_k=1,a"], "the values of top_k must be ints")]:
        code, _, stderr = run_evaluate("--ckpt", str(demo_run / "out" / "best.pt"), *flags)
        assert code == 1 and message in error_line(stderr), flags


def test_clear_errors(tmp_path, demo_run, run_evaluate):
    code, _, stderr = run_evaluate("--ckpt", str(tmp_path / "none.pt"))
    assert code == 1 and "no checkpoint at" in error_line(stderr)
    code, _, stderr = run_evaluate("--generated", str(tmp_path / "none.tsv"))
    assert code == 1 and "none.tsv: no such file (--generated)" in error_line(stderr)
    empty = tmp_path / "g.tsv"
    empty.write_text("")
    code, _, stderr = run_evaluate("--generated", str(empty))
    assert code == 1 and "--generated needs --data_dir" in error_line(stderr)
    code, _, stderr = run_evaluate("--ckpt", str(demo_run / "out" / "best.pt"), "--source_dir", str(tmp_path))
    assert code == 1 and "check --source_dir" in error_line(stderr)
    code, _, stderr = run_evaluate("--ckpt", str(demo_run / "out" / "grader" / "best.pt"))
    assert code == 1 and "holds a scorer, not a gpt" in error_line(stderr)
    code, _, stderr = run_evaluate("--ckpt", str(demo_run / "out" / "best.pt"), "--candidates", "0")
    assert code == 1 and "must be at least 1" in error_line(stderr)


def test_a_stale_ids_file_is_refused_and_an_unreadable_vqgan_skips_its_metrics(demo_run, no_pytorch_fid,
                                                                                 run_evaluate, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_run / "data", data)
    ids = (data / "val.ids.txt").read_text().split()
    generated = write_generated(tmp_path / "g.tsv", list(val_pictures(demo_run).items()))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    code, result, stderr = run_evaluate("--generated", str(generated), "--data_dir", str(data), "--vqgan_ckpt",
                                        str(bad))
    assert code == 0, stderr
    assert result["recon_psnr"] is None and result["r_precision"] is None and result["warnings"] == {"no VQGAN": 1}
    (data / "val.ids.txt").write_text("".join(i + "\n" for i in ids[:-1]))  # a row short: captions would shift
    code, _, stderr = run_evaluate("--generated", str(generated), "--data_dir", str(data))
    assert code == 1 and "val.ids.txt does not list the 10 val rows" in error_line(stderr)


def test_generated_pictures_must_answer_every_val_row_scored(demo_run, no_pytorch_fid, run_evaluate, tmp_path):
    # FID over a part of the val set is no FID: a file that lacks pictures is an error, not a smaller score
    ids = (demo_run / "data" / "val.ids.txt").read_text().split()
    by_id = val_pictures(demo_run)
    half = write_generated(tmp_path / "half.tsv", [(i, by_id[i]) for i in ids[:6:2]])
    code, result, stderr = run_evaluate("--generated", str(half), "--data_dir", str(demo_run / "data"),
                                        "--max_images", "6")
    assert code == 1 and result is None
    assert f"has pictures for 3 of the 6 val rows scored (none for {ids[1]}" in error_line(stderr)
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    code, _, stderr = run_evaluate("--generated", str(empty), "--data_dir", str(demo_run / "data"))
    assert code == 1 and "has pictures for 0 of the 10 val rows scored" in error_line(stderr)
    # and the first rows alone are enough for --max_images
    code, result, stderr = run_evaluate("--generated", str(half), "--data_dir", str(demo_run / "data"),
                                        "--max_images", "1")
    assert code == 0 and result["images"] == 1, stderr


def test_cli_writes_one_json_object_on_stdout(demo_run):
    completed = subprocess.run(
        [sys.executable, "evaluate.py", "--ckpt", str(demo_run / "out" / "best.pt"), "--device", "cpu",
         "--no_inception", "--max_images", "3"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["val_rows"] == 3 and completed.stdout.count("\n") == 1
    assert "val NLL" in completed.stderr


def test_demo_flag_on_other_data_is_refused_before_drawing(tmp_path, vqgan_ckpt, run_evaluate):
    source = write_dataset(tmp_path / "muge", good_rows(8))
    assert prepare.main(["--data_dir", str(source), "--vqgan_ckpt", str(vqgan_ckpt), "--out_dir",
                         str(tmp_path / "data"), "--image_size", str(TINY_F4_SIZE), "--text_len", "16",
                         "--val_fraction", "0.5", "--batch_size", "8", "--num_workers", "0"]) == 0
    generated = tmp_path / "g.tsv"
    generated.write_text("")
    code, _, stderr = run_evaluate("--generated", str(generated), "--data_dir", str(tmp_path / "data"), "--demo")
    assert code == 1 and "is this the demo data?" in error_line(stderr)
