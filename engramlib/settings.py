"""`engramlib.setup()`: the first code cell of every notebook.

It seeds Python, NumPy and torch, picks a device (cuda, then mps, then cpu), reads the
environment variables `ENGRAM_MODEL` (which model) and `ENGRAM_FAST` (small sweeps, for CI),
sets one plotting style, prints one line of versions, and returns a `Settings` object that heavy
cells read their sizes from.
"""
from __future__ import annotations

import importlib.metadata
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Settings:
    seed: int
    device: str          # "cuda", "mps" or "cpu"
    model_name: str | None  # from ENGRAM_MODEL; None lets load_model choose
    fast: bool           # ENGRAM_FAST=1: shrink sweeps so every notebook runs in CI
    smoke: bool = False  # ENGRAM_SMOKE=1: smallest sizes; the test suite runs the student notebooks so

    def size(self, full, fast, smoke=None):
        """Pick a sweep size: `full` normally, `fast` under ENGRAM_FAST=1, and `smoke` (when given)
        under ENGRAM_SMOKE=1, which the test suite sets for the student notebooks in chapters/:
        they must run end to end, while the solutions check the chapter's numbers at `fast` size."""
        if self.smoke and smoke is not None:
            return smoke
        return fast if self.fast or self.smoke else full


def seed_everything(seed: int = 0) -> None:
    """Seed Python's `random`, NumPy and torch (CPU and all GPUs)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> str:
    """'cuda' if a CUDA GPU is visible, else 'mps' on Apple silicon, else 'cpu'."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def engramlib_version() -> str:
    """The installed engramlib's version (from its package metadata, i.e. pyproject.toml), or
    "unknown" when the package runs without being installed (a source folder on sys.path)."""
    try:
        return importlib.metadata.version("engramlib")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def set_plot_style() -> None:
    """One plotting style for the whole course."""
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.figsize": (6.4, 4.0), "figure.dpi": 100, "axes.grid": True,
                         "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False, "font.size": 11})


def cache_on_drive(folder: str = "/content/drive/MyDrive/engram-cache") -> str:
    """On Colab: mount Google Drive and keep every download and cache of the course there
    (ENGRAM_CACHE: Hub models, C and its statistics, CounterFact, Wikipedia paragraphs), so that a
    new runtime finds them instead of downloading and computing them again. Run it in the first
    cell, after `settings = engramlib.setup()`. Returns the folder."""
    if "google.colab" in sys.modules:
        from google.colab import drive
        drive.mount("/content/drive")
    os.makedirs(folder, exist_ok=True)
    os.environ["ENGRAM_CACHE"] = folder
    print(f"engramlib's caches (models included) are in {folder}")
    return folder


def setup(seed: int = 0, verbose: bool = True) -> Settings:
    """Seed everything, pick the device, read ENGRAM_MODEL / ENGRAM_FAST, set the plot style.

    Returns a `Settings(seed, device, model_name, fast)`.
    """
    seed_everything(seed)
    device = pick_device()
    settings = Settings(seed=seed, device=device,
                        model_name=os.environ.get("ENGRAM_MODEL") or None,
                        fast=_env_flag("ENGRAM_FAST"), smoke=_env_flag("ENGRAM_SMOKE"))
    set_plot_style()
    if verbose:
        import transformers
        print(f"engramlib {engramlib_version()} | python {sys.version.split()[0]} | "
              f"torch {torch.__version__} | transformers {transformers.__version__} | "
              f"device {device} | model {settings.model_name or 'auto'}"
              f"{' | FAST' if settings.fast else ''}{' | SMOKE' if settings.smoke else ''}")
        if device == "cpu" and "google.colab" in sys.modules:
            print("No GPU: in Colab choose Runtime > Change runtime type > T4 GPU, then rerun. "
                  "TinyWorld runs fine on the CPU.")
    return settings
