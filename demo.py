"""The embedded demo data, in the MUGE layout: flat product pictures (category, colour, pattern) on white, with shop
titles naming the three among filler words, and the scoring of a generated picture against its title."""

import base64
import hashlib
import io
import itertools
import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

CATEGORIES = ("T恤", "连衣裙", "裤子", "手提包", "帽子", "运动鞋", "口红", "香水")
# Titles write a colour as "<name>色". Each has a body and a deeper trim shade, far apart from the other colours'.
# A white product would vanish on white, so its trim and pattern are grey, and grey pixels count as white.
COLOURS = {  # name: (body, trim)
    "红": ((215, 35, 40), (160, 20, 25)),
    "蓝": ((35, 85, 200), (20, 55, 150)),
    "绿": ((40, 150, 70), (25, 105, 45)),
    "黑": ((30, 30, 30), (70, 70, 70)),
    "白": ((244, 244, 244), (165, 165, 165)),
    "黄": ((245, 200, 30), (200, 150, 10)),
    "粉": ((245, 145, 185), (225, 95, 150)),
    "紫": ((125, 60, 175), (90, 35, 130)),
}
PATTERNS = ("纯色", "条纹", "格子", "波点")
BACKGROUND = (255, 255, 255)
SUPERSAMPLE = 4  # drawn at 4x and reduced, for smooth edges

# Filler that never contains a colour ("<x>色"), a category or a pattern word, so titles stay unambiguous.
YEARS = ("2021", "2020", "2022", "")
SEASONS = ("夏季新款", "春季新款", "秋冬新款", "春秋新款", "新款", "夏装")
STYLES = ("韩版宽松", "ins风", "欧美风", "日系简约", "法式复古", "时尚百搭", "小众设计感", "轻奢", "学院风", "气质")
SUFFIXES = {
    "T恤": ("短袖女", "男士短袖上衣", "女宽松打底衫", "圆领半袖", "纯棉上衣"),
    "连衣裙": ("女夏中长款", "收腰显瘦长裙", "气质女神范", "雪纺裙子"),
    "裤子": ("女高腰阔腿", "男士休闲直筒", "宽松九分", "显瘦哈伦"),
    "手提包": ("女大容量", "单肩斜挎", "通勤托特包", "真皮女包"),
    "帽子": ("女遮阳", "鸭舌棒球帽", "男士防晒", "户外休闲"),
    "运动鞋": ("男跑步鞋", "女透气休闲鞋", "学生板鞋", "轻便气垫"),
    "口红": ("哑光滋润", "持久保湿", "唇膏正品", "学生平价"),
    "香水": ("女士持久淡香", "清新花果香", "50ml", "男士古龙"),
}


@dataclass(frozen=True)
class Product:
    category: str
    colour: str
    pattern: str


ALL_PRODUCTS = tuple(Product(*p) for p in itertools.product(CATEGORIES, COLOURS, PATTERNS))


def make_caption(product: Product, rng: random.Random) -> str:
    """A shop-style title that names the product's category, colour and pattern among filler words."""
    when = rng.choice(YEARS) + rng.choice(SEASONS)
    style = rng.choice(STYLES)
    suffix = rng.choice(SUFFIXES[product.category])
    category, colour, pattern = product.category, product.colour + "色", product.pattern
    return rng.choice((f"{when}{style}{colour}{pattern}{category}{suffix}",
                       f"{style}{pattern}{category}{suffix}{when}{colour}",
                       f"{when}{colour}{category}{style}{pattern}{suffix}",
                       f"{pattern}{colour}{category}{suffix}{style}{when}"))


def parse_caption(caption: str) -> Product:
    """The product a title describes; ValueError unless exactly one category, colour and pattern are named."""
    found = {"category": [c for c in CATEGORIES if c in caption], "colour": [c for c in COLOURS if c + "色" in caption],
             "pattern": [p for p in PATTERNS if p in caption]}
    for what, words in found.items():
        if len(words) != 1:
            raise ValueError(f"caption {caption!r} names {len(words)} {what} words ({words}), expected exactly one")
    return Product(*(words[0] for words in found.values()))


