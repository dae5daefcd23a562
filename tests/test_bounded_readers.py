"""Readers bound what they allocate before allocating it: hostile files (an npz header declaring 7 TiB, a
gzip bomb, a PNG declaring 400 M pixels, a 1,000,000 x 1 strip), oversized dataset options and broken
checkpoints each give a one-line ValueError, never a MemoryError, a traceback or an unpickle. Every hostile
file is a few hundred bytes to a few hundred kilobytes, built here."""

import gzip
import io
import json
import pickle
import struct
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.evaluate.run import load_npz
from diffmem.io import checkpoint, data
from diffmem.io.checkpoint import load_json, load_tensors, save_tensors
from diffmem.io.config import ConfigError
from diffmem.io.data import (
    MAX_POINTS,
    load_cifar10,
    load_dataset,
    load_image_folder,
    load_mnist,
    load_patterns_npz,
)
from diffmem.io.files import MAX_ARRAY_BYTES, PickledArrayError, read_npz
from diffmem.study.config import StudyConfig


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# --- npz -----------------------------------------------------------------------------------------------------------


def npy_member(descr: str, shape: tuple, payload: bytes = b"", fortran: bool = False) -> bytes:
    """A .npy file whose header declares descr and shape, followed by payload (which need not match)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buf.getvalue() + payload


def write_npz(path, members: dict[str, bytes], compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, raw in members.items():
            z.writestr(f"{name}.npy", raw)
    return path


def test_npz_header_declaring_terabytes_is_refused_before_allocating(tmp_path):
    bomb = write_npz(tmp_path / "bomb.npz", {"x": npy_member("<f8", (10**6, 10**6), b"\0" * 64)})
    assert bomb.stat().st_size < 400
    expected = r"array 'x' declares shape \(1000000, 1000000\) of float64, 7.28 TiB, more than the 8 GiB"
    with pytest.raises(ValueError, match=expected) as e:
        load_patterns_npz(bomb)
    assert "MAX_ARRAY_BYTES" in one_line(e)
    with pytest.raises(ValueError, match=expected):
        read_npz(bomb)
    with pytest.raises(ValueError, match=expected + r".*; delete it to recompute"):
        load_npz(bomb, "sample")
    assert MAX_ARRAY_BYTES == 8 * 2**30


def test_npz_limit_counts_the_whole_archive_and_can_be_lowered(tmp_path):
    path = tmp_path / "two.npz"
    np.savez(path, a=np.zeros(100), b=np.zeros(100))  # 800 bytes each
    assert set(read_npz(path, max_bytes=1600)) == {"a", "b"}
    with pytest.raises(ValueError, match=r"array 'b' declares shape \(100,\) of float64, 800 bytes, more than"):
        read_npz(path, max_bytes=1599)


def test_npz_compressed_bomb_is_never_decompressed_whole(tmp_path):
    """A deflated member whose header declares 16 bytes but which inflates to 64 MiB: refused from the sizes
    in the zip directory, before inflating anything; savez_compressed files still read."""
    member = npy_member("<f8", (2,), bytes(64 * 2**20))
    bomb = write_npz(tmp_path / "bomb.npz", {"x": member}, compression=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"array 'x' is longer than its header says: .* needs 16 bytes"):
            read_npz(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20
    good = tmp_path / "good.npz"
    np.savez_compressed(good, x=np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(read_npz(good)["x"], np.arange(6.0).reshape(2, 3))


def test_npz_truncated_member_and_corrupt_archives(tmp_path):
    short = write_npz(tmp_path / "short.npz", {"x": npy_member("<f8", (4, 4), b"\0" * 8)})
    with pytest.raises(ValueError, match=r"not a readable npz file \(array 'x' is truncated: .* needs 128 bytes, it"):
        load_patterns_npz(short)
    good = tmp_path / "good.npz"
    np.savez(good, x=np.ones((3, 3)))
    raw = good.read_bytes()
    cases = {
        "cut.npz": raw[: len(raw) // 2],
        "empty.npz": b"",
        "text.npz": b"just some text, not a zip",
        "crc.npz": raw.replace(np.ones(9).tobytes(), np.zeros(9).tobytes()),  # data changed, CRC not
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"cannot read .*{name}: not a readable npz file") as e:
            load_patterns_npz(tmp_path / name)
        one_line(e)
    odd = tmp_path / "odd.npz"
    with zipfile.ZipFile(odd, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps([1]))  # what torch.save writes, inside a zip
    with pytest.raises(ValueError, match="member 'archive/data.pkl' is not a .npy array"):
        read_npz(odd)
    bz = write_npz(tmp_path / "bz.npz", {"x": npy_member("<f8", (1,), bytes(8))}, compression=zipfile.ZIP_BZIP2)
    with pytest.raises(ValueError, match="compressed with zip method 12"):
        read_npz(bz)


def test_npz_pickles_are_refused_without_unpickling(tmp_path):
    obj = tmp_path / "obj.npz"
    np.savez(obj, patterns=np.array([{"a": 1}], dtype=object))
    with pytest.raises(PickledArrayError, match=r"holds pickled data \(array 'patterns' has dtype object\)"):
        read_npz(obj)
    with pytest.raises(ValueError, match="pickled data"):
        load_patterns_npz(obj)
    with pytest.raises(ValueError, match=r"holds pickled objects and is refused \(loading them could run code\)$"):
        load_npz(obj, "sample")
    raw = tmp_path / "raw.npz"
    raw.write_bytes(pickle.dumps({"patterns": [1, 2]}))
    with pytest.raises(ValueError, match="holds pickled data, not an .npz archive"):
        load_patterns_npz(raw)


def test_npy_file_renamed_to_npz(tmp_path):
    path = tmp_path / "p.npz"
    with open(path, "wb") as f:
        np.save(f, np.eye(3))
    with pytest.raises(ValueError, match=r"p.npz is a .npy file, not an .npz archive; save it with numpy.savez") as e:
        load_patterns_npz(path)
    one_line(e)
    with pytest.raises(ValueError, match="is a .npy file, not an .npz archive"):
        load_npz(path, "sample")


def test_big_endian_and_fortran_arrays_read_in_native_order(tmp_path):
    x = np.arange(12, dtype=">f8").reshape(3, 4) / 7
    path = tmp_path / "be.npz"
    np.savez(path, xi=x, f=np.asfortranarray(np.arange(6, dtype=">i4").reshape(2, 3)))
    ds = load_patterns_npz(path, dtype=torch.float64)
    assert torch.equal(ds.x, torch.from_numpy(x.astype("<f8")))
    arrays = read_npz(path)
    assert arrays["xi"].dtype.isnative and arrays["f"].dtype.isnative and arrays["xi"].flags.writeable
    np.testing.assert_array_equal(arrays["f"], np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(load_npz(path, "sample")["xi"], x)


def test_stage_npz_messages(tmp_path):
    with pytest.raises(ValueError, match=r"missing: run the 'distances' stage first"):
        load_npz(tmp_path / "distances.npz", "distances")
    path = tmp_path / "distances.npz"
    np.savez(path, metric=np.array("euclidean"), m=np.arange(3.0))
    d = load_npz(path, "distances")
    assert str(d["metric"]) == "euclidean" and d["m"].tolist() == [0.0, 1.0, 2.0]


def test_npz_dataset_path_missing_empty_or_a_directory(tmp_path):
    with pytest.raises(ValueError, match="patterns file not found"):
        load_dataset("npz", root=tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="is a directory, not an .npz archive"):
        load_dataset("npz", root=tmp_path)
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable npz file"):
        load_dataset("npz", root=tmp_path / "empty.npz")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "image_folder"])
def test_file_datasets_missing_or_empty_folder(tmp_path, name):
    with pytest.raises(ValueError, match=r"root .*nowhere is not a directory") as e:
        load_dataset(name, root=tmp_path / "nowhere")
    one_line(e)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ValueError, match="is not a directory"):
        load_dataset(name, root=tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"not found|no image files") as e:
        load_dataset(name, root=tmp_path / "empty")
    assert str(tmp_path / "empty") in one_line(e)


# --- IDX (MNIST) and CIFAR-10 --------------------------------------------------------------------------------------


def gzip_stream(*parts: bytes, zeros: int = 0) -> bytes:
    """parts, then `zeros` zero bytes, gzipped without ever holding the zeros in memory at once."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb") as f:
        for part in parts:
            f.write(part)
        block = bytes(2**20)
        for _ in range(zeros // len(block)):
            f.write(block)
    return out.getvalue()


def write_labels(root, n: int):
    (root / "train-labels-idx1-ubyte").write_bytes(struct.pack(">iI", 2049, n) + bytes(n))


def test_idx_gzip_bomb_stops_at_the_declared_size(tmp_path):
    """The header declares 3 images of 4 x 5, the stream inflates to 64 MiB more: reading stops one byte past
    the 60 declared, instead of decompressing it all first."""
    header = struct.pack(">iIII", 2051, 3, 4, 5)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip_stream(header, bytes(60), zeros=64 * 2**20))
    write_labels(tmp_path, 3)
    tracemalloc.start()
    try:
        with pytest.raises(
            ValueError, match=r"is too long: header dims \(3, 4, 5\) need 76 bytes, the file holds more"
        ):
            load_mnist(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_idx_header_declaring_too_much_is_refused_before_reading(tmp_path):
    header = struct.pack(">iIII", 2051, 2**20, 1024, 1024)  # 1 TiB of pixels
    for name, raw in (("train-images-idx3-ubyte.gz", gzip.compress(header)), ("train-images-idx3-ubyte", header)):
        for p in tmp_path.iterdir():
            p.unlink()
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(
            ValueError, match=r"header dims \(1048576, 1024, 1024\) declare 1,099,511,627,776 bytes"
        ) as e:
            load_mnist(tmp_path)
        assert "MAX_DATASET_BYTES" in one_line(e)


def test_idx_labels_are_checked_against_the_images_before_reading(tmp_path):
    header = struct.pack(">iIII", 2051, 3, 4, 5)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(header + bytes(60))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip_stream(struct.pack(">iI", 2049, 2**30), zeros=2**20))
    with pytest.raises(ValueError, match="holds 3 images but the labels file 1073741824 labels"):
        load_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">iIII", 2051, 3, 0, 5))
    with pytest.raises(ValueError, match=r"holds empty 0 x 5 images"):
        load_mnist(tmp_path)


