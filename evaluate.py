"""Score a checkpoint on the val split the way MUGE ranks submissions (FID, IS), with cheap signals beside.

    python evaluate.py                                             # out/ckpt.pt against its val split
    python evaluate.py --ckpt out/muge/ckpt.pt --batch_size 256 --cfg_scale 3 --grid pairs.png
    python evaluate.py --generated val_pictures.tsv --data_dir data/muge   # pictures drawn elsewhere
    python evaluate.py --demo --cfg_scale 1                        # the demo: do colour and category match?

With a checkpoint, one picture is drawn per val caption with generate.py's sampler, and compared with the real
val pictures fitted to the square exactly as prepare.py fitted them. The metrics:

  fid, inception_score     the FID Inception network (pytorch-fid's port of TensorFlow's 2015-12-05 graph),
                           when pytorch-fid and its weights are installed (see --inception_weights)
  val_bits_per_code        the model's negative log-likelihood of the val codes, every row once
  recon_psnr, recon_fid    the VQGAN's round trip of the real pictures: the best any GPT over its codes can do
  demo                     with --demo: how often the drawn colour and category are the caption's

One JSON object goes to stdout; the summary, progress and warnings go to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter

import demo
import generate
from data import MAX_IMAGE_PIXELS, BadRowError, image_from_base64, read_tsv
from model import GPT
from prepare import TRAIN_FILES, VAL_FILES, read_captions
from train import TrainError, check_ids, meta_model_settings, open_split, read_meta
from utils import autocast, batched, pick_device, pick_dtype, progress
from vqgan import VQGAN, CheckpointError, images_to_tensor, load_checkpoint_file, load_vqgan, tensor_to_images
from vqgan.train import psnr

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
INCEPTION_SIZE = 299  # the graph's input side; pictures are resized to it bilinearly, as pytorch-fid does
IS_SPLITS = 10  # the Inception Score is the mean over 10 splits, as in the paper that introduced it
DEFAULT_BATCH_SIZE = generate.DEFAULT_BATCH_SIZE
DEFAULT_GRID_PAIRS = 8

# A feature extractor maps pictures [B, 3, H, W] in [-1, 1] to (features [B, D], class logits [B, C]).
Extractor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class EvaluateError(Exception):
    """A problem the user can fix; main() prints it as one line."""


class InceptionUnavailable(Exception):
    """FID and IS cannot run here; the message says what to install or download, and where."""


# ----------------------------------------------------------------------------------------------------------
# Fréchet distance and Inception Score


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features of shape [N >= 2, D], got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix.

    Rounding makes the tiny eigenvalues of a rank-deficient covariance slightly negative; they are zero.
    """
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    sigma1 sigma2 is not symmetric, and a general matrix square root of it (scipy's sqrtm) turns complex or
    fails when covariances are near-singular, as they are with fewer pictures than features. Its eigenvalues
    are those of sqrt(sigma1) sigma2 sqrt(sigma1), which is symmetric positive semi-definite, so the trace comes
    from a symmetric eigendecomposition instead, in float64, with no diagonal offset needed.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_of_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    difference = mu1 - mu2
    distance = difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_of_root
    return max(float(distance), 0.0)  # it is never negative; rounding can make it -1e-12


def fid_of_features(features1: np.ndarray, features2: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over each of `splits` consecutive parts of the pictures: (mean, std).

    Uniform predictions give 1; confident predictions spread evenly over C classes give C.
    """
    logits = np.asarray(logits, dtype=np.float64)
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for part in np.array_split(log_p, min(splits, len(log_p))):
        log_marginal = np.log(np.exp(part).mean(axis=0))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------------------
# features


@torch.no_grad()
def features_of_batch(extractor: Extractor, pictures: np.ndarray, device: torch.device
                      ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 pictures [B, H, W, 3] -> (features [B, D], logits [B, C]) as float64 numpy arrays."""
    features, logits = extractor(images_to_tensor(pictures).to(device))
    return features.double().cpu().numpy(), logits.double().cpu().numpy()


def extract_features(pictures: Iterable[np.ndarray], extractor: Extractor, device: torch.device, batch_size: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Features and logits of every picture, in order, `batch_size` pictures per call of the extractor."""
    features, logits = [], []
    for chunk in batched(iter(pictures), batch_size):
        batch_features, batch_logits = features_of_batch(extractor, np.stack(chunk), device)
        features.append(batch_features)
        logits.append(batch_logits)
    if not features:
        return np.zeros((0, 0)), np.zeros((0, 0))
    return np.concatenate(features), np.concatenate(logits)


class InceptionExtractor(nn.Module):
    """The FID Inception network: 2048 pool features and the 1008 class logits of the Inception Score.

    The logits leave out the classifier's bias, as the original Inception Score code did (it multiplied the
    pool features by the softmax layer's weights alone), so that scores compare with published ones.
    """

    def __init__(self, network: nn.Module, class_weight: torch.Tensor):
        super().__init__()
        self.network = network  # its classifier replaced by nn.Identity: it returns the pool features
        self.register_buffer("class_weight", class_weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.interpolate(x.float(), size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        pool = self.network(x)
        return pool, pool @ self.class_weight.T


def inception_weights_path(given: str | None) -> Path:
    """The weights file to read: the one given, else where pytorch-fid itself caches it (torch hub)."""
    return Path(given).expanduser() if given else Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def load_inception(weights: str | None, device: torch.device) -> InceptionExtractor:
    """pytorch-fid's FID Inception with the weights in `weights` (or the torch hub cache); never downloads.

    Raises InceptionUnavailable saying what to install or where to put the weights.
    """
    path = inception_weights_path(weights)
    problems = []
    try:
        import pytorch_fid.inception as fid_inception
    except ImportError:
        fid_inception = None
        problems.append(
            "the pytorch-fid package is not installed: `pip install pytorch-fid` (it brings torchvision; if your "
            "torch came from download.pytorch.org, install torchvision from the same index, e.g. `pip install "
            "torchvision --index-url https://download.pytorch.org/whl/cpu`, so that the two builds match)")
    except Exception as e:  # a torchvision built for another torch fails at import with RuntimeError
        fid_inception = None
        problems.append(
            f"pytorch-fid is installed but cannot be imported ({type(e).__name__}: {e}); this is usually a "
            f"torchvision built for another torch than this {torch.__version__}: reinstall torchvision from the "
            "index your torch came from (see https://pytorch.org/get-started/locally/)")
    if not path.is_file():
        where = "" if weights else " (the torch hub cache, where pytorch-fid keeps them)"
        problems.append(f"the FID Inception weights are not at {path}{where}: download {FID_WEIGHTS_URL} to that "
                        "path, or pass --inception_weights with where you keep the file")
    if problems:
        raise InceptionUnavailable("; ".join(problems))
    try:
        state = load_checkpoint_file(path)
    except CheckpointError as e:
        raise InceptionUnavailable(f"{e} (--inception_weights should be {FID_WEIGHTS_FILE})") from None
    # pytorch-fid reads its weights only from its URL, through the torch hub cache. Hand it the file read above
    # instead: nothing is downloaded, and our loader never runs code pickled in the file.
    fetch = fid_inception.load_state_dict_from_url
    fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        network = fid_inception.fid_inception_v3()
    except RuntimeError as e:  # load_state_dict: another network's weights
        raise InceptionUnavailable(f"{path}: not the FID Inception weights ({FID_WEIGHTS_FILE}): {e}") from None
    finally:
        fid_inception.load_state_dict_from_url = fetch
    class_weight = network.fc.weight.detach().clone()
    network.fc = nn.Identity()
    return InceptionExtractor(network, class_weight).to(device).eval()


# ----------------------------------------------------------------------------------------------------------
# the demo's attribute score

MATCHER_GRID = 16  # silhouettes are compared at 16x16 after cropping to the product's box


def silhouette(picture: np.ndarray) -> np.ndarray:
    """bool [H, W]: the product's shape, holes included.

    White stripes, checks and dots of a pattern and the body of a white product are as pale as the background;
    they belong to the product when the background cannot reach them from the picture's border.
    """
    background = ~demo.foreground_mask(picture)
    outside = np.zeros_like(background)
    for edge in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):
        outside[edge] = background[edge]
    while True:
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= background
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


def silhouette_features(picture: np.ndarray) -> np.ndarray:
    """Where a product is and how big does not matter: its silhouette cropped to its box, at 16x16, mirrored
    onto itself (renders are mirrored at random), plus the box's aspect ratio and how much of it is filled."""
    shape = silhouette(np.asarray(picture))
    if not shape.any():
        return np.zeros(MATCHER_GRID * MATCHER_GRID + 2)
    rows, cols = np.nonzero(shape)
    # The 1% tails are left out, so that a few stray pixels of a generated picture do not stretch the box.
    top, bottom = np.quantile(rows, [0.01, 0.99]).astype(int)
    left, right = np.quantile(cols, [0.01, 0.99]).astype(int)
    box = shape[top : bottom + 1, left : right + 1].astype(np.float32)
    small = np.asarray(Image.fromarray(box).resize((MATCHER_GRID, MATCHER_GRID), Image.Resampling.BOX))
    small = (small + small[:, ::-1]) / 2
    aspect = math.log(box.shape[1] / box.shape[0])
    return np.concatenate([small.ravel(), [aspect, box.mean()]])


def demo_renders(image_size: int, seed: int, per_product: int) -> tuple[list[np.ndarray], list[demo.Product]]:
    """`per_product` renders of every product the demo draws, at random sizes, places and mirrorings."""
    rng = random.Random(f"evaluate/{seed}")
    products = [product for product in demo.ALL_PRODUCTS for _ in range(per_product)]
    return [np.asarray(demo.render(product, image_size, rng)) for product in products], products


@dataclass
class CategoryMatcher:
    """Softmax regression from silhouette features to the demo's categories."""

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray  # [features, categories]
    bias: np.ndarray

    def predict(self, pictures: Iterable[np.ndarray]) -> list[str]:
        features = np.stack([silhouette_features(p) for p in pictures])
        scores = (features - self.mean) / self.scale @ self.weight + self.bias
        return [demo.CATEGORIES[i] for i in scores.argmax(axis=1)]


def fit_category_matcher(pictures: list[np.ndarray], products: list[demo.Product]) -> CategoryMatcher:
    """Fit on labelled pictures: full-batch L-BFGS in float64, so the same pictures give the same matcher."""
    features = np.stack([silhouette_features(p) for p in pictures])
    mean, scale = features.mean(axis=0), features.std(axis=0) + 1e-6
    x = torch.from_numpy((features - mean) / scale)
    y = torch.tensor([demo.CATEGORIES.index(p.category) for p in products])
    weight = torch.zeros(x.shape[1], len(demo.CATEGORIES), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(demo.CATEGORIES), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        # A little weight decay keeps the weights finite on separable data.
        value = F.cross_entropy(x @ weight + bias, y) + 1e-3 * weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    return CategoryMatcher(mean, scale, weight.detach().numpy(), bias.detach().numpy())


def attribute_accuracy(pictures: list[np.ndarray], products: list[demo.Product], matcher: CategoryMatcher
                       ) -> dict[str, float]:
    """Share of pictures whose drawn colour, category, and both, are the product's."""
    colours = np.array([demo.foreground_colour(p) == product.colour for p, product in zip(pictures, products,
                                                                                           strict=True)])
    categories = np.array([c == product.category for c, product in zip(matcher.predict(pictures), products,
                                                                       strict=True)])
    return {"colour": float(colours.mean()), "category": float(categories.mean()),
            "both": float((colours & categories).mean())}


def check_demo_captions(captions: list[str]) -> None:
    """Refuse --demo on other data before drawing anything rather than after."""
    for caption in captions:
        try:
            demo.parse_caption(caption)
            return
        except ValueError:
            continue
    raise EvaluateError(f"--demo: none of the {len(captions)} val captions names one colour, category and pattern "
                        "of demo.py's: is this the demo data?")


def chance_levels() -> dict[str, float]:
    """What guessing uniformly at random scores, whatever the captions: 1 / number of choices."""
    colour, category = 1 / len(demo.COLOURS), 1 / len(demo.CATEGORIES)
    return {"colour": colour, "category": category, "both": colour * category}


def build_matcher(image_size: int, vq: VQGAN | None, device: torch.device, batch_size: int
                  ) -> tuple[CategoryMatcher, dict[str, Any]]:
    """The category matcher, fitted on demo.py's renders, and the scores it allows (its ceiling): on fresh
    renders, and on their VQGAN round trip (what a perfect GPT over the codes could draw at best)."""
    pictures, products = demo_renders(image_size, seed=0, per_product=4)
    # Pictures that come out of a VQGAN decoder have soft edges; learning from blurred copies as well keeps the
    # matcher from reading blur as another shape (on round trips through an early demo VQGAN: 0.90 -> 0.99).
    radius = 1.5 * image_size / 64
    blurred = [np.asarray(Image.fromarray(p).filter(ImageFilter.GaussianBlur(radius))) for p in pictures]
    matcher = fit_category_matcher(pictures + blurred, products + products)
    pictures, products = demo_renders(image_size, seed=1, per_product=1)
    ceiling: dict[str, Any] = {"renders": attribute_accuracy(pictures, products, matcher), "round_trip": None}
    if vq is not None:
        round_trip = np.concatenate([reconstruct(vq, np.stack(chunk), device)
                                     for chunk in batched(iter(pictures), batch_size)])
        ceiling["round_trip"] = attribute_accuracy(list(round_trip), products, matcher)
    return matcher, ceiling


# ----------------------------------------------------------------------------------------------------------
# the val split


@dataclass
class ValSplit:
    ids: list[str]  # the img_ids of the rows scored, in the order of the memmaps
    codes: np.ndarray  # uint16 [N, rows*cols] memmap, all val rows
    text: np.ndarray  # uint16 [N, text_len] memmap
    image_tsv: Path
    text_tsv: Path


def open_val_split(data_dir: str, meta: dict, source_dir: str | None, max_images: int) -> ValSplit:
    """The val rows of a prepare.py output dir and the source files their pictures and captions came from."""
    try:
        arrays = open_split(data_dir, "val", meta)
    except TrainError as e:
        raise EvaluateError(str(e)) from None
    ids_path = Path(data_dir) / "val.ids.txt"
    if arrays is None:
        raise EvaluateError(f"{data_dir} has no val rows to score: prepare.py with a T2I_val.* pair or "
                            "--val_fraction above 0")
    if not ids_path.is_file():
        raise EvaluateError(f"{ids_path} is missing: re-run prepare.py for {data_dir}")
    ids = ids_path.read_text(encoding="utf-8").splitlines()
    if len(ids) != len(arrays[0]):
        raise EvaluateError(f"{ids_path} has {len(ids)} lines but val.img.bin {len(arrays[0])} rows: re-run prepare.py")
    source = Path(source_dir or meta.get("data_dir") or "")
    # Val rows come from T2I_val.* when prepare.py had them, else they were held out of T2I_train.* by hash.
    image_name, text_name = VAL_FILES if meta.get("val_split", "val files") == "val files" else TRAIN_FILES
    missing = [str(source / name) for name in (image_name, text_name) if not (source / name).is_file()]
    if missing:
        hint = "pass --source_dir" if source_dir is None else "check --source_dir"
        raise EvaluateError(f"the source files of the val split are not there ({', '.join(missing)}): {hint}, the "
                            "folder of the T2I_*.tsv files prepare.py read")
    n = len(ids) if max_images <= 0 else min(max_images, len(ids))
    return ValSplit(ids[:n], arrays[0], arrays[1], source / image_name, source / text_name)


def val_captions(split: ValSplit) -> list[str]:
    # prepare.py's own reading of the file, so that a repeated img_id gives the caption it stored: the first
    captions = {img_id: entry.caption for img_id, entry in read_captions(split.text_tsv)[0].items()
                if entry.error is None}
    missing = [img_id for img_id in split.ids if img_id not in captions]
    if missing:
        raise EvaluateError(f"{split.text_tsv} has no caption for {len(missing)} val img_id(s), e.g. {missing[0]}: "
                            "is it the file prepare.py read? (--source_dir)")
    return [captions[img_id] for img_id in split.ids]


def fitted(field: bytes, meta: dict) -> np.ndarray:
    """A base64 picture fitted to the square exactly as prepare.py fitted the training pictures."""
    return image_from_base64(field, meta["image_size"], meta.get("resize", "pad"),
                             meta.get("max_pixels", MAX_IMAGE_PIXELS))


def real_pictures(split: ValSplit, meta: dict, report: generate.Report) -> Iterator[tuple[int, np.ndarray]]:
    """(row, picture) of the val rows being scored, streamed from the source image TSV in its order."""
    wanted = {img_id: row for row, img_id in enumerate(split.ids)}
    for row in read_tsv(split.image_tsv):
        index = wanted.pop(row.img_id, None) if row.error is None else None
        if index is None:
            continue
        try:
            yield index, fitted(row.value, meta)
        except BadRowError as e:
            report.warn(f"{split.image_tsv}:{row.line_no}", "unreadable val picture", f"{row.img_id}: {e}")
        if not wanted:
            return
    if wanted:
        report.warn(str(split.image_tsv), "val pictures not found",
                    f"{len(wanted)} img_id(s), e.g. {next(iter(wanted))}: is it the file prepare.py read?")


def generated_pictures(path: str, split: ValSplit, meta: dict, report: generate.Report
                       ) -> Iterator[tuple[int, np.ndarray]]:
    """(row, picture) of an `img_id \\t base64` file for the val rows being scored, fitted like the real ones."""
    wanted = {img_id: row for row, img_id in enumerate(split.ids)}
    seen: set[str] = set()
    for row in read_tsv(path):
        where = f"{path}:{row.line_no}"
        if row.error is not None:
            report.warn(where, "skipped line", str(row.error))
            continue
        if row.img_id not in wanted:
            report.warn(where, "not a val img_id being scored", row.img_id)
            continue
        if row.img_id in seen:
            report.warn(where, "duplicate img_id", f"{row.img_id}: the first picture counts")
            continue
        seen.add(row.img_id)
        try:
            yield wanted[row.img_id], fitted(row.value, meta)
        except BadRowError as e:
            report.warn(where, "unreadable picture", f"{row.img_id}: {e}")


# ----------------------------------------------------------------------------------------------------------
# the model and the VQGAN


@torch.no_grad()
def val_nll(model: GPT, codes: np.ndarray, text: np.ndarray, batch_size: int, device: torch.device,
            dtype: torch.dtype) -> float:
    """Mean negative log-likelihood in nats per code over every given row once, with its caption.

    Unlike train.py's estimate (random batches, for speed), every row counts exactly once, so two
    checkpoints scored on the same data are compared on the same codes.
    """
    total = 0.0
    for start in range(0, len(codes), batch_size):
        batch_codes = torch.from_numpy(codes[start : start + batch_size].astype(np.int64)).to(device)
        batch_text = torch.from_numpy(text[start : start + batch_size].astype(np.int64)).to(device)
        with autocast(device, dtype):
            _, loss = model(batch_codes, batch_text)
        total += loss.item() * len(batch_codes)
    return total / len(codes)


@torch.no_grad()
def reconstruct(vq: VQGAN, pictures: np.ndarray, device: torch.device) -> np.ndarray:
    """uint8 pictures through the VQGAN and back, in float32."""
    return tensor_to_images(vq.decode(vq.encode(images_to_tensor(pictures).to(device))))


@torch.no_grad()
def decode_codes(vq: VQGAN, codes: np.ndarray, grid: tuple[int, int], device: torch.device) -> np.ndarray:
    """uint16 code rows [B, rows*cols] -> uint8 pictures, in float32."""
    codes = torch.from_numpy(codes.astype(np.int64)).view(len(codes), *grid).to(device)
    return tensor_to_images(vq.decode(codes))


# ----------------------------------------------------------------------------------------------------------
# the run


@dataclass
class Sources:
    """What the run reads: the model (optional), the VQGAN (optional), the data and the val split."""

    model: GPT | None
    vq: VQGAN | None
    tokenizer: Any
    ckpt: dict
    data_dir: str
    meta: dict
    split: ValSplit


def load_sources(args: argparse.Namespace, device: torch.device, report: generate.Report) -> Sources:
    ckpt_path = args.ckpt or (None if args.generated else generate.DEFAULT_CKPT)
    model = vq = tokenizer = None
    ckpt: dict = {}
    if ckpt_path:
        try:
            model, vq, tokenizer, ckpt = generate.load_pipeline(ckpt_path, device, args.vqgan_ckpt, args.data_dir,
                                                                report)
        except generate.GenerateError as e:
            hint = "" if args.generated or args.ckpt else " (or score pictures drawn already with --generated FILE)"
            raise EvaluateError(f"{e}{hint}") from None
    data_dir = args.data_dir or ckpt.get("data_dir")
    if not data_dir:
        raise EvaluateError("--generated needs --data_dir, the prepare.py output dir of the val split")
    try:
        meta = read_meta(data_dir)
    except TrainError as e:
        raise EvaluateError(str(e)) from None
    if model is not None:
        wanted = meta_model_settings(meta)
        differ = {k: v for k, v in wanted.items() if getattr(model.config, k) != v}
        if differ:
            raise EvaluateError(f"{ckpt_path} was trained on other data than {data_dir}: "
                                + ", ".join(f"{k} {getattr(model.config, k)!r} vs {v!r}" for k, v in differ.items()))
    if vq is None:
        vq = load_vqgan_if_there(args.vqgan_ckpt or meta.get("vqgan_ckpt"), device, report)
    split = open_val_split(data_dir, meta, args.source_dir, args.max_images)
    if model is not None:
        try:
            check_ids(data_dir, "val", (split.codes, split.text), model.config.codebook_size,
                      model.text_encoder.config.vocab_size)
        except TrainError as e:
            raise EvaluateError(str(e)) from None
    return Sources(model, vq, tokenizer, ckpt, data_dir, meta, split)


def load_vqgan_if_there(path: str | None, device: torch.device, report: generate.Report) -> VQGAN | None:
    """The VQGAN for the round trip; without one that metric is skipped, not the run."""
    if not path or not Path(path).is_file():
        report.warn(str(path), "no VQGAN", "the round-trip metrics are skipped (pass --vqgan_ckpt)")
        return None
    try:
        return load_vqgan(path, device)
    except CheckpointError as e:
        report.warn(str(path), "unreadable VQGAN", f"{e}; the round-trip metrics are skipped")
        return None


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Every metric that can run here; those that cannot are null, with the reason under "skipped"."""
    check_args(args)
    started = time.perf_counter()
    report = generate.Report()
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    src = load_sources(args, device, report)
    split, meta = src.split, src.meta
    n = len(split.ids)
    skipped: dict[str, str] = {}
    extractor = None
    if args.no_inception:
        skipped["fid"] = skipped["inception_score"] = "--no_inception"
    else:
        try:
            extractor = load_inception(args.inception_weights, device)
        except InceptionUnavailable as e:
            skipped["fid"] = skipped["inception_score"] = str(e)
    if extractor is None:
        skipped["recon_fid"] = skipped["fid"]
    if src.vq is None:
        skipped["recon_psnr"] = skipped["recon_fid"] = "no VQGAN (--vqgan_ckpt)"
    # Drawing pictures is the slow part: only when something will look at them.
    draw = extractor is not None or args.demo or bool(args.grid)
    if not draw:
        skipped["generation"] = "nothing would look at the pictures (no FID or IS here, no --demo, no --grid)"
    needs_captions = args.demo or bool(args.grid) or (draw and not args.generated)
    captions = val_captions(split) if needs_captions else []
    timings = {"load": time.perf_counter() - started}

    def lap(name: str) -> None:
        timings[name] = time.perf_counter() - started - sum(timings.values())

    matcher, ceiling = None, None
    if args.demo:
        check_demo_captions(captions)
        matcher, ceiling = build_matcher(meta["image_size"], src.vq, device, args.batch_size)
        lap("matcher")
    nll = None
    if src.model is not None:
        nll = val_nll(src.model, split.codes[:n], split.text[:n], args.batch_size, device, dtype)
        lap("nll")
    else:
        skipped["val_bits_per_code"] = "no checkpoint (--ckpt)"
    grid_rows = set(range(args.grid_count)) if args.grid else set()
    real = Scored()
    if extractor is not None or src.vq is not None or args.grid:
        real = score_real(src, extractor, device, args.batch_size, grid_rows, report)
        lap("real")
    fake = Scored(attributes=AttributeTally(matcher) if matcher is not None else None)
    if draw:
        if args.generated:
            stream = generated_pictures(args.generated, split, meta, report)
        else:
            pictures = generate.generate_images(
                src.model, src.vq, src.tokenizer, captions, cfg_scale=args.cfg_scale, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size, dtype=dtype,
                image_size=meta["image_size"])
            stream = enumerate(pictures)
        score_generated(fake, stream, n, extractor, device, args.batch_size, grid_rows, captions)
        lap("generated")

    result = {
        "images": fake.count,
        "real_images": real.count,
        "fid": None,
        "inception_score": None,
        "inception_score_std": None,
        "real_inception_score": None,
        "recon_fid": None,
        "recon_psnr": float(np.mean(real.psnr)) if real.psnr else None,
        "val_bits_per_code": None if nll is None else nll / math.log(2),
        "val_nll": nll,
        "val_rows": n if nll is not None else 0,
        "demo": None,
    }
    if extractor is not None:
        add_inception_metrics(result, real, fake, skipped)
    if matcher is not None:
        result["demo"] = fake.attributes.result(ceiling)
    if args.grid:
        write_pairs_grid(args, split, captions, real.kept, fake.kept)
    timings["total"] = time.perf_counter() - started
    result["skipped"] = {k: v for k, v in skipped.items() if result.get(k) is None}
    result["warnings"] = dict(report.counts)
    result["settings"] = settings_of(args, src, device, dtype)
    result["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    return result


@dataclass
class Scored:
    """What a pass over pictures leaves: features for FID and IS, PSNRs, the pictures kept for the grid."""

    count: int = 0
    features: list[np.ndarray] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    psnr: list[float] = field(default_factory=list)
    recon_features: list[np.ndarray] = field(default_factory=list)
    kept: dict[int, np.ndarray] = field(default_factory=dict)
    attributes: AttributeTally | None = None

    def add(self, chunk: list[tuple[int, np.ndarray]], extractor: Extractor | None, device: torch.device,
            grid_rows: set[int]) -> np.ndarray:
        """Count a batch of (row, picture), keep those for the grid, extract features; returns the pictures."""
        pictures = np.stack([picture for _, picture in chunk])
        self.count += len(chunk)
        self.kept.update((row, picture) for row, picture in chunk if row in grid_rows)
        if extractor is not None:
            features, logits = features_of_batch(extractor, pictures, device)
            self.features.append(features)
            self.logits.append(logits)
        return pictures


def score_real(src: Sources, extractor: Extractor | None, device: torch.device, batch_size: int,
               grid_rows: set[int], report: generate.Report) -> Scored:
    scored = Scored()
    grid = tuple(src.meta["code_grid"])
    pairs = real_pictures(src.split, src.meta, report)
    for chunk in batched(progress(pairs, len(src.split.ids), "real pictures", "img"), batch_size):
        pictures = scored.add(chunk, extractor, device, grid_rows)
        if src.vq is not None:
            # The codes prepare.py stored are the encoding of these very pictures: decoding them is the round trip.
            recon = decode_codes(src.vq, src.split.codes[[row for row, _ in chunk]], grid, device)
            scored.psnr.extend(psnr(pictures, recon).tolist())
            if extractor is not None:
                scored.recon_features.append(features_of_batch(extractor, recon, device)[0])
    return scored


def score_generated(scored: Scored, stream: Iterable[tuple[int, np.ndarray]], total: int,
                    extractor: Extractor | None, device: torch.device, batch_size: int, grid_rows: set[int],
                    captions: list[str]) -> None:
    for chunk in batched(progress(stream, total, "generated pictures", "img"), batch_size):
        scored.add(chunk, extractor, device, grid_rows)
        if scored.attributes is not None:
            for row, picture in chunk:
                scored.attributes.add(picture, captions[row])


class AttributeTally:
    """Counts, over generated demo pictures, how often the drawn colour and category are the caption's."""

    def __init__(self, matcher: CategoryMatcher):
        self.matcher = matcher
        self.colour = self.category = self.both = self.count = self.unparsed = 0

    def add(self, picture: np.ndarray, caption: str) -> None:
        try:
            product = demo.parse_caption(caption)
        except ValueError:
            self.unparsed += 1
            return
        colour_ok = demo.foreground_colour(picture) == product.colour
        category_ok = self.matcher.predict([picture])[0] == product.category
        self.count += 1
        self.colour += colour_ok
        self.category += category_ok
        self.both += colour_ok and category_ok

    def result(self, ceiling: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "images": self.count,
            "colour_accuracy": self.colour / max(self.count, 1),
            "category_accuracy": self.category / max(self.count, 1),
            "both_accuracy": self.both / max(self.count, 1),
            "chance": chance_levels(),
            "ceiling": ceiling,
            "unparsed_captions": self.unparsed,
        }


def add_inception_metrics(result: dict[str, Any], real: Scored, fake: Scored, skipped: dict[str, str]) -> None:
    real_features = np.concatenate(real.features) if real.features else np.zeros((0, 0))
    fake_features = np.concatenate(fake.features) if fake.features else np.zeros((0, 0))
    if len(real_features) >= 2 and len(fake_features) >= 2:
        result["fid"] = fid_of_features(real_features, fake_features)
    else:
        skipped["fid"] = "FID needs at least 2 real and 2 generated pictures"
    if real.recon_features and len(real_features) >= 2:
        result["recon_fid"] = fid_of_features(real_features, np.concatenate(real.recon_features))
    if fake.logits:
        result["inception_score"], result["inception_score_std"] = inception_score(np.concatenate(fake.logits))
    if real.logits:
        result["real_inception_score"] = inception_score(np.concatenate(real.logits))[0]


def write_pairs_grid(args: argparse.Namespace, split: ValSplit, captions: list[str], real: dict[int, np.ndarray],
                     fake: dict[int, np.ndarray]) -> None:
    """generate.py's contact sheet, with each real picture beside the one drawn for its caption."""
    rows = sorted(set(real) & set(fake))
    # The sheet has ceil(sqrt(pictures)) columns; an even number keeps every pair on one line.
    while rows and math.ceil(math.sqrt(2 * len(rows))) % 2:
        rows.pop()
    entries = []
    for row in rows:
        for label, picture in (("real", real[row]), ("generated", fake[row])):
            data = generate.encode_picture(picture, None, "png", 95)
            entries.append((f"{label} {split.ids[row]}", captions[row] if captions else "", data))
    if entries:
        generate.write_grid(args, entries)
    else:
        print(f"evaluate: no pair of real and generated pictures to show in {args.grid}", file=sys.stderr)


def settings_of(args: argparse.Namespace, src: Sources, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    settings = {
        "ckpt": args.ckpt or (None if args.generated else generate.DEFAULT_CKPT),
        "iter_num": src.ckpt.get("iter_num"),
        "generated": args.generated,
        "data_dir": src.data_dir,
        "val_pictures": str(src.split.image_tsv),
        "image_size": src.meta["image_size"],
        "max_images": args.max_images,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": args.batch_size,
    }
    if not args.generated:
        settings.update(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed)
    return settings


def print_summary(result: dict[str, Any]) -> None:
    def number(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    s = result["settings"]
    source = s["generated"] or f"{s['ckpt']} (step {s['iter_num']}, cfg {s['cfg_scale']})"
    lines = [f"evaluate: {result['images']} generated vs {result['real_images']} real val pictures at "
             f"{s['image_size']} px; {source}"]
    if result["fid"] is not None or result["inception_score"] is not None:
        lines.append(f"  FID {number(result['fid'], '.2f')}, IS {number(result['inception_score'], '.2f')} ± "
                     f"{number(result['inception_score_std'], '.2f')} (real pictures: "
                     f"{number(result['real_inception_score'], '.2f')})")
    if result["val_bits_per_code"] is not None:
        lines.append(f"  val NLL {result['val_bits_per_code']:.4f} bits per code over {result['val_rows']} rows")
    if result["recon_psnr"] is not None:
        lines.append(f"  VQGAN round trip (the ceiling): PSNR {result['recon_psnr']:.2f} dB, FID "
                     f"{number(result['recon_fid'], '.2f')}")
    if result["demo"] is not None:
        d, chance = result["demo"], result["demo"]["chance"]
        lines.append(f"  demo attributes over {d['images']} pictures: colour {d['colour_accuracy']:.3f}, category "
                     f"{d['category_accuracy']:.3f}, both {d['both_accuracy']:.3f} (chance {chance['colour']:.3f}, "
                     f"{chance['category']:.3f}, {chance['both']:.3f})")
        for name, what in (("renders", "demo.py's renders"), ("round_trip", "their VQGAN round trip")):
            ceiling = d["ceiling"][name]
            if ceiling is not None:
                lines.append(f"    ceiling, the same scorer on {what}: colour {ceiling['colour']:.3f}, category "
                             f"{ceiling['category']:.3f}, both {ceiling['both']:.3f}")
    reasons: dict[str, list[str]] = {}
    for metric, reason in result["skipped"].items():
        reasons.setdefault(reason, []).append(metric)
    for reason, metrics in reasons.items():
        lines.append(f"  skipped {', '.join(metrics)}: {reason}")
    if result["warnings"]:
        lines.append("  warnings: " + ", ".join(f"{k}: {v}" for k, v in sorted(result["warnings"].items())))
    print("\n".join(lines), file=sys.stderr)


def check_args(args: argparse.Namespace) -> None:
    problems = []
    if args.generated and not Path(args.generated).is_file():
        problems.append(f"{args.generated}: no such file (--generated)")
    if args.batch_size < 1:
        problems.append("--batch_size must be at least 1")
    if args.temperature < 0:
        problems.append("--temperature must be 0 (greedy) or more")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        problems.append("--top_p must lie in (0, 1]")
    if args.grid_count < 1:
        problems.append("--grid_count must be at least 1")
    if problems:
        raise EvaluateError("; ".join(problems))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to score")
    what.add_argument("--ckpt", default=None, help=f"train.py checkpoint: draws a picture for every val caption "
                      f"(default: {generate.DEFAULT_CKPT}, unless --generated is given)")
    what.add_argument("--generated", default=None, help="score these pictures instead of drawing them: "
                      "`img_id<TAB>base64` lines for val img_ids, as generate.py writes them; with --ckpt too, the "
                      "checkpoint gives the val NLL")
    what.add_argument("--data_dir", default=None,
                      help="prepare.py output dir whose val split is scored (default: the checkpoint's)")
    what.add_argument("--source_dir", default=None, help="folder of the T2I_*.tsv files prepare.py read, for the "
                      "real val pictures and captions (default: the one its meta.json records)")
    what.add_argument("--vqgan_ckpt", default=None,
                      help="VQGAN for decoding and the round trip (default: the one prepare.py encoded with)")
    what.add_argument("--max_images", type=int, default=0,
                      help="score the first N val rows only, for a quick look (default: 0, all of them)")
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--inception_weights", default=None,
                         help=f"the FID Inception weights, {FID_WEIGHTS_FILE} from {FID_WEIGHTS_URL} (default: "
                         "the torch hub cache, <torch hub dir>/checkpoints/, where pytorch-fid keeps them); FID "
                         "and IS also need `pip install pytorch-fid`; without either they are skipped")
    metrics.add_argument("--no_inception", action="store_true", help="skip FID and IS even where they could run")
    metrics.add_argument("--demo", action="store_true", help="the demo data: also score how often the drawn colour "
                         "and category are the caption's")
    sampling = parser.add_argument_group("sampling (as generate.py)")
    sampling.add_argument("--cfg_scale", type=float, default=generate.DEFAULT_CFG_SCALE,
                          help="classifier-free guidance (default: %(default)s)")
    sampling.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default: 1.0)")
    sampling.add_argument("--top_k", type=int, default=None, help="sample among the k most likely codes")
    sampling.add_argument("--top_p", type=float, default=None, help="nucleus sampling threshold")
    sampling.add_argument("--seed", type=int, default=generate.DEFAULT_SEED,
                          help="seed of the sampler, as in generate.py (default: %(default)s)")
    sampling.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                          help="pictures per batch for sampling, the VQGAN, the NLL and Inception "
                          "(default: %(default)s)")
    sampling.add_argument("--device", default=None, help="cuda, cuda:1, cpu, mps (default: the best there is)")
    sampling.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                          help="precision of the GPT and its sampling; the VQGAN round trip and Inception always "
                          "run in float32 (default: bfloat16 on GPUs that have it, float32 on the CPU)")
    output = parser.add_argument_group("output")
    output.add_argument("--grid", default=None, help="also save real and generated pictures side by side, e.g. "
                        "pairs.png")
    output.add_argument("--grid_count", type=int, default=DEFAULT_GRID_PAIRS,
                        help="pairs on the sheet, the first val rows; rounded down where needed so that each pair "
                        "shares a line (8, 18 and 32 are kept) (default: %(default)s)")
    output.add_argument("--grid_font", default=None, help="font file with Chinese glyphs for the captions")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with generate.results_stdout() as out:
            result = evaluate(args)
            out.write((json.dumps(result, ensure_ascii=False) + "\n").encode("utf-8"))
        print_summary(result)
        return 0
    except EvaluateError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nevaluate.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