# Silhouettes in a unit box (x right, y down) and the box's width / height.
ASPECT = {"T恤": 1.1, "连衣裙": 0.75, "裤子": 0.6, "手提包": 1.2, "帽子": 1.5, "运动鞋": 1.8, "口红": 0.35, "香水": 0.7}
# Parts drawn in the pattern are polygons; "trim" parts (handles, caps, rings) are drawn in the outline colour.
SHAPES: dict[str, dict[str, list]] = {
    "T恤": {"body": [[(0.38, 0.0), (0.18, 0.04), (0.0, 0.3), (0.12, 0.43), (0.22, 0.34), (0.22, 1.0), (0.78, 1.0),
                      (0.78, 0.34), (0.88, 0.43), (1.0, 0.3), (0.82, 0.04), (0.62, 0.0), (0.56, 0.07), (0.5, 0.09),
                      (0.44, 0.07)]]},
    "连衣裙": {"body": [[(0.28, 0.0), (0.35, 0.0), (0.5, 0.14), (0.65, 0.0), (0.72, 0.0), (0.73, 0.3), (0.64, 0.42),
                         (1.0, 1.0), (0.0, 1.0), (0.36, 0.42), (0.27, 0.3)]]},
    "裤子": {"body": [[(0.04, 0.0), (0.96, 0.0), (1.0, 1.0), (0.58, 1.0), (0.5, 0.28), (0.42, 1.0), (0.0, 1.0)]],
             "lines": [[(0.04, 0.09), (0.96, 0.09)]]},
    "手提包": {"body": [[(0.1, 0.36), (0.9, 0.36), (1.0, 1.0), (0.0, 1.0)]],
               "arcs": [((0.27, 0.0, 0.73, 0.72), 180, 360)]},
    "帽子": {"body": [[(0.02, 0.8), (0.06, 0.45), (0.18, 0.18), (0.4, 0.04), (0.62, 0.18), (0.74, 0.45), (0.78, 0.8)],
                      [(0.7, 0.72), (0.98, 0.84), (1.0, 0.96), (0.7, 0.96)],
                      [(0.02, 0.8), (0.78, 0.8), (0.78, 0.96), (0.02, 0.96)]],
             "trim": [[(0.36, 0.0), (0.44, 0.0), (0.44, 0.06), (0.36, 0.06)]]},
    "运动鞋": {"body": [[(0.0, 0.08), (0.1, 0.0), (0.3, 0.16), (0.42, 0.06), (0.52, 0.28), (0.76, 0.46), (0.94, 0.56),
                         (1.0, 0.72), (1.0, 1.0), (0.0, 1.0)]],
               "lines": [[(0.0, 0.8), (1.0, 0.8)], [(0.46, 0.3), (0.56, 0.22)], [(0.56, 0.38), (0.66, 0.3)]]},
    "口红": {"body": [[(0.0, 0.46), (1.0, 0.46), (1.0, 1.0), (0.0, 1.0)],
                      [(0.2, 0.36), (0.8, 0.36), (0.8, 0.0), (0.2, 0.16)]],
             "trim": [[(0.08, 0.36), (0.92, 0.36), (0.92, 0.46), (0.08, 0.46)]]},
    "香水": {"body": [[(0.0, 0.42), (0.08, 0.32), (0.92, 0.32), (1.0, 0.42), (1.0, 0.92), (0.92, 1.0), (0.08, 1.0),
                       (0.0, 0.92)]],
             "trim": [[(0.34, 0.0), (0.66, 0.0), (0.66, 0.2), (0.34, 0.2)],
                      [(0.42, 0.2), (0.58, 0.2), (0.58, 0.32), (0.42, 0.32)]]},
}


