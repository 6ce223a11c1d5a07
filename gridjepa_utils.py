"""GridJEPA: a JEPA world model that learns a small isometric grid world from pixels and actions, then plans in it.
One module shared by the five notebooks, its parts in their order (none calls a later one): settings; 1. world & data;
2. model; 3. training; 4. analysis; 5. planning; plots & widgets; the main job (python gridjepa_utils.py --help).

Shapes: B batch, T frames, D latent dim, G grid side, N = G*G cells, A = 4 actions, P start -> goal pairs, S sampled
action sequences, H horizon. A position is (col, row), (0, 0) at the board's top corner; a cell is row * G + col.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import hashlib
import inspect
import io
import json
import math
import os
import re
import shlex
import sys
import textwrap
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import filelock
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from PIL import Image
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import shortest_path
from scipy.stats import spearmanr
from sklearn.decomposition import PCA
from sklearn.linear_model import LinearRegression, Ridge, RidgeCV
from sklearn.metrics import r2_score as sklearn_r2_score
from sklearn.model_selection import ShuffleSplit
from tqdm.auto import tqdm

ACTIONS = ("up", "down", "left", "right")  # a ^ 1 undoes action a (where no wall is in the way)
ACTION_DELTAS = ((0, -1), (0, 1), (-1, 0), (1, 0))  # (dcol, drow) per action
REPO_ROOT = Path(__file__).resolve().parent
LAYOUTS = {  # named 5x5 layouts, '#' = wall, rows top to bottom
    "open": [".....", ".....", ".....", ".....", "....."],
    "two_rooms": ["..#..", "..#..", ".....", "..#..", "..#.."],  # one door: greedy Manhattan steps walk into the wall
    "u_trap": [".....", ".###.", ".#.#.", ".....", "....."],  # a cup: from inside, moves towards a goal above bump
    "maze": ["...#.", "##.#.", ".....", ".###.", "...#."],
}


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ══ Settings: one Config for a run, its profiles, and its validation (every notebook) ═════════════════════════════════


@dataclass
class Config:
    """Everything that defines a run; saved with every checkpoint. Change it with dataclasses.replace."""

    grid_size: int = 5  # G: the board has G x G cells
    layout: str = "open"  # a name from LAYOUTS; a random layout is passed to train() as a World
    num_layouts: int = 0  # K > 0: train on K generated layouts (never a held-out one) instead of ``layout``
    show_target: bool = False  # draw a fixed target marker (the original write-up's lesson 01)
    num_transitions: int = 50_000  # trajectories in the dataset
    seq_len: int = 2  # T frames per trajectory; the original write-up's 2 is one transition
    data_seed: int = 0  # seeds the dataset and the generated layouts
    # encoder: a ViT over the pooled image, its CLS token through a projector MLP to the latent
    input_size: int = 128  # the 128x128 image is average-pooled to this before the ViT
    patch_size: int = 16  # a patch token's side in pixels
    crop: bool = False  # keep only the middle half of the image's rows, where the board is: no token of backdrop alone
    pool: str = "cls"  # "cls": the CLS token; "flat": every token projected and concatenated, keeping its place
    width: int = 192  # the ViT's width
    depth: int = 4  # its blocks
    heads: int = 3  # its attention heads
    latent_dim: int = 192  # D
    proj_hidden: int = 2048  # the projector's hidden width
    projector_norm: str = "batchnorm"  # LeWM's BatchNorm projector; "layernorm" collapses here
    # predictor: a causal transformer over the latent history, the action entering by AdaLN-zero
    pred_width: int = 192  # its width
    pred_depth: int = 1  # its blocks
    pred_heads: int = 4  # its attention heads
    # loss: MSE(predicted, real next latent) + lam * SIGReg, and optional terms
    lam: float = 10.0  # SIGReg's weight: the original write-up's 10; every profile sets its own
    sigreg_dirs: int = 256  # random directions of SIGReg's Epps–Pulley test
    smooth_weight: float = 0.0  # MSE(z_t, z_t+1): under SIGReg's whitening its optimum is a map of the world
    smooth_ramp: float = 0.5  # that weight rises linearly from 0 over this fraction of training
    idm_weight: float = 0.0  # inverse dynamics (as PLDM): the action read back from (z_t, z_t+1) keeps the agent
    compile: bool = False  # train through torch.compile (on CUDA with CUDA graphs); eager otherwise
    batch_size: int = 128  # trajectories per step
    num_steps: int = 78_125  # 200 epochs of 50,000 transitions at batch 128
    lr: float = 5e-4  # AdamW's peak learning rate
    weight_decay: float = 1e-3  # AdamW's weight decay
    warmup_steps: int = 1000  # linear warm-up before the cosine decay
    grad_clip: float = 1.0  # the gradient norm's ceiling
    seed: int = 0  # seeds the weights and the batches
    log_every: int = 50  # steps between logged losses
    eval_every: int = 1000  # steps between evaluations
    ckpt_every: int = 5000  # steps between checkpoints
    profile: str = "full"  # the profile this Config came from

    def model_fields(self) -> dict:
        """The fields a checkpoint's weights depend on: they must match to load it."""
        names = "grid_size input_size patch_size crop pool width depth heads latent_dim proj_hidden projector_norm"
        return {k: getattr(self, k) for k in (names + " pred_width pred_depth pred_heads seq_len").split()}


# the latent-map term on a model small enough for a 2-core CPU; the other profiles but "full" start from it
CPU_PROFILE = dict(input_size=32, patch_size=8, width=128, depth=1, heads=4, pred_width=128, pred_depth=2, lam=0.1)
CPU_PROFILE |= dict(smooth_weight=5.0, batch_size=64, num_steps=450, lr=1e-3, warmup_steps=50, log_every=10)
CPU_PROFILE |= dict(eval_every=25, ckpt_every=100)
# layouts never seen (notebook 05): the cpu model on 50,000 generated layouts, inverse dynamics in place of the
# smoothness term, a larger batch (cheaper per example on a CPU) and more steps: learning the rules takes many
LAYOUTS_PROFILE = CPU_PROFILE | dict(num_layouts=50_000, smooth_weight=0.0, idm_weight=1.0, batch_size=256)
LAYOUTS_PROFILE |= dict(num_steps=7500, warmup_steps=100, log_every=50, eval_every=500, ckpt_every=500)
# the original write-up's own 5x5 results (lam 10, no smoothness term), shown beside ours in notebooks 03-04: latent std
# collapsed at lam 0.1, probe R^2 fit on the 25 cells it scores, PC1/PC2 variance shares; target drawn: R^2 of each
WRITEUP = dict(collapsed_latent_std=0.0007, probe_fit_r2=1.00, pc1=0.30, pc2=0.22, target_r2=0.99, agent_r2=0.08)
PROFILES = {
    # the original write-up's encoder and schedule (128x128 input, a ViT-Tiny-like encoder, 200 epochs) for a GPU,
    # with the latent-map term; the write-up's own loss is lam=10, smooth_weight=0
    "full": dict(lam=0.1, smooth_weight=5.0),
    "cpu": CPU_PROFILE,  # sized to reach the original write-up's headline results on a 2-core CPU (notebook 03)
    "layouts": LAYOUTS_PROFILE,
    "layouts_gpu": dict(LAYOUTS_PROFILE, num_steps=8000),  # the same on a GPU (what --layouts procedural picks there)
    "gpu": CPU_PROFILE  # sized for a free Colab T4, the default on a GPU
    | dict(input_size=64, width=192, depth=2, heads=3, pred_width=192, batch_size=128, num_steps=3000, warmup_steps=200)
    | dict(log_every=25, eval_every=250, ckpt_every=500),
    "smoke": CPU_PROFILE  # seconds: CI re-executes the notebooks with it
    | dict(width=64, heads=2, pred_width=64, pred_depth=1, pred_heads=2, proj_hidden=256, num_transitions=4000)
    | dict(batch_size=32, num_steps=30, warmup_steps=5, log_every=5, eval_every=15, ckpt_every=15),
}


def active_profile() -> str:
    """The profile named by $GRIDJEPA_PROFILE, else 'gpu' on a GPU and 'cpu' without one ('full' only by name)."""
    name = os.environ.get("GRIDJEPA_PROFILE") or ("gpu" if torch.cuda.is_available() else "cpu")
    if name not in PROFILES:
        raise ValueError(f"GRIDJEPA_PROFILE={name!r}; expected one of {sorted(PROFILES)}")
    return name


def study_profile() -> str:
    """The recipe of the notebooks' side studies: 'smoke' in CI, else 'cpu' (also on a GPU: many short runs)."""
    return "smoke" if active_profile() == "smoke" else "cpu"


# (low, high) inclusive bounds of the numeric Config fields; any other float field only has to be finite
CONFIG_RANGES = {
    **dict.fromkeys("lam idm_weight smooth_weight weight_decay grad_clip".split(), (0.0, math.inf)),
    **dict.fromkeys("num_steps log_every eval_every ckpt_every".split(), (1, 10**9)),
    **dict.fromkeys("input_size patch_size".split(), (1, 128)) | dict.fromkeys("width pred_width".split(), (1, 4096)),
    **dict.fromkeys("depth pred_depth".split(), (1, 64)) | dict.fromkeys("heads pred_heads".split(), (1, 256)),
    **dict(proj_hidden=(1, 65536), sigreg_dirs=(1, 65536), data_seed=(0, 2**63 - 1), seed=(0, 2**32 - 1)),
    **dict(grid_size=(2, 16), num_transitions=(1, 10_000_000), num_layouts=(0, 1_000_000), latent_dim=(1, 8192)),
    **dict(batch_size=(1, 1_000_000), warmup_steps=(0, 10**9), lr=(0.0, 10.0), smooth_ramp=(0.0, 1.0)),
    "seq_len": (2, 17),  # the predictor sees at most 16 frames of history
}  # seed * 1,000,003 + step seeds each step's batch and SIGReg's directions: a seed fits 32 bits
CONFIG_CHOICES = dict(projector_norm=("batchnorm", "layernorm"), pool=("cls", "flat"), profile=tuple(PROFILES))
CONFIG_CHOICES["layout"] = tuple(LAYOUTS)
CONFIG_POSITIVE = ("lr", "grad_clip")  # must be > 0, not only >= 0
MAX_PARAMETERS = 200_000_000  # ~0.8 GB of float32 weights
_SHEETS: dict[tuple, SpriteSheet] = {}  # the sprite sheet of each (grid size, image size, device), drawn once
# a field's type (its default's): the values it takes and its name in an error; a bool is no number
_KINDS = {bool: ((bool, np.bool_), "True or False"), int: ((int, np.integer), "an integer"), str: ((str,), "a string")}
_KINDS[float] = ((int, float, np.integer, np.floating), "a number")


def memory_limit_bytes() -> int:
    """The largest allocation the memory checks allow: $GRIDJEPA_MEMORY_LIMIT_GB GiB, default 4."""
    text = os.environ.get("GRIDJEPA_MEMORY_LIMIT_GB", "4")
    with contextlib.suppress(ValueError):
        if 0 < float(text) <= 1e6:  # also refuses nan and inf
            return int(float(text) * 2**30)
    raise ValueError(f"GRIDJEPA_MEMORY_LIMIT_GB must be a number of GiB > 0 and <= 1000000, got {text!r}")


def check_memory(estimate_bytes: float, what: str) -> None:
    """Refuse an allocation estimated above memory_limit_bytes(), naming what asked for it."""
    if estimate_bytes > (limit := memory_limit_bytes()):
        gib = f"about {estimate_bytes / 2**30:.1f} GiB of memory, above the limit of {limit / 2**30:.1f} GiB"
        raise ValueError(f"{what} would need {gib}; ask for less (or raise $GRIDJEPA_MEMORY_LIMIT_GB)")


