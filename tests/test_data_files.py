"""Dataset registry: tiny files in each real format (IDX, CIFAR-10 binary, image folders) written and read
back, synthetic sets, option checking, and the nested / held-out / disjoint splits."""

import gzip
import math
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.io.data import (
    DATASETS,
    dataset_options,
    disjoint_pair,
    held_out_indices,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    load_mnist,
    nested_order,
    training_indices,
)


def scaled(pixels) -> torch.Tensor:
    """The loaders' scaling, byte / 127.5 - 1, in float64."""
    return torch.as_tensor(np.asarray(pixels, dtype=np.float64) / 127.5 - 1.0)


# --- IDX (MNIST, Fashion-MNIST) ------------------------------------------------------------------------------------


def idx_images(pixels: np.ndarray, magic: int = 2051) -> bytes:
    n, rows, cols = pixels.shape
    return struct.pack(">iIII", magic, n, rows, cols) + pixels.astype(np.uint8).tobytes()


def idx_labels(labels, magic: int = 2049) -> bytes:
    return struct.pack(">iI", magic, len(labels)) + bytes(labels)


def write_idx(root, prefix, pixels, labels, gz=False):
    for stem, raw in (
        (f"{prefix}-images-idx3-ubyte", idx_images(pixels)),
        (f"{prefix}-labels-idx1-ubyte", idx_labels(labels)),
    ):
        if gz:
            (root / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (root / stem).write_bytes(raw)


PIXELS = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5) * 4 + 3  # (N=3, H=4, W=5), bytes 3..239
PIXELS[0, 0, 0], PIXELS[1, 0, 0] = 0, 255


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_idx_round_trip_exact_pixels_and_labels(tmp_path, gz):
    write_idx(tmp_path, "train", PIXELS, [7, 0, 9], gz=gz)
    ds = load_mnist(tmp_path, dtype=torch.float64)
    assert ds.x.shape == (3, 20) and ds.image_shape == (1, 4, 5) and ds.name == "mnist"
    assert torch.equal(ds.x, scaled(PIXELS.reshape(3, 20)))
    assert ds.x[0, 0] == -1.0 and ds.x[1, 0] == 1.0
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [7, 0, 9]
    assert ds.x.view(3, *ds.image_shape)[2, 0, 3, 4] == PIXELS[2, 3, 4] / 127.5 - 1.0  # row-major H, W


def test_idx_test_split_and_fashion_mnist(tmp_path):
    write_idx(tmp_path, "t10k", PIXELS[:2], [1, 2], gz=True)
    ds = load_dataset("fashion_mnist", root=tmp_path, split="test")
    assert ds.x.shape == (2, 20) and ds.x.dtype == torch.float32 and ds.labels.tolist() == [1, 2]
    assert ds.classes[ds.labels[0]] == "Trouser"
    assert load_fashion_mnist(tmp_path, split="test").name == "fashion_mnist"
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte or train-images-idx3-ubyte\.gz"):
        load_mnist(tmp_path, split="train")  # only the test files exist
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_mnist(tmp_path, split="val")


def test_idx_missing_file_names_file_and_directory(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_images(PIXELS))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte") as err:
        load_mnist(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ValueError, match="not a directory"):
        load_mnist(tmp_path / "nowhere")


def test_idx_bad_magic_truncated_and_mismatched(tmp_path):
    write_idx(tmp_path, "train", PIXELS, [1, 2, 3])
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(idx_labels([1, 2, 3]))  # a labels file in the images' place
    with pytest.raises(ValueError, match=r"magic number 2049 \(that of a labels file\), expected 2051"):
        load_mnist(tmp_path)
    images.write_bytes(idx_images(PIXELS, magic=1234))
    with pytest.raises(ValueError, match="magic number 1234"):
        load_mnist(tmp_path)
    images.write_bytes(idx_images(PIXELS)[:-1])
    with pytest.raises(ValueError, match=r"truncated: header dims \(3, 4, 5\) need 76 bytes, the file holds 75"):
        load_mnist(tmp_path)
    images.write_bytes(struct.pack(">iI", 2051, 3))
    with pytest.raises(ValueError, match="8 bytes, shorter than the 16-byte IDX header"):
        load_mnist(tmp_path)
    images.write_bytes(b"\x00\x00\x08")
    with pytest.raises(ValueError, match="too short for an IDX magic number"):
        load_mnist(tmp_path)
    images.write_bytes(idx_images(PIXELS))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_labels([1, 2]))
    with pytest.raises(ValueError, match="holds 3 images but the labels file 2 labels"):
        load_mnist(tmp_path)


