"""diffmem.io.images: image sets from folders and npz files, read as load_image_folder reads them, streamed
in batches, and embedded through a content-keyed cache."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.io import images
from diffmem.io.data import load_image_folder
from diffmem.io.images import (
    CacheWarning,
    EmbeddingCache,
    convert_images,
    default_cache_root,
    embed_images,
    iter_image_batches,
    read_image_files,
    read_images,
    scan_images,
)


def to_float(p: np.ndarray) -> np.ndarray:
    """p / 127.5 - 1 in float32 arithmetic, diffmem's rule."""
    return p.astype(np.float32) / np.float32(127.5) - np.float32(1)


def chw(a: np.ndarray) -> np.ndarray:
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


def random_uint8(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


@pytest.fixture
def rgb_folder(tmp_path):
    """Seven 6 x 5 (H x W) RGB PNGs, two in a subfolder, plus a hidden file and a text file that are skipped."""
    root = tmp_path / "rgb"
    (root / "sub").mkdir(parents=True)
    pixels = {}
    for i in range(7):
        name = f"sub/{i}.png" if i >= 5 else f"{i}.png"
        pixels[name] = random_uint8((6, 5, 3), seed=i)
        Image.fromarray(pixels[name]).save(root / name)
    Image.fromarray(random_uint8((6, 5, 3), 99)).save(root / ".hidden.png")
    (root / "notes.txt").write_text("not an image")
    return root, pixels


class Counter:
    """A pixel embedding (flattened images and their channel means) that counts its calls and images."""

    def __init__(self):
        self.calls = self.images = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32 and x.ndim == 4
        self.calls += 1
        self.images += len(x)
        return torch.cat([x.flatten(1), x.mean(dim=(2, 3))], dim=1)


# --- values --------------------------------------------------------------------------------------------------------


def test_uint8_image_reads_back_as_p_over_127_5_minus_1_exactly(rgb_folder):
    root, pixels = rgb_folder
    s = read_images(root)
    assert s.names == ("0.png", "1.png", "2.png", "3.png", "4.png", "sub/5.png", "sub/6.png")
    assert s.x.dtype == np.float32 and s.x.shape == (7, 3, 6, 5)
    assert s.native_size == (6, 5) and s.native_mode == "RGB"
    for name, x in zip(s.names, s.x, strict=True):
        assert np.array_equal(x, to_float(chw(pixels[name])))
    assert s.x.min() >= -1 and s.x.max() <= 1
    assert s.conversion["values"] == images.VALUES_UINT8
    assert s.conversion["resize"]["rule"] == images.RESIZE_NONE and s.conversion["resize"]["to"] == [6, 5]
    assert s.conversion["mode"] == {"from": ["RGB"], "to": "RGB", "rule": images.MODE_PIL}
    json.dumps(s.conversion)  # a plain JSON record


def test_grey_type_modes_give_a_grey_set_and_one_colour_image_an_rgb_set(tmp_path):
    grey = random_uint8((4, 4))
    Image.fromarray(grey).save(tmp_path / "a.png")
    Image.fromarray(grey).convert("LA").save(tmp_path / "b.png")
    Image.fromarray(grey > 127).save(tmp_path / "c.png")  # mode '1'
    listing = scan_images(tmp_path)
    assert listing.modes == ("L", "LA", "1") and listing.native_mode == "L"
    s = read_images(tmp_path)
    assert s.x.shape == (3, 1, 4, 4)
    assert np.array_equal(s.x[0, 0], to_float(grey)) and np.array_equal(s.x[1, 0], to_float(grey))
    assert set(np.unique(s.x[2])) == {-1.0, 1.0}
    Image.fromarray(random_uint8((4, 4, 3))).convert("P").save(tmp_path / "d.png")  # a palette: colour
    assert scan_images(tmp_path).native_mode == "RGB"
    assert read_images(tmp_path).x.shape == (4, 3, 4, 4)


def test_mode_conversion_both_ways_matches_pil(tmp_path):
    colour, grey = random_uint8((5, 7, 3), 1), random_uint8((5, 7), 2)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    as_grey = read_images(tmp_path, mode="L")
    assert as_grey.x.shape == (2, 1, 5, 7)
    assert np.array_equal(as_grey.x[0, 0], to_float(np.asarray(Image.fromarray(colour).convert("L"))))
    assert np.array_equal(as_grey.x[1, 0], to_float(grey))
    as_rgb = read_images(tmp_path, mode="RGB")
    assert np.array_equal(as_rgb.x[1], to_float(np.stack([grey] * 3)))
    assert as_rgb.conversion["mode"]["from"] == ["L", "RGB"] and as_rgb.conversion["mode"]["to"] == "RGB"


def test_resize_and_crop_agree_bit_for_bit_with_load_image_folder(tmp_path):
    (tmp_path / "b").mkdir()
    Image.fromarray(random_uint8((9, 13, 3), 3)).save(tmp_path / "a.png")
    Image.fromarray(random_uint8((12, 8, 3), 4)).save(tmp_path / "b" / "c.jpg")
    Image.fromarray(random_uint8((6, 6), 5)).save(tmp_path / "b" / "d.PNG")
    s = read_images(tmp_path, size=6, mode="RGB")
    assert s.names == ("a.png", "b/c.jpg", "b/d.PNG") and s.x.shape == (3, 3, 6, 6) and s.native_size is None
    ref = load_image_folder(tmp_path, size=6, mode="RGB").x.numpy()
    assert np.array_equal(s.x.reshape(3, -1), ref)
    assert s.conversion["resize"]["from"] == [[6, 6], [9, 13], [12, 8]] and s.conversion["resize"]["to"] == [6, 6]
    assert s.conversion["resize"]["rule"] == images.RESIZE_PIL


def test_mixed_sizes_without_a_size_name_two_files(tmp_path):
    Image.new("L", (4, 4)).save(tmp_path / "small.png")
    Image.new("L", (8, 4)).save(tmp_path / "wide.png")
    assert scan_images(tmp_path).native_size is None
    with pytest.raises(ValueError, match=r"small.png is 4 x 4, wide.png is 8 x 4 .*pass a size") as e:
        read_images(tmp_path)
    one_line(e)
    with pytest.raises(ValueError, match="pass a size"):
        iter_image_batches(tmp_path, size=None, mode=None)
    assert read_images(tmp_path, size=4).x.shape == (2, 1, 4, 4)


# --- npz -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, shape",
    [
        ("NHW", (4, 5, 6)),
        ("NHWC", (4, 5, 6, 1)),
        ("NHWC", (4, 5, 6, 3)),
        ("NCHW", (4, 1, 5, 6)),
        ("NCHW", (4, 3, 5, 6)),
    ],
)
def test_npz_layouts_and_value_ranges(tmp_path, layout, shape):
    p = random_uint8(shape, 7)
    nchw = {"NHW": p[:, None], "NHWC": p.transpose(0, 3, 1, 2) if p.ndim == 4 else p, "NCHW": p}[layout]
    expected = to_float(nchw)
    cases = [
        (p, expected, images.VALUES_UINT8),
        (p.astype(np.float64) / 255, nchw.astype(np.float64) / 255 * 2 - 1, images.VALUES_UNIT),
        (p.astype(np.float32) / 127.5 - 1, nchw.astype(np.float32) / 127.5 - 1, images.VALUES_SYMMETRIC),
    ]
    for i, (array, want, rule) in enumerate(cases):
        path = tmp_path / f"{i}.npz"
        np.savez(path, array)
        s = read_images(path)
        assert s.names == tuple(f"npz[{j}]" for j in range(4)) and s.native_size == (5, 6)
        assert s.native_mode == ("L" if nchw.shape[1] == 1 else "RGB")
        assert s.conversion["layout"] == layout and s.conversion["values"] == rule
        np.testing.assert_allclose(s.x, want, rtol=0, atol=1e-6)
        if rule == images.VALUES_UINT8:
            assert np.array_equal(s.x, want)


