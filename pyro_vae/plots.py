"""Pictures, drawn with matplotlib's Agg backend (no screen needed). Each function writes one PNG."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = ["image_grid", "save_image_grid", "save_reconstructions", "save_elbo_curve", "save_latent_map",
           "as_images", "save_interpolations", "save_traversals", "save_pareto_k", "save_imputations"]

PathLike = str | Path


def as_images(x: torch.Tensor) -> np.ndarray | None:
    """``(N, H, W)`` grey images from ``(N, 1, H, W)``, ``(N, H, W)`` or square flat ``(N, D)``; else ``None``."""
    x = x.detach().cpu().float()
    if x.dim() == 4 and x.shape[1] == 1:
        return x[:, 0].numpy()
    if x.dim() == 3:
        return x.numpy()
    if x.dim() == 2 and int(math.isqrt(x.shape[1])) ** 2 == x.shape[1]:
        s = math.isqrt(x.shape[1])
        return x.reshape(-1, s, s).numpy()
    return None


def image_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """``(N, H, W)`` grey images laid out row by row, ``ncol`` to a row (default ``ceil(sqrt(N))``), in one
    float32 picture ``(nrow * (H + pad) + pad, min(ncol, N) * (W + pad) + pad)`` with ``nrow = ceil(N / ncol)``:
    the images are framed and separated by ``pad`` pixels of white (1.0), and the places after the last image
    of an incomplete last row are white. A single image is returned as it is, ``(H, W)``, unframed.
    ``torchvision.utils.make_grid`` draws it."""
    from torchvision.utils import make_grid  # a few seconds to import: only where a grid is drawn

    n = images.shape[0]
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    grid = make_grid(torch.as_tensor(images, dtype=torch.float32).unsqueeze(1), nrow=ncol, padding=pad,
                     pad_value=1.0)
    return grid[0].numpy()


def _save(fig: plt.Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _show_grid(grid: np.ndarray, title: str, path: PathLike) -> Path:
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[0] / grid.shape[1]))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
    return _save(fig, path)


def save_image_grid(x: torch.Tensor, path: PathLike, title: str = "", ncol: int | None = None) -> Path:
    """A grid of images (values in [0, 1]); non-image data is drawn as one row of bars per data point."""
    imgs = as_images(x)
    if imgs is None:
        flat = x.detach().cpu().reshape(x.shape[0], -1).numpy()
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.imshow(flat, aspect="auto", cmap="viridis")
        ax.set_xlabel("data entry")
        ax.set_ylabel("sample")
        ax.set_title(title)
        return _save(fig, path)
    return _show_grid(image_grid(np.clip(imgs, 0, 1), ncol), title, path)


def save_reconstructions(x: torch.Tensor, recon: torch.Tensor, path: PathLike, n: int = 16) -> Path:
    """Originals (odd rows) above their reconstructions (even rows)."""
    x, recon = x[:n], recon[:n]
    imgs, rimgs = as_images(x), as_images(recon)
    if imgs is None or rimgs is None:
        return save_image_grid(torch.cat([x.reshape(len(x), -1), recon.reshape(len(x), -1)]), path,
                               "data (top) / reconstructions (bottom)")
    ncol = min(8, len(imgs))
    rows = []
    for i in range(0, len(imgs), ncol):
        rows += [imgs[i: i + ncol], rimgs[i: i + ncol]]
    stacked = np.concatenate([r for r in rows if len(r) == ncol] or [imgs, rimgs])
    return _show_grid(image_grid(np.clip(stacked, 0, 1), ncol), "data / reconstruction (alternate rows)", path)


def save_elbo_curve(history: Sequence[dict], path: PathLike) -> Path:
    """Train and validation ELBO per data point against the epoch."""
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_elbo"] for h in history], label="train")
    if any(h.get("val_elbo") is not None for h in history):
        ax.plot(epochs, [h["val_elbo"] for h in history], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats per data point)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def save_latent_map(z: torch.Tensor, labels: torch.Tensor | None, path: PathLike) -> Path:
    """2-D map of latent codes coloured by label; a PCA projection when ``z_dim > 2``."""
    points = z.detach().cpu().reshape(z.shape[0], -1).numpy()
    title = "posterior means"
    if points.shape[1] > 2:
        from sklearn.decomposition import PCA

        points = PCA(n_components=2, random_state=0).fit_transform(points)
        title += " (PCA to 2-D)"
    elif points.shape[1] == 1:
        points = np.concatenate([points, np.zeros_like(points)], axis=1)
    fig, ax = plt.subplots(figsize=(6, 5))
    c = None if labels is None else labels.detach().cpu().numpy()
    sc = ax.scatter(points[:, 0], points[:, 1], c=c, cmap="tab10", s=6)
    if c is not None:
        fig.colorbar(sc, ax=ax, label="label")
    ax.set_title(title)
    return _save(fig, path)


def _rows_grid(rows: torch.Tensor, path: PathLike, title: str) -> Path:
    """``(R, C, *data_shape)`` drawn as R rows of C images (or bars for non-image data)."""
    r, c = rows.shape[:2]
    flat = rows.reshape(r * c, *rows.shape[2:])
    imgs = as_images(flat)
    if imgs is None:
        return save_image_grid(flat.reshape(r * c, -1), path, title)
    return _show_grid(image_grid(np.clip(imgs, 0, 1), ncol=c), title, path)


def save_interpolations(paths: torch.Tensor, path: PathLike, method: str = "slerp") -> Path:
    """Interpolation strips: ``(pairs, steps, *data_shape)``, one path between two data points per row."""
    return _rows_grid(paths, path, f"{method} interpolation between posterior means (one pair a row)")


def save_traversals(grid: torch.Tensor, path: PathLike, values: Sequence[float] | None = None) -> Path:
    """Latent traversals: ``(dims, values, *data_shape)``, one latent dimension varied along each row."""
    title = "latent traversals (row j: z_j varied"
    if values is not None and len(values):
        title += f" from {float(values[0]):.3g} to {float(values[-1]):.3g}"
    return _rows_grid(grid, path, title + ")")


def save_pareto_k(k: torch.Tensor, path: PathLike) -> Path:
    """Pareto-k of each data point's importance weights, with the 0.5 / 0.7 / 1 reliability thresholds
    (Vehtari et al. 2024)."""
    ks = torch.as_tensor(k).detach().cpu().reshape(-1).numpy()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(np.arange(len(ks)), ks, s=6,
               c=np.where(ks > 0.7, "tab:red", np.where(ks > 0.5, "tab:orange", "tab:blue")))
    for level, style in ((0.5, ":"), (0.7, "--"), (1.0, "-")):
        ax.axhline(level, color="grey", linestyle=style, linewidth=1)
    ax.set_xlabel("data point")
    ax.set_ylabel("Pareto k")
    ax.set_title(f"importance weights: {np.mean(ks > 0.7):.1%} of points with k > 0.7")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def save_imputations(x: torch.Tensor, mask: torch.Tensor, imputed: torch.Tensor, path: PathLike) -> Path:
    """Three rows per block: the observed entries (missing ones drawn grey), the completion, the truth."""
    masked = torch.where(mask.expand_as(x), x, torch.full_like(x, 0.5))
    n = x.shape[0]
    ncol = min(8, n)
    blocks = []
    for i in range(0, n - n % ncol or n, ncol):
        blocks += [masked[i: i + ncol], imputed[i: i + ncol], x[i: i + ncol]]
    rows = torch.stack([b for b in blocks if b.shape[0] == ncol])
    return _rows_grid(rows, path, "observed (missing in grey) / imputed / truth")