def test_idx_corrupt_gzip(tmp_path):
    write_idx(tmp_path, "train", PIXELS, [1, 2, 3], gz=True)
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:20])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz is not a readable gzip file"):
        load_mnist(tmp_path)


# --- CIFAR-10 binary -----------------------------------------------------------------------------------------------


def cifar_record(label: int, rgb) -> bytes:
    """One record: the label byte, then the red, green and blue 32x32 planes; pixel (r, c) of channel ch
    holds rgb[ch] + r + c (mod 256), so position and channel are both recoverable."""
    r, c = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    planes = np.stack([(v + r + c) % 256 for v in rgb]).astype(np.uint8)
    return bytes([label]) + planes.tobytes()


def test_cifar_test_batch_channel_order_and_exact_pixels(tmp_path):
    (tmp_path / "test_batch.bin").write_bytes(cifar_record(3, (10, 100, 200)) + cifar_record(9, (0, 0, 255)))
    ds = load_cifar10(tmp_path, split="test", dtype=torch.float64)
    assert ds.x.shape == (2, 3072) and ds.image_shape == (3, 32, 32)
    assert ds.labels.tolist() == [3, 9] and ds.classes[3] == "cat"
    img = ds.x.view(2, 3, 32, 32)
    assert (
        img[0, 0, 0, 0] == 10 / 127.5 - 1 and img[0, 1, 0, 0] == 100 / 127.5 - 1 and img[0, 2, 0, 0] == 200 / 127.5 - 1
    )
    assert img[0, 0, 2, 5] == 17 / 127.5 - 1  # row 2, column 5 of the red plane
    assert img[1, 2, 0, 0] == 1.0 and img[1, 0, 0, 0] == -1.0


def test_cifar_train_batches_in_subfolder(tmp_path):
    sub = tmp_path / "cifar-10-batches-bin"
    sub.mkdir()
    for i in range(1, 6):
        (sub / f"data_batch_{i}.bin").write_bytes(cifar_record(i, (i, 0, 0)) * 2)
    ds = load_dataset("cifar10", root=tmp_path)
    assert ds.x.shape == (10, 3072) and ds.labels.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert ds.x.view(10, 3, 32, 32)[4, 0, 0, 0].item() == pytest.approx(3 / 127.5 - 1)


def test_cifar_missing_truncated_and_bad_labels(tmp_path):
    with pytest.raises(ValueError, match="expected data_batch_1.bin, .*data_batch_5.bin") as err:
        load_cifar10(tmp_path)
    assert "cifar-10-batches-bin" in str(err.value)
    (tmp_path / "data_batch_1.bin").write_bytes(cifar_record(0, (1, 2, 3)))
    with pytest.raises(ValueError, match=r"expected data_batch_2.bin, data_batch_3.bin"):
        load_cifar10(tmp_path)
    test = tmp_path / "test_batch.bin"
    test.write_bytes(cifar_record(0, (1, 2, 3))[:-7])
    with pytest.raises(ValueError, match="test_batch.bin holds 3066 bytes, not a positive multiple of the 3073"):
        load_cifar10(tmp_path, split="test")
    test.write_bytes(b"")
    with pytest.raises(ValueError, match="holds 0 bytes"):
        load_cifar10(tmp_path, split="test")
    test.write_bytes(cifar_record(12, (1, 2, 3)))
    with pytest.raises(ValueError, match="label byte 12 outside 0..9"):
        load_cifar10(tmp_path, split="test")


