"""Score a checkpoint on the val split as MUGE ranks submissions, by FID and Inception Score, and beside them by
R-precision (the real pictures' is its ceiling), the val NLL in bits per code, the VQGAN round trip (the ceiling of any
GPT over its codes) and with --demo how often the drawn colour and category are the caption's. One JSON object goes to
stdout (a metric that cannot run is null, its reason under "skipped"); the summary, progress and warnings to stderr.

    python evaluate.py                                            # out/best.pt against its val split
    python evaluate.py --ckpt out/muge/best.pt --batch_size 256 --grid pairs.png
    python evaluate.py --generated val_pictures.tsv --data_dir data/muge   # pictures drawn elsewhere
    python evaluate.py --demo --sweep cfg_scale=1,3,5 candidates=1,4   # one row per combination of settings
"""

import argparse
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import demo
from data import BadRowError, check_ids, image_from_base64, open_split, read_captions, read_meta, read_tsv
from model import GPT
from sample import DEFAULT_CKPT, add_sampling_flags, load_pipeline, sampling_flag_problems, write_grid
from scorer import Scorer, load_scorer
from utils import Report, UserError, autocast, batched, pick_device, pick_dtype, progress, results_stdout, run_main
from vqgan import VQGAN, CheckpointError, images_to_tensor, load_checkpoint_file, load_vqgan, psnr, tensor_to_images

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
R_PRECISION_OTHERS = 99  # captions a picture's own is ranked among, besides itself, as in the MUGE task text
SWEEPABLE = {"cfg_scale": float, "candidates": int, "top_k": int, "top_p": float, "temperature": float}