def test_npz_array_choice_and_refusals(tmp_path):
    x = random_uint8((2, 4, 4))
    np.savez(tmp_path / "two.npz", images=x, labels=np.arange(2))
    assert np.array_equal(read_images(tmp_path / "two.npz").x[:, 0], to_float(x))
    np.savez(tmp_path / "samples.npz", samples=x, seeds=np.arange(2))
    assert scan_images(tmp_path / "samples.npz").array == "samples"
    cases = {
        "many.npz": ({"a": x, "b": x}, r"holds arrays \['a', 'b'\]; it must hold exactly one array"),
        "far.npz": ({"x": np.full((2, 4, 4), 1.5)}, r"floats in \[1.5, 1.5\]; float images must lie in \[0, 1\]"),
        "nan.npz": ({"x": np.full((2, 4, 4), np.nan)}, "holds NaN or infinite values"),
        "int.npz": ({"x": x.astype(np.int64)}, "has dtype int64; images must be uint8"),
        "shape.npz": ({"x": np.zeros((2, 4, 4, 5), np.uint8)}, r"has shape \(2, 4, 4, 5\); images need shape"),
        "none.npz": ({"x": np.zeros((0, 4, 4), np.uint8)}, "holds no image"),
    }
    for name, (arrays, match) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=match) as e:
            read_images(tmp_path / name)
        one_line(e)
    np.savez(tmp_path / "pickle.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ValueError, match="pickled data .* refuses to load") as e:
        scan_images(tmp_path / "pickle.npz")
    one_line(e)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable npz file"):
        scan_images(tmp_path / "junk.npz")


def test_uint8_npz_and_the_same_pngs_agree_after_resize_and_mode_change(tmp_path):
    x = random_uint8((3, 10, 7, 3), 8)
    np.savez(tmp_path / "x.npz", x)
    (tmp_path / "png").mkdir()
    for i, a in enumerate(x):
        Image.fromarray(a).save(tmp_path / "png" / f"{i}.png")
    for size, mode in [(5, "L"), (4, "RGB"), (None, "L")]:
        a = read_images(tmp_path / "x.npz", size=size, mode=mode).x
        assert np.array_equal(a, read_images(tmp_path / "png", size=size, mode=mode).x)


def test_float_npz_is_resized_per_channel_and_clipped(tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, 3, 9, 12)).astype(np.float32)
    x[1] = 0.25  # a constant image stays constant through Lanczos
    np.savez(tmp_path / "f.npz", x)
    s = read_images(tmp_path / "f.npz", size=6, mode="L")
    assert s.x.shape == (2, 1, 6, 6) and s.x.min() >= -1 and s.x.max() <= 1
    np.testing.assert_allclose(s.x[1], 0.25, atol=1e-6)
    assert s.conversion["resize"]["rule"] == images.RESIZE_FLOAT and s.conversion["mode"]["rule"] == images.MODE_FLOAT