# --- image folders -------------------------------------------------------------------------------------------------


def columns_image(width: int, height: int) -> Image.Image:
    """Grey image whose pixel in column c holds 10 c: a centre crop shows in its first column."""
    row = (10 * np.arange(width)).astype(np.uint8)
    return Image.fromarray(np.tile(row, (height, 1)), mode="L")


@pytest.fixture
def folder(tmp_path):
    """cats/: a 20x10 column ramp (PNG) and a 30x30 grey JPEG; dogs/: a 40x20 constant PNG and an RGB PNG."""
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs" / "deep").mkdir(parents=True)
    columns_image(20, 10).save(tmp_path / "cats" / "a.png")
    Image.new("L", (30, 30), 90).save(tmp_path / "cats" / "b.JPG", quality=95)
    Image.new("L", (40, 20), 200).save(tmp_path / "dogs" / "c.png")
    Image.new("RGB", (10, 16), (255, 0, 128)).save(tmp_path / "dogs" / "deep" / "d.png")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "e.png").write_bytes(b"junk")
    return tmp_path


def test_image_folder_grey_crop_resize_and_labels(folder):
    ds = load_image_folder(folder, size=10, mode="L", dtype=torch.float64)
    assert ds.x.shape == (4, 100) and ds.image_shape == (1, 10, 10)
    assert ds.classes == ("cats", "dogs") and ds.labels.tolist() == [0, 0, 1, 1]
    img = (ds.x.view(4, 10, 10) + 1) * 127.5
    # 20x10 needs no resize: the centre crop keeps columns 5..14
    torch.testing.assert_close(img[0, 3], 10.0 * torch.arange(5, 15, dtype=torch.float64), rtol=0, atol=1e-9)
    assert (img[1] - 90).abs().max() <= 2  # JPEG of a flat grey, 30x30 -> 10x10
    assert (img[2] - 200).abs().max() <= 1  # 40x20 -> 20x10 -> centre 10x10
    assert (img[3] - round(0.299 * 255 + 0.114 * 128)).abs().max() <= 1  # RGB -> L by ITU-R 601-2 luma


def test_image_folder_rgb_channel_order_and_size(folder):
    ds = load_dataset("image_folder", root=folder, size=8, mode="RGB", dtype=torch.float64)
    assert ds.x.shape == (4, 3 * 64) and ds.image_shape == (3, 8, 8)
    d = ds.x.view(4, 3, 8, 8)[3]  # the (255, 0, 128) image, 10x16 -> 8x13 -> 8x8
    assert d[0].eq(1.0).all() and d[1].eq(-1.0).all() and (d[2] - (128 / 127.5 - 1)).abs().max() <= 1 / 127.5


def test_image_folder_root_files_get_label_zero(tmp_path):
    columns_image(12, 12).save(tmp_path / "flat.png")
    (tmp_path / "b").mkdir()
    columns_image(12, 12).save(tmp_path / "b" / "x.png")
    ds = load_image_folder(tmp_path, size=12)
    assert ds.classes == ("", "b") and ds.labels.tolist() == [1, 0]  # sorted paths: b/x.png before flat.png
    assert load_image_folder(tmp_path / "b", size=4).labels.tolist() == [0]


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no image files .* found under"):
        load_image_folder(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        load_image_folder(tmp_path)
    with pytest.raises(ValueError, match="unknown image mode 'CMYK'"):
        load_image_folder(tmp_path, mode="CMYK")
    with pytest.raises(ValueError, match="size must be an integer >= 1, got 0"):
        load_image_folder(tmp_path, size=0)


def test_image_folder_keeps_the_images_own_size_and_mode(tmp_path):
    rgb = Image.new("RGB", (16, 16), (255, 0, 128))
    rgb.save(tmp_path / "a.png")
    rgb.save(tmp_path / "b.png")
    ds = load_image_folder(tmp_path)  # 16 x 16 RGB, kept: nothing upscaled to 32 or turned grey
    assert ds.image_shape == (3, 16, 16) and ds.x.shape == (2, 768)
    Image.new("L", (16, 16), 7).save(tmp_path / "c.png")
    assert load_image_folder(tmp_path).image_shape == (3, 16, 16)  # one colour image makes the set RGB
    Image.new("L", (20, 20), 7).save(tmp_path / "d.png")
    with pytest.raises(ValueError, match=r"differ in size .*16 x 16.*20 x 20.*--image-size"):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, size=8).image_shape == (3, 8, 8)
    grey = tmp_path / "grey"
    grey.mkdir()
    Image.new("L", (12, 12), 7).save(grey / "g.png")
    assert load_image_folder(grey).image_shape == (1, 12, 12)


