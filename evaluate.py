"""Score a checkpoint on the val split the way MUGE ranks submissions (FID, IS), with R-precision and cheap
signals beside.

    python evaluate.py                                            # out/best.pt against its val split
    python evaluate.py --ckpt out/muge/best.pt --batch_size 256 --grid pairs.png
    python evaluate.py --generated val_pictures.tsv --data_dir data/muge   # pictures drawn elsewhere
    python evaluate.py --demo                                     # the demo: do colour and category match?
    python evaluate.py --demo --sweep cfg_scale=1,3,5 candidates=1,4   # one row per combination of settings

With a checkpoint, one picture is drawn per val caption by generate.py's sampler and compared with the real
val pictures, fitted to the square exactly as prepare.py fitted them. The metrics:

  fid, inception_score     the FID Inception network (pytorch-fid's port of TensorFlow's 2015-12-05 graph),
                           when pytorch-fid and its weights are installed (see --inception_weights)
  r_precision              how often a picture's own caption ranks first among it and 99 other val captions,
                           by a grading scorer trained on other rows than a --scorer that ranks best-of-N
                           candidates; real_r_precision is the same for the real pictures: the ceiling
  val_bits_per_code        the model's negative log-likelihood of the val codes, every row once
  recon_psnr, recon_fid    the VQGAN's round trip of the real pictures: the best any GPT over its codes can do
  demo                     with --demo: how often the drawn colour and category are the caption's

One JSON object goes to stdout; the summary, progress and warnings go to stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import demo
from data import BadRowError, check_ids, image_from_base64, open_split, read_captions, read_meta, read_tsv
from model import GPT
from sample import (
    DEFAULT_CKPT,
    Pipeline,
    add_sampling_flags,
    load_pipeline,
    load_ranker,
    sampling_flag_problems,
    write_grid,
)
from scorer import Scorer, load_scorer
from utils import Report, UserError, autocast, batched, pick_device, pick_dtype, progress, results_stdout, run_main
from vqgan import VQGAN, CheckpointError, images_to_tensor, load_checkpoint_file, load_vqgan, psnr, tensor_to_images

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
INCEPTION_SIZE = 299  # the graph's input side; pictures are resized to it bilinearly, as pytorch-fid does
IS_SPLITS = 10  # the Inception Score is the mean over 10 splits, as in the paper that introduced it
R_PRECISION_OTHERS = 99  # captions a picture's own is ranked among, besides itself, as in the MUGE task text
SWEEPABLE = {"cfg_scale": float, "candidates": int, "top_k": int, "top_p": float, "temperature": float}

# A feature extractor maps pictures [B, 3, H, W] in [-1, 1] to (features [B, D], class logits [B, C]).
Extractor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), the root's trace from the symmetric
    sqrt(sigma1) sigma2 sqrt(sigma1): scipy's sqrtm turns complex on near-singular covariances (N < D)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    # rounding makes the tiny eigenvalues of a rank-deficient covariance slightly negative; they are zero
    eigenvalues, eigenvectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
    middle = root1 @ sigma2 @ root1
    trace_of_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    difference = mu1 - mu2
    distance = difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_of_root
    return max(float(distance), 0.0)  # it is never negative; rounding can make it -1e-12


def fid_of_features(features1: np.ndarray, features2: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over each of `splits` consecutive parts of the pictures: (mean, std).
    Uniform predictions give 1; confident predictions spread evenly over C classes give C."""
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