# --- errors --------------------------------------------------------------------------------------------------------


def test_bad_paths_and_files_get_one_line_messages(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="folder .*empty is empty") as e:
        scan_images(tmp_path / "empty")
    one_line(e)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no image files \(.png, .jpg, .jpeg, any case\) found under"):
        scan_images(tmp_path / "text")
    with pytest.raises(ValueError, match="missing does not exist: pass a folder"):
        read_images(tmp_path / "missing")
    with pytest.raises(ValueError, match="a.txt is neither a folder nor an .npz file"):
        read_images(tmp_path / "text" / "a.txt")


def test_corrupt_png_and_truncated_jpeg_are_named(tmp_path):
    (tmp_path / "bad").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "bad" / "good.png")
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"cannot read image .*broken.png \(corrupt or truncated\?\)") as e:
        read_images(tmp_path / "bad")
    one_line(e)
    (tmp_path / "cut").mkdir()
    buf = io.BytesIO()
    Image.fromarray(random_uint8((32, 32, 3))).save(buf, format="JPEG")
    (tmp_path / "cut" / "half.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert scan_images(tmp_path / "cut").sizes == ((32, 32),)  # the header is whole; the data is not
    with pytest.raises(ValueError, match=r"cannot read image .*half.jpg \(corrupt or truncated\?\)") as e:
        read_images(tmp_path / "cut")
    one_line(e)


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 9_000, 8_000, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(png)
    with pytest.raises(ValueError, match=r"bomb.png is 9000 x 8000 = 72,000,000 pixels, more than MAX_IMAGE_PIXELS"):
        scan_images(tmp_path)


def test_size_and_mode_options_are_checked(rgb_folder):
    root, _ = rgb_folder
    with pytest.raises(ValueError, match="unknown image mode 'CMYK'"):
        read_images(root, mode="CMYK")
    with pytest.raises(ValueError, match="size must be <= 1,024"):
        read_images(root, size=2000)
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        iter_image_batches(root, size=None, mode=None, batch=0)


def test_memory_bound_refuses_and_says_to_stream(rgb_folder, monkeypatch):
    root, _ = rgb_folder
    monkeypatch.setattr(images, "MAX_IMAGE_SET_BYTES", 7 * 3 * 6 * 5 * 4 - 1)
    with pytest.raises(ValueError, match=r"7 images of 3 x 6 x 5 .*MAX_IMAGE_SET_BYTES .*stream them") as e:
        read_images(root)
    one_line(e)
    assert sum(len(n) for n, _ in iter_image_batches(root, size=None, mode=None, batch=2)) == 7


# --- streaming -----------------------------------------------------------------------------------------------------


def test_batches_concatenated_equal_read_images(rgb_folder, tmp_path):
    root, _ = rgb_folder
    np.savez(tmp_path / "x.npz", random_uint8((7, 6, 6, 3)))
    for path, size, mode in [(root, None, None), (root, 4, "L"), (tmp_path / "x.npz", 3, "RGB")]:
        whole = read_images(path, size=size, mode=mode)
        parts = list(iter_image_batches(path, size=size, mode=mode, batch=3))
        assert [len(n) for n, _ in parts] == [3, 3, 1]
        assert sum((n for n, _ in parts), ()) == whole.names
        assert np.array_equal(np.concatenate([x for _, x in parts]), whole.x)


def test_a_file_changed_after_the_scan_is_refused(rgb_folder):
    root, _ = rgb_folder
    batches = iter_image_batches(root, size=None, mode=None, batch=2)  # scanned now, decoded when drawn
    Image.fromarray(random_uint8((6, 5, 3), 50)).save(root / "1.png")
    with pytest.raises(ValueError, match="1.png changed after it was scanned"):
        next(batches)


def test_read_image_files_reads_just_the_named_images(rgb_folder, tmp_path):
    root, _ = rgb_folder
    whole = read_images(root, size=4, mode="L")
    x = read_image_files(root, ["sub/6.png", "2.png"], size=4, mode="L")
    assert np.array_equal(x, whole.x[[6, 2]])
    assert read_image_files(root, ["0.png"], size=None, mode=None).shape == (1, 3, 6, 5)
    np.savez(tmp_path / "x.npz", random_uint8((5, 4, 4)))
    assert np.array_equal(
        read_image_files(tmp_path / "x.npz", ["npz[4]", "npz[0]"], size=None, mode="RGB"),
        read_images(tmp_path / "x.npz", mode="RGB").x[[4, 0]],
    )
    Image.new("L", (4, 4)).save(tmp_path / "outside.png")
    for bad in ["../outside.png", str(tmp_path / "outside.png"), "missing.png", "notes.txt"]:
        with pytest.raises(ValueError, match="is not an image file inside"):
            read_image_files(root, [bad], size=4, mode="L")
    with pytest.raises(ValueError, match=r"names no image of .*0 <= i < 5"):
        read_image_files(tmp_path / "x.npz", ["npz[5]"], size=None, mode=None)


def test_convert_images_follows_the_float_rules(tmp_path):
    p = random_uint8((2, 3, 8, 10), 9)
    x = to_float(p)
    grey, record = convert_images(x, size=None, mode="L")
    assert grey.shape == (2, 1, 8, 10) and grey.dtype == np.float32
    pil = np.stack([to_float(np.asarray(Image.fromarray(a.transpose(1, 2, 0)).convert("L"))) for a in p])
    np.testing.assert_allclose(grey[:, 0], pil, atol=1 / 127.5)  # PIL rounds to a byte
    assert record["mode"] == {"from": ["RGB"], "to": "L", "rule": images.MODE_FLOAT}
    small, record = convert_images(torch.from_numpy(x), size=4, mode=None)
    assert small.shape == (2, 3, 4, 4) and record["resize"]["from"] == [[8, 10]] and record["resize"]["to"] == [4, 4]
    rgb, _ = convert_images(grey, size=None, mode="RGB")
    assert np.array_equal(rgb, np.repeat(grey, 3, axis=1))
    with pytest.raises(ValueError, match=r"outside \[-1, 1\]; clip them first"):
        convert_images(x * 2, size=None, mode=None)
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\) with C = 1 or 3"):
        convert_images(x[:, :2], size=None, mode=None)