def test_idx_corrupt_gzip_stream(tmp_path):
    raw = bytearray(gzip.compress(struct.pack(">iIII", 2051, 3, 4, 5) + bytes(range(60))))
    raw[12:20] = b"\xff" * 8  # damage the deflate stream
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(bytes(raw))
    write_labels(tmp_path, 3)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz is not a readable gzip file") as e:
        load_mnist(tmp_path)
    one_line(e)


def test_cifar_sizes_are_checked_before_reading(tmp_path, monkeypatch):
    record = 1 + 3 * 32 * 32
    monkeypatch.setattr(data, "MAX_DATASET_BYTES", 10 * record)
    with open(tmp_path / "test_batch.bin", "wb") as f:
        f.truncate(11 * record)  # sparse: nothing is written, and nothing may be read
    with pytest.raises(ValueError, match=r"hold 33,803 bytes, more than the 30,730 a dataset may hold") as e:
        load_cifar10(tmp_path, split="test")
    assert "MAX_DATASET_BYTES" in one_line(e)
    (tmp_path / "test_batch.bin").write_bytes(bytes(2 * record))
    assert load_cifar10(tmp_path, split="test").x.shape == (2, 3072)


# --- images ----------------------------------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height 8-bit grey pixels and holds none: the header alone, valid."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "width, height, match",
    [
        (
            20_000,
            20_000,
            r"is refused as a possible decompression bomb \(Image size \(400000000 pixels\)",
        ),  # PIL's error
        (10_000, 10_000, r"is refused as a possible decompression bomb \(Image size \(100000000 pixels\)"),  # warning
        (9_000, 8_000, r"is 9000 x 8000 = 72,000,000 pixels, more than MAX_IMAGE_PIXELS = 67,108,864"),
    ],
)
def test_image_bombs_are_refused_from_the_header(tmp_path, width, height, match):
    (tmp_path / "bomb.png").write_bytes(png_header(width, height))
    with pytest.raises(ValueError, match=r"image .*bomb.png " + match) as e:
        load_image_folder(tmp_path)
    one_line(e)


