import random

import numpy as np
import pytest

import demo
from data import image_from_base64, read_text_tsv, read_tsv

TSV_FILES = ("T2I_train.img.tsv", "T2I_train.text.tsv", "T2I_val.img.tsv", "T2I_val.text.tsv", "T2I_test.text.tsv")


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    demo.write_dataset(out, n_train=40, n_val=12, n_test=6, image_size=64, seed=3)
    return out


def test_same_seed_gives_byte_identical_files(small_dataset, tmp_path):
    demo.write_dataset(tmp_path / "again", n_train=40, n_val=12, n_test=6, image_size=64, seed=3)
    demo.write_dataset(tmp_path / "other", n_train=40, n_val=12, n_test=6, image_size=64, seed=4)
    for name in TSV_FILES:
        assert (small_dataset / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
        assert (small_dataset / name).read_bytes() != (tmp_path / "other" / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]  # no .partial folder left


def test_an_interrupted_write_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    out = tmp_path / "demo_src"
    demo.write_dataset(out, n_train=4, n_val=2, n_test=2, image_size=32, seed=0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def failing(image):  # the disk fills up on the val images of a second write
        calls.append(image)
        if len(calls) > 5:
            raise OSError(28, "No space left on device")
        return real(image)

    real = demo.png_base64
    monkeypatch.setattr(demo, "png_base64", failing)
    with pytest.raises(OSError):
        demo.write_dataset(out, n_train=4, n_val=2, n_test=2, image_size=32, seed=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old files, whole
    monkeypatch.undo()
    paths = demo.write_dataset(out, n_train=4, n_val=2, n_test=2, image_size=32, seed=1)  # and a rerun finishes
    assert sorted(p.name for p in paths) == sorted(TSV_FILES) and not (tmp_path / "demo_src.partial").exists()
    assert {p.name: p.read_bytes() for p in out.iterdir()} != before


def test_files_are_in_the_muge_layout(small_dataset):
    counts = {"train": 40, "val": 12, "test": 6}
    all_ids = []
    for split, n in counts.items():
        texts = list(read_text_tsv(small_dataset / f"T2I_{split}.text.tsv"))
        assert len(texts) == n and all(row.error is None for row in texts)
        ids = [row.img_id for row in texts]
        all_ids += ids
        if split == "test":
            assert not (small_dataset / "T2I_test.img.tsv").exists()
            continue
        rows = list(read_tsv(small_dataset / f"T2I_{split}.img.tsv"))
        assert [row.img_id for row in rows] == ids
        for row in rows:
            image = image_from_base64(row.value, 64)
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert len(set(all_ids)) == len(all_ids) and all(len(i) == 32 for i in all_ids)


def test_caption_and_picture_agree_with_the_product(small_dataset):
    for split in ("train", "val"):
        captions = {row.img_id: row.caption for row in read_text_tsv(small_dataset / f"T2I_{split}.text.tsv")}
        rows = demo.make_split(split, len(captions), 64, seed=3)
        for img_id, caption, image, product in rows:
            assert captions[img_id] == caption
            assert demo.parse_caption(caption) == product
            assert demo.foreground_colour(image) == product.colour, caption
            assert demo.foreground_mask(image).mean() > 0.02  # something is drawn


def test_every_product_parses_back_from_its_captions():
    rng = random.Random(0)
    assert len(demo.ALL_PRODUCTS) == len(demo.CATEGORIES) * len(demo.COLOURS) * len(demo.PATTERNS) == 256
    for product in demo.ALL_PRODUCTS:
        for _ in range(8):
            caption = demo.make_caption(product, rng)
            assert demo.parse_caption(caption) == product, caption


def test_foreground_colour_of_every_product_at_several_sizes():
    for size in (48, 64, 128):  # below 48 px the patterns blur into the colour
        rng = random.Random(size)
        for product in demo.ALL_PRODUCTS:
            image = demo.render(product, size, rng)
            assert image.size == (size, size) and image.mode == "RGB"
            assert demo.foreground_colour(image) == product.colour, (product, size)


def test_splits_cover_the_products_evenly():
    products = demo.split_products("train", 2 * len(demo.ALL_PRODUCTS), seed=0)
    assert sorted(map(repr, products)) == sorted(map(repr, demo.ALL_PRODUCTS * 2))


@pytest.mark.parametrize(
    "caption",
    ["2021夏季新款韩版宽松条纹T恤短袖女", "红色蓝色条纹T恤", "红色条纹波点T恤", "红色条纹T恤帽子", "韩版宽松连帽卫衣"],
)
def test_ambiguous_or_incomplete_captions_are_refused(caption):
    with pytest.raises(ValueError, match="expected exactly one"):
        demo.parse_caption(caption)


def test_lipstick_is_not_read_as_red():
    assert demo.parse_caption("2021新款蓝色纯色口红哑光滋润") == demo.Product("口红", "蓝", "纯色")


def test_empty_picture_counts_as_white():
    assert demo.foreground_colour(np.full((16, 16, 3), 255, np.uint8)) == "白"


# --- the demo's attribute scorer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def matcher():
    return demo.CategoryMatcher(*demo.renders(64, seed=0, per_product=2))


def test_colour_and_category_of_demo_renders_are_recognised(matcher):
    images, products = demo.renders(64, seed=7, per_product=1)
    accuracy = demo.attribute_accuracy(images, products, matcher)
    assert accuracy["colour"] == 1.0
    assert accuracy["category"] >= 0.97, accuracy
    assert accuracy["both"] >= 0.97 and accuracy["images"] == 256


def test_renders_at_another_size_are_recognised_too():
    images, products = demo.renders(48, seed=3, per_product=1)
    matcher = demo.CategoryMatcher(*demo.renders(48, seed=0, per_product=2))
    assert demo.attribute_accuracy(images, products, matcher)["category"] >= 0.95


def test_noise_and_blank_pictures_score_near_chance(matcher):
    products = list(demo.ALL_PRODUCTS)  # every colour and category equally often
    rng = np.random.default_rng(0)
    chance = demo.chance_levels()
    for images in ([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in products],
                   [np.full((64, 64, 3), 255, np.uint8)] * len(products)):
        accuracy = demo.attribute_accuracy(images, products, matcher)
        assert abs(accuracy["colour"] - chance["colour"]) < 0.07, accuracy
        assert abs(accuracy["category"] - chance["category"]) < 0.07, accuracy
        assert accuracy["both"] < 0.06, accuracy
    assert chance == {"colour": 1 / 8, "category": 1 / 8, "both": 1 / 64}


def test_silhouette_fills_white_patterns_and_white_products():
    white = np.asarray(demo.render(demo.Product("T恤", "白", "纯色"), 64))  # only its grey outline is foreground
    assert demo.silhouette(white).sum() > 3 * demo.foreground_mask(white).sum()
    striped = np.asarray(demo.render(demo.Product("T恤", "红", "条纹"), 64))  # half its body is white stripes
    assert demo.silhouette(striped).sum() > 1.5 * demo.foreground_mask(striped).sum()
    assert not demo.silhouette(np.full((16, 16, 3), 255, np.uint8)).any()


def test_silhouette_features_ignore_place_size_and_mirroring():
    # The same product drawn at different places, sizes and mirrorings: near-identical features.
    rng = random.Random(0)
    product = demo.Product("运动鞋", "蓝", "纯色")
    features = [demo.silhouette_features(np.asarray(demo.render(product, 64, rng))) for _ in range(4)]
    other = demo.silhouette_features(np.asarray(demo.render(demo.Product("口红", "蓝", "纯色"), 64, rng)))
    spread = max(np.abs(f - features[0]).mean() for f in features)
    assert spread < 0.5 * np.abs(other - features[0]).mean()
    assert features[0].shape == (2 * demo.MATCHER_GRID**2 + 2,)
    assert not demo.silhouette_features(np.full((16, 16, 3), 255, np.uint8)).any()


def test_silhouette_features_see_the_hole_of_a_handle():
    # A handbag's silhouette fills the hole under its handle, which makes it a dome like a hat's; the coloured
    # pixels keep the hole, so painting it over changes the features though not the silhouette.
    bag = np.asarray(demo.render(demo.Product("手提包", "蓝", "纯色"), 64, random.Random(0))).copy()
    filled = bag.copy()
    filled[demo.silhouette(bag) & ~demo.foreground_mask(bag)] = demo.COLOURS["蓝"][0]
    assert np.array_equal(demo.silhouette(filled), demo.silhouette(bag))
    grid = demo.MATCHER_GRID**2
    before, after = demo.silhouette_features(bag), demo.silhouette_features(filled)
    assert np.allclose(before[:grid], after[:grid])
    assert np.abs(before[grid:2 * grid] - after[grid:2 * grid]).max() > 0.5


def test_captions_that_are_not_the_demos_are_not_counted(matcher):
    # evaluate.py scores generated pictures against titles of any kind; only demo titles can be checked.
    images, products = demo.renders(64, seed=5, per_product=1)
    captions = [demo.make_caption(p, random.Random(i)) for i, p in enumerate(products[:8])]
    read = [demo.product_of(c) for c in [*captions, "韩版宽松连帽卫衣", "红色蓝色条纹T恤"]]
    assert read[:8] == products[:8] and read[8:] == [None, None]
    accuracy = demo.attribute_accuracy(images[:10], read, matcher)
    assert accuracy["images"] == 8 and accuracy["colour"] == 1.0
    assert demo.attribute_accuracy(images[:2], [None, None], matcher) == {
        "colour": 0.0, "category": 0.0, "both": 0.0, "images": 0}