# --- the embedding cache -------------------------------------------------------------------------------------------


def test_second_call_is_read_from_the_cache_without_embedding(rgb_folder, tmp_path):
    root, _ = rgb_folder
    cache, embed = EmbeddingCache(tmp_path / "cache"), Counter()
    first = embed_images(root, embed, "pixel", size=None, mode=None, cache=cache, batch=4, progress=False)
    assert not first.cached and embed.calls == 2 and embed.images == 7
    assert first.vectors.shape == (7, 3 * 6 * 5 + 3) and first.vectors.dtype == np.float32
    assert np.array_equal(first.vectors[:, :90], read_images(root).x.reshape(7, -1))
    second = embed_images(root, embed, "pixel", size=None, mode=None, cache=cache, progress=False)
    assert second.cached and embed.calls == 2 and second.key == first.key and second.names == first.names
    assert second.conversion == first.conversion == read_images(root).conversion
    assert second.native_size == (6, 5) and second.native_mode == "RGB"
    assert isinstance(second.vectors, np.memmap) and np.array_equal(second.vectors, first.vectors)
    with pytest.raises(ValueError, match="read-only"):
        second.vectors[0, 0] = 1.0
    npy, meta = cache.paths(first.key)
    record = json.loads(meta.read_text())
    assert record["shape"] == [7, 93] and record["names"] == list(first.names) and record["embedding_id"] == "pixel"
    assert record["size"] == [6, 5] and record["mode"] == "RGB" and "created" in record
    assert sorted(p.name for p in cache.directory.iterdir()) == sorted([npy.name, meta.name])  # no temporary left