def test_elongated_image_is_never_resized(tmp_path):
    Image.new("L", (1_000_000, 1), color=7).save(tmp_path / "strip.png")
    assert (tmp_path / "strip.png").stat().st_size < 5_000
    with pytest.raises(ValueError, match=r"strip.png is 1000000 x 1 pixels, an aspect ratio beyond 20:1") as e:
        load_image_folder(tmp_path, size=32)
    assert "MAX_ASPECT_RATIO" in one_line(e)
    (tmp_path / "strip.png").unlink()
    Image.new("L", (40, 2), color=7).save(tmp_path / "wide.png")  # 20:1 is still taken
    assert load_image_folder(tmp_path, size=2).x.shape == (1, 4)


def test_image_folder_size_and_total_are_bounded(tmp_path, monkeypatch):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"size must be <= 1,024 \(MAX_IMAGE_SIZE\), got 1,025"):
        load_image_folder(tmp_path, size=1025)
    monkeypatch.setattr(data, "MAX_DATASET_BYTES", 2 * 3 * 8 * 8 - 1)
    with pytest.raises(ValueError, match=r"2 images of 3 x 8 x 8 bytes .* would take 384 bytes, more than"):
        load_image_folder(tmp_path, size=8, mode="RGB")
    assert load_image_folder(tmp_path, size=4, mode="RGB").x.shape == (2, 48)


