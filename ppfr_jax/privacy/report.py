"""Privacy outputs: PNG grids (original | protected | recovered) and the Markdown table.

The protected DuetFace view is contrast-stretched per image (1st..99th percentile) in the grid only.
"""
from __future__ import annotations


import numpy as np

from ppfr_jax.privacy.metrics import PSNR_CAP



def _stretch(img: np.ndarray) -> np.ndarray:
    """Per-image contrast stretch of uint8 (H, W, 3), 1st..99th percentile to 0..255 (display only)."""
    lo, hi = np.percentile(img, [1, 99])
    if hi <= lo:
        return img
    return np.clip((img.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255).round().astype(np.uint8)


def stretch_each(images: np.ndarray) -> np.ndarray:
    """:func:`_stretch` applied to each uint8 (H, W, 3) image of (N, H, W, 3) (display only)."""
    return np.stack([_stretch(im) for im in images])


def tile_grid(columns: list[np.ndarray], *, gap: int = 2) -> np.ndarray:
    """Columns of uint8 (N, H, W, 3) images (the same N, H, W) -> one uint8 picture, row i = image i of each
    column, left to right, white ``gap``-pixel lines between tiles."""
    n, h, w, _ = columns[0].shape
    k = len(columns)
    grid = np.full((n * h + (n - 1) * gap, k * w + (k - 1) * gap, 3), 255, np.uint8)
    for i in range(n):
        for j, col in enumerate(columns):
            grid[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = col[i]
    return grid


def make_grid(original: np.ndarray, protected: np.ndarray, recovered: np.ndarray, *, stretch: bool = False,
              gap: int = 2) -> np.ndarray:
    """Rows of (original | protected | recovered) 112x112 tiles -> one uint8 (H, W, 3) picture."""
    return tile_grid([original, stretch_each(protected) if stretch else protected, recovered], gap=gap)


def grid_file_name(method: str) -> str:
    return "privacy_" + method.replace("/", "__") + ".png"


def markdown_table(records: list[dict], reference: dict | None, skipped: dict) -> str:
    """The rows as a Markdown table (SSIM / PSNR of recovered faces and of the protected image)."""
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = ["| method | attacker sees | recovered SSIM | recovered PSNR (dB) | attacker accuracy (%) "
             "| protected SSIM | protected PSNR (dB) | images |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        acc = None if r["attacker_accuracy"] is None else 100 * r["attacker_accuracy"]
        lines.append(f"| {r['method']} | {r['representation']} | {f(r['ssim'], '.3f')} | {f(r['psnr'], '.2f')} | "
                     f"{f(acc, '.2f')} | {f(r['protected_ssim'], '.3f')} | {f(r['protected_psnr'], '.2f')} | "
                     f"{r['n_images']} |")
    out = "\n".join(lines) + "\n"
    if reference is not None:
        out += (f"\nRecogniser on the original faces (the ceiling): {100 * reference['accuracy']:.2f}% "
                f"± {100 * reference['std']:.2f}.\n")
    for name, why in skipped.items():
        out += f"\nSkipped `{name}`: {why.splitlines()[0]}\n"
    out += (f"\nLower is more private. PSNR capped at {PSNR_CAP:g} dB. Images mapped to [0, 1]; SSIM with an 11x11 "
            f"Gaussian window (dm-pix).\n")
    return out