# --- registry ------------------------------------------------------------------------------------------------------


def test_registry_names_and_options(tmp_path):
    assert set(DATASETS) == {
        "digits", "mnist5k", "circle", "swiss_roll", "sphere", "gaussian_mixture", "random_sphere",
        "mnist", "fashion_mnist", "cifar10", "image_folder", "npz",
    }  # fmt: skip
    assert dataset_options("sphere") == ("n", "dim", "seed")
    assert dataset_options("mnist") == ("split",) and dataset_options("npz") == ()
    with pytest.raises(ValueError, match="unknown option.* dims for dataset 'sphere'; allowed: n, dim, seed"):
        load_dataset("sphere", dims=3)
    with pytest.raises(ValueError, match="unknown option.* size for dataset 'mnist'; allowed: split"):
        load_dataset("mnist", root=tmp_path, size=3)
    with pytest.raises(ValueError, match="'npz'; it takes no options"):
        load_dataset("npz", root=tmp_path / "p.npz", n=3)
    with pytest.raises(ValueError, match=r"'cifar10' is read from files you provide.*pass root="):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="built in and reads no files; drop root"):
        load_dataset("digits", root=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")


def test_registry_npz_and_builtins(tmp_path):
    np.savez(tmp_path / "p.npz", xi=np.eye(3))
    ds = load_dataset("npz", root=tmp_path / "p.npz", dtype=torch.float64)
    assert torch.equal(ds.x, torch.eye(3, dtype=torch.float64))
    digits = load_dataset("digits")
    assert digits.x.shape == (1797, 64) and digits.image_shape == (8, 8)
    even = load_dataset("circle", n=4, spacing="even", dtype=torch.float64)
    torch.testing.assert_close(even.x, torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float64))
    assert not torch.equal(load_dataset("circle", n=4).x, load_dataset("circle", n=4, seed=1).x)
    with pytest.raises(ValueError, match="spacing"):
        load_dataset("circle", spacing="grid")


# --- synthetic sets ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options, dim",
    [
        ("swiss_roll", {}, 3),
        ("sphere", {"dim": 5}, 5),
        ("gaussian_mixture", {"dim": 4, "n_components": 3}, 4),
        ("random_sphere", {"dim": 16}, 16),
    ],
)
def test_synthetic_shapes_and_seeds(name, options, dim):
    ds = load_dataset(name, n=50, seed=1, **options)
    assert ds.x.shape == (50, dim) and ds.x.dtype == torch.float32 and ds.image_shape == (dim,)
    assert ds.labels.shape == (50,) and ds.labels.dtype == torch.int64
    assert torch.equal(ds.x, load_dataset(name, n=50, seed=1, **options).x)
    assert not torch.equal(ds.x, load_dataset(name, n=50, seed=2, **options).x)
    assert load_dataset(name, n=50, seed=1, dtype=torch.float64, **options).x.dtype == torch.float64
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        load_dataset(name, n=0, **options)


