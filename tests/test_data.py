"""Data loaders: the embedded digits, torchvision's MNIST-format reader on tiny IDX files written here,
the real MNIST files when present, and user arrays."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import pyro_vae
from pyro_vae import data

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def test_digits_splits_are_fixed_by_seed_and_scaled():
    a, b, c = data.load("digits", seed=0), data.load("digits", seed=0), data.load("digits", seed=1)
    assert a.data_shape == (1, 8, 8)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert torch.equal(a.train.x, b.train.x) and not torch.equal(a.train.x, c.train.x)
    assert a.train.x.min() >= 0 and a.train.x.max() <= 1 and a.train.x.dtype == torch.float32
    assert set(a.test.y.tolist()) == set(range(10))


def test_static_and_dynamic_binarization():
    s = data.load("digits", binarize_mode="static", seed=3)
    assert set(s.train.x.unique().tolist()) <= {0.0, 1.0} and not s.dynamic_binarize
    assert torch.equal(s.train.x, data.load("digits", binarize_mode="static", seed=3).train.x)
    d = data.load("digits", binarize_mode="dynamic")
    assert d.dynamic_binarize and set(d.val.x.unique().tolist()) <= {0.0, 1.0}
    assert len(d.train.x.unique()) > 2  # grey levels kept: fit draws a fresh binarization every batch


def _write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, compress: bool) -> None:
    opener = gzip.open if compress else open
    suffix = ".gz" if compress else ""
    with opener(folder / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">IIII", 0x0803, *images.shape) + images.astype(np.uint8).tobytes())
    with opener(folder / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name,cls", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST"), ("kmnist", "KMNIST")])
def test_torchvision_reader_on_tiny_idx_files(tmp_path, name, cls):
    raw = tmp_path / cls / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _write_idx(raw, "train", rng.integers(0, 256, (60, 28, 28)), rng.integers(0, 10, 60), compress=False)
    _write_idx(raw, "t10k", rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 10, 12), compress=False)
    s = data.load(name, tmp_path, seed=0)
    assert s.data_shape == (1, 28, 28)
    assert len(s.train) + len(s.val) == 60 and len(s.test) == 12
    assert 0 <= s.train.x.min() and s.train.x.max() <= 1


def test_missing_files_offline_give_a_clear_error(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    with pytest.raises(pyro_vae.DataError, match=r"data mnist under .*: expected the four MNIST IDX files"):
        data.load("mnist", tmp_path)


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="MNIST files not present")
def test_real_mnist_from_a_folder_of_gz_files(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_VAE_CACHE", str(tmp_path))
    s = data.load("mnist", SHARED_MNIST, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (50000, 10000, 10000)
    assert s.data_shape == (1, 28, 28)


def test_user_arrays_npy_and_pt(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (20, 5, 5)).astype(np.uint8)
    np.save(tmp_path / "a.npy", arr)
    torch.save(torch.rand(20, 7), tmp_path / "b.pt")
    s = data.load(str(tmp_path / "a.npy"))
    assert s.data_shape == (5, 5) and s.train.x.max() <= 1 and len(s.train) + len(s.val) + len(s.test) == 20
    assert data.load(str(tmp_path / "b.pt")).data_shape == (7,)


def test_a_data_file_that_is_not_an_array_is_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(pyro_vae.DataError, match="expected a numeric array"):
        data.load(str(tmp_path / "obj.npy"))
    torch.save({"x": torch.zeros(3)}, tmp_path / "d.pt")
    with pytest.raises(pyro_vae.DataError, match=r"expected a numeric array of shape \(N, \*data_shape\)"):
        data.load(str(tmp_path / "d.pt"))


def test_unknown_data_name_lists_the_known_ones():
    with pytest.raises(pyro_vae.ConfigError, match="digits, mnist, fashion-mnist, kmnist"):
        data.load("cifar")