def test_the_key_follows_content_size_mode_and_embedding(rgb_folder, tmp_path):
    root, _ = rgb_folder
    cache, embed = EmbeddingCache(tmp_path / "cache"), Counter()

    def key(**kw):
        options = {"size": None, "mode": None, "embedding_id": "pixel"} | kw
        return embed_images(root, embed, cache=cache, progress=False, **options).key

    base = key()
    assert key() == base and key(size=None, mode="RGB") == base  # the native mode, stated
    others = {key(size=4), key(mode="L"), key(embedding_id="lpips")}
    assert base not in others and len(others) == 3
    moved = tmp_path / "moved"
    root.rename(moved)
    root = moved
    assert key() == base  # the content key does not depend on where the folder is
    Image.fromarray(random_uint8((6, 5, 3), 70)).save(root / "3.png")  # new content
    changed = key()
    assert changed != base
    Image.fromarray(random_uint8((6, 5, 3), 71)).save(root / "7.png")  # an added file
    added = key()
    (root / "7.png").unlink()
    assert len({base, changed, added}) == 3 and key() == changed  # removed again: the earlier key


def test_truncated_or_corrupt_entries_are_recomputed_with_a_warning(rgb_folder, tmp_path):
    root, _ = rgb_folder
    cache, embed = EmbeddingCache(tmp_path / "cache"), Counter()
    first = embed_images(root, embed, "pixel", size=None, mode=None, cache=cache, progress=False)
    expected = np.array(first.vectors)
    npy, meta = cache.paths(first.key)
    del first
    npy.write_bytes(npy.read_bytes()[:-40])
    with pytest.warns(CacheWarning, match="is unreadable .*recomputing it"):
        again = embed_images(root, embed, "pixel", size=None, mode=None, cache=cache, progress=False)
    assert not again.cached and embed.calls == 2 and np.array_equal(again.vectors, expected)
    meta.write_text("{not json")
    with pytest.warns(CacheWarning, match="is unreadable"):
        assert not embed_images(root, embed, "pixel", size=None, mode=None, cache=cache, progress=False).cached
    record = json.loads(meta.read_text())
    np.save(npy, np.zeros((7, 93), np.float64))  # another dtype
    with pytest.warns(CacheWarning, match="float64"):
        assert not embed_images(root, embed, "pixel", size=None, mode=None, cache=cache, progress=False).cached
    assert json.loads(meta.read_text())["shape"] == record["shape"]
    final = embed_images(root, embed, "pixel", size=None, mode=None, cache=cache, progress=False)
    assert final.cached and embed.calls == 4 and np.array_equal(final.vectors, expected)