def test_sphere_norms():
    sphere = load_dataset("sphere", n=200, dim=7, dtype=torch.float64)
    torch.testing.assert_close(sphere.x.norm(dim=1), torch.ones(200, dtype=torch.float64))
    assert load_dataset("sphere", n=10).x.shape == (10, 3)  # S^2 by default
    rs = load_dataset("random_sphere", n=300, dim=64, dtype=torch.float64)
    torch.testing.assert_close(rs.x.norm(dim=1), torch.full((300,), 8.0, dtype=torch.float64))
    assert abs(rs.x.mean().item()) < 0.05 and abs(rs.x.var().item() - 1) < 0.05  # unit variance per coordinate
    gram = rs.x @ rs.x.T / 64 - torch.eye(300, dtype=torch.float64)
    assert gram.abs().max() < 0.7  # random patterns are nearly orthogonal: overlaps ~ 1/sqrt(D)


def test_swiss_roll_scale_and_mixture_components():
    roll = load_dataset("swiss_roll", n=2000, dtype=torch.float64).x
    # about [-2/3, 8/9] x [-1, 1] x [-7/9, 1]: t cos t and t sin t peak near t = 3 pi, 4 pi and 3.5 pi, 4.5 pi
    assert roll.abs().max() <= 1.0
    torch.testing.assert_close(roll.amin(0), torch.tensor([-2 / 3, -1, -7 / 9], dtype=torch.float64), atol=0.02, rtol=0)
    torch.testing.assert_close(roll.amax(0), torch.tensor([8 / 9, 1, 1], dtype=torch.float64), atol=0.02, rtol=0)
    radius = roll[:, [0, 2]].norm(dim=1) * 4.5 * math.pi  # = t, the roll angle
    assert radius.min() >= 1.5 * math.pi - 1e-9 and radius.max() <= 4.5 * math.pi + 1e-9
    mix = load_dataset("gaussian_mixture", n=600, n_components=3, dim=2, std=0.05, dtype=torch.float64)
    assert mix.labels.bincount().tolist() == [200, 200, 200]
    centres = torch.stack([mix.x[mix.labels == c].mean(0) for c in range(3)])
    torch.testing.assert_close(centres.norm(dim=1), torch.ones(3, dtype=torch.float64), atol=0.02, rtol=0)
    spread = torch.cat([mix.x[mix.labels == c] - centres[c] for c in range(3)]).std()
    assert abs(spread.item() - 0.05) < 0.005
    with pytest.raises(ValueError, match="std .* must be >= 0"):
        load_dataset("gaussian_mixture", std=-1.0)


# --- splits --------------------------------------------------------------------------------------------------------


def test_held_out_never_meets_any_training_set():
    n, held, seed = 50, 12, 3
    test = set(held_out_indices(n, held, seed).tolist())
    assert len(test) == held and held_out_indices(n, held, seed).dtype == torch.int64
    assert held_out_indices(n, held, seed).tolist() == nested_order(n, seed)[-held:].tolist()
    previous: set[int] = set()
    for k in range(1, n - held + 1):
        train = set(training_indices(n, k, seed, n_held_out=held).tolist())
        assert len(train) == k and previous < train and not train & test
        previous = train
    assert torch.equal(training_indices(n, 5, seed), nested_order(n, seed)[:5])
    assert held_out_indices(n, 0, seed).numel() == 0
    with pytest.raises(ValueError, match="K=39 exceeds the 38 examples left after holding out 12 of 50"):
        training_indices(n, 39, seed, n_held_out=held)
    with pytest.raises(ValueError, match="n_held_out=50 must be < n=50"):
        held_out_indices(n, n, seed)


def test_disjoint_pairs():
    a, b = disjoint_pair(40, 15, seed=2, n_held_out=10)
    assert a.dtype == b.dtype == torch.int64 and len(a) == len(b) == 15
    assert not set(a.tolist()) & set(b.tolist())
    assert not (set(a.tolist()) | set(b.tolist())) & set(held_out_indices(40, 10, 2).tolist())
    assert torch.equal(a, training_indices(40, 15, 2)) and torch.equal(b, nested_order(40, 2)[15:30])
    assert not torch.equal(a, disjoint_pair(40, 15, seed=3)[0])
    with pytest.raises(ValueError, match="need 32 examples, but only 30 are left"):
        disjoint_pair(40, 16, seed=2, n_held_out=10)