class InceptionUnavailable(Exception):
    """FID and IS cannot run here; the message says what to install or download, and where."""


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features of shape [N >= 2, D], got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), the root's trace from the symmetric
    sqrt(sigma1) sigma2 sqrt(sigma1): scipy's sqrtm turns complex on near-singular covariances (N < D)."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, np.float64) for a in (mu1, sigma1, mu2, sigma2))
    # rounding makes the tiny eigenvalues of a rank-deficient covariance slightly negative; they are zero
    eigenvalues, eigenvectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
    middle = root1 @ sigma2 @ root1
    trace_of_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    distance = (mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_of_root
    return max(float(distance), 0.0)  # it is never negative; rounding can make it -1e-12


def fid_of_features(features1: np.ndarray, features2: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over each of `splits` consecutive parts of the pictures (10, as in the paper that
    introduced it): (mean, std). Uniform predictions give 1; confident ones spread evenly over C classes give C."""
    logits = np.asarray(logits, dtype=np.float64)
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for part in np.array_split(log_p, min(splits, len(log_p))):
        log_marginal = np.log(np.exp(part).mean(axis=0))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def load_inception(weights: str | None, device: torch.device) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """pytorch-fid's FID Inception network with the weights in `weights`, else its torch hub cache (never downloaded),
    as a function of uint8 pictures [B, H, W, 3] to float64 (pool features [B, 2048], IS logits [B, 1008])."""
    path = Path(weights).expanduser() if weights else Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE
    problems = []
    try:
        import pytorch_fid.inception as fid_inception
    except Exception as e:  # not installed, or a torchvision built for another torch: RuntimeError at import
        problems.append(f"pytorch-fid cannot be imported ({type(e).__name__}: {e}): `pip install pytorch-fid`, and "
                        f"should its torchvision be built for another torch than this {torch.__version__}, "
                        "reinstall torchvision from the index your torch came from")
    if not path.is_file():
        problems.append(f"the FID Inception weights are not at {path}: download {FID_WEIGHTS_URL} there, or pass "
                        "--inception_weights with where you keep the file")
    if problems:
        raise InceptionUnavailable("; ".join(problems))
    try:
        state = load_checkpoint_file(path)
    except CheckpointError as e:
        raise InceptionUnavailable(f"{e} (--inception_weights should be {FID_WEIGHTS_FILE})") from None
    # pytorch-fid reads its weights only from its URL, through the torch hub cache. Hand it the file read above
    # instead: nothing is downloaded, and our loader never runs code pickled in the file.
    fetch, fid_inception.load_state_dict_from_url = fid_inception.load_state_dict_from_url, lambda *a, **k: state
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

    @torch.no_grad()
    def extract(pictures: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # resized bilinearly to the graph's input side, as pytorch-fid does
        pool = network(F.interpolate(images_to_tensor(pictures).to(device), size=(299, 299), mode="bilinear",
                                     align_corners=False))
        return pool.double().cpu().numpy(), (pool @ class_weight.T).double().cpu().numpy()

    return extract


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
    """The first `max_images` (0: all) val rows of a prepare.py output dir, and the source files they came from."""
    meta = read_meta(data_dir)
    arrays = open_split(data_dir, "val", meta)
    if arrays is None:
        raise UserError(f"{data_dir} has no val rows to score: run prepare.py with T2I_val.* or --val_fraction")
    ids_path = Path(data_dir) / "val.ids.txt"
    ids = ids_path.read_text(encoding="utf-8").split("\n")[:-1] if ids_path.is_file() else []
    if len(ids) != len(arrays[0]):
        raise UserError(f"{ids_path} does not list the {len(arrays[0])} val rows: run prepare.py again")
    n = len(ids) if max_images <= 0 else min(max_images, len(ids))
    ids = ids[:n]
    source = Path(source_dir or meta.get("data_dir") or "")
    # Val rows come from T2I_val.* when prepare.py had them, else they were held out of T2I_train.* by hash.
    prefix = "T2I_val" if meta.get("val_split", "val files") == "val files" else "T2I_train"
    image_tsv, text_tsv = source / f"{prefix}.img.tsv", source / f"{prefix}.text.tsv"
    missing = [str(p) for p in (image_tsv, text_tsv) if not p.is_file()]
    if missing:
        raise UserError(f"the source files of the val split are not there ({', '.join(missing)}): "
                        f"{'pass' if source_dir is None else 'check'} --source_dir, the folder prepare.py read")
    # prepare.py's own reading of the file, so that a repeated img_id gives the caption it stored: the first
    captions = {img_id: c.caption for img_id, c in read_captions(text_tsv)[0].items() if c.error is None}
    missing = [img_id for img_id in ids if img_id not in captions]
    if missing:
        raise UserError(f"{text_tsv} has no caption for {len(missing)} val img_id(s), e.g. {missing[0]}: is it the "
                        "file prepare.py read? (--source_dir)")
    return ValSplit(data_dir, meta, ids, arrays[0][:n], arrays[1][:n], [captions[i] for i in ids], image_tsv)


def pictures_of(path: Path, split: ValSplit, report: Report, generated: bool = False
                ) -> Iterator[tuple[int, np.ndarray]]:
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
        index = wanted.pop(row.img_id, None) if row.error is None else None
        if index is not None:
            try:
                yield index, image_from_base64(row.value, split.meta["image_size"], split.meta.get("resize", "pad"))
            except BadRowError as e:
                report.warn(f"{path}:{row.line_no}", "unreadable picture", f"{row.img_id}: {e}")
        elif generated:
            reason = row.error or f"{row.img_id}: not a val row being scored, or its second picture"
            report.warn(f"{path}:{row.line_no}", "line skipped", str(reason))
        if not wanted and not generated:
            return


class Judges:
    """What scores pictures, as far as it is available here; what is not says why under `skipped`."""

    def __init__(self, args: argparse.Namespace, ckpt: str | None, split: ValSplit, vq: VQGAN | None,
                 device: torch.device, skipped: dict[str, str]):
        self.split, self.vq, self.device, self.batch_size = split, vq, device, args.batch_size
        self.grid_count = args.grid_count if args.grid else 0
        self.extractor = self.grader = self.matcher = self.ceiling = self.reference = None
        try:
            if args.no_inception:
                raise InceptionUnavailable("--no_inception")
            self.extractor = load_inception(args.inception_weights, device)
        except InceptionUnavailable as e:
            skipped.update(fid=str(e), inception_score=str(e))
        grader = Path(args.grader) if args.grader else Path(ckpt or ".").parent / "grader" / "best.pt"
        if vq is None or not grader.is_file():
            skipped["r_precision"] = "no VQGAN (--vqgan_ckpt)" if vq is None else (
                f"no grading scorer at {grader} (train.py config/scorer_demo.py, or pass --grader)")
        else:
            self.grader, _ = load_scorer(grader, device)
            config = self.grader.config
            if config.codebook_size != split.meta["codebook_size"] or config.text_len != split.meta["text_len"]:
                raise UserError(f"the grader {grader} was trained on other data than {split.data_dir}")
        if args.demo:
            if not any(demo.product_of(c) for c in split.captions):
                raise UserError(f"--demo: none of the {len(split.ids)} val captions names one colour, category and "
                                "pattern of demo.py's: is this the demo data?")
            round_trip = (lambda p: tensor_to_images(vq.decode(vq.encode(images_to_tensor(p))))) if vq else None
            self.matcher, self.ceiling = demo.build_matcher(split.meta["image_size"], round_trip)

    def score(self, pictures: Iterable[tuple[int, np.ndarray]], what: str, real: bool = False
              ) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
        """The metrics of (row, picture) pairs, and the pictures kept for the grid. Of the real pictures, the
        features are kept as the FID reference and the VQGAN's round trip is scored."""
        count, features, logits, codes, kept, matched, psnrs, recon = 0, [], [], {}, {}, [], [], []
        for chunk in batched(progress(len(self.split.ids), what, "img", pictures), self.batch_size):
            rows, batch = [row for row, _ in chunk], np.stack([picture for _, picture in chunk])
            count += len(rows)
            kept.update((row, picture) for row, picture in chunk if row < self.grid_count)
            if self.extractor is not None:
                batch_features, batch_logits = self.extractor(batch)
                features.append(batch_features)
                logits.append(batch_logits)
            if self.grader is not None:
                codes.update(zip(rows, self.vq.encode(images_to_tensor(batch)).flatten(1).cpu(), strict=True))
            if self.matcher is not None and not real:
                matched += [(picture, demo.product_of(self.split.captions[row])) for row, picture in chunk]
            if self.vq is not None and real:
                # The codes prepare.py stored are the encoding of these very pictures: decoding them is the round trip.
                stored = torch.from_numpy(self.split.codes[rows].astype(np.int64))
                decoded = tensor_to_images(self.vq.decode(stored.view(len(rows), *self.split.meta["code_grid"])))
                psnrs += psnr(batch, decoded).tolist()
                if self.extractor is not None:
                    recon.append(self.extractor(decoded)[0])
        result: dict[str, Any] = {"images": count}
        if logits:
            result["inception_score"], result["inception_score_std"] = inception_score(np.concatenate(logits))
        if codes:
            result["r_precision"] = r_precision(self.grader, codes, self.split.text, self.device)
        if real:
            self.reference = np.concatenate(features) if features and count >= 2 else None  # FID needs 2 or more
            recon_fid = fid_of_features(self.reference, np.concatenate(recon)) if recon and count >= 2 else None
            result.update(recon_psnr=float(np.mean(psnrs)) if psnrs else None, recon_fid=recon_fid)
        elif features and count >= 2 and self.reference is not None:
            result["fid"] = fid_of_features(self.reference, np.concatenate(features))
        if matched:
            scores = demo.attribute_accuracy(*zip(*matched, strict=True), self.matcher)
            result["demo"] = {**scores, "chance": demo.chance_levels(), "ceiling": self.ceiling}
        return result, kept


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
    vq = pipe.vq if pipe else None
    vq_path = args.vqgan_ckpt or split.meta.get("vqgan_ckpt")
    if vq is None:  # a VQGAN is needed by the round trip and the grader only: the rest still runs
        try:
            if not vq_path:
                raise CheckpointError("the data records no VQGAN")
            vq = load_vqgan(vq_path, device)
        except CheckpointError as e:
            report.warn("--vqgan_ckpt", "no VQGAN", f"{e}; the round-trip metrics and R-precision are skipped")
    judges = Judges(args, ckpt, split, vq, device, skipped)
    result: dict[str, Any] = {"val_bits_per_code": None}
    if pipe is not None:
        config = pipe.model.config
        if split.meta["code_grid"] != [config.grid_rows, config.grid_cols]:
            raise UserError(f"{data_dir} holds {split.meta['code_grid']} code grids, {ckpt} draws "
                            f"{[config.grid_rows, config.grid_cols]}: pass the --data_dir it was trained on")
        check_ids(data_dir, "val", (split.codes, split.text), config.codebook_size,
                  pipe.model.text_encoder.config.vocab_size)
        nll = val_nll(pipe.model, split.codes, split.text, args.batch_size, device, dtype)
        result.update(val_nll=nll, val_bits_per_code=nll / math.log(2), val_rows=len(split.ids))
    real, real_kept = judges.score(pictures_of(split.image_tsv, split, report), "real pictures", real=True)
    result.update(real_images=real["images"], real_inception_score=real.get("inception_score"),
                  real_r_precision=real.get("r_precision"), recon_psnr=real["recon_psnr"], recon_fid=real["recon_fid"])
    if pipe and not (judges.extractor or judges.grader or judges.matcher or args.grid):
        skipped["generation"] = "nothing would look at the pictures (no FID or IS, no grader, no --demo, no --grid)"
        settings = []
    rows = []
    for sampling in settings:
        if pipe:  # one picture per val caption, as generate.py draws them
            pipe.timings["sampling"] = 0.0
            pictures = enumerate(pipe.draw_captions(split.captions, args.seed, args.batch_size, **sampling))
        else:
            pictures = pictures_of(Path(args.generated), split, report, generated=True)
        setting_started = time.perf_counter()
        metrics, kept = judges.score(pictures, "generated pictures")
        rows.append({"settings": sampling, **metrics, "seconds": round(time.perf_counter() - setting_started, 2),
                     "sampling_seconds": round(pipe.timings["sampling"], 2) if pipe else None})
        if args.grid and len(rows) == 1:
            write_pairs_grid(args.grid, args.grid_font, split, real_kept, kept)
    for row in [*rows, result]:
        row.update({metric: None for metric in skipped if metric not in row})
    result.update(rows[0] if len(rows) == 1 else {"sweep": rows})
    result.update(skipped=skipped, warnings=dict(report.counts), seconds=round(time.perf_counter() - started, 2),
                  ckpt=str(ckpt) if ckpt else None, generated=args.generated, data_dir=data_dir)
    return result


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

    lines = [f"evaluate: {result['real_images']} real val pictures; {result['ckpt'] or result['generated']}"]
    if result["val_bits_per_code"] is not None:
        lines.append(f"  val NLL {result['val_bits_per_code']:.4f} bits per code over {result['val_rows']} rows")
    if result["recon_psnr"] is not None:
        lines.append(f"  VQGAN round trip (the ceiling): PSNR {result['recon_psnr']:.2f} dB, FID "
                     f"{number(result['recon_fid'], '.2f')}; real pictures: IS "
                     f"{number(result['real_inception_score'], '.2f')}, R-precision "
                     f"{number(result['real_r_precision'])}")
    rows = result.get("sweep") or ([result] if "settings" in result else [])
    # a column for each setting that differs between rows, when the checkpoint drew the pictures
    names = [n for n in SWEEPABLE if len({str(row["settings"][n]) for row in rows}) > 1] or ["cfg_scale"]
    names = names if result["ckpt"] else []
    table = [[*names, "colour", "category", "both", "R-precision", "FID", "IS", "sampling s"]]
    formats = {"colour": ".3f", "category": ".3f", "both": ".3f", "r_precision": ".3f", "fid": ".2f",
               "inception_score": ".2f", "sampling_seconds": ".1f"}
    for row in rows:
        values = {**row, **(row.get("demo") or {})}
        table.append([str(row["settings"][n]) for n in names] + [number(values.get(k), f) for k, f in formats.items()])
    if rows:
        lines += ["  " + "  ".join(f"{cell:>11}" for cell in cells) for cells in table]
    for reason in dict.fromkeys(result["skipped"].values()):  # each reason once, with the metrics it skipped
        lines.append(f"  skipped {', '.join(m for m, r in result['skipped'].items() if r == reason)}: {reason}")
    if result["warnings"]:
        lines.append("  warnings: " + ", ".join(f"{k}: {v}" for k, v in sorted(result["warnings"].items())))
    print("\n".join(lines), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--ckpt", help="train.py checkpoint that draws a picture for every val caption, as generate.py does "
        f"(default: {DEFAULT_CKPT}, unless --generated is given)")
    add("--generated", help="score these `img_id<TAB>base64` lines (generate.py's output) instead: one for every val "
        "row scored; with --ckpt too, the checkpoint gives the val NLL")
    add("--data_dir", help="prepare.py output dir whose val split is scored (default: the checkpoint's)")
    add("--source_dir", help="folder of the T2I_*.tsv files prepare.py read (default: the one its meta.json records)")
    add("--vqgan_ckpt", help="VQGAN for decoding and the round trip (default: the one prepare.py encoded with)")
    add("--max_images", type=int, default=0, help="score the first N val rows only (default: 0, all of them)")
    add("--inception_weights", help=f"{FID_WEIGHTS_FILE} from {FID_WEIGHTS_URL}, the weights of FID and IS, which "
        "also need `pip install pytorch-fid` (default: where pytorch-fid keeps them, <torch hub dir>/checkpoints/)")
    add("--no_inception", action="store_true", help="skip FID and IS even where they could run")
    add("--grader", help="the scorer that grades R-precision (default: <the checkpoint's folder>/grader/best.pt)")
    add("--demo", action="store_true", help="the demo data: also score how often the drawn colour and category match")
    add("--grid", help="save the first val rows' real and generated pictures side by side, e.g. pairs.png")
    add("--grid_count", type=int, default=8, help="pairs on the sheet, fewer to fill whole rows (default: %(default)s)")
    add("--grid_font", help="font file with Chinese glyphs for the captions")
    add_sampling = add_sampling_flags(parser).add_argument
    add_sampling("--sweep", nargs="+", metavar="NAME=V1,V2", help="score every combination of these settings "
                 f"({', '.join(SWEEPABLE)}), one row each, e.g. cfg_scale=1,3,5 candidates=1,4 top_k=0,100 (0: off)")
    add_sampling("--batch_size", type=int, default=32, help="pictures per batch, in every step (default: %(default)s)")
    args = parser.parse_args(argv)

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