def test_batch_size_does_not_change_the_vectors(rgb_folder, tmp_path):
    root, _ = rgb_folder
    np.savez(tmp_path / "x.npz", np.random.default_rng(1).uniform(0, 1, (7, 8, 8, 3)))
    for path in (root, tmp_path / "x.npz"):
        small = embed_images(path, Counter(), "pixel", size=4, mode="L", batch=3, progress=False)
        large = embed_images(path, Counter(), "pixel", size=4, mode="L", batch=1024, progress=False)
        cached = embed_images(path, Counter(), "pixel", size=4, mode="L", cache=EmbeddingCache(tmp_path / "c"), batch=3)
        assert np.array_equal(small.vectors, large.vectors) and np.array_equal(small.vectors, cached.vectors)
        assert not small.vectors.flags.writeable and small.key == cached.key


def test_cache_errors_are_clear_and_leave_nothing_behind(rgb_folder, tmp_path):
    root, _ = rgb_folder
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(ValueError, match="cannot create the embedding cache directory .*set DIFFMEM_CACHE") as e:
        embed_images(root, Counter(), "pixel", size=None, mode=None, cache=EmbeddingCache(tmp_path / "file"))
    one_line(e)
    cache = EmbeddingCache(tmp_path / "cache")

    def failing(x):
        if failing.calls:
            raise RuntimeError("out of memory")
        failing.calls += 1
        return x.flatten(1)

    failing.calls = 0
    with pytest.raises(RuntimeError, match="out of memory"):
        embed_images(root, failing, "pixel", size=None, mode=None, cache=cache, batch=2, progress=False)
    assert list(cache.directory.iterdir()) == []  # the half-written temporary is gone
    with pytest.raises(ValueError, match=r"returned shape \(2,\) for a batch of 2 images"):
        embed_images(root, lambda x: x.sum((1, 2, 3)), "sum", size=None, mode=None, batch=2, progress=False)
    with pytest.raises(ValueError, match="embedding_id must be a non-empty string"):
        embed_images(root, Counter(), "", size=None, mode=None)


def test_default_cache_root_reads_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path / "here"))
    assert default_cache_root() == tmp_path / "here" and EmbeddingCache().directory == tmp_path / "here" / "embeddings"
    monkeypatch.delenv("DIFFMEM_CACHE")
    assert default_cache_root().parts[-2:] == (".cache", "diffmem")