# --- options that size synthetic sets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("circle", {"n": 10**11}, r"n must be <= 10,000,000 \(MAX_POINTS\), got 100,000,000,000"),
        ("swiss_roll", {"n": MAX_POINTS + 1}, r"n must be <= 10,000,000 \(MAX_POINTS\)"),
        ("sphere", {"dim": 10**7}, r"dim must be <= 1,000,000 \(MAX_DIM\)"),
        ("sphere", {"n": 10**7, "dim": 1000}, r"n \* dim = 10,000,000 \* 1,000 = 10,000,000,000 values, more than"),
        ("random_sphere", {"dim": 10**6}, r"n \* dim = 1,000 \* 1,000,000 .* lower n or dim"),
        ("gaussian_mixture", {"n": 10, "n_components": 10**7, "dim": 100}, r"n_components \* dim = "),
    ],
)
def test_size_options_are_bounded(name, options, match):
    with pytest.raises(ValueError, match=match) as e:
        load_dataset(name, **options)
    one_line(e)


@pytest.mark.parametrize(
    "data_section, key",
    [
        ({"name": "circle", "options": {"n": 100_000_000_000}}, "data.options.n"),
        ({"name": "sphere", "options": {"dim": 10**6}}, "data.options.dim"),  # n's default, 2000, times dim
        ({"name": "gaussian_mixture", "options": {"n_components": 10**6, "dim": 1000}}, "data.options.n_components"),
        ({"name": "image_folder", "options": {"root": "x", "size": 4096}}, "data.options.size"),
    ],
)
def test_study_config_names_the_oversized_option(data_section, key):
    with pytest.raises(ConfigError, match=rf"^{key}: ") as e:
        StudyConfig.from_dict({"ks": [8], "n_held_out": 10, "data": data_section})
    assert e.value.key == key


# --- checkpoints -----------------------------------------------------------------------------------------------------


def test_checkpoint_json_refusals(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.json"
    path.write_text('{"step": 3, "nonce": "a"}')
    assert load_json(path) == {"step": 3, "nonce": "a"}
    cases = {
        "{ truncated": r"is not valid JSON \(corrupt or truncated\?\)",
        "[1, 2]": "holds an array at the top level; expected a JSON object",
        '"text"': "holds a string at the top level",
        "null": "holds null at the top level",
        "[" * 100_000: "is not valid JSON: nested too deeply",
        '{"step": 3, "config": {"k": 4, "k": 400}}': "repeats the key 'k' in one object",
    }
    for text, match in cases.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=match) as e:
            load_json(path)
        one_line(e)
    path.write_bytes(pickle.dumps({"step": 3}))
    with pytest.raises(ValueError, match="is a pickle, not JSON; diffmem refuses to load it"):
        load_json(path)
    path.write_text('{"step": 3}')
    monkeypatch.setattr(checkpoint, "MAX_JSON_BYTES", 5)
    with pytest.raises(ValueError, match=r"holds 11 bytes, more than the 5 a JSON file may hold \(MAX_JSON_BYTES\)"):
        load_json(path)
    with pytest.raises(ValueError, match="file not found"):
        load_json(tmp_path / "missing.json")


def test_truncated_or_forged_safetensors(tmp_path):
    good = tmp_path / "w.safetensors"
    save_tensors(good, {"w": torch.arange(64, dtype=torch.float32)})
    raw = good.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    cases = {
        "short.safetensors": (raw[:5], "not a valid safetensors file"),
        "header.safetensors": (raw[: 8 + header_len // 2], "not a valid safetensors file"),
        "data.safetensors": (raw[:-10], "is truncated or corrupt"),
        "huge.safetensors": ((2**62).to_bytes(8, "little") + b"{}", "not a valid safetensors file"),
        "pickle.safetensors": (pickle.dumps({"w": [1.0]}), "pickle-based"),
        "empty.safetensors": (b"", "not a valid safetensors file"),
    }
    for name, (content, match) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=match) as e:
            load_tensors(tmp_path / name)
        one_line(e)
    assert torch.equal(load_tensors(good)["w"], torch.arange(64, dtype=torch.float32))
    (tmp_path / "meta.json").write_text(json.dumps({"a": 1}))
    assert load_json(tmp_path / "meta.json") == {"a": 1}
