"""Data sets: scikit-learn's 8x8 digits (the embedded default, no download), MNIST / Fashion-MNIST / KMNIST
through torchvision from a local folder, and the user's own ``.npy`` / ``.pt`` arrays.

Every loader returns :class:`Splits` of float tensors scaled to [0, 1] with shape ``(N, *data_shape)``
(images as ``(N, 1, H, W)``), optionally binarized, with train/validation/test splits fixed by ``seed``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_vae.errors import ConfigError, DataError, message
from pyro_vae.validation import describe_path, positive, unit_interval

__all__ = ["Dataset", "Splits", "load", "digits", "torchvision_dataset", "from_file", "binarize",
           "check_binarizable", "DATASETS", "BINARIZE"]

TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
DATASETS = ("digits", *TORCHVISION)
BINARIZE = ("none", "static", "dynamic")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


@dataclass
class Dataset:
    """``x``: ``(N, *data_shape)`` float tensor; ``y``: ``(N,)`` labels or ``None``."""

    x: torch.Tensor
    y: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def data_shape(self) -> tuple[int, ...]:
        """The shape of one data point, ``x.shape[1:]``."""
        return tuple(self.x.shape[1:])


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    name: str = ""
    dynamic_binarize: bool = False

    @property
    def data_shape(self) -> tuple[int, ...]:
        """The shape of one data point (the training split's)."""
        return self.train.data_shape


def binarize(x: torch.Tensor, seed: int = 0, what: str = "data") -> torch.Tensor:
    """Static binarization: one Bernoulli draw per entry with probability the grey level, seeded.

    Raises:
        DataError: ``x`` (named ``what``) holds values outside [0, 1] or non-finite values; they are refused,
            never clamped (0..255 grey levels clamped to 1 would silently turn into an image of ones).
    """
    check_binarizable(x, what)
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(x if x.is_floating_point() else x.to(torch.float32), generator=g)


def check_binarizable(x: torch.Tensor, what: str = "data") -> None:
    """:class:`DataError` unless ``x`` holds finite grey levels in [0, 1], the probabilities that static or
    dynamic binarization draws a one with."""
    unit_interval(x, what, "grey levels in [0, 1] to binarize (each the probability of a one)")


def _split(x: torch.Tensor, y: torch.Tensor | None, n_val: int, n_test: int, seed: int) -> tuple[Dataset, ...]:
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    parts = (perm[n_val + n_test:], perm[:n_val], perm[n_val: n_val + n_test])
    return tuple(Dataset(x[p], None if y is None else y[p]) for p in parts)


def digits(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1) -> Splits:
    """scikit-learn's 1797 8x8 digits, grey levels 0..16 scaled to [0, 1], shape ``(N, 1, 8, 8)``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    y = torch.as_tensor(d.target, dtype=torch.long)
    n = x.shape[0]
    train, val, test = _split(x, y, round(n * val_fraction), round(n * test_fraction), seed)
    return Splits(train, val, test, name="digits")


def _stage_raw_files(name: str, root: Path) -> Path:
    """torchvision expects ``ROOT/<Class>/raw/<files>``; a folder holding the files themselves (such as a
    copy of the four MNIST ``.gz`` files) is linked into a staging root beside it."""
    cls = TORCHVISION[name]
    if (root / cls / "raw").is_dir():
        return root
    present = [f for f in os.listdir(root) if f.split(".gz")[0] in MNIST_FILES] if root.is_dir() else []
    if not present:
        return root
    staged = Path(os.environ.get("PYRO_VAE_CACHE", Path.home() / ".cache" / "pyro_vae")) / "torchvision"
    raw = staged / cls / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for f in present:
        if not (raw / f).exists():
            try:
                os.symlink((root / f).resolve(), raw / f)
            except OSError:
                shutil.copy2(root / f, raw / f)
    return staged


def torchvision_dataset(name: str, root: str | Path, seed: int = 0, n_val: int = 10000) -> Splits:
    """MNIST-format data through torchvision (``download=True``: files already in ``root`` are verified and
    used, so this works offline; where a network exists missing files are fetched). The official test set is
    the test split; ``n_val`` training images chosen by ``seed`` form the validation split."""
    import torchvision

    if name not in TORCHVISION:
        raise ConfigError(message("data", f"one of {DATASETS} or a .npy/.pt file", repr(name), "pick a known name"))
    root = _stage_raw_files(name, Path(root).expanduser())
    cls = getattr(torchvision.datasets, TORCHVISION[name])
    try:
        tr = cls(str(root), train=True, download=True)
        te = cls(str(root), train=False, download=True)
    except Exception as e:  # noqa: BLE001 - offline download failures surface as URLError/RuntimeError
        raise DataError(message(
            f"data {name} under {root}", f"the four {TORCHVISION[name]} IDX files (train/t10k images and labels, "
            "optionally .gz) in ROOT or ROOT/" + TORCHVISION[name] + "/raw", f"{type(e).__name__}: {e}",
            "copy the files there (e.g. --data-dir ../shared/data/mnist) or run once with network access")) from None
    x = tr.data.to(torch.float32).div_(255.0).unsqueeze(1)
    y = tr.targets.long()
    n_val = min(n_val, x.shape[0] // 6)
    train, val, _ = _split(x, y, n_val, 0, seed)
    test = Dataset(te.data.to(torch.float32).div_(255.0).unsqueeze(1), te.targets.long())
    return Splits(train, val, test, name=name)


def from_file(path: str | Path, seed: int = 0, val_fraction: float = 0.1,
              test_fraction: float = 0.1) -> Splits:
    """The user's own array from ``.npy`` (``np.load(allow_pickle=False)``) or ``.pt``
    (``torch.load(weights_only=True)``) of shape ``(N, *data_shape)``; 8-bit integers are scaled to [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise DataError(message("data", f"one of {DATASETS} or an existing .npy/.pt file",
                                f"{describe_path(path)} at {path}", "check the path"))
    try:
        if path.suffix == ".npy":
            arr = torch.as_tensor(np.load(path, allow_pickle=False))
        elif path.suffix == ".pt":
            arr = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise DataError(message(f"data file {path}", "a .npy or .pt file", f"suffix {path.suffix!r}",
                                    "save the array with np.save or torch.save"))
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DataError(message(f"data file {path}", "a numeric array (np.save / torch.save of a tensor)",
                                f"a file that does not load as one ({type(e).__name__})",
                                "save a plain array; object arrays and pickles are refused")) from None
    if not torch.is_tensor(arr) or arr.dim() < 2 or not (arr.is_floating_point() or arr.dtype in
                                                          (torch.uint8, torch.int64, torch.int32, torch.bool)):
        found = f"tensor of shape {tuple(arr.shape)}, dtype {arr.dtype}" if torch.is_tensor(arr) else type(arr).__name__
        raise DataError(message(f"data file {path}", "a numeric array of shape (N, *data_shape) with N >= 1",
                                found, "save one array with the data points along the first axis"))
    x = arr.to(torch.float32) / 255.0 if arr.dtype == torch.uint8 else arr.to(torch.float32)
    n = x.shape[0]
    if n < 3:
        raise DataError(message(f"data file {path}", "at least 3 data points (train, validation, test)",
                                f"{n}", "pass more data"))
    n_val, n_test = max(1, round(n * val_fraction)), max(1, round(n * test_fraction))
    train, val, test = _split(x, None, n_val, n_test, seed)
    return Splits(train, val, test, name=path.name)


def load(name: str = "digits", root: str | Path | None = None, *, binarize_mode: str = "none",
         seed: int = 0, scale: float | None = None) -> Splits:
    """Load a data set by name (``digits``, ``mnist``, ``fashion-mnist``, ``kmnist``) or file path.

    Args:
        root: torchvision root or a folder holding the raw files (default ``~/.cache/pyro_vae/data``).
        binarize_mode: ``"none"``, ``"static"`` (one seeded draw, done here) or ``"dynamic"`` (a fresh draw
            every batch during training: ``Splits.dynamic_binarize`` is set and validation/test sets are
            binarized once, statically).
        seed: fixes the splits and the static binarization.
        scale: divide every value by this number first (e.g. 255 for 8-bit grey levels stored as floats).

    Raises:
        DataError: with ``binarize_mode`` ``"static"`` or ``"dynamic"``, a split holding values outside
            [0, 1] (the message names the split and the data; nothing is clamped).
    """
    if binarize_mode not in BINARIZE:
        raise ConfigError(message("binarize", f"one of {BINARIZE}", repr(binarize_mode), "pick a known mode"))
    if scale is not None:
        scale = positive("scale", scale, fix="pass the largest value the data can take, e.g. scale=255")
    if name == "digits":
        splits = digits(seed)
    elif name in TORCHVISION:
        root = root if root is not None else Path.home() / ".cache" / "pyro_vae" / "data"
        splits = torchvision_dataset(name, root, seed)
    elif name.endswith((".npy", ".pt")) or os.sep in name:
        splits = from_file(name, seed)
    else:
        raise ConfigError(message("data", f"one of {', '.join(DATASETS)} or a .npy/.pt file path", repr(name),
                                  "pick a known name or pass a file"))
    parts = (("train", splits.train), ("validation", splits.val), ("test", splits.test))
    if scale is not None:
        for _, d in parts:
            d.x = d.x / scale
    if binarize_mode != "none":
        for split, d in parts:  # every split before any work, so the message names the split at fault
            check_binarizable(d.x, f"{split} split of {splits.name or name}"
                                   f"{f' (divided by {scale:g})' if scale is not None else ''}")
    if binarize_mode == "static":
        splits.train.x, splits.val.x, splits.test.x = (binarize(d.x, seed + i) for i, d in
                                                       enumerate((splits.train, splits.val, splits.test)))
    elif binarize_mode == "dynamic":
        splits.val.x, splits.test.x = binarize(splits.val.x, seed + 1), binarize(splits.test.x, seed + 2)
        splits.dynamic_binarize = True
    return splits


def as_tensor_data(data: Any, what: str = "train_data") -> torch.Tensor:
    """The data tensor of a tensor or of a :class:`pyro_vae.data.Dataset` (anything with ``.x``)."""
    x = getattr(data, "x", data)
    if not torch.is_tensor(x):
        raise DataError(message(what, "a torch.Tensor or a pyro_vae.data.Dataset", type(data).__name__,
                                "convert with torch.as_tensor(array, dtype=torch.float32)"))
    return x