def num_patches(cfg: Config) -> int:
    """The encoder's patch tokens: (input/patch)^2, or half as many rows of them with cfg.crop."""
    side = cfg.input_size // max(1, cfg.patch_size)
    return side * (side // 2 if cfg.crop else side)


def flat_channels(cfg: Config) -> int:
    """With pool="flat": each patch token's channels after its shared projection (4 x width in all, at least 1)."""
    return max(1, 4 * cfg.width // num_patches(cfg))


def estimate_parameters(cfg: Config) -> int:
    """The JEPA's parameter count from its config alone (without building it): what a model would allocate."""
    W, Wp, P, C = cfg.width, cfg.pred_width, num_patches(cfg), flat_channels(cfg)
    shared, features = ((W + 1) * C, P * C) if cfg.pool == "flat" else (0, W)  # the flat tokens' shared projection
    encoder = W * cfg.patch_size**2 + W + (P + 2) * W + cfg.depth * (12 * W * W + 13 * W) + 2 * W + shared
    projector = features * cfg.proj_hidden + 3 * cfg.proj_hidden + cfg.proj_hidden * cfg.latent_dim + cfg.latent_dim
    predictor = (cfg.latent_dim + 1) * Wp + 16 * Wp + 4 * Wp + cfg.pred_depth * (18 * Wp * Wp + 15 * Wp)
    return int(encoder + projector + predictor + 2 * Wp + (Wp + 1) * cfg.latent_dim)


def validate_config(cfg: Config) -> Config:
    """Check each field (type, finiteness, range, choice), their consistency, the model's size and a batch's memory."""
    if not isinstance(cfg, Config):
        raise TypeError(f"expected a Config, got {type(cfg).__name__}")
    for f in dataclasses.fields(cfg):
        value, name, (types, kind) = getattr(cfg, f.name), f"Config.{f.name}", _KINDS[type(f.default)]
        if not isinstance(value, types) or (isinstance(value, (bool, np.bool_)) and bool not in types):
            raise TypeError(f"{name} must be {kind}, got {value!r}")
        if isinstance(value, np.generic):  # a numpy scalar is stored as the Python value (JSON and torch.save take it)
            setattr(cfg, f.name, value := type(f.default)(value.item()))
        if isinstance(f.default, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        lo, hi = CONFIG_RANGES.get(f.name, (value, value))
        if not lo <= value <= hi or (f.name in CONFIG_POSITIVE and value <= 0):
            low = f"> {lo}" if f.name in CONFIG_POSITIVE else f">= {lo}"
            raise ValueError(f"{name} must be {low if hi == math.inf else f'{low} and <= {hi}'}, got {value!r}")
        if value not in CONFIG_CHOICES.get(f.name, (value,)):
            raise ValueError(f"{name} must be one of {list(CONFIG_CHOICES[f.name])}, got {value!r}")
    size, patch, n = cfg.input_size, cfg.patch_size, len(LAYOUTS[cfg.layout])
    if cfg.layout != "open" and cfg.grid_size != n:
        raise ValueError(f"Config.layout {cfg.layout!r} is {n}x{n}, but Config.grid_size={cfg.grid_size}")
    if 128 % size or size % (patch * (1 + cfg.crop)):  # Config.crop keeps half the rows: two patches must divide it
        got = f"{'2 x ' if cfg.crop else ''}Config.patch_size must divide it, got input_size={size}, patch_size={patch}"
        raise ValueError(f"Config.input_size must divide the 128-pixel image and {got}, crop={cfg.crop}")
    for w, h in (("width", "heads"), ("pred_width", "pred_heads")):
        if getattr(cfg, w) % getattr(cfg, h):
            raise ValueError(f"Config.{w} ({getattr(cfg, w)}) must be divisible by Config.{h} ({getattr(cfg, h)})")
    if (params := estimate_parameters(cfg)) > MAX_PARAMETERS:
        raise ValueError(f"this Config describes a model of ~{params:,} parameters, above the limit {MAX_PARAMETERS:,}")
    tokens, flat = num_patches(cfg) + 1, num_patches(cfg) * flat_channels(cfg) if cfg.pool == "flat" else 0
    per_image = 128 * 128 + 16 * tokens * cfg.width * cfg.depth + 4 * cfg.proj_hidden + flat  # floats, roughly
    batch = f"a training batch of Config.batch_size={cfg.batch_size} x seq_len={cfg.seq_len}"
    check_memory(4 * cfg.batch_size * cfg.seq_len * per_image, batch)
    return cfg


def make_config(profile: str | None = None, **overrides) -> Config:
    """The Config of a profile (default: active_profile()) with overrides, validated."""
    profile = profile or active_profile()
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
    if unknown := set(overrides) - {f.name for f in dataclasses.fields(Config)}:
        raise TypeError(f"unknown Config fields: {sorted(unknown)}")
    return validate_config(Config(**{**PROFILES[profile], "profile": profile, **overrides}))


# ══ 1. World & data (notebook 01) ═════════════════════════════════════════════════════════════════════════════════════


def layout_walls(layout: str | np.ndarray | None, grid_size: int = 5) -> np.ndarray:
    """A (G, G) boolean array of blocked cells, indexed [row, col], from a name or an array."""
    if layout is None or (isinstance(layout, str) and layout == "open"):
        return np.zeros((grid_size, grid_size), dtype=bool)
    if isinstance(layout, str) and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUTS)} or a (G, G) bool array")
    name = f"{layout!r} " if isinstance(layout, str) else ""
    walls = np.array([[c == "#" for c in row] for row in LAYOUTS[layout]]) if name else np.asarray(layout)
    if walls.shape != (grid_size, grid_size):
        need = f"a layout needs shape (grid_size, grid_size) = ({grid_size}, {grid_size}), got {walls.shape}"
        raise ValueError(f"layout {name}is {'x'.join(map(str, walls.shape))}, but grid_size={grid_size}: {need}")
    if walls.dtype != bool:
        raise TypeError(f"a layout must be a boolean array (True = wall), got dtype {walls.dtype}")
    return walls.copy()


def check_int(value, name: str, lo: int = 0, hi: float = math.inf) -> int:
    """``value`` as an int: a TypeError unless it is an integer, a ValueError naming ``name`` unless in [lo, hi]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be {f'>= {lo}' if hi == math.inf else f'in [{lo}, {hi}]'}, got {value!r}")
    return int(value)


def check_int_tensor(x, name: str) -> torch.Tensor:
    """``x`` as a long tensor; a TypeError unless it is a tensor of integers."""
    if not isinstance(x, torch.Tensor) or x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        got = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must hold integers (a torch.Tensor of integers, torch.long), got {got}")
    return x.long()


def check_flags(**flags) -> None:
    """A TypeError naming the first of ``flags`` (name=value) that is not True or False."""
    if bad := next((name for name, flag in flags.items() if not isinstance(flag, bool)), None):
        raise TypeError(f"{bad} must be True or False, got {flags[bad]!r}")


def check_actions(action) -> torch.Tensor:
    """Actions as a long tensor, each in 0..3 (up, down, left, right)."""
    if (action := check_int_tensor(action, "action")).numel() and (action.min() < 0 or action.max() >= len(ACTIONS)):
        bad = action[(action < 0) | (action >= len(ACTIONS))][0].item()
        raise ValueError(f"action {bad} is not valid; expected 0..3 = {dict(enumerate(ACTIONS))}")
    return action


class SpriteSheet:
    """Every cell's sprites, drawn once at 2x with numpy, then pasted back to front (painter's order) on a device."""

    def __init__(self, grid_size: int, image_size: int = 128, device: torch.device | str = "cpu", supersample: int = 2):
        G, size, s = grid_size, image_size * supersample, supersample
        self.grid_size, self.image_size, self.supersample = G, image_size, supersample
        self.tw, self.th = tw, th = 0.86 * size / G, 0.43 * size / G  # an iso tile's width and height (tw / 2)
        self.x0, self.y0, slab = size / 2, (size - G * th) / 2 + 0.35 * th, th * 0.45  # the board's centre x, top y
        self.yy, self.xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        self.img = np.repeat(np.linspace(0.02, 0.12, size, dtype=np.float32)[:, None], size, 1)  # a soft gradient
        center = lambda col, row: (self.x0 + (col - row) * tw / 2, self.y0 + (col + row + 1) * th / 2)
        (lx, ly), (bx, by), (rx, ry) = (center(c, r) for c, r in ((0, G - 1), (G - 1, G - 1), (G - 1, 0)))
        self._side_face(lx - tw / 2, bx, ly + slab, by + th / 2 + slab, slab, 0.30)  # the slab's two front faces
        self._side_face(bx, rx + tw / 2, by + th / 2 + slab, ry + slab, slab, 0.20)
        for row, col in np.ndindex(G, G):  # a checkered board, grout lines between its tiles
            cx, cy = center(col, row)
            self._blob(cx, cy, tw / 2, th / 2, 0.36, 1)
            self._blob(cx, cy, tw / 2 * 0.9, th / 2 * 0.9, 0.56 if (col + row) % 2 == 0 else 0.64, 1)
        self.board = torch.from_numpy(self.img.copy()).to(device)
        # targets first (they lie on the board, under everything), then walls and agents from far to near
        order = sorted((c + r if kind < 2 else -1, kind, c, r) for r, c in np.ndindex(G, G) for kind in (0, 1, 2))
        self.sprites = []  # (kind: 0 wall, 1 agent, 2 target; cell; box; values; mask)
        for _, kind, c, r in order:
            self.img = np.full((size, size), np.nan, dtype=np.float32)
            self._draw(kind, *center(c, r))
            if (drawn := ~np.isnan(self.img)).any():  # else a target too small for a single pixel
                box = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(drawn))
                value, mask = (torch.from_numpy(x).to(device) for x in (np.nan_to_num(self.img[box]), drawn[box]))
                self.sprites.append((kind, r * G + c, box, value, mask))
        # painting touches only the crop that sprites reach (aligned to the supersampling); each sprite becomes its
        # opaque pixels' flat indices into that crop, so one scatter paints it into every image of a batch
        boxes = [box for _, _, box, _, _ in self.sprites]
        y0, x0 = (min(box[i].start for box in boxes) // s * s for i in (0, 1))
        y1, x1 = (-(-max(box[i].stop for box in boxes) // s) * s for i in (0, 1))
        self.crop, self.crop_at = self.board[y0:y1, x0:x1], [v // s for v in (y0, y1, x0, x1)]
        self.plain = self._downsample(self.board[None])[0]  # the board alone, (H, W) uint8
        index = torch.zeros(size, size, dtype=torch.long, device=device)  # each pixel's flat index into the crop
        index[y0:y1, x0:x1] = torch.arange((y1 - y0) * (x1 - x0), device=device).view(y1 - y0, x1 - x0)
        self.pixels = [(kind, cell, index[box][mask], value[mask]) for kind, cell, box, value, mask in self.sprites]

    def _fill(self, x0, x1, y0, y1, value, inside: Callable) -> None:
        sl = (slice(max(int(y0) - 1, 0), int(y1) + 2), slice(max(int(x0) - 1, 0), int(x1) + 2))  # a box around it
        mask = inside(x := self.xx[sl], y := self.yy[sl])
        self.img[sl][mask] = value if np.isscalar(value) else value(x, y)[mask]

    def _blob(self, cx, cy, rx, ry, value, p: int) -> None:  # a diamond (p=1) or an ellipse (p=2)
        inside = lambda x, y: (abs(x - cx) / rx) ** p + (abs(y - cy) / ry) ** p <= 1
        self._fill(cx - rx, cx + rx, cy - ry, cy + ry, value, inside)

    def _side_face(self, x_from, x_to, y_from, y_to, height, value) -> None:  # an upright face on an edge
        lo, hi = min(x_from, x_to), max(x_from, x_to)
        edge = lambda x: y_from + (x - x_from) * (y_to - y_from) / (x_to - x_from)
        inside = lambda x, y: (x >= lo) & (x <= hi) & (y <= edge(x)) & (y >= edge(x) - height)
        self._fill(lo, hi, min(y_from, y_to) - height, max(y_from, y_to), value, inside)

    def _draw(self, kind: int, cx: float, cy: float) -> None:
        """One sprite at a cell's centre: 0 a wall, 1 the agent, 2 the target."""
        tw, th, height = self.tw, self.th, self.th * 1.1
        if kind == 0:  # a block: a left face, a right face in shadow, a lit top
            self._side_face(cx - tw / 2, cx, cy, cy + th / 2, height, 0.34)
            self._side_face(cx, cx + tw / 2, cy + th / 2, cy, height, 0.22)
            self._blob(cx, cy - height, tw / 2, th / 2, 0.86, 1)
            self._blob(cx, cy - height, tw / 2 * 0.7, th / 2 * 0.7, 0.80, 1)
        elif kind == 1:  # a figure with a shadow, a dark outline, a body, a head and a highlight
            r, outline, bottom, top = tw * 0.16, tw * 0.16 * 0.35, cy, cy - th * 1.05
            shaded = lambda bright: lambda x, y: np.clip(bright - 0.30 * (x - cx + 0.5 * r) / (2 * r), 0, 1)  # lit from
            self._blob(cx, cy + th * 0.05, tw * 0.27, th * 0.27, 0.18, 2)  # the upper left, the figure looks round
            for grow, body, head in ((outline, 0.04, 0.04), (0, shaded(0.90), shaded(1.0))):
                side = lambda x, y: (abs(x - cx) <= r + grow) & (y >= top) & (y <= bottom)
                self._blob(cx, bottom, r + grow, (r + grow) * 0.5, body, 2)
                self._fill(cx - (r + grow), cx + (r + grow), top, bottom, body, side)
                self._blob(cx, top - r * 0.9, r * 1.05 + grow, r * 1.05 + grow, head, 2)
            self._blob(cx - r * 0.35, top - r * 1.2, r * 0.3, r * 0.3, 1.0, 2)
        else:  # a bullseye
            for scale, value in ((0.32, 0.08), (0.22, 0.95), (0.11, 0.08)):
                self._blob(cx, cy, tw * scale, th * scale, value, 1)

    def _downsample(self, img: torch.Tensor) -> torch.Tensor:
        """(B, s*H, s*W) -> (B, H, W) uint8: the mean of each s x s block, summed in one order (same on any device)."""
        s = self.supersample
        blocks = img.unflatten(-1, (img.shape[-1] // s, s)).unflatten(-3, (img.shape[-2] // s, s))  # (B, H, s, W, s)
        mean = sum(blocks[..., i, :, j] for i in range(s) for j in range(s)) / (s * s)
        return torch.round(mean.clamp(0, 1) * 255).to(torch.uint8)

    @torch.no_grad()
    def paint(self, walls: torch.Tensor, cells: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """walls (B, N) bool, agent cells (B,) (not drawn on a wall), targets (B,) or None -> (B, H, W) uint8 images."""
        B, (r0, r1, c0, c1), size = len(cells), self.crop_at, self.crop.numel()
        img = self.crop.reshape(-1).repeat(B)  # (B * crop pixels): every image's crop
        cells = cells.to(walls.device).long()
        cells = torch.where(walls.gather(1, cells[:, None])[:, 0], -1, cells)
        for kind, cell, index, value in self.pixels:
            if kind < 2 or targets is not None:
                idx = (walls[:, cell] if kind == 0 else (cells if kind == 1 else targets) == cell).nonzero()[:, 0]
                img.scatter_(0, (idx[:, None] * size + index).view(-1), value.repeat(len(idx)))
        out = self.plain.expand(B, *self.plain.shape).clone()  # (B, H, W)
        out[:, r0:r1, c0:c1] = self._downsample(img.view(B, *self.crop.shape))
        return out


def transition_tables(walls: np.ndarray) -> np.ndarray:
    """The rules of K layouts at once: walls (K, G, G) bool -> (K, N, A) the cell after each action (a bump stays)."""
    K, G = walls.shape[:2]
    (row, col), (dc, dr) = np.divmod(np.arange(G * G), G), np.array(ACTION_DELTAS).T
    c, r = col[:, None] + dc, row[:, None] + dr  # (N, A) where each action leads, maybe off the board
    target = np.clip(r, 0, G - 1) * G + np.clip(c, 0, G - 1)  # (N, A)
    blocked = (c < 0) | (c >= G) | (r < 0) | (r >= G) | walls.reshape(K, G * G)[:, target]  # (K, N, A)
    return np.where(blocked, np.arange(G * G)[:, None], target)


def layouts_connected(walls: np.ndarray) -> np.ndarray:
    """(K, G, G) bool -> (K,) bool: whether every free cell of each layout reaches every other (one flood fill)."""
    K, G = walls.shape[:2]
    free, table = ~walls.reshape(K, G * G), transition_tables(walls).reshape(K, -1)
    reach = (np.arange(G * G) == free.argmax(1)[:, None]) & free  # (K, N) from the first free cell
    # moves are symmetric: a free cell is reached when one of its 4 neighbours is
    grow = lambda reach: reach | (np.take_along_axis(reach, table, 1).reshape(K, G * G, len(ACTIONS)).any(2) & free)
    while not np.array_equal(reach, grown := grow(reach)):
        reach = grown
    return (reach == free).all(1) & free.any(1)


class World:
    """The grid world: G x G cells, 4 actions, a bump stays put; a state is cell row * G + col (+ N * drawn target)."""

    def __init__(self, grid_size: int = 5, walls=None, show_target: bool = False, image_size=128, check_connected=True):
        if isinstance(grid_size, bool) or not isinstance(grid_size, (int, np.integer)) or not 2 <= grid_size <= 16:
            raise ValueError(f"grid_size must be an integer >= 2 and <= 16 (a readable image), got {grid_size!r}")
        check_flags(show_target=show_target, check_connected=check_connected)
        self.show_target, self.grid_size = show_target, (G := int(grid_size))
        layouts = self.layouts if hasattr(self, "layouts") else layout_walls(walls, G)[None]  # a family set its own
        K, free = len(layouts), (~layouts).reshape(len(layouts), -1).sum(1)
        if len(bad := np.flatnonzero((free < 2) | (~layouts_connected(layouts) if check_connected else False))):
            why = "needs at least two free cells" if free[bad[0]] < 2 else "has free cells that cannot be reached"
            raise ValueError(f"{'this layout' if K == 1 else f'layout {bad[0]}'} {why}")
        self.image_size = check_int(image_size, "image_size", 32, 1024)  # smaller ones lose a 16x16 board's sprites
        self.num_cells, self.walls = K * G * G, layouts.reshape(K * G, G)  # flat index k * N + cell
        self.free_cells, tables = np.flatnonzero(~layouts.reshape(-1)), transition_tables(layouts)  # (K, N, A)
        self.next_cell = torch.from_numpy((tables + G * G * np.arange(K)[:, None, None]).reshape(K * G * G, -1))
        self._atlas = {}  # every state's image, per device

    def cell_index(self, col: int, row: int) -> int:
        """Index of cell (col, row); raises ValueError off the grid."""
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (col, row)):
            raise TypeError(f"a position is two integers (col, row), got ({col!r}, {row!r})")
        if max(col, row) >= (G := self.grid_size) or min(col, row) < 0:
            raise ValueError(f"position (col={col}, row={row}) is off the {G}x{G} grid; expected 0 <= col, row < {G}")
        return row * G + col

    def _cells(self, cell) -> np.ndarray:
        cell, n = np.asarray(cell), self.num_cells
        if not np.issubdtype(cell.dtype, np.integer) or (cell.size and not 0 <= cell.min() <= cell.max() < n):
            raise ValueError(f"cells must be integers in [0, {n}), got {np.array2string(cell, threshold=8)}")
        return cell

    def cell_pos(self, cell: int | np.ndarray | torch.Tensor) -> np.ndarray:
        """(col, row) of cell indices in [0, num_cells): (...,) -> (..., 2) int array (in a family, of any layout)."""
        return np.stack(np.divmod(self._cells(cell) % self.grid_size**2, self.grid_size)[::-1], axis=-1)

    num_states = property(lambda self: self.num_cells * (self.num_cells if self.show_target else 1))
    is_wall = lambda self, cell: bool(self.walls.reshape(-1)[self._cells(cell)])
    agent_cell = lambda self, state: state % self.num_cells

    def check_states(self, state) -> torch.Tensor:
        """State indices as a long tensor in [0, num_states), none with the agent or the target on a wall."""
        if (state := check_int_tensor(state, "state")).numel() and (state.min() < 0 or state.max() >= self.num_states):
            raise ValueError(f"states must lie in [0, {self.num_states}), got values in [{state.min()}, {state.max()}]")
        flat, walls = state.reshape(-1).cpu().numpy(), self.walls.reshape(-1)
        if (on_wall := walls[flat % self.num_cells] | (self.show_target & walls[flat // self.num_cells])).any():
            raise ValueError(f"state {flat[on_wall][0]} puts the agent or the target on a wall; see free_cells")
        return state

    def step(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Next states after one action each: (B,), (B,) -> (B,). Validates its inputs."""
        state, action = self.check_states(state), check_actions(action)
        if state.shape != action.shape:
            raise ValueError(f"state and action must have the same shape, got {(*state.shape,)} and {(*action.shape,)}")
        return self.next_cell.to(state.device)[state % self.num_cells, action] + state - state % self.num_cells

    def shortest_paths(self, cells=None) -> np.ndarray:
        """Fewest moves (BFS) from ``cells`` (default: all) to every cell: (len(cells), N), -1 where unreachable."""
        n, table = self.num_cells, self.next_cell.numpy()
        graph = csr_matrix((np.ones(table.size), (np.repeat(np.arange(n), table.shape[1]), table.reshape(-1))), (n, n))
        moves = shortest_path(graph, unweighted=True, indices=cells if cells is None else self._cells(cells))
        return np.where(np.isinf(moves), -1, moves).astype(np.int64)

    def all_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every ordered (start, goal) pair of distinct free cells: two (P,) tensors; 600 on the open 5x5."""
        starts, goals = torch.meshgrid(free := torch.from_numpy(self.free_cells), free, indexing="ij")
        return starts[starts != goals], goals[starts != goals]

    def _paint(self, states: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """States (B,), k * N + cell on layout k or cell + N * target -> (B, H, W) uint8 on ``device``, 512 at once."""
        N, t, key = self.grid_size**2, self.show_target, (self.grid_size, self.image_size, str(device))
        sheet = _SHEETS.get(key) or _SHEETS.setdefault(key, SpriteSheet(*key))
        walls, chunks = torch.from_numpy(self.walls.reshape(-1, N)).to(device), states.to(device).split(512)  # (K, N)
        return torch.cat([sheet.paint(walls[0 * s if t else s // N], s % N, s // N if t else None) for s in chunks])

    def atlas(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Every state's image, painted once: (num_states, H, W) uint8 on ``device`` (no agent on a wall cell)."""
        if self.num_cells > 100_000:  # a large family: its images are painted on demand
            raise ValueError(f"an atlas of {self.num_cells:,} images is too large; use render(states)")
        if str(device) not in self._atlas:  # painted once on the CPU, then copied to each device
            cpu = self._atlas["cpu"] if "cpu" in self._atlas else self._paint(torch.arange(self.num_states), "cpu")
            self._atlas |= {"cpu": cpu, str(device): cpu.to(device)}
        return self._atlas[str(device)]

    def render(self, state: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """Observations of states: (...,) -> (..., 1, H, W) float in [0, 1], on ``device`` (default: the states')."""
        state = self.check_states(torch.as_tensor(state))
        flat, device = state.reshape(-1), torch.device(device) if device is not None else state.device
        on_demand = hasattr(self, "layouts") and self.num_states > 8192  # a large family paints on demand
        images = self._paint(flat, device) if on_demand else self.atlas(device).index_select(0, flat.to(device))
        return images.view(*state.shape, 1, *images.shape[1:]).float().div_(255.0)  # (..., 1, H, W)

    def render_pos(self, col: int, row: int, target: tuple[int, int] | None = None) -> torch.Tensor:
        """The observation of the agent at (col, row): (1, 1, H, W). The public way to get one image."""
        if self.is_wall(cell := self.cell_index(col, row)):
            raise ValueError(f"(col={col}, row={row}) is a wall cell; the agent cannot stand there")
        if self.show_target and target is None:
            raise ValueError("this world draws a target: pass target=(col, row)")
        target = self.cell_index(*target) if self.show_target else 0
        return self.render(torch.tensor([cell + self.num_cells * target]))

    def __repr__(self) -> str:
        return f"World(grid_size={self.grid_size}, walls={int(self.walls.sum())}, show_target={self.show_target})"


class WorldFamily(World):
    """Layouts of one size as one World (state k * N + cell of layout k), painted on demand: tens of thousands fit."""

    def __init__(self, layouts, image_size: int = 128):
        layouts = list(layouts) if isinstance(layouts, np.ndarray) and layouts.ndim == 3 else layouts
        if isinstance(layouts, (list, tuple)) and any(isinstance(w, str) for w in layouts):
            raise TypeError("a WorldFamily takes (G, G) bool arrays, not layout names: pass [layout_walls(name), ...]")
        G = len(layouts[0]) if isinstance(layouts, (list, tuple)) and layouts else 0
        if not G or any(np.shape(w) != (G, G) for w in layouts):
            raise ValueError("a WorldFamily takes a non-empty list of (G, G) bool layouts, all the same grid size")
        self.layouts = np.stack([layout_walls(w, G) for w in layouts])  # (K, G, G), validated
        super().__init__(G, image_size=image_size)

    __len__ = lambda self: len(self.layouts)
    __repr__ = lambda self: f"WorldFamily({len(self)} layouts of {self.grid_size}x{self.grid_size})"


HELDOUT_RESERVED = 1000  # the first 1,000 layouts of the test stream (per grid size): never trained on, even turned
_HELDOUT: dict[int, np.ndarray] = {}  # the reserved held-out layouts of each grid size, drawn once


def layout_keys(walls: np.ndarray, symmetric: bool = True) -> list[bytes]:
    """A key per layout of (K, G, G): its bits or, ``symmetric``, the least over its turns and mirror images."""
    turns = np.stack([np.rot90(walls, k, axes=(1, 2)) for k in range(4 if symmetric else 1)], 1)  # (K, 4, G, G)
    images = np.concatenate([turns, turns.transpose(0, 1, 3, 2)], 1) if symmetric else turns  # (K, 8, G, G)
    bits = np.packbits(images.reshape(*images.shape[:2], walls.shape[-1] ** 2), axis=-1)  # (K, S, B): S images, B bytes
    return [key.tobytes() for key in np.sort(bits.view(f"V{bits.shape[-1]}")[..., 0], axis=1)[:, 0]]


def generate_layout(grid_size: int, rng: np.random.Generator) -> np.ndarray:
    """(G, G) bool, maybe disconnected: scattered blocks, rooms, a cup or corridors, with blocks scattered on top."""
    G, walls, kind = grid_size, np.zeros((grid_size, grid_size), dtype=bool), rng.choice(4, p=(0.4, 0.2, 0.2, 0.2))
    if kind in (1, 3):  # one or two full walls across the board, each with one or two doors
        for line in rng.choice(np.arange(1, G - 1), size=min(1 if kind == 1 else 2, G - 2), replace=False):
            walls[line] |= ~np.isin(np.arange(G), rng.choice(G, size=rng.integers(1, 3), replace=False))
        walls = walls.T.copy() if rng.random() < 0.5 else walls
    elif kind == 2:  # a cup: three sides of a box, open on a random side
        h, w = rng.integers(3, G + 1), rng.integers(3, G + 1)
        r0, c0 = rng.integers(0, G - h + 1), rng.integers(0, G - w + 1)
        cup = np.pad(np.zeros((h - 1, w - 2), dtype=bool), ((1, 0), (1, 1)), constant_values=True)  # top, sides
        walls[r0 : r0 + h, c0 : c0 + w] = np.rot90(cup, rng.integers(4)) if h == w else cup[:: rng.choice([1, -1])]
    density = rng.uniform(0.0, 0.3 if kind == 0 else 0.12)  # drawn first: the seeded streams depend on the order
    return walls | (rng.random((G, G)) < density)


def _draw_layouts(grid_size: int, num: int, split: str, seed: int, skip: np.ndarray | None = None) -> np.ndarray:
    """``num`` layouts of a stream as procedural_layouts describes, none in a class (layout_keys) of ``skip``'s."""
    G, N, seen, kept = grid_size, grid_size * grid_size, set(), []
    banned = [layout_walls(name) for name in LAYOUTS] if G == 5 else []
    banned = set(layout_keys(np.array([*banned, *(() if skip is None else skip)], dtype=bool).reshape(-1, G, G)))
    rng = np.random.default_rng([G, int(split == "test"), seed])  # two streams: train 0, test 1
    while len(kept) < num:
        batch = np.stack([generate_layout(G, rng) for _ in range(2 * (num - len(kept)) + 16)])
        batch = batch[layouts_connected(batch) & np.isin(batch.sum((1, 2)), np.arange(1, N // 2 + 1))]  # 1..N/2 walls
        for walls, key, own in zip(batch, layout_keys(batch), layout_keys(batch, symmetric=split == "test")):
            if key not in banned and own not in seen and len(kept) < num:
                seen.add(own), kept.append(walls)
    return np.stack(kept)


def heldout_layouts(grid_size: int, num: int = 200) -> np.ndarray:
    """The first ``num`` held-out layouts, (num, G, G) bool: distinct, none named or trained on, even turned."""
    check_int(grid_size, "grid_size", 4, 16), check_int(num, "num", 1, HELDOUT_RESERVED)
    if grid_size not in _HELDOUT:
        _HELDOUT[grid_size] = _draw_layouts(grid_size, HELDOUT_RESERVED, "test", 0)
    return _HELDOUT[grid_size][:num].copy()


def procedural_layouts(grid_size: int, num: int, seed: int = 0) -> np.ndarray:
    """``num`` distinct seeded training layouts (num, G, G), connected, 1 to N/2 walls, none a named or held-out one,
    even turned or mirrored."""
    check_int(grid_size, "grid_size", 4, 16), check_int(num, "num", 1), check_int(seed, "seed")
    check_memory(float(num) * grid_size**2 * 48, f"procedural_layouts(num={num:,})")
    return _draw_layouts(grid_size, num, "train", seed, skip=heldout_layouts(grid_size, HELDOUT_RESERVED))


def build_world(cfg: Config) -> World:
    """The world a config trains in: its named layout, or with num_layouts > 0 a family of generated layouts."""
    if cfg.num_layouts > 0:
        return WorldFamily(procedural_layouts(cfg.grid_size, cfg.num_layouts, seed=cfg.data_seed))
    return World(cfg.grid_size, walls=cfg.layout, show_target=cfg.show_target)


@dataclass
class Transitions:
    """Compact trajectories, small integer tensors; images are painted when a batch is drawn."""

    states: torch.Tensor  # (B, T) int16 (int32 for many states) state indices
    actions: torch.Tensor  # (B, T-1) uint8 actions
    nbytes = property(lambda self: self.states.nbytes + self.actions.nbytes)
    __len__ = lambda self: self.states.shape[0]


def make_transitions(world: World, num: int = 50_000, seq_len: int = 2, seed: int = 0, exclude_cells=()) -> Transitions:
    """``num`` seeded trajectories of ``seq_len`` frames: uniform free starts, uniform actions, no ``exclude_cells``."""
    check_int(num, "num", 1), check_int(seq_len, "seq_len", 2), check_int(seed, "seed")
    check_memory(8.0 * 6 * (2 * num + 64) * seq_len, f"make_transitions(num={num:,}, seq_len={seq_len})")
    gen, free, num_cells = torch.Generator().manual_seed(seed), torch.from_numpy(world.free_cells), world.num_cells
    try:
        excluded = world._cells(np.asarray(exclude_cells, dtype=np.int64).reshape(-1))
    except (TypeError, ValueError):
        raise ValueError(f"exclude_cells must be cell indices in [0, {num_cells}), got {exclude_cells!r}") from None
    if not len(allowed := torch.from_numpy(np.setdiff1d(world.free_cells, excluded))):
        raise ValueError(f"exclude_cells {exclude_cells} leaves no free cell to start from; exclude fewer cells")
    kept_states, kept_actions, have, barren = [], [], 0, 0
    while have < num:
        if barren >= 100:
            raise ValueError(f"no trajectory of {seq_len} frames avoids the cells {exclude_cells}; exclude fewer cells")
        batch = 2 * (num - have) + 64
        cells = [allowed[torch.randint(len(allowed), (batch,), generator=gen)]]
        actions = torch.randint(len(ACTIONS), (batch, seq_len - 1), generator=gen)
        for t in range(seq_len - 1):
            cells.append(world.next_cell[cells[-1], actions[:, t]])
        states, ok = torch.stack(cells, 1), torch.isin(torch.stack(cells, 1), allowed).all(1)  # (batch, T), (batch,)
        if world.show_target:  # the target sits on a random free cell and never moves
            states = states + num_cells * free[torch.randint(len(free), (batch, 1), generator=gen)]
        kept_states.append(states[ok]), kept_actions.append(actions[ok])
        have, barren = have + int(ok.sum()), 0 if ok.any() else barren + 1
    dtype = torch.int16 if world.num_states < 2**15 else torch.int32
    return Transitions(torch.cat(kept_states)[:num].to(dtype), torch.cat(kept_actions)[:num].to(torch.uint8))


def paint_frames(world: World, data: Transitions, device, progress: bool = False, size: int | None = None, crop=False):
    """Every distinct state of ``data`` painted once on ``device`` as the encoder reads it (pooled to ``size``, with
    ``crop`` the middle half of the rows), and each trajectory's frame index: (index (B, T) long, frames (U, H, W)
    uint8, or float32 when pooled), so a batch is one gather; None for one layout (its atlas is one gather) or above
    the memory limit."""
    if not isinstance(world, WorldFamily):
        return None
    image, side = world.image_size, world.image_size if size is None else size
    if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side < 1 or image % side:
        raise ValueError(f"size must be a positive integer that divides the image size {image}, got {size!r}")
    states, index = torch.unique(data.states.long(), return_inverse=True)
    k, device = image // side, torch.device(device)  # pooled k x k, as the encoder pools its input
    rows = slice(side // 4, 3 * side // 4) if crop else slice(None)  # the middle half, as the encoder crops
    shape = (len(states), side // 2 if crop else side, side)
    if (need := math.prod(shape) * (4 if k > 1 else 1)) > (limit := memory_limit_bytes()):
        frames = f"the {len(states):,} frames of this dataset would take {need / 2**30:.1f} GiB"
        print(f"painting on demand: {frames}, above the limit of {limit / 2**30:.1f} GiB ($GRIDJEPA_MEMORY_LIMIT_GB)")
        return None
    frames = torch.empty(shape, dtype=torch.float32 if k > 1 else torch.uint8, device=device)  # filled, not joined
    chunks = list(enumerate(states.split(4096)))
    for i, c in tqdm(chunks, desc="painting frames", mininterval=0.5, disable=not progress or len(chunks) <= 4):
        painted = F.avg_pool2d(world.render(c, device), k)[:, 0] if k > 1 else world._paint(c, device)
        frames[4096 * i : 4096 * i + len(c)] = painted[:, rows]
    return index.to(device), frames


def sample_batch(world: World, data: Transitions, idx: torch.Tensor, device, painted: tuple | None = None):
    """Trajectories ``idx`` on ``device``: obs (B, T, 1, H, W), actions (B, T-1) long; from ``painted`` if given."""
    actions = data.actions[idx].long().to(device)
    if painted is not None:
        index, frames = painted  # paint_frames'
        frames = frames[index[idx.to(index.device)]].to(device).unsqueeze(-3)
        return (frames.float().div_(255.0) if frames.dtype == torch.uint8 else frames), actions
    return world.render(data.states[idx].long().to(device), device), actions


# ══ 2. Model (notebook 02): encoder, predictor, SIGReg, the JEPA ══════════════════════════════════════════════════════
class Projector(nn.Module):
    """Features -> latent: Linear -> BatchNorm (or LayerNorm) -> GELU -> Linear; BatchNorm here helps SIGReg (LeWM)."""

    def __init__(self, width: int, hidden: int, latent_dim: int, norm: str = "batchnorm"):
        super().__init__()
        if norm not in ("batchnorm", "layernorm"):
            raise ValueError(f"projector_norm must be 'batchnorm' or 'layernorm', got {norm!r}")
        bn = nn.BatchNorm1d(hidden) if norm == "batchnorm" else nn.LayerNorm(hidden)
        self.net = nn.Sequential(nn.Linear(width, hidden), bn, nn.GELU(), nn.Linear(hidden, latent_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def cls_attention(attn: nn.MultiheadAttention, h: torch.Tensor) -> torch.Tensor:
    """attn's output for the CLS token alone, h (B, N, E) -> (B, E), with no key or value per token: the query goes
    through W_k (the key bias shifts all scores alike) and the tokens are mixed before W_v (the weights sum to 1)."""
    (B, _, E), H, d = h.shape, attn.num_heads, attn.head_dim
    (w_q, w_k, w_v), (b_q, _, b_v) = attn.in_proj_weight.chunk(3), attn.in_proj_bias.chunk(3)
    q = F.linear(h[:, 0], w_q, b_q).view(B, H, d) * d**-0.5  # (B, H, d)
    a = torch.einsum("bhe,bne->bhn", torch.einsum("bhd,hde->bhe", q, w_k.view(H, d, E)), h).softmax(-1)  # (B, H, N)
    out = torch.einsum("bhe,hde->bhd", torch.einsum("bhn,bne->bhe", a, h), w_v.view(H, d, E)) + b_v.view(H, d)
    return attn.out_proj(out.reshape(B, E))


class Encoder(nn.Module):
    """ViT-Tiny-style encoder, image (B, 1, H, W) -> latent (B, D): patches, CLS token (or pool="flat"), projector."""

    def __init__(self, cfg: Config, image_size: int = 128):
        super().__init__()
        if image_size % cfg.input_size or cfg.input_size % cfg.patch_size:
            raise ValueError("input_size must divide the image size and patch_size must divide input_size")
        W, self.image_size, self.input_size, self.crop = cfg.width, image_size, cfg.input_size, cfg.crop
        self.patch_embed = nn.Conv2d(1, W, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, W))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches(cfg) + 1, W) * 0.02)
        layer = nn.TransformerEncoderLayer(W, cfg.heads, 4 * W, 0.0, "gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)  # pre-norm, as ViT
        self.norm, self.flat = nn.LayerNorm(W), nn.Linear(W, flat_channels(cfg)) if cfg.pool == "flat" else None
        features = num_patches(cfg) * flat_channels(cfg) if cfg.pool == "flat" else W
        self.projector = Projector(features, cfg.proj_hidden, cfg.latent_dim, cfg.projector_norm)

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        """The ViT's output: CLS (B, W), or flat (B, patches x flat_channels); frames may come pooled and cropped."""
        if (side := obs.shape[-1]) not in (s := self.image_size, i := self.input_size):
            raise ValueError(f"the encoder takes {s}x{s} images (or frames already pooled to input_size {i}): {side}")
        if side != self.input_size:  # pooling is linear: pool first, then rescale the fewer pixels
            obs = F.avg_pool2d(obs, self.image_size // self.input_size)  # (B, 1, input, input)
        if self.crop and obs.shape[-2] == obs.shape[-1]:
            obs = obs[..., self.input_size // 4 : 3 * self.input_size // 4, :]
        x = rearrange(self.patch_embed(obs * 2 - 1), "b c h w -> b (h w) c")  # pixels to [-1, 1]; (B, N, W)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        if self.flat is not None:
            return self.flat(self.norm(self.blocks(x))[:, 1:]).flatten(1)  # (B, N * channels), board order
        *first, last = self.blocks.layers
        for layer in first:
            x = layer(x)
        cls = x[:, 0] + cls_attention(last.self_attn, last.norm1(x))  # the last block, for CLS alone (dropout is 0)
        return self.norm(cls + last.linear2(last.activation(last.linear1(last.norm2(cls)))))  # = norm(blocks(x))[:, 0]

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.projector(self.features(obs))  # (B, D)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class AdaLNZeroBlock(nn.Module):
    """Pre-norm transformer block whose norms are shifted/scaled and residuals gated by the action (DiT's AdaLN-zero).
    The modulation starts at zero, so every gate is 0 and the block is the identity: the action's effect is learned."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask=None, action=None) -> torch.Tensor:
        """x, cond: (B, T, W); or cond the (A, W) embeddings of all actions and ``action`` (B, T): looked up after."""
        mod = self.modulation(cond) if action is None else self.modulation(cond)[action]  # (B, T, 6W)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        if x.shape[1] == 1:  # one frame: softmax over a single key is 1, so attention is its value path alone
            W = x.shape[-1]
            att = self.attn.out_proj(F.linear(h, self.attn.in_proj_weight[2 * W :], self.attn.in_proj_bias[2 * W :]))
        else:
            att = self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        x = x + gate1 * att
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class Predictor(nn.Module):
    """Causal transformer: latents (B, T, D) + actions (B, T) -> (B, T, D); token t sees frames 0..t, predicts t+1."""

    max_len = 16

    def __init__(self, cfg: Config):
        super().__init__()
        self.in_proj = nn.Linear(cfg.latent_dim, cfg.pred_width)
        self.time_embed = nn.Parameter(torch.randn(1, self.max_len, cfg.pred_width) * 0.02)
        self.action_embed = nn.Embedding(len(ACTIONS), cfg.pred_width)
        self.blocks = nn.ModuleList(AdaLNZeroBlock(cfg.pred_width, cfg.pred_heads) for _ in range(cfg.pred_depth))
        self.norm, self.out_proj = nn.LayerNorm(cfg.pred_width), nn.Linear(cfg.pred_width, cfg.latent_dim)

    def forward(self, emb: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        if (T := emb.shape[1]) > self.max_len:
            raise ValueError(f"the predictor sees at most {self.max_len} frames, got {T}")
        x = self.in_proj(emb) + self.time_embed[:, :T]  # (B, T, Wp)
        mask = torch.ones(T, T, dtype=torch.bool, device=emb.device).triu(1)  # True = may not attend
        table = not torch.is_grad_enabled()  # planning: each block's modulation of the 4 actions, then looked up
        for block in self.blocks:
            x = block(x, self.action_embed.weight, mask, action) if table else block(x, self.action_embed(action), mask)
        return self.out_proj(self.norm(x))  # (B, T, D)


class SIGReg(nn.Module):
    """Sketched Isotropic Gaussian Regulariser (LeJEPA, LeWM): how far latents are from N(0, I), as the mean over M
    random unit directions of the Epps-Pulley statistic N * integral exp(-t^2/2) |phi_hat(t) - exp(-t^2/2)|^2 dt."""

    def __init__(self, num_dirs: int = 256, num_knots: int = 17, t_max: float = 3.0, seed: int = 0):
        super().__init__()
        self.num_dirs, self.seed, t = num_dirs, seed, torch.linspace(0, t_max, num_knots)
        trapezoid = torch.full_like(t, t_max / (num_knots - 1))
        trapezoid[[0, -1]] /= 2
        self.register_buffer("t", t)
        self.register_buffer("phi_target", torch.exp(-0.5 * t**2))  # characteristic function of N(0, 1)
        self.register_buffer("weights", 2 * trapezoid * torch.exp(-0.5 * t**2))  # doubled: the integrand is even

    def directions(self, dim: int, step: int | None, device) -> torch.Tensor:
        """(D, M) random unit vectors: fresh each call, or a function of ``step`` (a resumed run draws the same)."""
        gen = None if step is None else torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        return F.normalize(torch.randn(dim, self.num_dirs, generator=gen), dim=0).to(device)

    def forward(self, emb: torch.Tensor, step: int | None = None) -> torch.Tensor:
        proj = (emb.float() @ self.directions(emb.shape[1], step, emb.device)).float()  # (B, M)
        xt = proj.unsqueeze(-1) * self.t  # (B, M, K): the empirical characteristic function is mean_b exp(i t x)
        err = (torch.cos(xt).mean(0) - self.phi_target) ** 2 + torch.sin(xt).mean(0) ** 2  # (M, K)
        return len(emb) * (err * self.weights).sum(-1).mean()


class JEPA(nn.Module):
    """Encoder + predictor; one encoder for every frame, no EMA, no stop-gradient: SIGReg alone keeps latents apart."""

    device = property(lambda self: next(self.parameters()).device)

    def __init__(self, cfg: Config, image_size: int = 128):
        super().__init__()
        self.cfg, self.encoder, self.predictor = cfg, Encoder(cfg, image_size), Predictor(cfg)
        if cfg.idm_weight > 0:  # a training-time head: (z_t, z_t+1) -> which of the 4 actions was taken
            W, D = cfg.pred_width, cfg.latent_dim
            self.inverse = nn.Sequential(nn.Linear(2 * D, W), nn.GELU(), nn.Linear(W, len(ACTIONS)))

    @torch.no_grad()
    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, H, W), finite floats in [0, 1] -> latents (B, D); inference only (training uses forward)."""
        size, tensor = self.encoder.image_size, isinstance(obs, torch.Tensor)
        if not tensor or not obs.dtype.is_floating_point:
            raise TypeError(f"obs must be a float tensor in [0, 1], got {obs.dtype if tensor else type(obs).__name__}")
        if obs.ndim != 4 or obs.shape[1:] != (1, size, size) or not len(obs):
            raise ValueError(f"obs must have shape (B, 1, {size}, {size}) with B >= 1, got {tuple(obs.shape)}")
        lo, hi = float(obs.min()), float(obs.max())  # NaN if any value is NaN
        if not 0 <= lo <= hi <= 1:
            hint = "; it looks like 0..255 pixels: divide by 255" if lo >= 0 and hi <= 255 else ""
            raise ValueError(f"obs values must lie in [0, 1] (no NaN or inf), got [{lo:g}, {hi:g}]{hint}")
        return self.encoder(obs.to(self.device, next(self.parameters()).dtype))

    def _check(self, emb, actions, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(emb, torch.Tensor) or not emb.dtype.is_floating_point:
            raise TypeError(f"emb must be a float tensor of latents, got {getattr(emb, 'dtype', type(emb).__name__)}")
        actions, D = check_actions(actions).to(emb.device), self.cfg.latent_dim
        if emb.ndim != 2 or emb.shape[1] != D or actions.ndim != ndim or len(actions) != len(emb):
            want = ("action (B,)" if ndim == 1 else "actions (B, H)") + f" with D = latent_dim = {D}"
            raise ValueError(f"expected emb (B, D) and {want}, got {tuple(emb.shape)} and {tuple(actions.shape)}")
        if not torch.isfinite(emb).all():
            raise ValueError("emb holds NaN or inf values; latents must be finite")
        return emb.to(next(self.predictor.parameters()).dtype), actions

    def predict(self, emb: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """The latent after one action from a single frame: (B, D), (B,) -> (B, D)."""
        emb, action = self._check(emb, action, 1)
        return self.predictor(emb[:, None], action[:, None])[:, 0]

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training: obs (B, T, 1, H, W), actions (B, T-1) -> emb (B, T, D), pred (B, T-1, D); one BatchNorm batch."""
        if not torch.isfinite(obs.sum()):  # a NaN would poison BatchNorm's statistics; one sum is a cheap check
            raise ValueError("obs holds NaN or inf values; images must be finite floats in [0, 1]")
        emb = self.encoder(obs.flatten(0, 1)).float().unflatten(0, obs.shape[:2])  # (B, T, D)
        out = {"emb": emb, "pred": self.predictor(emb[:, :-1], actions).float()}  # (B, T-1, D)
        if hasattr(self, "inverse"):
            out["action_logits"] = self.inverse(torch.cat([emb[:, :-1], emb[:, 1:]], -1)).float()  # (B, T-1, A)
        return out

    def rollout(self, emb: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Open-loop imagination (B, D), (B, H) -> (B, H, D), seeing the last seq_len - 1 frames, as in training."""
        emb, actions = self._check(emb, actions, 2)
        history, context = emb[:, None], max(1, self.cfg.seq_len - 1)  # (B, 1, D)
        for h in range(actions.shape[1]):  # the last `context` frames and the actions taken from them
            nxt = self.predictor(history[:, -context:], actions[:, max(0, h + 1 - context) : h + 1])[:, -1]
            history = torch.cat([history, nxt[:, None]], dim=1)
        return history[:, 1:]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_table(model: JEPA) -> dict[str, int]:
    """Parameter count per part of the model."""
    enc, proj, pred = (count_parameters(m) for m in (model.encoder, model.encoder.projector, model.predictor))
    return {"encoder (ViT)": enc - proj, "projector": proj, "predictor": pred, "total": count_parameters(model)}


# ══ 3. Training (notebook 03) ═════════════════════════════════════════════════════════════════════════════════════════
# ── the loss, its schedule, and the measures of a model ──
def smoothness_loss(emb: torch.Tensor) -> torch.Tensor:
    """MSE between consecutive latents (B, T, D): with SIGReg's spread it lays the cells out like the world."""
    return F.mse_loss(emb[:, 1:], emb[:, :-1])


def smooth_weight_at(step: int | None, cfg: Config) -> float:
    """The smoothness weight, ramped in over cfg.smooth_ramp of training, so SIGReg spreads the latents first."""
    ramp = cfg.smooth_ramp * cfg.num_steps
    return cfg.smooth_weight if step is None or ramp <= 0 else cfg.smooth_weight * min(1.0, (step + 1) / ramp)


def effective_rank(emb: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the normalised singular values of centred latents (B, D): near 1 when collapsed to a line."""
    s = torch.linalg.svdvals(emb.float() - emb.float().mean(0))
    p = s / s.sum().clamp_min(1e-12)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def jepa_loss(model: JEPA, sigreg: SIGReg, obs, actions, cfg: Config, step: int | None = None, measure=True) -> dict:
    """Named terms for obs (B, T, 1, H, W), actions (B, T-1): loss = pred_loss + lam * sigreg (the original write-up's
    lam = 10) [+ smooth_weight_at(step) * smooth_loss] [+ idm_weight * idm_loss]; ``measure``: latent_std, eff_rank."""
    out = model(obs, actions)
    emb = out["emb"]  # (B, T, D)
    terms = {"pred_loss": F.mse_loss(out["pred"], emb[:, 1:]), "sigreg": sigreg(emb.flatten(0, 1), step)}
    loss = terms["pred_loss"] + cfg.lam * terms["sigreg"]
    if cfg.smooth_weight > 0:
        terms["smooth_loss"] = smoothness_loss(emb)
        loss = loss + smooth_weight_at(step, cfg) * terms["smooth_loss"]
    if "action_logits" in out:  # inverse dynamics: the action must be readable from the latent's change
        terms["idm_loss"] = F.cross_entropy(out["action_logits"].flatten(0, 1), actions.flatten())
        loss = loss + cfg.idm_weight * terms["idm_loss"]
    terms["loss"] = loss
    if measure:  # an SVD: train() asks for it on the steps it logs only
        flat = emb.detach().flatten(0, 1)  # (B*T, D)
        terms["latent_std"], terms["eff_rank"] = flat.std(0).mean(), effective_rank(flat)
    return terms


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to 0 at cfg.num_steps. Annealing to 0 also settles BatchNorm."""
    if check_int(step, "step") < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.num_steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def calibration_images(world: World, size: int, device) -> torch.Tensor:
    """One image per free cell (and target; 2,048 of a large family's), pooled to ``size``: (P, 1, size, size)."""
    free = torch.from_numpy(world.free_cells)  # (F,); with a target, every (agent, target) pair: (F * F,)
    states = (free[:, None] + world.num_cells * free).reshape(-1) if world.show_target else free
    if len(states) > 2048:  # a large family: a fixed uniform sample of its free cells
        states = states[torch.randperm(len(states), generator=torch.Generator().manual_seed(0))[:2048]]
    return F.avg_pool2d(world.render(states, device), world.image_size // size)


@torch.no_grad()
def calibrate_batchnorm(model: JEPA, world: World, obs: torch.Tensor | None = None) -> None:
    """Set BatchNorm's running statistics from one image per free cell (``obs``: calibration_images): averages lag."""
    (linear, bn), was_training, model = model.encoder.projector.net[:2], model.training, model.eval()
    if isinstance(bn, nn.BatchNorm1d):  # the model's only BatchNorm
        obs = calibration_images(world, model.encoder.input_size, model.device) if obs is None else obs
        x = linear(model.encoder.features(obs)).float()  # (P, C): the BatchNorm's input
        bn.running_mean.copy_(x.mean(0))
        bn.running_var.copy_(x.var(0) if len(obs) > 1 else torch.ones_like(bn.running_var))
    model.train(was_training)


def encode_states(model: JEPA, world: World, states=None) -> torch.Tensor:
    """Latents of states (default: every free cell), (P,) -> (P, D), in eval mode, each distinct state encoded once."""
    states, was_training = torch.as_tensor(world.free_cells if states is None else states).long(), model.training
    unique, inverse = torch.unique(states, return_inverse=True)
    try:
        emb = torch.cat([model.eval().encode(world.render(chunk, model.device)) for chunk in unique.split(2048)])
    finally:
        model.train(was_training)
    return emb[inverse.to(model.device)]


@torch.no_grad()
def next_state_table(model: JEPA, world: World) -> dict[str, torch.Tensor]:
    """Per (free cell, action) pair (P,): cell, action, next, predicted (nearest cell), bump; latents (P, D), CPU."""
    emb, free, A = encode_states(model, world), torch.from_numpy(world.free_cells), len(ACTIONS)  # (F, D), (F,)
    cells, actions = repeat(free, "f -> (f a)", a=A), torch.arange(A).repeat(len(free))  # (F * A,): every pair
    latent, nxt = repeat(emb, "f d -> (f a) d", a=A), world.next_cell[cells, actions]
    pred = model.predict(latent, actions.to(model.device))  # (F * A, D)
    nearest, next_latent = free[torch.cdist(pred, emb).argmin(1).cpu()], emb[torch.searchsorted(free, nxt)]
    table = {"cell": cells, "action": actions, "next": nxt, "predicted": nearest, "bump": nxt == cells}
    return table | {"latent": latent.cpu(), "predicted_latent": pred.cpu(), "next_latent": next_latent.cpu()}


@torch.no_grad()
def layout_next_state_accuracy(model: JEPA, family: World) -> np.ndarray:
    """Next-state accuracy of each layout of a family (or of one world), (K,), nearest latents sought within each."""
    K, N, A = family.num_cells // family.grid_size**2, family.grid_size**2, len(ACTIONS)
    free, emb = torch.from_numpy(family.free_cells), encode_states(model, family)  # (F,), (F, D): all layouts
    pred = model.predict(repeat(emb, "f d -> (f a) d", a=A), torch.arange(A, device=emb.device).repeat(len(free)))
    table = torch.full((K * N, emb.shape[1]), float("nan"), device=emb.device).index_copy_(0, free.to(emb.device), emb)
    layout = free // N
    gaps = torch.cdist(pred.view(len(free), A, -1), table.view(K, N, -1)[layout.to(emb.device)])  # (F, A, N)
    nearest = gaps.nan_to_num(float("inf")).argmin(-1).cpu() + (layout * N)[:, None]
    right = (nearest == family.next_cell[free]).float()  # (F, A)
    return torch.zeros(K).index_add_(0, layout, right.sum(1)).div_(A * torch.bincount(layout, minlength=K)).numpy()


def next_state_accuracy(model: JEPA, world: World) -> float:
    """Share of (free cell, action) pairs whose predicted latent is nearest the true next cell's own (probe-free); in a
    family, the mean of its layouts' shares."""
    return float(layout_next_state_accuracy(model, world).mean())


# ── checkpoints, run records and output locks: checked before they are trusted, written atomically ──
CHECKPOINT_FORMAT, CHECKPOINT_KEYS = 2, ("model", "optimizer", "config", "history", "metrics")  # dicts, beside a step
RETIRED_FIELDS = {"stem": "patch", "spatial": False, "rollout_frames": 0, "rollout_weight": 0.0}  # at their old values
BOOKKEEPING = ("log_every", "eval_every", "ckpt_every", "profile", "compile")  # not in a run's name
RECORD_KIND = "gridjepa run record"
RECORD_FIELDS = dict(command=str | None, train_seconds=int | float, metrics=dict, evaluations=list, config=dict)
_LOCKS: dict[str, filelock.FileLock] = {}  # one per output: this process may take it again (train inside main)


def checkpoint_checksum(state: dict, h=None) -> str:
    """sha256 over all a checkpoint holds but its checksum: dicts in key order, lists, tensors' bytes, scalars."""
    obj, h = ({k: v for k, v in state.items() if k != "checksum"}, hashlib.sha256()) if h is None else (state, h)
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif not isinstance(obj, (dict, list, tuple)):
        h.update(f"S{obj!r}".encode())
    else:
        h.update(f"{'D' if (is_dict := isinstance(obj, dict)) else 'L'}{len(obj)}".encode())
        for k in sorted(obj, key=repr) if is_dict else range(len(obj)):
            h.update(repr(k).encode() if is_dict else b""), checkpoint_checksum(obj[k], h)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """A fresh file beside ``path``, synced, then renamed over it (a link there is replaced, never followed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # "x": a new file, never an existing one or a link; the mode open() gives, not mkstemp's 0600
        with open(tmp := path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp", "xb") as f:
            f.write(data), f.flush(), os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, f"{(e.strerror or str(e)).lower()} writing {path}") from e
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename


def save_checkpoint(path, model: JEPA, cfg: Config, opt=None, step=0, history=None, metrics=None, train_seconds=0.0):
    """Everything a run needs in one checksummed file, serialised in memory first (a full disk is our OSError)."""
    state = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "step": step, "config": dataclasses.asdict(cfg)}
    state |= {"optimizer": opt.state_dict() if opt is not None else {}, "history": history or {}}
    state |= {"metrics": metrics or {}, "train_seconds": float(train_seconds)}
    torch.save(state | {"checksum": checkpoint_checksum(state)}, buffer := io.BytesIO())
    _atomic_write(Path(path), buffer.getvalue())


def config_from_dict(values: dict, source: str = "config", cfg: Config | None = None, same_run: bool = True) -> Config:
    """A validated Config from a saved dict; ``cfg``: refused if a model (``same_run``: any) field differs from it."""
    names = {f.name for f in dataclasses.fields(Config)}
    bad = [f"{k}={v!r}" for k, v in values.items() if k in RETIRED_FIELDS and v != RETIRED_FIELDS[k]]
    if bad := bad + sorted(set(values) - names - set(RETIRED_FIELDS)):
        raise ValueError(f"{source} describes a model this module does not build ({', '.join(bad)})")
    try:
        saved = validate_config(Config(**{k: v for k, v in values.items() if k in names}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source} holds an invalid config: {e}") from e
    models, where = saved.model_fields(), source.split()[0]  # where: "checkpoint" or "record"
    if diff := [
        f"{'model' if k in models else 'training'} field {k}: {where}={v!r} vs config={getattr(cfg, k)!r}"
        for k, v in dataclasses.asdict(saved).items()
        if cfg is not None and k not in BOOKKEEPING and (same_run or k in models) and getattr(cfg, k) != v
    ]:
        raise ValueError(f"{source} was made with another config ({', '.join(diff)}): use its own, or another name")
    return saved


def load_checkpoint(path, cfg: Config | None = None, model: JEPA | None = None, device="cpu", same_run=False) -> dict:
    """A checkpoint checked before it is used, plus "cfg" and "model_obj"; ``cfg``: see config_from_dict."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} is not available here (no CUDA GPU); load {path} with device='cpu'")
    data = Path(path).read_bytes()  # a missing file is a FileNotFoundError
    try:
        ckpt = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} cannot be read (corrupt, truncated or not a checkpoint): {e}") from e
    if not isinstance(ckpt, dict) or any(not isinstance(ckpt.get(k), dict) for k in CHECKPOINT_KEYS):
        raise ValueError(f"{path} is not a GridJEPA checkpoint (it needs dicts {list(CHECKPOINT_KEYS)} and a step)")
    if ckpt.get("format", 1) not in (1, CHECKPOINT_FORMAT):  # 1: most shipped files, a checksum and no "format" key
        raise ValueError(f"checkpoint {path} has format {ckpt['format']!r}; this module reads formats 1 and 2")
    if checkpoint_checksum(ckpt) != ckpt.get("checksum"):  # a missing one too: format 1 and 2 both have it
        raise ValueError(f"checkpoint {path} fails its integrity check: edited, corrupted or pre-checksum; retrain it")
    saved, step = config_from_dict(ckpt["config"], f"checkpoint {path}", cfg, same_run), ckpt.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= saved.num_steps:
        raise ValueError(f"checkpoint {path} has step {step!r}; expected an integer in [0, {saved.num_steps}]")
    model = model if model is not None else JEPA(saved).to(device)
    try:
        model.load_state_dict(ckpt["model"])  # its message names each tensor that does not fit
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path}: its weights do not fit its config ({' '.join(str(e).split())})") from e
    seconds = float(ckpt["metrics"].get("train_seconds") or 0.0)  # format 1 kept it in the metrics
    return {"train_seconds": seconds} | ckpt | {"cfg": saved, "model_obj": model.eval()}


def default_out_path(cfg: Config) -> Path:
    """runs/<profile>_<layout, or "procedural">_seed<seed>_<hash>.pt; the hash covers every field but BOOKKEEPING."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in BOOKKEEPING} | {"rollout_weight": 0.0}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]  # a retired field: names stay
    layout = "procedural" if cfg.num_layouts else cfg.layout
    return REPO_ROOT / "runs" / f"{cfg.profile}_{layout}_seed{cfg.seed}_{digest}.pt"


def read_record(out: str | Path, cfg: Config, warn: bool = False) -> dict | None:
    """The record <stem>.json beside ``out`` (or None); another file there: FileExistsError, or with warn None."""
    if not os.path.lexists(path := Path(out).with_suffix(".json")):
        return None
    try:  # OSError, or ValueError: not JSON, not UTF-8
        record = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
        if not isinstance(record, dict) or record.get("kind") != RECORD_KIND or {"command", "config"} - record.keys():
            raise ValueError("it is a link, a folder or a file not written by gridjepa_utils.py")
        if record.get("checkpoint") != Path(out).name:
            raise ValueError(f"it records checkpoint {record.get('checkpoint')!r}, not {Path(out).name!r}")
        if wrong := [k for k, kind in RECORD_FIELDS.items() if k in record and not isinstance(record[k], kind)]:
            raise ValueError(f"its fields {wrong} have the wrong type")
        config_from_dict(record["config"], "record", cfg)
        return record
    except (OSError, ValueError) as e:
        if not warn:
            raise FileExistsError(f"refusing to overwrite {path}, not this run's record: {e}") from None
        warnings.warn(f"ignoring {path}, not this run's record: {e}", stacklevel=3)


def write_record(out: str | Path, record: dict) -> None:
    """Write the run record of checkpoint ``out`` atomically."""
    _atomic_write(Path(out).with_suffix(".json"), json.dumps(record, indent=2).encode())


def load_run(path: str | Path, device: torch.device | str = "cpu") -> tuple[JEPA, Config, dict]:
    """A checkpoint's model and config, and info: path, step, metrics, history, and command etc. from its record."""
    record = read_record(path, (ckpt := load_checkpoint(path, device=device))["cfg"], warn=True) or {}
    info = {"path": str(path), "step": ckpt["step"], "history": ckpt["history"], "command": None}
    info |= {k: record[k] for k in ("command", "train_seconds", "device", "evaluations") if k in record}
    return ckpt["model_obj"], ckpt["cfg"], info | {"metrics": dict(ckpt["metrics"]) | record.get("metrics", {})}


@contextlib.contextmanager
def output_lock(path: str | Path):
    """An OS lock on ``<path>.lock`` while a run writes ``path`` (it goes with its process: never stale). A lock file
    that cannot be made, or a folder at ``path``, is an error now, naming ``path``, not after training."""
    try:
        (path := Path(path)).parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644))
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path} (its lock file {path}.lock: {e.strerror or e})") from e
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder; give a checkpoint path ending in .pt")
    lock = _LOCKS.setdefault(lock_path := str(Path(f"{path}.lock").resolve()), filelock.FileLock(lock_path))
    try:
        with lock.acquire(timeout=0):  # released on leaving, whatever happens
            yield lock_path
    except filelock.Timeout:  # from acquire: a run takes no other file lock
        raise RuntimeError(f"{path} is being written by another process: wait, or use another path") from None


# ── the training loop ──
@dataclass
class TrainResult:
    model: JEPA
    history: dict[str, list]
    world: World
    data: Transitions
    cfg: Config
    train_seconds: float = 0.0  # in this call
    warnings: list[str] = field(default_factory=list)
    total_train_seconds: float = 0.0  # summed over every call that trained this run (resumes included)
    steps_trained: int = 0  # steps taken in this call (0 when the checkpoint was already finished)


def train_step(model, sigreg: SIGReg, opt, obs, actions, cfg: Config, step: int, measure: bool = True) -> dict:
    """One optimisation step as train() takes it (lr, loss with bf16 on CUDA, backward, clip, AdamW): its terms."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=obs.device.type == "cuda"):
        terms = jepa_loss(model.train(), sigreg, obs, actions, cfg, step, measure)
    # before any weight is touched; on a GPU only on the logged steps, so that the host never waits on it
    if (measure or obs.device.type == "cpu") and not torch.isfinite(terms["loss"]):
        raise FloatingPointError(f"loss became {float(terms['loss'])} at step {step}: lower lr, raise lam")
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return terms


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW at cfg.lr and cfg.weight_decay, fused (every parameter in one kernel) where this torch has it."""
    kind = next(model.parameters()).device.type
    fused = kind == "cuda" or (kind == "cpu" and torch.torch_version.TorchVersion(torch.__version__) >= "2.4")
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def collapse_warning(latent_std: float, cfg: Config) -> str | None:
    """A message with what to try when the latents have (almost) stopped varying."""
    tries = [f"a larger lam (now {cfg.lam:g})"]
    tries += ["projector_norm='batchnorm' (LeWM's; now 'layernorm')"] if cfg.projector_norm != "batchnorm" else []
    tries += [f"a smaller smooth_weight (now {cfg.smooth_weight:g})"] if cfg.smooth_weight > 0 else []
    why = f"COLLAPSE: the latent std is {latent_std:.4f} (healthy is ~1): the encoder maps every image to nearly one"
    return None if latent_std >= 0.05 else f"{why} vector. Try {' or '.join(tries)}."


def train(
    cfg, world=None, data=None, ckpt_path=None, resume=True, on_log=None, progress=True, device=None, stop_after=None
) -> TrainResult:
    """Train a JEPA with cfg; batch k depends on (seed, k) alone, so a run resumed from ``ckpt_path`` takes one path."""
    validate_config(cfg)
    stop_after = None if stop_after is None else check_int(stop_after, "stop_after")
    if on_log is not None and not callable(on_log):
        raise TypeError(f"on_log must be a function on_log(history) or None, got {type(on_log).__name__}")
    if world is not None and not isinstance(world, World):
        raise TypeError(f"world must be a World (or a WorldFamily), got {type(world).__name__}")
    if world is not None and (got := (world.grid_size, world.show_target)) != (cfg.grid_size, cfg.show_target):
        want = f"Config.grid_size={cfg.grid_size} and Config.show_target={cfg.show_target}"
        raise ValueError(f"world is {got[0]}x{got[0]} with show_target={got[1]}, but {want}: pass build_world(cfg)")
    if data is not None and not (isinstance(data, Transitions) and data.states.shape[1] == cfg.seq_len):
        got = f"{data.states.shape[1]} frames" if isinstance(data, Transitions) else type(data).__name__
        raise ValueError(f"data must be Transitions of Config.seq_len={cfg.seq_len} frames per trajectory, got {got}")
    with contextlib.nullcontext() if ckpt_path is None else output_lock(ckpt_path):
        device, world = torch.device(device or default_device()), world or build_world(cfg)
        data = data or make_transitions(world, cfg.num_transitions, cfg.seq_len, cfg.data_seed)
        # a large family is watched on its first 32 layouts: the curve's next-state accuracy is on training layouts
        monitor = WorldFamily(world.layouts[:32]) if isinstance(world, WorldFamily) and len(world) > 32 else world
        torch.manual_seed(cfg.seed)
        model = JEPA(cfg, world.image_size).to(device)
        if device.type == "cuda":
            model, torch.backends.cuda.matmul.allow_tf32 = model.to(memory_format=torch.channels_last), True
        sigreg, opt = SIGReg(cfg.sigreg_dirs, seed=cfg.seed).to(device), make_optimizer(model, cfg)
        mode = "reduce-overhead" if device.type == "cuda" else None  # reduce-overhead: replayed as CUDA graphs
        step_model = torch.compile(model, mode=mode) if cfg.compile else model  # the same weights, fused kernels
        history, start, earlier_seconds, notes = {}, 0, 0.0, []
        if ckpt_path is not None and resume and Path(ckpt_path).exists():
            ckpt = load_checkpoint(ckpt_path, cfg, model=model, device=device, same_run=True)
            if ckpt["optimizer"]:  # a finished run's final checkpoint keeps no optimiser state
                opt.load_state_dict(ckpt["optimizer"])
            start, history, earlier_seconds = ckpt["step"], ckpt["history"], ckpt["train_seconds"]
            if progress:
                print(f"resumed from {ckpt_path} at step {start}/{cfg.num_steps}")
        steps = range(start, cfg.num_steps if stop_after is None else min(cfg.num_steps, start + stop_after))
        t0 = time.perf_counter() - earlier_seconds  # the clock of the whole run; painting the frames counts
        painted = paint_frames(world, data, device, progress, cfg.input_size, cfg.crop) if len(steps) else None
        calib = calibration_images(world, cfg.input_size, device)  # every evaluation's BatchNorm images, once
        notebook = {"display": False} if any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__) else {}
        bar, handle = tqdm(steps, desc="training", mininterval=0.5, disable=not progress or not steps, **notebook), None
        if notebook and not bar.disable:  # a notebook's bar: shown with a handle, to save its final text at the end
            from IPython.display import display

            handle = display(bar.container, display_id=True)
        for step in bar:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
            obs, actions = sample_batch(world, data, idx, device, painted)
            logged = (done := step + 1) % cfg.log_every == 0 or done == cfg.num_steps
            terms = train_step(step_model, sigreg, opt, obs, actions, cfg, step, measure=logged)
            if logged:  # to the history, the bar and on_log
                row = {"step": done, "lr": lr_at(step, cfg)} | {name: float(t.detach()) for name, t in terms.items()}
                for k, v in row.items():
                    history.setdefault(k, []).append(v)
                bar.set_postfix(pred=row["pred_loss"], sig=row["sigreg"], std=row["latent_std"], refresh=False)
                if on_log is not None:
                    on_log(history)
            if done % cfg.eval_every == 0 or done == cfg.num_steps:  # next-state accuracy, BatchNorm calibrated
                calibrate_batchnorm(model, world, calib)
                history.setdefault("eval_step", []).append(done)
                history.setdefault("next_state_acc", []).append(next_state_accuracy(model, monitor))
                if not notes and (note := collapse_warning(history.get("latent_std", [math.inf])[-1], cfg)):
                    notes.append(note)  # said once per run
                    print(note)
            if ckpt_path is not None and (done % cfg.ckpt_every == 0 or done == cfg.num_steps):
                save_checkpoint(ckpt_path, model, cfg, opt, done, history, train_seconds=time.perf_counter() - t0)
    total = time.perf_counter() - t0
    if handle is not None:  # a saved notebook then reads "450/450", not the "0/450" the bar was first shown with
        handle.update(bar.container)
    calibrate_batchnorm(model, world, calib)
    return TrainResult(model.eval(), history, world, data, cfg, total - earlier_seconds, notes, total, len(steps))


# ══ 4. Analysis (notebook 04): probes scored honestly, PCA ════════════════════════════════════════════════════════════
@dataclass
class LinearProbe:
    """y = x @ weight + bias, on numpy arrays or torch tensors (the planners decode latents on the model's device)."""

    weight: np.ndarray  # (D, 2)
    bias: np.ndarray  # (2,)

    def __call__(self, x) -> np.ndarray:
        as_x = (lambda v: torch.as_tensor(v, dtype=x.dtype, device=x.device)) if torch.is_tensor(x) else np.asarray
        return as_x(x) @ as_x(self.weight) + as_x(self.bias)


def fit_probe(x: np.ndarray, y: np.ndarray, alpha: float = 0.0) -> LinearProbe:
    """A linear probe latents x (P, D) -> targets y (P, k): sklearn's LinearRegression, or Ridge(alpha) if alpha > 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or not 0 <= alpha < math.inf:
        raise ValueError(f"alpha must be a finite number >= 0 (0: no ridge penalty), got {alpha!r}")
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    reg = (Ridge(alpha=alpha) if alpha > 0 else LinearRegression()).fit(x, y)
    return LinearProbe(np.asarray(reg.coef_, np.float64).reshape(-1, x.shape[1]).T, np.atleast_1d(reg.intercept_))


def ridge_alpha_loo(x: np.ndarray, y: np.ndarray, alphas=None) -> float:
    """The ridge alpha (default: 15 from 1e-3 to 1e4) with the smallest leave-one-out error: sklearn's RidgeCV."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(RidgeCV(alphas=np.logspace(-3, 4, 15) if alphas is None else alphas).fit(x, y).alpha_)


def r2_score(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Coefficient of determination per output column (sklearn's): (P, k) -> (k,). Negative = worse than the mean."""
    return np.atleast_1d(sklearn_r2_score(np.asarray(y, float), np.asarray(pred, float), multioutput="raw_values"))


def probe_report(emb, pos, num_splits: int = 20, holdout: int | None = None, seed: int = 0) -> dict:
    """R^2 of linear probes emb -> pos: on the cells fit on, and held out (seeded ShuffleSplits; plain and ridge)."""
    emb, pos = np.asarray(emb, np.float64), np.asarray(pos, np.float64)
    if emb.ndim != 2 or pos.ndim != 2 or len(pos) != (P := len(emb)) or P < 4:
        raise ValueError(f"expected emb (P, D) and pos (P, k) of at least 4 points, got {emb.shape} and {pos.shape}")
    if not (np.isfinite(emb).all() and np.isfinite(pos).all()):
        raise ValueError("emb and pos must be finite (no NaN or inf)")
    holdout = max(2, round(P * 0.3)) if holdout is None else check_int(holdout, "holdout", 2, P - 2)
    splits = list(ShuffleSplit(check_int(num_splits, "num_splits", 1), test_size=holdout, random_state=seed).split(emb))
    heldout = lambda fit, test, alpha=0.0: r2_score(pos[test], fit_probe(emb[fit], pos[fit], alpha)(emb[test])).mean()
    plain = [heldout(fit, test) for fit, test in splits]
    ridge = [heldout(fit, test, ridge_alpha_loo(emb[fit], pos[fit])) for fit, test in splits]
    fit_r2 = r2_score(pos, fit_probe(emb, pos)(emb))
    names = "fit_col fit_row fit heldout_mean heldout_std ridge_heldout_mean ridge_heldout_std".split()
    values = [*fit_r2[:2], fit_r2.mean(), np.mean(plain), np.std(plain), np.mean(ridge), np.std(ridge)]
    return {k: float(v) for k, v in zip(names, values)} | {"num_splits": num_splits, "holdout": holdout}


def pca(emb, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Latents (P, D) on their principal components (sklearn's PCA): (P, k) coordinates and all explained ratios."""
    fitted = PCA(svd_solver="full").fit(x := np.asarray(emb, np.float64))
    return fitted.transform(x)[:, : k or len(fitted.explained_variance_ratio_)], fitted.explained_variance_ratio_


def latent_vs_grid_distance(emb, world: World) -> dict:
    """Does latent L2 track grid distance? Over all pairs of free cells (emb (N, D)): both, and Spearman's rho."""
    emb, (i, j) = np.asarray(emb, np.float64), np.triu_indices(len(emb), k=1)
    l2 = np.linalg.norm(emb[i] - emb[j], axis=1)
    rho, pvalue = spearmanr(l2, moves := world.shortest_paths()[world.free_cells[i], world.free_cells[j]])
    return {"spearman": float(rho), "pvalue": float(pvalue), "l2": l2, "grid_distance": moves, "pairs": (i, j)}


def geometry_report(model: JEPA, world: World, num_splits: int = 20) -> dict:
    """Is the latent space a map? Over the free cells: PCA, latent vs BFS distance, probe R^2, std, effective rank."""
    emb = encode_states(model, world).cpu().numpy()
    ratio, probes = pca(emb)[1], probe_report(emb, world.cell_pos(world.free_cells), num_splits=num_splits)
    out = {"pc1": ratio[0], "pc2": ratio[1], "spearman_l2_grid": latent_vs_grid_distance(emb, world)["spearman"]}
    out |= {"probe_r2_heldout": probes["heldout_mean"], "probe_r2_heldout_std": probes["heldout_std"]}
    out |= {"probe_r2_ridge_heldout": probes["ridge_heldout_mean"], "probe_r2_fit": probes["fit"]}
    out |= {"latent_std": emb.std(0).mean(), "effective_rank": effective_rank(torch.from_numpy(emb))}
    return {k: float(v) for k, v in out.items()}


def untrained_model(cfg: Config, world: World | None = None, seed: int = 1234) -> JEPA:
    """Same architecture, seeded random weights, BatchNorm calibrated on ``world``: the baseline any claim must beat."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = JEPA(validate_config(cfg))
    calibrate_batchnorm(model, world or build_world(cfg))
    return model.eval()


# ══ 5. Planning (notebook 05): batched MPC over all start->goal pairs at once ═════════════════════════════════════════
# A policy maps (cells (P,), goals (P,)) to a dict: "action" (P,) and, from a planner that scores its options,
# "scores" (P, A), the predicted cost of each first action (lower is better). run_mpc acts and repeats.
Policy = Callable[[torch.Tensor, torch.Tensor], dict]
PLANNERS = ("probe", "latent", "cem", "search", "imagine", "graph", "random")  # make_policy's names


def cheapest(scores: torch.Tensor, **extra) -> dict:
    """A scoring policy's answer: the action of lowest predicted cost (scores (P, A)), the scores, and any extras."""
    return {"action": scores.argmin(1), "scores": scores} | extra


def latent_greedy_policy(model: JEPA, world: World, decode: Callable | None = None) -> Policy:
    """One step ahead: imagine each cell's 4 next latents and take the action whose latent is nearest (L2) the goal
    image's latent, or, with ``decode`` (latents -> (col, row)), whose decoded cell is nearest the goal (Manhattan)."""
    A = len(ACTIONS)

    @torch.no_grad()
    def policy(cells: torch.Tensor, goals: torch.Tensor) -> dict:
        emb, actions = encode_states(model, world, cells), torch.arange(A).repeat(len(cells))  # (P, D), (P * A,)
        imagined = model.predict(repeat(emb, "p d -> (p a) d", a=A), actions.to(emb.device))  # (P * A, D)
        if decode is None:
            goal_emb = encode_states(model, world, goals)[:, None]  # (P, 1, D)
            return cheapest(((imagined.view(len(cells), A, -1) - goal_emb) ** 2).sum(-1).cpu())  # (P, A)
        imagined = decode(imagined).view(len(cells), A, 2).cpu()  # (P, A, 2) decoded (col, row)
        goal_pos = torch.from_numpy(world.cell_pos(goals.numpy())).float()[:, None]  # (P, 1, 2)
        return cheapest((imagined - goal_pos).abs().sum(-1), imagined=imagined)

    return policy


def probe_policy(model: JEPA, world: World, probe: LinearProbe | None = None) -> Policy:
    """The original write-up's planner: greedy, decoding imagined latents with a linear probe (default: fit on all)."""
    probe = probe or fit_probe(encode_states(model, world).cpu().numpy(), world.cell_pos(world.free_cells))
    if not isinstance(probe, LinearProbe):
        raise TypeError(f"probe must be a LinearProbe (fit_probe's), got {type(probe).__name__}")
    if (got := np.shape(probe.weight)) != (D := model.cfg.latent_dim, 2):
        raise ValueError(f"probe weight must be (latent_dim, 2) = ({D}, 2), got {got}; fit it on this model's latents")
    return latent_greedy_policy(model, world, lambda z: probe(z.float().cpu()))


def random_policy(seed: int = 0) -> Policy:
    """Uniformly random actions, the floor any planner must clear. It scores nothing, so it returns no scores."""
    gen = torch.Generator().manual_seed(check_int(seed, "seed"))
    return lambda cells, goals: {"action": torch.randint(len(ACTIONS), (len(cells),), generator=gen)}


def bfs_policy(world: World) -> Policy:
    """The optimum, from the true map: step to the first neighbour one move closer to the goal (no scores)."""
    moves = torch.from_numpy(world.shortest_paths())  # (N, N)
    closer = lambda cells, goals: moves[world.next_cell[cells], goals[:, None]] == moves[cells, goals][:, None] - 1
    return lambda cells, goals: {"action": closer(cells, goals).int().argmax(1)}  # (P, A) -> the first closer


def check_search(model: JEPA, world: World, horizon: int, cost: str, who: str) -> None:
    """horizon >= 1, a known latent cost, and the 4^H imagined rollouts per start cell within the memory limit."""
    if cost not in (costs := ("final", "steps")):
        raise ValueError(f"cost must be one of {costs}, got {cost!r}")
    U, S = len(world.free_cells), len(ACTIONS) ** min(check_int(horizon, "horizon H", 1), 64)
    per_rollout = horizon * (model.cfg.latent_dim + U + 4 * model.cfg.pred_width) + 2 * horizon
    check_memory(4.0 * U * S * per_rollout, f"{who} with horizon={horizon} ({S:,} action sequences per start cell)")


@torch.no_grad()
def imagined_costs(model: JEPA, world: World, cells, goals, horizon: int, cost: str = "steps") -> torch.Tensor:
    """Latent cost of all 4^H sequences (base-4 code s in column s) from each cell to its goal image: (P, S). "final":
    ||z_H - z_goal||^2 (LeWM's); "steps": min over h of h + ||z_h - z_goal|| / (the longest imagined first move)."""
    check_search(model, world, horizon, cost, "imagined_costs")
    seqs = torch.cartesian_prod(*[torch.arange(len(ACTIONS))] * horizon).view(-1, horizon)  # (S, H)
    (start_u, start_inv), (goal_u, goal_inv) = (torch.unique(x, return_inverse=True) for x in (cells, goals))
    emb, goal_emb = encode_states(model, world, start_u), encode_states(model, world, goal_u)  # (U, D), (Ug, D)
    S, U = len(seqs), len(start_u)  # the rollouts depend on the start and the actions only: once per start cell
    z = model.rollout(repeat(emb, "u d -> (u s) d", s=S), seqs.repeat(U, 1).to(emb.device)).view(U, S, horizon, -1)
    if cost == "final":
        return (torch.cdist(z[:, :, -1].flatten(0, 1), goal_emb).view(U, S, -1) ** 2).cpu()[start_inv, :, goal_inv]
    d = torch.cdist(z.flatten(0, 2), goal_emb).view(U, S, horizon, -1)  # (U, S, H, Ug)
    step = (z[:, torch.arange(len(ACTIONS)) * S // len(ACTIONS), 0] - emb[:, None]).norm(dim=-1).amax(1)  # (U,)
    moves = d / step.clamp_min(1e-6)[:, None, None, None] + torch.arange(1, horizon + 1, device=d.device)[:, None]
    return moves.min(2).values.cpu()[start_inv, :, goal_inv]  # (P, S)


def exhaustive_policy(model: JEPA, world: World, horizon: int = 4, cost: str = "steps") -> Policy:
    """Search all 4^H action sequences for every pair at once; execute the first action of the best."""
    check_search(model, world, horizon, cost, "exhaustive_policy")
    best = lambda costs: costs.unflatten(1, (len(ACTIONS), -1)).amin(2)  # (P, S) -> (P, A): the best from each action
    return lambda cells, goals: cheapest(best(imagined_costs(model, world, cells, goals, horizon, cost)))


def cem_policy(model, world, horizon=4, samples=64, elites=8, iterations=3, smoothing=0.1, seed=0, cost="steps"):
    """Cross-entropy method (LeWM's, made discrete): refit per-step categoricals to the elite sampled sequences."""
    check_search(model, world, horizon, cost, "cem_policy")
    check_int(samples, "samples", 1), check_int(iterations, "iterations", 1), check_int(seed, "seed")
    check_int(elites, "elites (at most samples)", 1, samples)
    if not (isinstance(smoothing, (int, float)) and 0 <= smoothing <= 1):
        raise ValueError(f"smoothing must be a number in [0, 1], got {smoothing!r}")
    gen, A, code = torch.Generator().manual_seed(seed), len(ACTIONS), len(ACTIONS) ** torch.arange(horizon - 1, -1, -1)

    def policy(cells: torch.Tensor, goals: torch.Tensor) -> dict:
        P, table, best = len(cells), imagined_costs(model, world, cells, goals, horizon, cost), []  # table (P, 4^H)
        probs, scores, action = torch.full((P, horizon, A), 1 / A), torch.full((P, A), torch.inf), torch.zeros(P).long()
        for _ in range(iterations):  # action: the first of the best sequence so far
            seqs = torch.multinomial(probs.flatten(0, 1), samples, replacement=True, generator=gen)
            seqs = rearrange(seqs, "(p h) s -> p s h", p=P)  # (P, S, H)
            costs = table.gather(1, (seqs * code).sum(-1))  # (P, S): base-4 code, a sequence's column in the table
            elite = seqs.gather(1, repeat(costs.argsort(1)[:, :elites], "p e -> p e h", h=horizon))  # (P, E, H)
            action = torch.where(costs.amin(1) < scores.amin(1), elite[:, 0, 0], action)  # a new best: its first
            scores = scores.scatter_reduce(1, seqs[:, :, 0], costs, "amin")  # (P, A) the best sequence from each action
            probs = (1 - smoothing) * F.one_hot(elite, A).float().mean(1) + smoothing / A  # (P, H, A)
            best.append(scores.amin(1))  # (P,) the best cost so far
        return {"action": action, "scores": scores, "best_cost_per_iter": torch.stack(best, 1)}

    return policy


def graph_policy(model: JEPA, world: World) -> Policy:
    """Breadth-first search in the imagined graph of the free cells' latents (privileged): edges to the nearest node."""
    nodes = encode_states(model, world)  # (V, D): one image per free cell
    V, A = len(nodes), len(ACTIONS)
    pred = model.predict(repeat(nodes, "v d -> (v a) d", a=A), torch.arange(A, device=nodes.device).repeat(V))
    edges = torch.cdist(pred, nodes).argmin(1).view(V, A).cpu().numpy()  # (V, A) the imagined next node
    hops = shortest_path(csr_matrix((np.ones(V * A), (np.arange(V * A) // A, edges.ravel())), (V, V)), unweighted=True)
    node_of = lambda cells: torch.cdist(encode_states(model, world, cells), nodes).argmin(1).cpu().numpy()
    # each action's cost (P, A): the imagined moves left after it (inf where no path), half a move more for a bump
    costs = lambda here, there: hops[edges[here], there[:, None]] + 0.5 * (edges[here] == here[:, None])
    return lambda cells, goals: cheapest(torch.from_numpy(costs(node_of(cells), node_of(goals))).float())


@torch.no_grad()
def imagine_map(model: JEPA, start: torch.Tensor, max_depth=32, max_nodes=256, merge=0.5) -> dict:
    """Breadth-first search in imagination from start latents (U, D) alone: places (U, V, D) and their count (U,),
    depth (U, V), first action of the path to each (-1 at the start) and merge radius tol (U, V)."""
    (U, D), A, dev = start.shape, len(ACTIONS), start.device
    actions, slots = torch.arange(A, device=dev), torch.arange(max_nodes, device=dev)
    nodes, tol = start.new_zeros(U, max_nodes, D), start.new_zeros(U, max_nodes)
    depth, first = torch.full((U, max_nodes), -1, device=dev), torch.full((U, max_nodes), -1, device=dev)  # long
    nodes[:, 0], depth[:, 0], count = start, 0, torch.ones(U, dtype=torch.long, device=dev)
    front_u, front_v = torch.arange(U, device=dev), torch.zeros_like(count)  # the frontier: (search, place)
    for level in range(1, max_depth + 1):
        if not len(front_u):
            break  # the last level found no new place
        parents = repeat(nodes[front_u, front_v], "f d -> (f a) d", a=A)  # (C, D): C = F * A candidate moves
        pred = model.predict(parents, step := actions.repeat(len(front_u)))  # (C, D)
        went = (pred - parents).norm(dim=-1)  # (C,) how far each imagined move went
        # q is one move c from c's parent if undoing it (from q) lands nearer the parent than c went: a scale-free test
        one_move = lambda q, c: (model.predict(q, step[c] ^ 1) - parents[c]).norm(dim=-1) < went[c]  # ^ 1: undo
        real = one_move(pred, torch.arange(len(pred), device=dev))  # (C,) False: a wall bump
        real_fa, went_fa = real.view(-1, A), went.view(-1, A)  # (F, A)
        longest = torch.where(real_fa.any(1, keepdim=True), went_fa * real_fa, went_fa).amax(1)  # (F,) of real moves
        radius = merge * longest.clamp_min(1e-6)  # (F,) the merge radius: places are not evenly spaced
        if level == 1:
            tol[:, 0] = radius
        ctol, cu, own = (repeat(x, "f -> (f a)", a=A) for x in (radius, front_u, front_v))
        cfirst = step if level == 1 else repeat(first[front_u, front_v], "f -> (f a)", a=A)
        # each candidate's nearest place in its own search (never its parent), and its distance: a batch row per search
        searches, row, size = torch.unique_consecutive(cu, return_inverse=True, return_counts=True)  # row: (C,)
        rank = torch.arange(len(cu), device=dev) - (size.cumsum(0) - size)[row]  # (C,) its place in that row
        queries = pred.new_zeros(len(searches), int(size.max()), D).index_put_((row, rank), pred)  # (rows, most, D)
        gaps = torch.cdist(queries, nodes[searches])[row, rank]  # (C, V)
        nearest, place = gaps.masked_fill((slots >= count[cu][:, None]) | (slots == own[:, None]), torch.inf).min(1)
        # a real move joins the nearest place within the radius only if that place is one such move from the parent
        merging = (real & (nearest < ctol)).nonzero().squeeze(1)
        same = one_move(nodes[cu[merging], place[merging]], merging)
        nearest[merging] = nearest[merging].masked_fill(~same, torch.inf)
        index = torch.arange(len(pred), device=dev)[new := (nearest >= ctol) & real]  # each new latent's candidate move
        pred, cu, cfirst, ctol = pred[new], cu[new], cfirst[new], ctol[new]
        # two new latents of one search are one place by the same test, unless one parent's moves (distinct cells)
        close = torch.tril((torch.cdist(pred, pred) < ctol[:, None]) & (cu[:, None] == cu[None]), diagonal=-1)
        later, earlier = close.nonzero(as_tuple=True)
        close[later, earlier] = one_move(pred[earlier], index[later]) & (index[later] // A != index[earlier] // A)
        order = torch.argsort(cu[keep := ~close.any(1)], stable=True)  # keep: the first of each place
        pred, cu, cfirst, ctol = pred[keep][order], cu[keep][order], cfirst[keep][order], ctol[keep][order]
        slot = count[cu] + torch.arange(len(cu), device=dev) - torch.searchsorted(cu, cu)  # after the search's places
        pred, cu, cfirst, ctol, slot = (x[slot < max_nodes] for x in (pred, cu, cfirst, ctol, slot))
        nodes[cu, slot], depth[cu, slot], first[cu, slot], tol[cu, slot] = pred, level, cfirst, ctol
        count, front_u, front_v = count + torch.bincount(cu, minlength=U), cu, slot
    return {"nodes": nodes, "count": count, "depth": depth, "first": first, "tol": tol}


def imagination_policy(model: JEPA, world: World, max_depth: int | None = None, merge=0.5, meet="either") -> Policy:
    """Plan from two images and the model alone: imagine the places reachable from both (imagine_map; moves are
    reversible; two half-depth searches drift less than one), act along the shortest path through a meeting place."""
    if not (isinstance(merge, int | float) and 0 < merge < 1) or meet not in ("either", "both"):  # True/False: 1/0
        raise ValueError(f"merge must be a number in (0, 1) and meet 'either' or 'both', got {merge=!r}, {meet=!r}")
    G = world.grid_size  # default depth 2G; room for 2G^2 + 1 places, more than the free cells
    max_depth, max_nodes = check_int(2 * G if max_depth is None else max_depth, "max_depth", 1), 2 * G**2 + 1
    within = torch.maximum if meet == "either" else torch.minimum  # either's radius (both latents drift), or both's
    seen, unused = {}, {"nodes": 0.0, "depth": -1, "first": -1, "tol": 0.0}  # a search per image; imagine_map's pads

    def searches(cells: torch.Tensor) -> tuple[dict, torch.Tensor]:  # (P,) -> imagine_map's dict, each cell's row
        images, rows = torch.unique(cells, return_inverse=True)  # a row per distinct image, padded to the most places
        if todo := [int(s) for s in images if int(s) not in seen]:  # a search depends only on its image
            emb = encode_states(model, world, torch.tensor(todo))  # (U, D), searched 256 at a time
            parts = [imagine_map(model, z, max_depth, max_nodes, merge) for z in emb.split(256)]
            found = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            for i, s in enumerate(todo):  # kept trimmed to the places found: memory grows with places, not max_nodes
                seen[s] = {k: v[i, : found["count"][i]] if k in unused else v[i] for k, v in found.items()}
        kept = [seen[int(s)] for s in images]
        pad = lambda k: nn.utils.rnn.pad_sequence([s[k] for s in kept], batch_first=True, padding_value=unused[k])
        return {k: pad(k) if k in unused else torch.stack([s[k] for s in kept]) for k in kept[0]}, rows.to(model.device)

    def policy(cells: torch.Tensor, goals: torch.Tensor) -> dict:
        (ahead, start_inv), (back, goal_inv) = searches(cells), searches(goals)
        scores = []
        for s, t in zip(start_inv.split(256), goal_inv.split(256)):
            depth_s, depth_t = ahead["depth"][s][:, :, None], back["depth"][t][:, None, :]  # (R, Vs, 1), (R, 1, Vg)
            dist, first = torch.cdist(ahead["nodes"][s], back["nodes"][t]), ahead["first"][s]  # (R, Vs, Vg), (R, Vs)
            length, radius = (depth_s + depth_t).float(), within(ahead["tol"][s][:, :, None], back["tol"][t][:, None])
            met = (depth_s >= 0) & (depth_t >= 0) & (dist < radius)  # (R, Vs, Vg)
            cost = torch.where(met, length, float("inf")).amin(2)  # (R, Vs) the shortest imagined path through each
            # no meeting: after every meeting, by the distance to the goal image's latent in merge radii
            far = 1e3 + dist[:, :, 0] / (2 * ahead["tol"][s].clamp_min(1e-6)) + length[:, :, 0]
            cost = torch.where(torch.isinf(cost), far, cost).masked_fill(first < 0, float("inf"))  # (R, Vs)
            row = torch.full((len(s), len(ACTIONS)), float("inf"), device=cost.device)
            scores.append(row.scatter_reduce(1, first.clamp_min(0), cost, reduce="amin"))  # (R, A)
        return cheapest(torch.cat(scores).cpu(), imagined_places=ahead["count"][start_inv].cpu())

    return policy


@dataclass
class PlanResult:
    """Outcome of planning every pair: where each episode went and how long it took."""

    starts: torch.Tensor  # (P,)
    goals: torch.Tensor  # (P,)
    paths: torch.Tensor  # (P, T + 1) the cell after each step; T: the steps run (max_steps if an episode failed)
    steps: torch.Tensor  # (P,) steps to reach the goal (max_steps + 1 if never)
    optimal_steps: torch.Tensor  # (P,) BFS distance
    seconds: float
    trace: list = field(default_factory=list)  # per step: the policy's dict (when record=True)
    success = property(lambda self: self.steps <= self.paths.shape[1] - 1)  # (P,) bool
    optimal = property(lambda self: self.success & (self.steps == self.optimal_steps))  # (P,) bool
    _shares = lambda self, m=slice(None): {k: getattr(self, k)[m].float().mean().item() for k in ("success", "optimal")}

    def summary(self) -> dict:
        mean = self.steps[self.success].float().mean().item()  # nan if none was solved
        return {"pairs": len(self.starts)} | self._shares() | {"seconds": self.seconds, "mean_steps_solved": mean}

    def by_distance(self) -> dict[int, dict]:  # pairs, success and optimal share per BFS distance
        masks = {d: self.optimal_steps == d for d in sorted(set(self.optimal_steps.tolist()))}
        return {d: {"pairs": int(m.sum())} | self._shares(m) for d, m in masks.items()}


def step_budget(world: World, optimal: torch.Tensor) -> int:
    """run_mpc's default steps for pairs with these BFS distances (P,): 2 x the longest + G, room for detours."""
    return 2 * int(optimal.max()) + world.grid_size


def run_mpc(
    world, policy, starts=None, goals=None, max_steps=None, record=False, remember_bumps=False, remember_tried=False
) -> PlanResult:
    """Closed-loop control of every pair at once (default: all pairs of free cells): observe, ask the policy, act in
    the real world, until each episode is at its goal or max_steps (default: step_budget) ran out. A planner may loop
    back to an image; ``remember_bumps`` never repeats a bump from it, ``remember_tried`` its least-tried move."""
    if (starts is None) != (goals is None):
        raise ValueError("pass both starts and goals (one goal per start), or neither for every pair")
    if not isinstance(world, World):
        raise TypeError(f"world must be a World (or a WorldFamily), got {type(world).__name__}")
    if not callable(policy):
        raise TypeError(f"policy must be callable as policy(cells, goals) -> dict, got {type(policy).__name__}")
    starts, goals = world.all_pairs() if starts is None else (starts, goals)
    starts, goals = (check_int_tensor(torch.as_tensor(x), name) for x, name in ((starts, "starts"), (goals, "goals")))
    if starts.ndim != 1 or starts.shape != goals.shape or not len(starts):
        shapes = f"{tuple(starts.shape)} and {tuple(goals.shape)}"
        raise ValueError(f"starts and goals must be non-empty 1-D tensors of the same length, got shapes {shapes}")
    check_flags(record=record, remember_bumps=remember_bumps, remember_tried=remember_tried)
    for name, cells in (("start", starts), ("goal", goals)):
        if cells.min() < 0 or cells.max() >= world.num_cells:
            raise ValueError(f"{name} cells must lie in [0, {world.num_cells})")
        if (on_wall := world.walls.reshape(-1)[cells.numpy()]).any():
            raise ValueError(f"{name} cell {tuple(int(v) for v in world.cell_pos(int(cells[on_wall][0])))} is a wall")
    unique, inverse = torch.unique(starts, return_inverse=True)  # one BFS per distinct start
    if ((optimal := torch.from_numpy(world.shortest_paths(unique.numpy()))[inverse, goals]) < 0).any():
        raise ValueError("some goals cannot be reached from their start in this layout")  # BFS distance -1
    max_steps = step_budget(world, optimal) if max_steps is None else check_int(max_steps, "max_steps", 1)
    A, N = len(ACTIONS), world.grid_size**2  # counts per episode, image (its cell in its layout) and action:
    if remember := "remember_tried" if remember_tried else "remember_bumps" if remember_bumps else "":
        check_memory(4.0 * len(starts) * N * A, f"run_mpc({remember}=True) for {len(starts):,} pairs")
    taken = torch.zeros(len(starts) if remember else 0, N, A, dtype=torch.int32)  # (P, N, A)
    t0, cells, paths, trace = time.perf_counter(), starts.clone(), [starts.clone()], []
    steps = torch.where(starts == goals, 0, max_steps + 1)
    for t in range(max_steps):  # memory grows with the steps run, never with max_steps
        if not (active := cells != goals).any():
            break
        episodes, here = active.nonzero()[:, 0], cells[active]  # (n,), (n,)
        out = policy(here, goals[active])
        if not isinstance(out, dict) or "action" not in out:
            raise TypeError("a policy must return a dict with an 'action' tensor")
        if (action := check_actions(out["action"]).cpu()).shape != here.shape:
            raise ValueError(f"the policy returned actions of shape {tuple(action.shape)} for {len(here)} pairs")
        if (scores := out.get("scores")) is not None and (got := getattr(scores, "shape", None)) != (len(here), A):
            raise ValueError(f"the policy returned 'scores' of shape {got}; expected {(len(here), A)}")
        if remember:  # remember_tried counts every action taken from an image, remember_bumps the wall bumps
            allowed = (past := taken[episodes, here % N]) == (past.amin(1, keepdim=True) if remember_tried else 0)
            scores = torch.zeros(len(here), A) if scores is None else torch.as_tensor(scores).detach().float().cpu()
            # an action the policy rules out (a score of inf) still comes before one memory rules out
            best = scores.nan_to_num(posinf=torch.finfo().max).masked_fill(~allowed, torch.inf).argmin(1)
            chosen = torch.where(allowed[range(len(here)), action], action, best)
            out = out | {"action": chosen, "policy_action": action}
            taken[episodes, here % N, chosen] += ((world.next_cell[here, chosen] == here) | remember_tried).int()
        if record:
            kept = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in out.items() if v is not None}
            trace.append(kept | {"active": active.clone()})
        cells[active] = world.next_cell[here, out["action"]]
        steps[(cells == goals) & active] = t + 1
        paths.append(cells.clone())
    return PlanResult(starts, goals, torch.stack(paths, 1), steps, optimal, time.perf_counter() - t0, trace)


def sample_pairs(world: World, per_layout: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_layout`` seeded (start, goal) pairs of distinct free cells in each layout of a world or family."""
    rng, N, per_layout = np.random.default_rng(seed), world.grid_size**2, check_int(per_layout, "per_layout", 1)
    free = [world.free_cells[world.free_cells // N == k] for k in range(world.num_cells // N)]
    pick = np.stack([rng.choice(f, size=2, replace=False) for f in free for _ in range(per_layout)])  # (P, 2)
    return torch.from_numpy(pick[:, 0]), torch.from_numpy(pick[:, 1])


def make_policy(name: str, model: JEPA, world: World, probe: LinearProbe | None = None) -> Policy:
    """A planner by name (PLANNERS); the probe planner's probe is fit on every free cell unless given."""
    if name not in PLANNERS:
        raise ValueError(f"unknown planner {name!r}; expected one of {PLANNERS}")
    makers = dict(latent=latent_greedy_policy, cem=cem_policy, search=exhaustive_policy, imagine=imagination_policy)
    makers |= dict(probe=lambda *a: probe_policy(*a, probe), graph=graph_policy, random=lambda *_: random_policy())
    return makers[name](model, world)


# ══ Plots and widgets (used by the notebooks) ═════════════════════════════════════════════════════════════════════════


def show_source(obj) -> str:
    """Show (and return) the module's code for ``obj``: a Python block in a notebook, printed elsewhere."""
    from IPython import display, get_ipython

    src = textwrap.dedent(inspect.getsource(obj))
    display.display(display.Markdown(f"```python\n{src}```")) if get_ipython() is not None else print(src)
    return src


class LivePlot:
    """Loss and latent-health curves vs step, redrawn in place in a notebook: train(on_log=plot.update) while training
    runs, plot.update(history, every_seconds=0) to draw one now. A collapse shows as latent std and rank fall."""

    def __init__(self):
        import matplotlib.pyplot as plt
        from IPython.display import display

        self.fig, self.axes = plt.subplots(1, 5, figsize=(17, 3))
        self.handle, self.last = display(self.fig, display_id=True), 0.0
        plt.close(self.fig)  # shown through the display handle only

    def update(self, history: dict, every_seconds: float = 3.0) -> None:
        if time.perf_counter() - self.last < every_seconds:  # drawing costs more than a CPU training step
            return
        keys, colors = "pred_loss sigreg latent_std eff_rank next_state_acc".split(), "C0 C1 C2 C4 C3".split()
        titles = ["prediction MSE", "SIGReg", "latent std per dim (~1 healthy)", "effective rank of a batch"]
        for i, (ax, key, title, color) in enumerate(zip(self.axes, keys, [*titles, "next-state accuracy"], colors)):
            ax.clear()
            ax.set(xlabel="step", title=title)
            x = history.get("eval_step" if i == 4 else "step", [])  # losses on a log scale; accuracy per evaluation
            (ax.semilogy if i < 3 else ax.plot)(x, history.get(key, []), "o-" if i == 4 else "-", color=color, ms=3)
        self.axes[4].set_ylim(-0.05, 1.05)
        self.fig.tight_layout()
        self.handle.update(self.fig)
        self.last = time.perf_counter()


def show_grid(world: World, ax=None, path=None, goal=None, imagined=None, title: str | None = None):
    """A top-down map of the grid: walls, optional path (cells), goal and imagined positions."""
    import matplotlib.pyplot as plt

    ax, G = ax or plt.gca(), world.grid_size
    ax.imshow(np.where(world.walls, 0.25, 0.92), cmap="gray", vmin=0, vmax=1, extent=(-0.5, G - 0.5, G - 0.5, -0.5))
    ax.set(xticks=range(G), yticks=range(G), xlabel="col", ylabel="row", title=title or "")
    if path is not None:
        ax.plot(*(cells := world.cell_pos(np.asarray(path))).T, "-o", color="C0", ms=4)
        ax.plot(*cells[-1], "o", color="C0", ms=12, label="agent")
    if goal is not None:
        ax.plot(*world.cell_pos(int(goal)), "*", color="C3", ms=16, label="goal")
    for a, (x, y) in enumerate(np.asarray(imagined if imagined is not None else [])):
        ax.annotate(ACTIONS[a][0].upper(), (x, y), color="C2", ha="center", va="center", fontsize=9, weight="bold")
    return ax


def _show_png(widget, images) -> None:
    """Grayscale images side by side, x2, or a matplotlib figure, as a PNG in an ipywidgets.Image at its own size."""
    if hasattr(images, "savefig"):
        images.savefig(buf := io.BytesIO(), format="png", dpi=80)
    else:  # scaled x2, nearest neighbour, a gap between images
        gap = np.full((images[0].shape[0], 6), 255, np.uint8)
        row = np.concatenate(sum(([np.asarray(im), gap] for im in images), [])[:-1], axis=1).repeat(2, 0).repeat(2, 1)
        Image.fromarray(row).save(buf := io.BytesIO(), format="png")
    w, h = Image.open(io.BytesIO(png := buf.getvalue())).size
    widget.value, widget.width, widget.height = png, str(w), str(h)
    widget.layout.width, widget.layout.height, widget.layout.display = f"{w}px", f"{h}px", None  # else it stretches


def transition_explorer(world: World):
    """Widget: pick a cell and an action, see the image before and after (ipywidgets 7.7 and 8)."""
    import ipywidgets as W

    if not isinstance(world, World):
        raise TypeError(f"transition_explorer takes a World, got {type(world).__name__}")
    G, first, atlas = world.grid_size, int(world.free_cells[0]), world.atlas()
    col = W.Dropdown(options=list(range(G)), value=first % G, description="col")
    row = W.Dropdown(options=list(range(G)), value=first // G, description="row")
    action = W.ToggleButtons(options=[(name, i) for i, name in enumerate(ACTIONS)], value=3, description="action")
    image, label = W.Image(format="png"), W.HTML()

    def update(_=None):
        cell, here, (dc, dr) = row.value * G + col.value, f"({col.value}, {row.value})", ACTION_DELTAS[action.value]
        if world.is_wall(cell):  # no frame: the agent cannot stand there; the message stays in view
            label.value, image.layout.display = f"<b>{here} is a wall</b>: pick another cell", "none"
            return
        after = int(world.step(torch.tensor([cell]), torch.tensor([action.value]))[0])
        _show_png(image, [atlas[cell].numpy(), atlas[after].numpy()])
        why = "a wall" if 0 <= col.value + dc < G and 0 <= row.value + dr < G else "the board's edge"  # of a bump
        stay = f": <b>blocked by {why}, the agent stays</b>" if after == cell else ""
        label.value = f"before {here} --{ACTIONS[action.value]}--&gt; after ({after % G}, {after // G}){stay}"

    for w in (col, row, action):
        w.observe(update, names="value")
    update()
    return W.VBox([W.HBox([col, row]), action, label, image])


def planning_player(world, policies, start=None, goal=None, max_steps=None, remember_bumps=False, remember_tried=False):
    """Widget: Play or step through a planner's episode: frame, map, predicted costs, choice (ipywidgets 7.7 and 8)."""
    import ipywidgets as W
    from matplotlib.figure import Figure

    check_flags(remember_bumps=remember_bumps, remember_tried=remember_tried)
    if not isinstance(world, World):
        raise TypeError(f"planning_player takes a World first, got {type(world).__name__}")
    if not isinstance(policies, dict) or not policies:
        raise ValueError(f"policies must be a non-empty dict {{name: policy}}, got {policies!r}")
    free, G = [int(c) for c in world.free_cells], world.grid_size
    if bad := [f"{name}={c!r}" for name, c in (("start", start), ("goal", goal)) if c is not None and c not in free]:
        raise ValueError(f"{bad[0]} is not a free cell of this world; expected one of {free}")
    cells, state = [(f"({c % G}, {c // G})", c) for c in free], {}
    planner = W.Dropdown(options=list(policies), description="planner")
    start_w = W.Dropdown(options=cells, value=free[0] if start is None else start, description="start")
    goal_w = W.Dropdown(options=cells, value=free[-1] if goal is None else goal, description="goal")
    memory = W.Checkbox(value=remember_bumps, description="remember bumps", indent=False)
    tried = W.Checkbox(value=remember_tried, description="remember what it tried", indent=False)
    step, play = W.IntSlider(min=0, max=0, description="step"), W.Play(min=0, max=0, interval=600)
    frame, board, info = W.Image(format="png"), W.Image(format="png"), W.HTML()
    W.link((play, "value"), (step, "value"))

    def replan(_=None):
        state["result"] = None
        if start_w.value == goal_w.value:
            info.value = "start and goal are the same cell: pick another goal"
            return
        args = torch.tensor([start_w.value]), torch.tensor([goal_w.value]), max_steps, True, memory.value, tried.value
        res = state["result"] = run_mpc(world, policies[planner.value], *args)  # recorded, with the boxes' memories
        step.max = play.max = int(min(res.steps[0], res.paths.shape[1] - 1))
        step.value = 0  # and the Play button with it
        show()

    def show(_=None):
        if (res := state.get("result")) is None:
            return
        t = step.value
        cell, rec = int(res.paths[0, t]), res.trace[t] if t < len(res.trace) else {}
        _show_png(frame, [world.atlas()[cell].numpy()])
        fig = Figure(figsize=(3, 3), layout="constrained")  # drawn to a PNG only: not pyplot's, nothing to close
        show_grid(world, fig.subplots(), res.paths[0, : t + 1].numpy(), goal_w.value, rec.get("imagined", [None])[0])
        _show_png(board, fig)
        solved = f"solved in {int(res.steps[0])}" if bool(res.success[0]) else "not solved"
        status = "reached the goal" if cell == goal_w.value else f"step {t}/{step.max}"
        text = f"<b>{planner.value}</b>: {status} (optimal: {int(res.optimal_steps[0])} steps; {solved})"
        if rec:  # the predicted costs (inf: "ruled out"), the chosen action in bold, and why a memory overrode it
            chosen, wanted = (ACTIONS[int(rec.get(key, rec["action"])[0])] for key in ("action", "policy_action"))
            scores = rec["scores"][0].tolist() if "scores" in rec else []
            costs = [f"{n}: {v:.2f}" if v < math.inf else f"{n}: ruled out" for n, v in zip(ACTIONS, scores)]
            costs = " ".join(f"<b>{c}</b>" if name == chosen else c for name, c in zip(ACTIONS, costs))
            tried_note = f"back at this image: {wanted} was taken from it more often than {chosen}"
            note = tried_note if tried.value else f"{wanted} already went nowhere from this image: remembered"
            text += f"<br>predicted cost per action: {costs}" if costs else "<br>this planner has no scores"
            text += f" -> <b>{chosen}</b>" + (f"<br>({note})" if wanted != chosen else "")
        info.value = text

    for w in (planner, start_w, goal_w, memory, tried):
        w.observe(replan, names="value")
    step.observe(show, names="value")
    replan()
    rows = [W.HBox([planner, start_w, goal_w]), W.HBox([memory, tried]), W.HBox([play, step])]
    box = W.VBox([*rows, W.HBox([frame, board], layout=W.Layout(align_items="flex-start")), info])
    box.state = state
    box.controls = dict(planner=planner, start=start_w, goal=goal_w, memory=memory, tried=tried, step=step, play=play)
    return box


# ══ The main job: train, analyse, plan, report ════════════════════════════════════════════════════════════════════════


def evaluate(model: JEPA, world: World, cfg: Config, planner="probe", remember_bumps=False, remember_tried=False):
    """Headline metrics of a trained model on its world: next-state accuracy, latent geometry, planning with
    ``planner`` (and run_mpc's memories) and with the latent cost alone. A layouts model: next-state accuracy on
    training and held-out layouts, and imagination search (alone, and remembering what it tried) beside BFS."""
    calibrate_batchnorm(model, world)
    if isinstance(world, WorldFamily):  # 10 seeded pairs in each held-out layout (200 of them; smoke: 20)
        seen = WorldFamily(world.layouts[:200], world.image_size)
        new = WorldFamily(heldout_layouts(world.grid_size, 20 if cfg.profile == "smoke" else 200), world.image_size)
        acc, pairs = layout_next_state_accuracy(model, new), sample_pairs(new, 10)
        metrics = {"training_layouts_next_state_accuracy": next_state_accuracy(model, seen)}
        metrics |= {"heldout_next_state_accuracy": float(acc.mean()), "heldout_pairs": len(pairs[0])}
        runs = {"bfs": bfs_policy(new), "imagine": (search := imagination_policy(model, new)), "imagine_tried": search}
        for name, policy in runs.items():  # imagine_tried: the same policy, remembering what it tried
            shares = run_mpc(new, policy, *pairs, remember_tried=name.endswith("tried"))._shares()
            metrics |= {f"heldout_{name}_{k}": v for k, v in shares.items()}
        return metrics
    geo, memory = geometry_report(model, world), {"remember_bumps": remember_bumps, "remember_tried": remember_tried}
    plan = run_mpc(world, make_policy(planner, model, world), **memory).summary()
    latent = run_mpc(world, latent_greedy_policy(model, world)).summary()
    metrics = {"next_state_accuracy": next_state_accuracy(model, world), "pc1_plus_pc2": geo["pc1"] + geo["pc2"]}
    metrics |= {k: v for k, v in geo.items() if k not in ("pc1", "pc2")} | {"planner": planner, **memory}
    metrics |= {f"plan_{k}": plan[k] for k in ("seconds", "success", "optimal")}
    return metrics | {f"latent_greedy_{k}": latent[k] for k in ("success", "optimal")}


def describe_device(device: torch.device) -> str:
    cpu = f"cpu ({os.cpu_count()} cores, torch {torch.__version__})"
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu


def keep_freed_memory() -> None:
    """glibc only: keep freed memory for reuse, so a training step need not map and fault in its activations afresh."""
    with contextlib.suppress(OSError, AttributeError):  # elsewhere, nothing
        libc = ctypes.CDLL("libc.so.6")  # all three settings are needed
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: tensors below 1 GiB come from the heap
        libc.mallopt(-1, 1 << 33)  # M_TRIM_THRESHOLD: the heap is not trimmed below 8 GiB
        libc.mallopt(-2, 1 << 26)  # M_TOP_PAD: it grows 64 MiB at a time


def main(argv: list[str] | None = None) -> dict:
    """Train with a profile (or resume), evaluate, print the headline metrics, save checkpoint + run record. A rerun
    of a finished run only evaluates: its evaluation is appended to the record, whose training metrics stay."""
    flags = {  # Config field -> (flag, type, help); the default is the profile's
        "seed": ("--seed", int, "seeds the weights and the batches"),
        "lam": ("--lam", float, "SIGReg weight >= 0"),
        "smooth_weight": ("--smooth", float, "temporal-smoothness weight >= 0 (0: the original write-up's objective)"),
        "smooth_ramp": ("--smooth-ramp", float, "fraction of training over which smoothness ramps in, in [0, 1]"),
        "seq_len": ("--seq-len", int, "frames per training sequence (2: one transition, as the original write-up)"),
        "num_steps": ("--steps", int, "training steps >= 1"),
        "batch_size": ("--batch-size", int, "batch size >= 1"),
    }
    p = argparse.ArgumentParser(description="Train a GridJEPA world model, then analyse and plan with it.")
    p.add_argument("--profile", choices=sorted(PROFILES), help="default: $GRIDJEPA_PROFILE or by device")
    p.add_argument("--layout", choices=sorted(LAYOUTS), help="default: open")
    p.add_argument("--layouts", help="'procedural' (the 'layouts' profile's generated layouts) or a number of them")
    p.add_argument("--planner", choices=PLANNERS, help="default: probe")
    p.add_argument("--remember-bumps", action="store_true", help="never repeat an action that left the image as it was")
    p.add_argument("--remember-tried", action="store_true", help="back at an image, take its least-tried action")
    p.add_argument("--compile", action="store_true", help="train through torch.compile (CUDA graphs on a GPU)")
    for name, (flag, kind, text) in flags.items():
        p.add_argument(flag, type=kind, dest=name, help=f"{text} (default: the profile's)")
    p.add_argument("--out", help="checkpoint path ending in .pt, its run record <stem>.json beside it (default: runs/)")
    args = p.parse_args(argv)
    overrides = {"layout": args.layout or "open"} | ({"compile": True} if args.compile else {})
    overrides |= {name: value for name in flags if (value := getattr(args, name)) is not None}
    if (layouts := args.layouts) is not None:
        if layouts != "procedural" and not (re.fullmatch(r"[0-9]+", layouts) and int(layouts) >= 1):
            p.error(f"--layouts must be 'procedural' or a whole number of layouts >= 1, got {layouts!r}")
        overrides["num_layouts"] = PROFILES["layouts"]["num_layouts"] if layouts == "procedural" else int(layouts)
        args.profile = args.profile or ("layouts_gpu" if torch.cuda.is_available() else "layouts")
    try:
        cfg = make_config(args.profile, **overrides)
    except (TypeError, ValueError) as e:  # each Config field named with its flag: "--steps (Config.num_steps) ..."
        named = {name: flag for name, (flag, *_) in flags.items()} | {"layout": "--layout", "num_layouts": "--layouts"}
        p.error(re.sub(r"\bConfig\.(\w+)\b", lambda m: f"{named[m[1]]} ({m[0]})" if m[1] in named else m[0], str(e)))
    if cfg.num_layouts and (args.layout or args.planner or args.remember_bumps or args.remember_tried):
        p.error("--layout, --planner and --remember-* apply to single-layout runs (generated layouts: fixed planners)")
    if (out := Path(args.out).expanduser() if args.out is not None else default_out_path(cfg)).suffix != ".pt":
        stem = "; the name needs a stem before .pt" if out.name == ".pt" else ""
        p.error(f"--out must end in .pt (its run record is written beside it as <stem>.json), got {args.out!r}{stem}")
    device, planner = torch.device("cuda:0" if torch.cuda.is_available() else "cpu"), args.planner or "probe"
    command = shlex.join(["python", "gridjepa_utils.py", *(sys.argv[1:] if argv is None else argv)])
    try:  # refusals: a message, exit status 1, nothing overwritten
        with output_lock(out):  # which first checks that a file can be made beside out
            record = read_record(out, cfg)  # refuses before any training
            result = train(cfg, ckpt_path=out, resume=True, device=device)
            metrics = evaluate(result.model.cpu(), result.world, cfg, planner, args.remember_bumps, args.remember_tried)
            seconds, stamp = result.total_train_seconds, time.strftime("%Y-%m-%dT%H:%M:%S%z")
            evaluation = {"command": command, "planner": planner, "time": stamp, "device": describe_device(device)}
            if result.steps_trained:  # training metrics are written once, by the run that trained; evaluations append
                metrics["train_seconds"] = seconds
                save_checkpoint(out, result.model, cfg, None, cfg.num_steps, result.history, metrics, seconds)
                record = {"command": command, "metrics": metrics, "evaluations": (record or {}).get("evaluations", [])}
            elif record is None:  # a finished checkpoint whose record is gone: rebuilt from the checkpoint's metrics
                record = {"command": None, "metrics": load_checkpoint(out, cfg).get("metrics") or {}, "evaluations": []}
            fresh = {"kind": RECORD_KIND, "checkpoint": out.name, "config": dataclasses.asdict(cfg)}
            record = fresh | {"train_seconds": seconds, "device": evaluation["device"]} | record  # its entries win
            record["evaluations"].append(evaluation | {"metrics": metrics})
            write_record(out, record)
        where = f"{cfg.num_layouts:,} generated layouts" if cfg.num_layouts else f"layout {cfg.layout}"
        print(f"\n{cfg.profile} profile, {where}, seed {cfg.seed}: {result.steps_trained} steps trained now, ", end="")
        print(f"{seconds:.1f} s of training in all")
        print("\n".join(f"  {k:24s} {v:.4f}" if isinstance(v, float) else f"  {k:24s} {v}" for k, v in metrics.items()))
        print(f"checkpoint: {out}\nrecord:     {out.with_suffix('.json')}")
    except (OSError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        if args.out and "another config" in str(e):
            print("hint: pick another --out, or leave --out out to get a name of this config's own", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C: the last checkpoint is whole (atomic writes); the same command resumes
        kept = f"{out} keeps the last checkpoint" if out.exists() else "no checkpoint was written yet"
        print(f"\ninterrupted: {kept}; run the same command again to resume", file=sys.stderr)
        raise SystemExit(130) from None
    return metrics


if __name__ == "__main__":
    keep_freed_memory()  # the command-line job only: notebooks keep the default allocator
    main()
