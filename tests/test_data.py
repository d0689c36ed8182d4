"""Domain discovery, the DomainBed split, prompt names and image decoding."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dgkit.data import check_targets, decode_samples, discover, prompt_names, split_sources
from dgkit.errors import DgkitError
from dgkit.preprocess import ImageError, PreprocessSpec, decode_image, load_prepared


def test_discovers_domains_classes_and_counts(tiny_domains):
    data = discover(tiny_domains)
    assert data.domains == ["cartoon", "photo", "sketch"]
    assert data.classes == ["circle", "square", "triangle"]
    assert data.counts().tolist() == [[8, 8, 8]] * 3
    assert data.warnings == []


def test_split_is_seeded_disjoint_and_80_20(tiny_domains):
    data = discover(tiny_domains)
    targets, sources = check_targets(data, ["sketch"])
    train, val = split_sources(data, sources, seed=0)
    again_train, again_val = split_sources(data, sources, seed=0)
    other_train, _ = split_sources(data, sources, seed=1)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    assert not np.array_equal(train, other_train)
    assert set(train).isdisjoint(val)
    for d in sources:  # 3 classes x 8 images: 20 % of 24 is 4.8, DomainBed truncates to 4
        assert sum(data.samples[i].domain == d for i in val) == 4
        assert sum(data.samples[i].domain == d for i in train) == 20
    assert all(data.samples[i].domain in sources for i in [*train, *val])


def test_prompt_names_default_and_override(tmp_path):
    assert prompt_names(["art_painting", "hot-dog"]) == ["art painting", "hot dog"]
    lines = tmp_path / "names.txt"
    lines.write_text("art_painting: painting of art\n")
    assert prompt_names(["art_painting", "dog"], lines) == ["painting of art", "dog"]
    js = tmp_path / "names.json"
    js.write_text('{"dog": "puppy"}')
    assert prompt_names(["dog"], js) == ["puppy"]
    js.write_text('{"cat": "kitty"}')
    with pytest.raises(DgkitError, match="unknown classes: cat"):
        prompt_names(["dog"], js)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", r"has no domain folders \(found nothing in it\): expected <root>/<domain>/"),
    ("empty_domain", "domain 'empty' .* has no images"),
])
def test_bad_roots(tmp_path, case, message):
    root = tmp_path / "root"
    if case != "missing":
        root.mkdir()
    if case == "empty_domain":
        (root / "empty" / "dog").mkdir(parents=True)
    with pytest.raises(DgkitError, match=message):
        discover(root)


def test_targets_must_name_a_domain_and_leave_a_source(tiny_domains):
    data = discover(tiny_domains)
    with pytest.raises(DgkitError, match="names no domain .* cartoon, photo, sketch"):
        check_targets(data, ["clipart"])
    with pytest.raises(DgkitError, match="every domain"):
        check_targets(data, data.domains)


def test_missing_classes_warn_and_unseen_target_class_fails(domains_copy):
    import shutil

    shutil.rmtree(domains_copy / "photo" / "square")
    data = discover(domains_copy)
    assert data.warnings == ["domain 'photo' has no images of square"]
    assert data.counts()[1].tolist() == [8, 0, 8]
    check_targets(data, ["sketch"])  # square is still in cartoon: allowed
    shutil.rmtree(domains_copy / "cartoon" / "square")
    with pytest.raises(DgkitError, match="class square appears in the target domain but in no"):
        check_targets(discover(domains_copy), ["sketch"])


def _save(path, img, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16", "P", "LA"])
def test_every_mode_decodes_to_rgb(tmp_path, mode):
    """Each mode's pixels against the RGB worked out here from the source array."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    if mode == "I;16":
        deep = rng.integers(0, 65535, (20, 30), dtype=np.uint16)
        img = Image.fromarray(deep)
        assert img.mode.startswith("I;16")
        want = np.repeat(np.round(deep / 257.0)[..., None], 3, axis=2)  # 65535 -> 255
    elif mode == "CMYK":  # a flat colour: JPEG keeps it, and inverted CMYK would show
        rgb = np.broadcast_to(np.array([200, 30, 60], np.uint8), rgb.shape)
        img = Image.fromarray(np.ascontiguousarray(rgb)).convert("CMYK")
        want = rgb
    else:
        img = Image.fromarray(rgb).convert(mode)
        if mode == "P":  # palette indices looked up in the image's own palette
            palette = np.array(img.getpalette(), np.uint8).reshape(-1, 3)
            want = palette[np.asarray(img)]
        elif mode in ("L", "LA"):  # opaque grey: the L band in all three channels
            want = np.repeat(np.asarray(img)[..., :1] if mode == "LA"
                             else np.asarray(img)[..., None], 3, axis=2)
        else:  # RGBA converted from RGB: alpha 255 everywhere, the colours as they were
            want = rgb
    suffix = ".jpg" if mode == "CMYK" else ".png"
    out = decode_image(_save(tmp_path / f"x{suffix}", img))
    assert out.mode == "RGB" and out.size == (30, 20)
    got = np.asarray(out).astype(int)
    assert np.abs(got - want.astype(int)).max() <= (8 if mode == "CMYK" else 1)
    pixels = load_prepared(tmp_path / f"x{suffix}", PreprocessSpec(16, 16))
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    out = np.asarray(decode_image(_save(tmp_path / "x.png", Image.fromarray(arr))))
    assert abs(int(out[0, 0, 0]) - 128) <= 1


def test_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    out = np.asarray(decode_image(_save(tmp_path / "x.png", img)))
    assert out[0, 0].tolist() == [255, 255, 255]


def test_resize_shorter_side_then_center_crop():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 40, 100))  # white on the left: cropped away
    out = load_prepared(img, PreprocessSpec(input_size=50, resize_size=50))
    assert out.shape == (50, 50, 3)
    assert out.max() == 0


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"this is not an image", "not an image"),
    (None, "cannot be decoded"),
])
def test_bad_images_raise_one_sentence(tmp_path, content, message):
    path = tmp_path / "bad.jpg"
    if content is None:  # truncated JPEG
        Image.new("RGB", (64, 64), (9, 9, 9)).save(path, quality=95)
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(ImageError, match=message) as info:
        decode_image(path)
    assert str(path) in str(info.value)


def test_huge_png_is_refused_not_decoded(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (20000, 20000)).save(path)
    with pytest.raises(ImageError, match="20000x20000|too large"):
        decode_image(path)


def test_big_jpeg_is_decoded_at_reduced_scale(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (200, 10, 10)).save(path)
    out = load_prepared(path, PreprocessSpec(64, 64))
    assert out.shape == (64, 64, 3) and abs(int(out[0, 0, 0]) - 200) < 8


def test_decode_samples_lists_bad_files(domains_copy):
    bad = domains_copy / "photo" / "circle" / "000.png"
    bad.write_bytes(b"")
    data = discover(domains_copy)
    decoded = decode_samples(data, range(len(data.samples)), PreprocessSpec(16, 16), None)
    assert [p for p, _ in decoded.bad] == [bad]
    assert len(decoded.pixels) == len(data.samples) - 1 == len(decoded.hashes)