def load_inception(weights: str | None, device: torch.device) -> Extractor:
    """The FID Inception network (2048 pool features, 1008 Inception Score logits) of pytorch-fid, with the weights in
    `weights`, else its torch hub cache; never downloads. Raises InceptionUnavailable saying what to install where."""
    path = Path(weights).expanduser() if weights else Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE
    problems = []
    try:
        import pytorch_fid.inception as fid_inception
    except ImportError:
        problems.append("the pytorch-fid package is not installed: `pip install pytorch-fid` (with a torch from "
                        "download.pytorch.org, install the torchvision it brings from the same index, so that the "
                        "builds match: `pip install torchvision --index-url https://download.pytorch.org/whl/cpu`)")
    except Exception as e:  # a torchvision built for another torch fails at import with RuntimeError
        problems.append(f"pytorch-fid is installed but cannot be imported ({type(e).__name__}: {e}); usually a "
                        f"torchvision built for another torch than this {torch.__version__}: reinstall torchvision "
                        "from the index your torch came from (see https://pytorch.org/get-started/locally/)")
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
    # The logits leave out the classifier's bias, as the original IS code did, so that scores compare with published
    # ones; with the classifier replaced by nn.Identity the network returns the pool features.
    class_weight = network.fc.weight.detach().clone().to(device)
    network.fc = nn.Identity()
    network.to(device).eval()

    def extract(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = network(F.interpolate(x.float(), size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                                     align_corners=False))
        return pool, pool @ class_weight.T

    return extract


# ----------------------------------------------------------------------------------------------------------
# the val split


@dataclass
class ValSplit:
    data_dir: str
    meta: dict
    ids: list[str]  # the img_ids of the rows scored, in the order of the memmaps
    codes: np.ndarray  # uint16 [n, rows*cols]: what prepare.py encoded the real pictures to
    text: np.ndarray  # uint16 [n, text_len]
    captions: list[str]
    image_tsv: Path


def open_val_split(data_dir: str, source_dir: str | None, max_images: int) -> ValSplit:
    """The val rows of a prepare.py output dir, and the source files their pictures and captions came from."""
    meta = read_meta(data_dir)
    arrays = open_split(data_dir, "val", meta)
    if arrays is None:
        raise UserError(f"{data_dir} has no val rows to score: prepare.py with a T2I_val.* pair or --val_fraction "
                        "above 0")
    ids_path = Path(data_dir) / "val.ids.txt"
    ids = ids_path.read_text(encoding="utf-8").split("\n")[:-1] if ids_path.is_file() else []
    if len(ids) != len(arrays[0]):
        raise UserError(f"{ids_path} does not list the {len(arrays[0])} val rows: run prepare.py again")
    source = Path(source_dir or meta.get("data_dir") or "")
    # Val rows come from T2I_val.* when prepare.py had them, else they were held out of T2I_train.* by hash.
    prefix = "T2I_val" if meta.get("val_split", "val files") == "val files" else "T2I_train"
    image_tsv, text_tsv = source / f"{prefix}.img.tsv", source / f"{prefix}.text.tsv"
    missing = [str(p) for p in (image_tsv, text_tsv) if not p.is_file()]
    if missing:
        raise UserError(f"the source files of the val split are not there ({', '.join(missing)}): "
                        f"{'pass' if source_dir is None else 'check'} --source_dir, the folder prepare.py read")
    n = len(ids) if max_images <= 0 else min(max_images, len(ids))
    # prepare.py's own reading of the file, so that a repeated img_id gives the caption it stored: the first
    captions = {img_id: c.caption for img_id, c in read_captions(text_tsv)[0].items() if c.error is None}
    missing = [img_id for img_id in ids[:n] if img_id not in captions]
    if missing:
        raise UserError(f"{text_tsv} has no caption for {len(missing)} val img_id(s), e.g. {missing[0]}: is it the "
                        "file prepare.py read? (--source_dir)")
    return ValSplit(data_dir, meta, ids[:n], arrays[0][:n], arrays[1][:n], [captions[i] for i in ids[:n]], image_tsv)


def pictures_of(path: Path, split: ValSplit, report: Report, generated: bool) -> Iterator[tuple[int, np.ndarray]]:
    """(row, picture) of an `img_id \\t base64` file for the val rows being scored. A generated file must
    answer every one of them: FID over a part is no FID."""
    wanted = {img_id: row for row, img_id in enumerate(split.ids)}
    if generated:
        found = {row.img_id for row in read_tsv(path) if row.error is None} & wanted.keys()
        if len(found) < len(wanted):
            lacking = next(img_id for img_id in split.ids if img_id not in found)
            raise UserError(f"{path} has pictures for {len(found)} of the {len(wanted)} val rows scored (none for "
                            f"{lacking}, for one): draw them all, or score fewer with --max_images")
    for row in read_tsv(path):
        where = f"{path}:{row.line_no}"
        index = wanted.pop(row.img_id, None) if row.error is None else None
        if index is None:
            if generated:
                report.warn(where, "line skipped", str(row.error or f"{row.img_id}: not a val row being scored, or "
                                                                     "its second picture"))
            continue
        try:
            # fitted to the square exactly as prepare.py fitted the training pictures
            yield index, image_from_base64(row.value, split.meta["image_size"], split.meta.get("resize", "pad"))
        except BadRowError as e:
            report.warn(where, "unreadable picture", f"{row.img_id}: {e}")
        if not wanted and not generated:
            return


# ----------------------------------------------------------------------------------------------------------
# scoring


@dataclass
class Tally:
    """What a pass over pictures keeps for the metrics."""

    count: int = 0
    features: list[np.ndarray] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    codes: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> the VQGAN's codes of its picture
    demo: dict[str, float] = field(default_factory=lambda: {"colour": 0.0, "category": 0.0, "both": 0.0, "images": 0})
    kept: dict[int, np.ndarray] = field(default_factory=dict)  # pictures for the grid

    def add(self, chunk: list[tuple[int, np.ndarray]], tools: Tools) -> np.ndarray:
        rows, pictures = [row for row, _ in chunk], np.stack([picture for _, picture in chunk])
        self.count += len(chunk)
        self.kept.update((row, picture) for row, picture in chunk if row < tools.grid_count)
        if tools.extractor is not None:
            features, logits = features_of_batch(tools.extractor, pictures, tools.device)
            self.features.append(features)
            self.logits.append(logits)
        if tools.grader is not None:
            self.codes.update(zip(rows, tools.vq.encode(images_to_tensor(pictures)).flatten(1).cpu(), strict=True))
        if tools.matcher is not None:
            products = [demo.product_of(tools.split.captions[row]) for row in rows]
            scores = demo.attribute_accuracy(pictures, products, tools.matcher)
            for key in ("colour", "category", "both"):
                self.demo[key] += scores[key] * scores["images"]
            self.demo["images"] += scores["images"]
        return pictures

    def metrics(self, tools: Tools, real: Tally | None) -> dict[str, Any]:
        result: dict[str, Any] = {"images": self.count}
        if self.logits:
            result["inception_score"], result["inception_score_std"] = inception_score(np.concatenate(self.logits))
        if real is not None and self.features and self.count >= 2 and real.count >= 2:
            result["fid"] = fid_of_features(np.concatenate(real.features), np.concatenate(self.features))
        if tools.grader is not None and self.codes:
            result["r_precision"] = r_precision(tools.grader, self.codes, tools.split.text, tools.device)
        if tools.matcher is not None:
            result["demo"] = {k: v / max(self.demo["images"], 1) for k, v in self.demo.items() if k != "images"}
            result["demo"]["images"] = self.demo["images"]
        return result


@dataclass
class Tools:
    """What scores pictures, as far as it is available here."""

    split: ValSplit
    device: torch.device
    batch_size: int
    vq: VQGAN | None
    extractor: Extractor | None
    grader: Scorer | None
    matcher: demo.CategoryMatcher | None
    grid_count: int


@torch.no_grad()
def r_precision(grader: Scorer, codes: dict[int, torch.Tensor], text: np.ndarray, device: torch.device,
                seed: int = 0) -> float:
    """Share of pictures whose own caption the grader ranks above R_PRECISION_OTHERS other val captions, drawn
    at random (the same ones for every call: the seed is fixed)."""
    rows = sorted(codes)
    images = torch.cat([grader.embed_images(torch.stack([codes[r] for r in chunk]).to(device))
                        for chunk in batched(rows, 256)])
    captions = torch.cat([grader.embed_captions(torch.from_numpy(text[chunk].astype(np.int64)).to(device))
                          for chunk in batched(range(len(text)), 256)])
    similarity = (images.float() @ captions.float().T).cpu().numpy()
    rng, hits = np.random.default_rng(seed), 0
    for i, row in enumerate(rows):
        others = rng.choice(np.delete(np.arange(len(text)), row), min(R_PRECISION_OTHERS, len(text) - 1),
                            replace=False)
        hits += similarity[i, row] > similarity[i, others].max(initial=-np.inf)
    return hits / len(rows)


@torch.no_grad()
def val_nll(model: GPT, codes: np.ndarray, text: np.ndarray, batch_size: int, device: torch.device,
            dtype: torch.dtype) -> float:
    """Mean negative log-likelihood in nats per code over every given row once, with its caption: unlike
    train.py's estimate (random batches), two checkpoints scored on the same data see the same codes."""
    total = 0.0
    for start in range(0, len(codes), batch_size):
        batch_codes = torch.from_numpy(codes[start : start + batch_size].astype(np.int64)).to(device)
        batch_text = torch.from_numpy(text[start : start + batch_size].astype(np.int64)).to(device)
        with autocast(device, dtype):
            total += model(batch_codes, batch_text)[1].item() * len(batch_codes)
    return total / len(codes)


def score_real(tools: Tools, report: Report) -> tuple[Tally, dict[str, Any]]:
    """The real pictures (the FID reference, the R-precision ceiling) and the VQGAN's round trip of them."""
    real, split, psnrs, recon_features = Tally(), tools.split, [], []
    pairs = pictures_of(split.image_tsv, split, report, generated=False)
    for chunk in batched(progress(len(split.ids), "real pictures", "img", pairs), tools.batch_size):
        pictures = real.add(chunk, tools)
        if tools.vq is not None:
            # The codes prepare.py stored are the encoding of these very pictures: decoding them is the round trip.
            stored = torch.from_numpy(split.codes[[row for row, _ in chunk]].astype(np.int64))
            recon = tensor_to_images(tools.vq.decode(stored.view(len(chunk), *split.meta["code_grid"])))
            psnrs.extend(psnr(pictures, recon).tolist())
            if tools.extractor is not None:
                recon_features.append(features_of_batch(tools.extractor, recon, tools.device)[0])
    metrics = real.metrics(tools, None)
    result = {"real_images": real.count, "real_inception_score": metrics.get("inception_score"),
              "real_r_precision": metrics.get("r_precision"), "recon_psnr": float(np.mean(psnrs)) if psnrs else None}
    if recon_features and real.count >= 2:
        result["recon_fid"] = fid_of_features(np.concatenate(real.features), np.concatenate(recon_features))
    return real, result


# ----------------------------------------------------------------------------------------------------------
# the run


def sweep_settings(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The sampling settings to score: the flags' alone, or every combination --sweep lists."""
    base = {name: getattr(args, name) for name in SWEEPABLE}
    axes = []
    for item in args.sweep or []:
        name, _, values = item.partition("=")
        if name not in SWEEPABLE or not values:
            raise UserError(f"--sweep {item}: expected NAME=V1,V2,... with NAME one of {', '.join(SWEEPABLE)}")
        try:
            axes.append([(name, SWEEPABLE[name](v)) for v in values.split(",")])
        except ValueError:
            raise UserError(f"--sweep {item}: the values of {name} must be {SWEEPABLE[name].__name__}s") from None
    return [{**base, **dict(combo)} for combo in itertools.product(*axes)]


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Every metric that can run here; those that cannot are null, with the reason under "skipped"."""
    started = time.perf_counter()
    report, skipped = Report(), {}
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    settings = sweep_settings(args)
    ckpt = args.ckpt or (None if args.generated else DEFAULT_CKPT)
    pipe = load_pipeline(ckpt, device, dtype, args.vqgan_ckpt, args.data_dir, report) if ckpt else None
    data_dir = args.data_dir or (pipe.ckpt.get("data_dir") if pipe else None)
    if not data_dir:
        raise UserError("--generated needs --data_dir, the prepare.py output dir of the val split")
    split = open_val_split(data_dir, args.source_dir, args.max_images)
    vq = pipe.vq if pipe else load_vqgan_if_there(args.vqgan_ckpt or split.meta.get("vqgan_ckpt"), device, report)
    if pipe is not None:
        check_ids(data_dir, "val", (split.codes, split.text), pipe.model.config.codebook_size,
                  pipe.model.text_encoder.config.vocab_size)
    tools = Tools(split, device, args.batch_size, vq, load_extractor(args, device, skipped),
                  load_grader(args, ckpt, split, vq, device, skipped), None, args.grid_count if args.grid else 0)
    best_of_n = pipe is not None and max(sampling["candidates"] for sampling in settings) > 1
    ranker = load_ranker(args.scorer, pipe, ckpt) if best_of_n and args.scorer else None
    result: dict[str, Any] = {"val_bits_per_code": None, "recon_psnr": None, "recon_fid": None}
    ceiling = None
    if args.demo:
        if not any(demo.product_of(c) for c in split.captions):
            raise UserError(f"--demo: none of the {len(split.ids)} val captions names one colour, category and "
                            "pattern of demo.py's: is this the demo data?")
        round_trip = (lambda p: tensor_to_images(vq.decode(vq.encode(images_to_tensor(p))))) if vq else None
        tools.matcher, ceiling = demo.build_matcher(split.meta["image_size"], round_trip)
    if pipe is not None:
        nll = val_nll(pipe.model, split.codes, split.text, args.batch_size, device, dtype)
        result.update(val_nll=nll, val_bits_per_code=nll / math.log(2), val_rows=len(split.ids))
    real, real_result = score_real(tools, report)
    result.update(real_result)
    rows = []
    if pipe and not (tools.extractor or tools.grader or tools.matcher or args.grid):
        skipped["generation"] = "nothing would look at the pictures (no FID or IS, no grader, no --demo, no --grid)"
    else:
        rows = [score_setting(pipe, ranker, split, sampling, args, tools, real, ceiling, report)
                for sampling in settings]
    kept = [row.pop("kept") for row in rows]
    if args.grid and rows:
        write_pairs_grid(args.grid, args.grid_font, split, real.kept, kept[0])
    for metric in skipped:
        for row in rows:
            row.setdefault(metric, None)
        result.setdefault(metric, None)
    result.update(rows[0] if len(rows) == 1 else {"sweep": rows})
    result.update(skipped=skipped, warnings=dict(report.counts), seconds=round(time.perf_counter() - started, 2),
                  ckpt=str(ckpt) if ckpt else None, generated=args.generated, data_dir=data_dir)
    return result


def score_setting(pipe: Pipeline | None, ranker: Scorer | None, split: ValSplit, sampling: dict[str, Any],
                  args: argparse.Namespace, tools: Tools, real: Tally, ceiling: dict | None, report: Report
                  ) -> dict[str, Any]:
    """The metrics of the pictures drawn with one setting (or read from --generated)."""
    if pipe:  # one picture per val caption, as generate.py draws them
        sampler_settings = {name: value for name, value in sampling.items() if name != "candidates"}
        pictures = enumerate(pipe.draw_captions(split.captions, args.seed, args.batch_size, sampling["candidates"],
                                                ranker, **sampler_settings))
    else:
        pictures = pictures_of(Path(args.generated), split, report, generated=True)
    tally, started = Tally(), time.perf_counter()
    for chunk in batched(progress(len(split.ids), "generated pictures", "img", pictures), args.batch_size):
        tally.add(chunk, tools)
    metrics = tally.metrics(tools, real)
    if metrics.get("demo") is not None:
        metrics["demo"].update(chance=demo.chance_levels(), ceiling=ceiling)
    sampling_seconds = None
    if pipe:
        sampling_seconds, pipe.timings["sampling"] = round(pipe.timings["sampling"], 2), 0.0
    return {"settings": sampling, **metrics, "seconds": round(time.perf_counter() - started, 2),
            "sampling_seconds": sampling_seconds, "kept": tally.kept}


def load_extractor(args: argparse.Namespace, device: torch.device, skipped: dict[str, str]) -> Extractor | None:
    reason = "--no_inception"
    if not args.no_inception:
        try:
            return load_inception(args.inception_weights, device)
        except InceptionUnavailable as e:
            reason = str(e)
    skipped.update(fid=reason, inception_score=reason)
    return None


def load_grader(args: argparse.Namespace, ckpt: str | None, split: ValSplit, vq: VQGAN | None, device: torch.device,
                skipped: dict[str, str]) -> Scorer | None:
    """The scorer that grades R-precision: --grader, or <checkpoint folder>/grader/best.pt when there is one."""
    path = Path(args.grader) if args.grader else Path(ckpt or ".").parent / "grader" / "best.pt"
    if not path.is_file() or vq is None:
        skipped["r_precision"] = (f"no grading scorer at {path} (train.py config/scorer_demo.py --rows=odd "
                                  "--out_dir=out/grader, or pass --grader)" if vq else "no VQGAN (--vqgan_ckpt)")
        return None
    grader, _ = load_scorer(path, device)
    if grader.config.codebook_size != split.meta["codebook_size"] or grader.config.text_len != split.meta["text_len"]:
        raise UserError(f"the grader {path} was trained on other data than {split.data_dir}")
    return grader


def load_vqgan_if_there(path: str | None, device: torch.device, report: Report) -> VQGAN | None:
    """The VQGAN for the round trip; without one those metrics are skipped, not the run."""
    if not path or not Path(path).is_file():
        report.warn(str(path), "no VQGAN", "the round-trip metrics are skipped (pass --vqgan_ckpt)")
        return None
    try:
        return load_vqgan(path, device)
    except CheckpointError as e:
        report.warn(str(path), "unreadable VQGAN", f"{e}; the round-trip metrics are skipped")
        return None


def write_pairs_grid(path: str, font: str | None, split: ValSplit, real: dict[int, np.ndarray],
                     fake: dict[int, np.ndarray]) -> None:
    """generate.py's contact sheet, with each real picture beside the one drawn for its caption."""
    rows = sorted(set(real) & set(fake))
    # The sheet has ceil(sqrt(pictures)) columns; an even number keeps every pair on one line.
    while rows and math.ceil(math.sqrt(2 * len(rows))) % 2:
        rows.pop()
    entries = [(f"{label} {split.ids[row]}", split.captions[row], pictures[row])
               for row in rows for label, pictures in (("real", real), ("generated", fake))]
    if entries:
        write_grid(entries, path, font)


def print_summary(result: dict[str, Any]) -> None:
    def number(value: float | None, fmt: str = ".3f") -> str:
        return "n/a" if value is None else format(value, fmt)

    def table_line(cells: list[str]) -> str:
        return "  " + "  ".join(f"{cell:>11}" for cell in cells)

    lines = [f"evaluate: {result['real_images']} real val pictures; {result['ckpt'] or result['generated']}"]
    if result["val_bits_per_code"] is not None:
        lines.append(f"  val NLL {result['val_bits_per_code']:.4f} bits per code over {result['val_rows']} rows")
    if result["recon_psnr"] is not None:
        lines.append(f"  VQGAN round trip (the ceiling): PSNR {result['recon_psnr']:.2f} dB, FID "
                     f"{number(result.get('recon_fid'), '.2f')}; real pictures: IS "
                     f"{number(result.get('real_inception_score'), '.2f')}, R-precision "
                     f"{number(result.get('real_r_precision'))}")
    rows = result.get("sweep") or ([result] if "settings" in result else [])
    # a column for each setting that differs between rows, when the checkpoint drew the pictures
    names = [n for n in SWEEPABLE if len({str(row["settings"][n]) for row in rows}) > 1] or ["cfg_scale"]
    names = names if result["ckpt"] else []
    if rows:
        lines.append(table_line([*names, "colour", "category", "both", "R-precision", "FID", "IS", "sampling s"]))
    for row in rows:
        scores = row.get("demo") or {}
        cells = [number(scores.get(key)) for key in ("colour", "category", "both")] + [
            number(row.get("r_precision")), number(row.get("fid"), ".2f"), number(row.get("inception_score"), ".2f"),
            number(row.get("sampling_seconds"), ".1f")]
        lines.append(table_line([str(row["settings"][n]) for n in names] + cells))
    reasons: dict[str, list[str]] = {}
    for metric, reason in result["skipped"].items():
        reasons.setdefault(reason, []).append(metric)
    lines += [f"  skipped {', '.join(metrics)}: {reason}" for reason, metrics in reasons.items()]
    if result["warnings"]:
        lines.append("  warnings: " + ", ".join(f"{k}: {v}" for k, v in sorted(result["warnings"].items())))
    print("\n".join(lines), file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to score")
    what.add_argument("--ckpt", help=f"train.py checkpoint: draws a picture for every val caption (default: "
                      f"{DEFAULT_CKPT}, unless --generated is given)")
    what.add_argument("--generated", help="score these pictures instead of drawing them: `img_id<TAB>base64` lines "
                      "for every val img_id, as generate.py writes them; with --ckpt too, the checkpoint gives the "
                      "val NLL")
    what.add_argument("--data_dir", help="prepare.py output dir whose val split is scored (default: the checkpoint's)")
    what.add_argument("--source_dir", help="folder of the T2I_*.tsv files prepare.py read, for the real val pictures "
                      "and captions (default: the one its meta.json records)")
    what.add_argument("--vqgan_ckpt",
                      help="VQGAN for decoding and the round trip (default: the one prepare.py encoded with)")
    what.add_argument("--max_images", type=int, default=0,
                      help="score the first N val rows only, for a quick look (default: 0, all of them)")
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--inception_weights", help=f"the FID Inception weights, {FID_WEIGHTS_FILE} from "
                         f"{FID_WEIGHTS_URL} (default: the torch hub cache, <torch hub dir>/checkpoints/, where "
                         "pytorch-fid keeps them); FID and IS also need `pip install pytorch-fid`; without either "
                         "they are skipped")
    metrics.add_argument("--no_inception", action="store_true", help="skip FID and IS even where they could run")
    metrics.add_argument("--grader", help="the scorer that grades R-precision, trained on other rows than a --scorer "
                         "that ranks candidates (default: <the checkpoint's folder>/grader/best.pt)")
    metrics.add_argument("--demo", action="store_true", help="the demo data: also score how often the drawn colour "
                         "and category are the caption's")
    sampling = add_sampling_flags(parser)
    sampling.add_argument("--sweep", nargs="+", metavar="NAME=V1,V2", help="score every combination of these "
                          f"settings ({', '.join(SWEEPABLE)}), one row each; e.g. cfg_scale=1,3,5 candidates=1,4 "
                          "top_k=0,100 (top_k 0: off)")
    sampling.add_argument("--batch_size", type=int, default=32, help="pictures per batch for sampling, the VQGAN, "
                          "the NLL and Inception (default: %(default)s)")
    output = parser.add_argument_group("output")
    output.add_argument("--grid", help="also save real and generated pictures side by side, e.g. pairs.png (the "
                        "first setting's)")
    output.add_argument("--grid_count", type=int, default=8, help="pairs on the sheet, the first val rows; "
                        "rounded down so that each pair shares a line (default: %(default)s)")
    output.add_argument("--grid_font", help="font file with Chinese glyphs for the captions")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> None:
        problems = sampling_flag_problems(args)
        if args.batch_size < 1 or args.grid_count < 1:
            problems.append("--batch_size and --grid_count must be at least 1")
        if args.generated and not Path(args.generated).is_file():
            problems.append(f"{args.generated}: no such file (--generated)")
        if problems:
            raise UserError("; ".join(problems))
        with results_stdout() as out:
            result = evaluate(args)
            out.write((json.dumps(result, ensure_ascii=False) + "\n").encode("utf-8"))
        print_summary(result)

    return run_main("evaluate.py", run)


if __name__ == "__main__":
    sys.exit(main())