def render(product: Product, image_size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """An RGB picture of `product` on white; `rng` picks its size, place, mirroring and pattern phase."""
    rng = rng or random.Random(0)
    s = image_size * SUPERSAMPLE
    unit = s / 64  # pattern and line sizes scale with the picture, so every image size looks alike
    aspect = ASPECT[product.category]
    extent = rng.uniform(0.55, 0.92) * s  # the longer side of the product
    w, h = (extent, extent / aspect) if aspect >= 1 else (extent * aspect, extent)
    x0, y0 = rng.uniform(0.03 * s, s * 0.97 - w), rng.uniform(0.03 * s, s * 0.97 - h)
    mirror = rng.random() < 0.5

    def place(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(x0 + (1 - x if mirror else x) * w, y0 + y * h) for x, y in points]

    shape = SHAPES[product.category]
    mask = Image.new("L", (s, s), 0)
    draw_mask = ImageDraw.Draw(mask)
    for polygon in shape["body"]:
        draw_mask.polygon(place(polygon), fill=255)
    base, trim = COLOURS[product.colour]
    second = trim if product.colour == "白" else BACKGROUND
    canvas = Image.new("RGB", (s, s), BACKGROUND)
    canvas.paste(_pattern(product.pattern, s, unit, base, second, rng), mask=mask)
    draw = ImageDraw.Draw(canvas)
    line = max(1, round(unit))
    for polygon in shape["body"]:
        draw.polygon(place(polygon), outline=trim, width=line)
    for polygon in shape.get("trim", []):
        draw.polygon(place(polygon), fill=trim)
    for segment in shape.get("lines", []):
        draw.line(place(segment), fill=trim, width=line)
    for box, start, end in shape.get("arcs", []):
        (ax0, ay0), (ax1, ay1) = place([box[:2], box[2:]])
        draw.arc((min(ax0, ax1), ay0, max(ax0, ax1), ay1), start, end, fill=base, width=round(3 * unit))
    return canvas.reduce(SUPERSAMPLE)


def _pattern(pattern: str, s: int, unit: float, base: tuple, second: tuple, rng: random.Random) -> Image.Image:
    layer = Image.new("RGB", (s, s), base)
    draw = ImageDraw.Draw(layer)
    period = 8 * unit
    phase = rng.uniform(0, period)
    steps = [phase + i * period for i in range(-1, int(s / period) + 2)]
    if pattern == "条纹":
        for y in steps:
            draw.rectangle((0, y, s, y + period / 2), fill=second)
    elif pattern == "格子":
        for t in steps:
            draw.rectangle((0, t, s, t + 2 * unit), fill=second)
            draw.rectangle((t, 0, t + 2 * unit, s), fill=second)
    elif pattern == "波点":
        radius = 1.8 * unit
        for row, y in enumerate(steps):
            for x in steps:
                cx = x + (period / 2 if row % 2 else 0)
                draw.ellipse((cx - radius, y - radius, cx + radius, y + radius), fill=second)
    return layer


def foreground_mask(image: Image.Image | np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """bool [H, W]: pixels farther than `threshold` (RGB distance) from the white background."""
    return _distance_from_white(image)[1] > threshold


def _distance_from_white(image: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    return pixels, np.linalg.norm(pixels - np.array(BACKGROUND, np.float32), axis=-1)


def foreground_colour(image: Image.Image | np.ndarray) -> str:
    """The colour name whose body or trim shade is nearest to the median of the most strongly coloured pixels, which
    leaves out white patterns and their blends; a white product's grey trim, or no foreground, reads as white."""
    pixels, distance = _distance_from_white(image)
    foreground = distance > 60.0
    if not foreground.any():
        return "白"
    # The half of the foreground farthest from white: solid colour rather than its blends with white.
    median = np.median(pixels[foreground & (distance >= np.median(distance[foreground]))], axis=0)
    references = [(name, shades[i]) for i in (0, 1) for name, shades in COLOURS.items()]  # bodies, then trims
    return min(references, key=lambda ref: float(np.sum((median - np.array(ref[1])) ** 2)))[0]


def split_products(split: str, n: int, seed: int) -> list[Product]:
    """`n` products that visit every combination equally often, in a seeded order."""
    rng = random.Random(f"{seed}/{split}/products")
    products: list[Product] = []
    while len(products) < n:
        round_ = list(ALL_PRODUCTS)
        rng.shuffle(round_)
        products.extend(round_)
    return products[:n]


def make_split(split: str, n: int, image_size: int, seed: int) -> list[tuple[str, str, Image.Image, Product]]:
    """(img_id, caption, image, product) rows of one split; the same arguments give the same rows."""
    rng = random.Random(f"{seed}/{split}/rows")
    rows = []
    for i, product in enumerate(split_products(split, n, seed)):
        img_id = hashlib.md5(f"demo/{seed}/{split}/{i}".encode()).hexdigest()
        rows.append((img_id, make_caption(product, rng), render(product, image_size, rng), product))
    return rows


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_dataset(out_dir: str | Path, n_train: int = 4096, n_val: int = 256, n_test: int = 64,
                  image_size: int = 64, seed: int = 0) -> list[Path]:
    """Write T2I_{train,val}.{img,text}.tsv and T2I_test.text.tsv under `out_dir` and return their paths; the same
    arguments give byte-identical files. A folder beside it replaces it once complete: no truncated TSV looks done."""
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        rows = make_split(split, n, image_size, seed)
        titles = "".join(f"{i}\t{caption}\n" for i, caption, _, _ in rows)
        (partial / f"T2I_{split}.text.tsv").write_text(titles, encoding="utf-8")
        if split != "test":  # the test split has titles only, as in MUGE
            pictures = "".join(f"{i}\t{png_base64(image)}\n" for i, _, image, _ in rows)
            (partial / f"T2I_{split}.img.tsv").write_text(pictures, encoding="ascii")
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return sorted(out_dir.glob("T2I_*.tsv"))


MATCHER_GRID = 12  # silhouettes are compared at 12x12 after cropping to the product's box


def silhouette(picture: np.ndarray) -> np.ndarray:
    """bool [H, W]: the product's shape, including pale parts (white patterns, white products) that the background
    cannot reach from the picture's border."""
    background = ~foreground_mask(picture)
    outside = background.copy()
    outside[1:-1, 1:-1] = False  # the fill starts from the background on the border
    while True:  # and grows into the background next to it (4 neighbours) until it stops
        padded = np.pad(outside, 1)
        grown = background & (outside | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:])
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


def silhouette_features(picture: np.ndarray) -> np.ndarray:
    """Where a product is and how big does not matter: its silhouette, and its coloured pixels (which keep the hole
    of a handbag's handle that the silhouette fills), cropped to the silhouette's box at 12x12 and mirrored onto
    themselves (renders are mirrored at random), plus the box's aspect ratio and how much of it is filled."""
    shape = silhouette(picture)
    if not shape.any():
        return np.zeros(2 * MATCHER_GRID * MATCHER_GRID + 2)
    rows, cols = np.nonzero(shape)
    # The 1% tails are left out, so that a few stray pixels of a generated picture do not stretch the box.
    top, bottom = np.quantile(rows, [0.01, 0.99]).astype(int)
    left, right = np.quantile(cols, [0.01, 0.99]).astype(int)
    box = np.s_[top : bottom + 1, left : right + 1]
    grids = []
    for mask in (shape[box], foreground_mask(picture)[box]):
        small = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((MATCHER_GRID,) * 2, Image.Resampling.BOX))
        grids.append(((small + small[:, ::-1]) / 2).ravel())
    return np.concatenate([*grids, [math.log((right - left + 1) / (bottom - top + 1)), shape[box].mean()]])


def renders(image_size: int, seed: int, per_product: int) -> tuple[list[np.ndarray], list[Product]]:
    """`per_product` renders of every product, at random sizes, places and mirrorings."""
    rng = random.Random(f"evaluate/{seed}")
    products = [product for product in ALL_PRODUCTS for _ in range(per_product)]
    return [np.asarray(render(product, image_size, rng)) for product in products], products


class CategoryMatcher:
    """Softmax regression from silhouette features to the categories, fitted to the products of `pictures` by
    full-batch L-BFGS in float64, so that the same pictures give the same matcher."""

    def __init__(self, pictures: Sequence[np.ndarray], products: Sequence[Product]):
        features = np.stack([silhouette_features(p) for p in pictures])
        self.mean, self.scale = features.mean(axis=0), features.std(axis=0) + 1e-6
        x = torch.from_numpy((features - self.mean) / self.scale)
        y = torch.tensor([CATEGORIES.index(p.category) for p in products])
        weight = torch.zeros(x.shape[1], len(CATEGORIES), dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(len(CATEGORIES), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

        def loss() -> torch.Tensor:
            optimizer.zero_grad()
            # A little weight decay keeps the weights finite on separable data.
            value = F.cross_entropy(x @ weight + bias, y) + 1e-3 * weight.square().sum()
            value.backward()
            return value

        optimizer.step(loss)
        self.weight, self.bias = weight.detach().numpy(), bias.detach().numpy()  # [features, categories], [categories]

    def predict(self, pictures: Sequence[np.ndarray]) -> list[str]:
        features = np.stack([silhouette_features(p) for p in pictures])
        scores = (features - self.mean) / self.scale @ self.weight + self.bias
        return [CATEGORIES[i] for i in scores.argmax(axis=1)]


def attribute_accuracy(pictures: Sequence[np.ndarray], products: Sequence[Product | None], matcher: CategoryMatcher
                       ) -> dict[str, float]:
    """Share of pictures whose drawn colour, category, and both, are the product's (None: not counted)."""
    pairs = [(p, product) for p, product in zip(pictures, products, strict=True) if product is not None]
    if not pairs:
        return {"colour": 0.0, "category": 0.0, "both": 0.0, "images": 0}
    colours = np.array([foreground_colour(p) == product.colour for p, product in pairs])
    categories = np.array(matcher.predict([p for p, _ in pairs])) == [product.category for _, product in pairs]
    return {"colour": float(colours.mean()), "category": float(categories.mean()),
            "both": float((colours & categories).mean()), "images": len(pairs)}


def chance_levels() -> dict[str, float]:
    """What guessing uniformly at random scores, whatever the captions: 1 / number of choices."""
    colour, category = 1 / len(COLOURS), 1 / len(CATEGORIES)
    return {"colour": colour, "category": category, "both": colour * category}


def build_matcher(image_size: int, round_trip: Callable[[np.ndarray], np.ndarray] | None = None
                  ) -> tuple[CategoryMatcher, dict]:
    """The category matcher, fitted on renders, and the scores it allows (its ceiling): on fresh renders, and
    on their `round_trip` through the VQGAN (the best a GPT over its codes could draw)."""
    pictures, products = renders(image_size, seed=0, per_product=4)
    # Pictures that come out of a VQGAN decoder have soft edges; learning from blurred copies as well keeps the
    # matcher from reading blur as another shape (on round trips through an early demo VQGAN: 0.90 -> 0.99).
    radius = 1.5 * image_size / 64
    blurred = [np.asarray(Image.fromarray(p).filter(ImageFilter.GaussianBlur(radius))) for p in pictures]
    matcher = CategoryMatcher(pictures + blurred, products + products)
    pictures, products = renders(image_size, seed=1, per_product=1)
    ceiling = {"renders": attribute_accuracy(pictures, products, matcher), "round_trip": None}
    if round_trip is not None:
        ceiling["round_trip"] = attribute_accuracy(list(round_trip(np.stack(pictures))), products, matcher)
    return matcher, ceiling


def product_of(caption: str) -> Product | None:
    """parse_caption, or None for a caption that is not one of the demo's."""
    try:
        return parse_caption(caption)
    except ValueError:
        return None
