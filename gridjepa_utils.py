"""GridJEPA: a JEPA world model that learns a small isometric grid world from pixels and actions.

One module shared by the five notebooks, in their order, a banner per part; no part refers to a later one:

    settings             (all five)     Config, its profiles (make_config) and its validation
    1. world & data      (notebook 01)  the sprite atlas and sheet, World, layouts (named, random, generated, held
                                        out), families of layouts, datasets
    2. model             (notebook 02)  distributed statistics, Encoder (ViT + BatchNorm projector, CLS or patch
                                        latents), AdaLN-zero predictors, SIGReg, JEPA
    3. training          (notebook 03)  the loss, encodings of every cell, checkpoints, output locks, train()
    4. analysis          (notebook 04)  linear probes scored honestly, PCA, latent vs grid distance
    5. planning          (notebook 05)  batched MPC: greedy probe planner, CEM, exhaustive search, imagination
                                        search from two images, graph search; make_policy (a planner by name);
                                        planning in layouts never seen
    plots & widgets      (notebooks)    training curves, LivePlot, grid maps, the explorer and the player
    the main job         (CLI)          evaluate, run records, main()

Shape vocabulary used in comments:  B batch, T frames per sequence, D latent dim, W width,
G grid side, N = G*G cells, A = 4 actions, P start->goal pairs, S sampled action sequences, H horizon.
Positions are (col, row) with (0, 0) at the top corner of the iso board; a cell index is row * G + col.

Command line (the main job):  python gridjepa_utils.py --profile cpu
Worlds never seen:             python gridjepa_utils.py --layouts procedural
Multi-GPU:                     torchrun --nproc_per_node=8 gridjepa_utils.py --profile full
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import math
import os
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

ACTIONS = ("up", "down", "left", "right")
ACTION_DELTAS = ((0, -1), (0, 1), (-1, 0), (1, 0))  # (dcol, drow) per action
OPPOSITE = torch.tensor([1, 0, 3, 2])  # the action that undoes each action (where no wall is in the way)
REPO_ROOT = Path(__file__).resolve().parent
ASSETS = REPO_ROOT / "assets"


LAYOUTS = {  # named 5x5 obstacle layouts, '#' = wall; rows top to bottom
    "open": [".....", ".....", ".....", ".....", "....."],
    # a wall down the middle with one door: greedy Manhattan planning walks into the wall
    "two_rooms": ["..#..", "..#..", ".....", "..#..", "..#.."],
    # a cup open to the bottom: from inside it, every move that shortens the distance to a goal above is blocked
    "u_trap": [".....", ".###.", ".#.#.", ".....", "....."],
    "maze": ["...#.", "##.#.", ".....", ".###.", "...#."],
}


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ════════════════════════════════════════════════════════════════════════════════════════
# Settings: one Config for a run, its profiles, and its validation (every notebook)
# ════════════════════════════════════════════════════════════════════════════════════════


@dataclass
class Config:
    """Everything that defines a run; saved with every checkpoint. Change it with dataclasses.replace."""

    # world & data
    grid_size: int = 5
    layout: str = "open"  # a name from LAYOUTS; random layouts are passed to train() as a World
    # 0: train in the one layout above. K > 0: train on K distinct procedurally generated layouts (a fresh one for
    # almost every trajectory when K ~ num_transitions), drawn with data_seed; never one of the held-out layouts
    num_layouts: int = 0
    show_target: bool = False  # the original write-up's lesson 01: draw a fixed target marker
    num_transitions: int = 50_000
    seq_len: int = 2  # T frames per training sequence; the original write-up's is 2 (one transition)
    data_seed: int = 0
    # encoder: a ViT over the (pooled) image, CLS token -> projector MLP -> latent
    input_size: int = 128  # the 128x128 observation is average-pooled to this before the ViT
    patch_size: int = 16
    # how pixels become patch tokens. "patch": one linear map per patch (a strided convolution), as ViT. "conv": early
    # convolutions (Xiao et al., 2021) - log2(patch_size) 3x3 stride-2 convolutions, so each token is built from
    # local edges and corners before attention mixes them. Tried for reading walls (bench/studies.py readers)
    stem: str = "patch"
    # True: the encoder sees only the middle half of the image's rows (32-95 of 128). The isometric board fills 43%
    # of the height (an 8x8 board with its walls and agent: rows 31-92), so half of a square image's patches hold
    # only the empty backdrop; cropped, every token covers the board. Tokens: (input/patch) x (input/patch / 2)
    crop: bool = False
    # how the tokens become one vector. "cls": the CLS token, as ViT. "flat": every patch token through a shared
    # Linear(width -> 4 * width / patches), concatenated in board order. Attention pools tokens by a weighted sum of
    # position-blind values, so from one block the CLS token hardly knows which patch a wall was in; flattening keeps
    # the place of every token. Tried for reading walls (bench/studies.py readers)
    pool: str = "cls"
    width: int = 192
    depth: int = 4
    heads: int = 3
    latent_dim: int = 192
    proj_hidden: int = 2048
    projector_norm: str = "batchnorm"  # LeWM: a BatchNorm projector; "layernorm" collapses here
    # False: the latent is the CLS token's projection (the original write-up's). True: patch latents, as PLDM - every
    # patch token is projected to latent_dim / (number of patches) channels and the latent is their concatenation;
    # the predictor then works on the grid of tokens. What reading walls in never-seen layouts needs (notebook 05)
    spatial: bool = False
    # predictor: a causal transformer over the latent history, action enters by AdaLN-zero
    pred_width: int = 192
    pred_depth: int = 1
    pred_heads: int = 4
    # loss: MSE(predicted, real next latent) + lam * SIGReg
    lam: float = 10.0  # the full profile's (the write-up's) lambda; every other profile sets its own: read cfg.lam
    sigreg_dirs: int = 256
    rollout_weight: float = 0.0  # > 0 adds an open-loop (self-fed) rollout loss over the T-1 steps
    # frames of history the predictor sees when fed its own predictions (that loss and rollout()): 0 = seq_len - 1,
    # as it was trained; 1 = only the latest, as the imagination search (imagine_map) uses it from its places
    rollout_frames: int = 0
    # temporal smoothness: smooth_weight * MSE(z_t, z_t+1). Under SIGReg's whitening its optimum is the spectral
    # (Laplacian) embedding of the world's transition graph: a map. 0 gives the original write-up's pure objective.
    smooth_weight: float = 0.0
    smooth_ramp: float = 0.5  # the weight rises linearly from 0 over this fraction of training (0: full from step 0)
    # inverse dynamics (PLDM has it): idm_weight * cross-entropy of the action read back from (z_t, z_t+1) by a small
    # head. Across many layouts the walls hold most of an image's information and the latent can all but drop the
    # agent; this term keeps the agent's move in it (notebook 05)
    idm_weight: float = 0.0
    # optimisation
    batch_size: int = 128
    num_steps: int = 78_125  # 200 epochs of 50k transitions at batch 128
    lr: float = 5e-4
    weight_decay: float = 1e-3
    warmup_steps: int = 1000
    grad_clip: float = 1.0
    seed: int = 0
    # bookkeeping
    log_every: int = 50
    eval_every: int = 1000
    ckpt_every: int = 5000
    profile: str = "full"

    def model_fields(self) -> dict:
        """The fields a checkpoint's weights depend on: they must match to load it."""
        names = (
            "grid_size",
            "input_size",
            "patch_size",
            "stem",
            "crop",
            "pool",
            "width",
            "depth",
            "heads",
            "latent_dim",
            "proj_hidden",
            "projector_norm",
            "spatial",
            "pred_width",
            "pred_depth",
            "pred_heads",
            "seq_len",
        )
        return {k: getattr(self, k) for k in names}


# the cpu profile's fields; the layouts profile starts from them
CPU_PROFILE = dict(
    smooth_weight=5.0,  # the latent map (notebook 04); 0 gives the original write-up's pure objective
    input_size=32,
    patch_size=8,
    width=128,
    depth=1,
    heads=4,
    pred_width=128,
    pred_depth=2,
    lam=0.1,
    batch_size=64,
    num_steps=450,  # 300 gives a wider map (PC1 + PC2 74% vs 71%) but gets obstacle layouts' walls wrong more often
    lr=1e-3,
    warmup_steps=50,
    log_every=10,
    eval_every=25,
    ckpt_every=100,
)

LAYOUTS_PROFILE = dict(
    CPU_PROFILE,
    num_layouts=50_000,
    smooth_weight=0.0,
    idm_weight=1.0,
    # ~1.7M examples: learning the rule takes many (13,000 steps of batch 64 reached 0.97 next-state accuracy, 3,800
    # of batch 256 0.99; batch 256 costs less per example on a CPU). Frames painted once, pooled to the encoder's
    # input, a last block run for the CLS token alone (cls_output), a fused AdamW, SIGReg's sums with their own
    # backward (characteristic_sums) and the SVD of eff_rank on logged steps only make room for 7,500 steps
    batch_size=256,
    num_steps=7500,
    warmup_steps=100,
    log_every=50,
    eval_every=500,
    ckpt_every=500,
)

PROFILES = {
    # the original write-up's encoder and schedule: 128x128 into a ViT-Tiny-style encoder, 200 epochs; ~3M
    # parameters; for a GPU. Its loss with the latent-map term; the write-up's own is lam=10, smooth_weight=0
    "full": dict(lam=0.1, smooth_weight=5.0),
    # reaches the write-up's headline results on a 2-core CPU in well under a minute (measured: see notebook 03)
    "cpu": CPU_PROFILE,
    # worlds never seen (notebook 05): the cpu model trained on 50,000 generated layouts with inverse dynamics and
    # without the smoothness term, at batch 256 for 7,500 steps: 11-12 min on 2 cores. See bench/studies.py layouts
    "layouts": LAYOUTS_PROFILE,
    # the same on a GPU (what --layouts procedural picks there), longer: 8,000 steps, 5 min on an H100
    "layouts_gpu": dict(LAYOUTS_PROFILE, num_steps=8000),
    # sized for a free Colab T4 (the default on a GPU): 64x64 input, 2 blocks, 3000 steps
    "gpu": dict(
        smooth_weight=5.0,
        input_size=64,
        patch_size=8,
        width=192,
        depth=2,
        heads=3,
        pred_width=192,
        pred_depth=2,
        lam=0.1,
        batch_size=128,
        num_steps=3000,
        lr=1e-3,
        warmup_steps=200,
        log_every=25,
        eval_every=250,
        ckpt_every=500,
    ),
    # seconds: CI re-executes the notebooks with it
    "smoke": dict(
        smooth_weight=5.0,
        num_transitions=4000,
        input_size=32,
        patch_size=8,
        width=64,
        depth=1,
        heads=2,
        pred_width=64,
        pred_depth=1,
        pred_heads=2,
        proj_hidden=256,
        lam=0.1,
        batch_size=32,
        num_steps=30,
        lr=1e-3,
        warmup_steps=5,
        log_every=5,
        eval_every=15,
        ckpt_every=15,
    ),
}


def active_profile() -> str:
    """The profile named by $GRIDJEPA_PROFILE, else 'gpu' on a GPU and 'cpu' without one.

    'full' (the write-up's 78,125 steps) is only ever chosen by name."""
    name = os.environ.get("GRIDJEPA_PROFILE") or ("gpu" if torch.cuda.is_available() else "cpu")
    if name not in PROFILES:
        raise ValueError(f"GRIDJEPA_PROFILE={name!r}; expected one of {sorted(PROFILES)}")
    return name


def study_profile() -> str:
    """The recipe for the notebooks' side studies (collapse study, lesson 01, held-out cells, layout family):
    'smoke' in CI, else 'cpu' - also on a GPU, where eight runs of the 'full' recipe would take hours."""
    return "smoke" if active_profile() == "smoke" else "cpu"


# ── validation at the boundary: every setting named, with its allowed range ──


# (low, high) inclusive bounds of the numeric Config fields; a field missing here only has to be finite.
CONFIG_RANGES = {
    "grid_size": (2, 16),
    "num_transitions": (1, 10_000_000),
    "num_layouts": (0, 1_000_000),
    "seq_len": (2, 17),  # the predictor sees at most 16 frames of history (T - 1 tokens)
    "data_seed": (0, 2**63 - 1),
    "input_size": (1, 128),
    "patch_size": (1, 128),
    "width": (1, 4096),
    "depth": (1, 64),
    "heads": (1, 256),
    "latent_dim": (1, 8192),
    "proj_hidden": (1, 65536),
    "pred_width": (1, 4096),
    "pred_depth": (1, 64),
    "pred_heads": (1, 256),
    "lam": (0.0, math.inf),
    "sigreg_dirs": (1, 65536),
    "rollout_weight": (0.0, math.inf),
    "rollout_frames": (0, 16),
    "idm_weight": (0.0, math.inf),
    "smooth_weight": (0.0, math.inf),
    "smooth_ramp": (0.0, 1.0),
    "batch_size": (1, 1_000_000),
    "num_steps": (1, 10**9),
    "lr": (0.0, 10.0),
    "weight_decay": (0.0, math.inf),
    "warmup_steps": (0, 10**9),
    "grad_clip": (0.0, math.inf),
    "seed": (0, 2**63 - 1),
    "log_every": (1, 10**9),
    "eval_every": (1, 10**9),
    "ckpt_every": (1, 10**9),
}
CONFIG_CHOICES = {
    "projector_norm": ("batchnorm", "layernorm"),
    "stem": ("patch", "conv"),
    "pool": ("cls", "flat"),
    "profile": tuple(PROFILES),
    "layout": tuple(LAYOUTS),
}
CONFIG_POSITIVE = ("lr", "grad_clip")  # must be > 0, not only >= 0
MAX_PARAMETERS = 200_000_000  # ~0.8 GB of float32 weights (the full profile has ~3.4M)


def memory_limit_bytes() -> int:
    """The largest allocation the memory checks allow: $GRIDJEPA_MEMORY_LIMIT_GB (default 4) GiB."""
    return int(float(os.environ.get("GRIDJEPA_MEMORY_LIMIT_GB", "4")) * 2**30)


def check_memory(estimate_bytes: float, what: str) -> None:
    """Refuse an allocation estimated above memory_limit_bytes(), naming what asked for it."""
    limit = memory_limit_bytes()
    if estimate_bytes > limit:
        raise ValueError(
            f"{what} would need about {estimate_bytes / 2**30:.1f} GiB of memory, above the limit of "
            f"{limit / 2**30:.1f} GiB; ask for less (or raise $GRIDJEPA_MEMORY_LIMIT_GB)"
        )


def num_patches(cfg: Config) -> int:
    """The encoder's patch tokens: (input/patch)^2, or half as many rows of them with cfg.crop."""
    side = cfg.input_size // max(1, cfg.patch_size)
    return side * (side // 2 if cfg.crop else side)


def conv_stem_channels(width: int, patch_size: int) -> list[int]:
    """The conv stem's channels, image first: one per stride-2 convolution, doubling up to ``width`` / 2 (at least
    8). Narrow on purpose: on a CPU a convolution costs far more time per FLOP than the transformer's matmuls."""
    n = patch_size.bit_length() - 1  # log2(patch_size) halvings
    return [1] + [max(8, width >> (n - i + 1)) for i in range(1, n + 1)]


def flat_channels(cfg: Config) -> int:
    """With pool="flat": each patch token's channels after its shared projection (4 x width in all, at least 1)."""
    return max(1, 4 * cfg.width // num_patches(cfg))


def estimate_parameters(cfg: Config) -> int:
    """The JEPA's parameter count from its config alone (without building it): what a model would allocate."""
    W, Wp, P = cfg.width, cfg.pred_width, num_patches(cfg)
    if cfg.stem == "conv":
        chans = conv_stem_channels(W, cfg.patch_size)
        stem = sum(9 * a * b + b for a, b in zip(chans, chans[1:])) + chans[-1] * W + W
    else:
        stem = W * cfg.patch_size**2 + W
    encoder = stem + (P + 2) * W + cfg.depth * (12 * W * W + 13 * W) + 2 * W
    features = W
    if cfg.pool == "flat":
        features = P * flat_channels(cfg)
        encoder += (W + 1) * flat_channels(cfg)
    projector = features * cfg.proj_hidden + 3 * cfg.proj_hidden + cfg.proj_hidden * cfg.latent_dim + cfg.latent_dim
    predictor = (cfg.latent_dim + 1) * Wp + 16 * Wp + 4 * Wp + cfg.pred_depth * (18 * Wp * Wp + 15 * Wp)
    return int(encoder + projector + predictor + 2 * Wp + (Wp + 1) * cfg.latent_dim)


def validate_config(cfg: Config) -> Config:
    """Check every field of ``cfg``: type, finiteness, range, choices, consistency and model size.

    Raises a ValueError (TypeError for a wrong type) naming the field and its allowed range. Generic over the
    fields: a new float field only has to be finite unless CONFIG_RANGES says more. Returns ``cfg``.
    """
    if not isinstance(cfg, Config):
        raise TypeError(f"expected a Config, got {type(cfg).__name__}")
    for f in dataclasses.fields(cfg):
        value, default = getattr(cfg, f.name), f.default
        if isinstance(default, bool):
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"Config.{f.name} must be True or False, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"Config.{f.name} must be an integer, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"Config.{f.name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"Config.{f.name} must be a finite number, got {value!r}")
        elif isinstance(default, str) and not isinstance(value, str):
            raise TypeError(f"Config.{f.name} must be a string, got {value!r}")
        if f.name in CONFIG_RANGES:
            lo, hi = CONFIG_RANGES[f.name]
            if not lo <= value <= hi or (f.name in CONFIG_POSITIVE and value <= 0):
                low = f"> {lo}" if f.name in CONFIG_POSITIVE else f">= {lo}"
                span = f"{low}" if hi == math.inf else f"{low} and <= {hi}"
                raise ValueError(f"Config.{f.name} must be {span}, got {value!r}")
        if f.name in CONFIG_CHOICES and value not in CONFIG_CHOICES[f.name]:
            raise ValueError(f"Config.{f.name} must be one of {list(CONFIG_CHOICES[f.name])}, got {value!r}")
    if cfg.layout != "open" and cfg.grid_size != len(LAYOUTS[cfg.layout]):
        n = len(LAYOUTS[cfg.layout])
        raise ValueError(f"Config.layout {cfg.layout!r} is {n}x{n}, but Config.grid_size={cfg.grid_size}")
    if 128 % cfg.input_size or cfg.input_size % cfg.patch_size:
        raise ValueError(
            f"Config.input_size must divide the 128-pixel image and Config.patch_size must divide input_size, "
            f"got input_size={cfg.input_size}, patch_size={cfg.patch_size}"
        )
    if cfg.stem == "conv" and cfg.patch_size < 2:  # a divisor of 128 is a power of 2: log2(patch_size) halvings
        raise ValueError(f"Config.stem='conv' needs Config.patch_size >= 2 (one halving each), got {cfg.patch_size}")
    for width, heads in (("width", "heads"), ("pred_width", "pred_heads")):
        if getattr(cfg, width) % getattr(cfg, heads):
            raise ValueError(
                f"Config.{width} ({getattr(cfg, width)}) must be divisible by Config.{heads} ({getattr(cfg, heads)})"
            )
    params = estimate_parameters(cfg)
    if params > MAX_PARAMETERS:
        raise ValueError(f"this Config describes a model of ~{params:,} parameters, above the limit {MAX_PARAMETERS:,}")
    if cfg.crop and cfg.input_size % (2 * cfg.patch_size):
        raise ValueError(
            f"Config.crop keeps half of the input's rows, so 2 x Config.patch_size must divide Config.input_size, got "
            f"input_size={cfg.input_size}, patch_size={cfg.patch_size}"
        )
    if cfg.pool == "flat" and cfg.spatial:
        raise ValueError("Config.pool='flat' makes one latent of every token; Config.spatial keeps a latent per token")
    tokens = num_patches(cfg) + 1
    if cfg.spatial and cfg.latent_dim % (tokens - 1):
        raise ValueError(
            f"with Config.spatial, latent_dim must be a multiple of the number of patches "
            f"({tokens - 1} = (input_size / patch_size)^2), got latent_dim={cfg.latent_dim}"
        )
    flat = (tokens - 1) * flat_channels(cfg) if cfg.pool == "flat" else 0  # the flattened tokens, into the projector
    per_image = 128 * 128 + 16 * tokens * cfg.width * cfg.depth + 4 * cfg.proj_hidden + flat  # floats, roughly
    batch_bytes = 4 * cfg.batch_size * cfg.seq_len * per_image
    check_memory(batch_bytes, f"a training batch of Config.batch_size={cfg.batch_size} x seq_len={cfg.seq_len}")
    return cfg


# ── a run's Config: a profile with overrides, validated ──


def make_config(profile: str | None = None, **overrides) -> Config:
    """The Config of a profile ('full', 'cpu', 'smoke'; default from the environment) with overrides."""
    profile = profile or active_profile()
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise TypeError(f"unknown Config fields: {sorted(unknown)}")
    return validate_config(Config(**{**PROFILES[profile], "profile": profile, **overrides}))


# ════════════════════════════════════════════════════════════════════════════════════════
# 1. World & data (notebook 01)
# ════════════════════════════════════════════════════════════════════════════════════════


# ── layouts, and the checks of states and actions ──


def layout_walls(layout: str | np.ndarray | None, grid_size: int = 5) -> np.ndarray:
    """A (G, G) boolean array of blocked cells, indexed [row, col], from a name or an array."""
    if layout is None:
        layout = "open"
    if isinstance(layout, str):
        if layout == "open":
            return np.zeros((grid_size, grid_size), dtype=bool)
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUTS)} or a (G, G) bool array")
        walls = np.array([[ch == "#" for ch in row] for row in LAYOUTS[layout]], dtype=bool)
        if walls.shape != (grid_size, grid_size):
            raise ValueError(f"layout {layout!r} is {walls.shape[0]}x{walls.shape[1]}, but grid_size={grid_size}")
        return walls
    walls = np.asarray(layout)
    if walls.shape != (grid_size, grid_size):
        raise ValueError(
            f"a layout must have shape (grid_size, grid_size) = ({grid_size}, {grid_size}), got {walls.shape}"
        )
    if walls.dtype != bool:
        raise TypeError(f"a layout must be a boolean array (True = wall), got dtype {walls.dtype}")
    return walls.copy()


def check_int_tensor(x, name: str) -> torch.Tensor:
    """Raise a clear TypeError unless ``x`` is an integer tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers (torch.long), got dtype {x.dtype}")
    return x.long()


def check_flags(**flags) -> None:
    """Raise a clear TypeError naming the first of ``flags`` (name=value) that is not True or False."""
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")


def check_actions(action) -> torch.Tensor:
    """Actions as a long tensor, each in 0..3 (up, down, left, right); clear errors otherwise."""
    action = check_int_tensor(action, "action")
    if action.numel() and (action.min() < 0 or action.max() >= len(ACTIONS)):
        bad = action[(action < 0) | (action >= len(ACTIONS))][0].item()
        raise ValueError(f"action {bad} is not valid; expected 0..3 = {dict(enumerate(ACTIONS))}")
    return action


# ── the sprite atlas: every state drawn once with numpy, 2x supersampled for smooth edges ──


def _iso_geometry(G: int, size: int) -> tuple[float, float, float, float]:
    """Tile width, tile height, board origin x, board top y for a G x G board in a size x size image."""
    tw = 0.86 * size / G
    th = tw / 2
    x0 = size / 2
    y0 = (size - G * th) / 2 + 0.35 * th
    return tw, th, x0, y0


def _cell_center(col: float, row: float, G: int, size: int) -> tuple[float, float]:
    tw, th, x0, y0 = _iso_geometry(G, size)
    return x0 + (col - row) * tw / 2, y0 + (col + row + 1) * th / 2


class _Canvas:
    """A float image with a few vectorised fill operations restricted to bounding boxes."""

    def __init__(self, img: np.ndarray):
        self.img = img
        self.yy, self.xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]].astype(np.float32) + 0.5

    def _box(self, x0, x1, y0, y1):
        h, w = self.img.shape
        sl = (slice(max(int(y0) - 1, 0), min(int(y1) + 2, h)), slice(max(int(x0) - 1, 0), min(int(x1) + 2, w)))
        return sl, self.xx[sl], self.yy[sl]

    def diamond(self, cx, cy, hw, hh, value):
        sl, x, y = self._box(cx - hw, cx + hw, cy - hh, cy + hh)
        mask = np.abs(x - cx) / hw + np.abs(y - cy) / hh <= 1
        self.img[sl][mask] = value if np.isscalar(value) else value(x, y)[mask]

    def ellipse(self, cx, cy, rx, ry, value):
        sl, x, y = self._box(cx - rx, cx + rx, cy - ry, cy + ry)
        mask = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
        self.img[sl][mask] = value if np.isscalar(value) else value(x, y)[mask]

    def side_face(self, x_from, x_to, y_from, y_to, height, value):
        """The vertical face under the edge (x_from, y_from)-(x_to, y_to), extruded ``height`` upwards."""
        lo, hi = min(x_from, x_to), max(x_from, x_to)
        sl, x, y = self._box(lo, hi, min(y_from, y_to) - height, max(y_from, y_to))
        y_edge = y_from + (x - x_from) * (y_to - y_from) / (x_to - x_from)
        mask = (x >= lo) & (x <= hi) & (y <= y_edge) & (y >= y_edge - height)
        self.img[sl][mask] = value


def _draw_board(canvas: _Canvas, G: int, size: int) -> None:
    tw, th, x0, y0 = _iso_geometry(G, size)
    slab = th * 0.45
    left, bottom, right = (
        _cell_center(0, G - 1, G, size),
        _cell_center(G - 1, G - 1, G, size),
        _cell_center(G - 1, 0, G, size),
    )
    # the board is a slab: its two front faces give it depth
    canvas.side_face(left[0] - tw / 2, bottom[0], left[1] + slab, bottom[1] + th / 2 + slab, slab, 0.30)
    canvas.side_face(bottom[0], right[0] + tw / 2, bottom[1] + th / 2 + slab, right[1] + slab, slab, 0.20)
    for row in range(G):
        for col in range(G):
            cx, cy = _cell_center(col, row, G, size)
            canvas.diamond(cx, cy, tw / 2, th / 2, 0.36)  # grout line
            canvas.diamond(cx, cy, tw / 2 * 0.9, th / 2 * 0.9, 0.56 if (col + row) % 2 == 0 else 0.64)


def _draw_wall(canvas: _Canvas, col: int, row: int, G: int, size: int) -> None:
    tw, th, _, _ = _iso_geometry(G, size)
    cx, cy = _cell_center(col, row, G, size)
    height = th * 1.1
    canvas.side_face(cx - tw / 2, cx, cy, cy + th / 2, height, 0.34)  # left face
    canvas.side_face(cx, cx + tw / 2, cy + th / 2, cy, height, 0.22)  # right face, in shadow
    canvas.diamond(cx, cy - height, tw / 2, th / 2, 0.86)  # lit top
    canvas.diamond(cx, cy - height, tw / 2 * 0.7, th / 2 * 0.7, 0.80)


def _draw_target(canvas: _Canvas, col: int, row: int, G: int, size: int) -> None:
    tw, th, _, _ = _iso_geometry(G, size)
    cx, cy = _cell_center(col, row, G, size)
    canvas.diamond(cx, cy, tw * 0.32, th * 0.32, 0.08)
    canvas.diamond(cx, cy, tw * 0.22, th * 0.22, 0.95)
    canvas.diamond(cx, cy, tw * 0.11, th * 0.11, 0.08)


def _draw_agent(canvas: _Canvas, col: int, row: int, G: int, size: int) -> None:
    tw, th, _, _ = _iso_geometry(G, size)
    cx, cy = _cell_center(col, row, G, size)
    r = tw * 0.16
    body_bottom, body_top = cy, cy - th * 1.05
    canvas.ellipse(cx, cy + th * 0.05, tw * 0.27, th * 0.27, 0.18)  # shadow on the tile

    def shaded(bright):  # light from the upper left gives the sprite roundness
        return lambda x, y: np.clip(bright - 0.30 * (x - cx + 0.5 * r) / (2 * r), 0, 1)

    outline = r * 0.35
    canvas.ellipse(cx, body_bottom, r + outline, (r + outline) * 0.5, 0.04)
    sl, x, y = canvas._box(cx - r - outline, cx + r + outline, body_top, body_bottom)
    canvas.img[sl][(np.abs(x - cx) <= r + outline) & (y >= body_top) & (y <= body_bottom)] = 0.04
    canvas.ellipse(cx, body_top - r * 0.9, r * 1.05 + outline, r * 1.05 + outline, 0.04)
    canvas.ellipse(cx, body_bottom, r, r * 0.5, shaded(0.90))
    sl, x, y = canvas._box(cx - r, cx + r, body_top, body_bottom)
    mask = (np.abs(x - cx) <= r) & (y >= body_top) & (y <= body_bottom)
    canvas.img[sl][mask] = shaded(0.90)(x, y)[mask]
    canvas.ellipse(cx, body_top - r * 0.9, r * 1.05, r * 1.05, shaded(1.0))  # head
    canvas.ellipse(cx - r * 0.35, body_top - r * 1.2, r * 0.3, r * 0.3, 1.0)  # highlight


def _downsample(img: torch.Tensor, s: int) -> torch.Tensor:
    """Average s x s blocks of a supersampled image (..., s*H, s*W) -> (..., H, W) uint8. The sum runs in one fixed
    order, so the atlas and the on-demand renderer give bit-identical pixels."""
    blocks = img.unflatten(-1, (img.shape[-1] // s, s)).unflatten(-3, (img.shape[-2] // s, s))  # (..., H, s, W, s)
    acc = sum(blocks[..., i, :, j] for i in range(s) for j in range(s)) / (s * s)
    return torch.round(acc.clamp(0, 1) * 255).to(torch.uint8)


def render_atlas(world: World, supersample: int = 2) -> np.ndarray:
    """Draw every state of ``world`` once: (num_states, H, W) uint8. Objects are painted back to front."""
    G, size = world.grid_size, world.image_size * supersample
    background = np.zeros((size, size), dtype=np.float32)
    background += np.linspace(0.02, 0.12, size, dtype=np.float32)[:, None]  # a soft vertical gradient
    base = _Canvas(background)
    _draw_board(base, G, size)
    walls = [(c, r) for r in range(G) for c in range(G) if world.walls[r, c]]
    targets = range(world.num_cells) if world.show_target else [None]
    images = np.zeros((world.num_states, world.image_size, world.image_size), dtype=np.uint8)
    for target in targets:
        board = _Canvas(base.img.copy())
        if target is not None:
            _draw_target(board, target % G, target // G, G, size)
        for cell in range(world.num_cells):
            col, row = cell % G, cell // G
            canvas = _Canvas(board.img.copy())
            canvas.yy, canvas.xx = base.yy, base.xx
            sprites = [(c + r, 0, c, r) for c, r in walls]
            if not world.walls[row, col]:
                sprites.append((col + row, 1, col, row))
            for _, is_agent, c, r in sorted(sprites):  # painter's order: far (small col+row) first
                (_draw_agent if is_agent else _draw_wall)(canvas, c, r, G, size)
            state = cell + (world.num_cells * target if target is not None else 0)
            images[state] = _downsample(torch.from_numpy(canvas.img), supersample).numpy()
    return images


class SpriteSheet:
    """The board and every cell's wall and agent sprites, cut once from the atlas painter, for drawing any layout on
    demand: a batch of (wall mask, agent cell) pairs is painted back to front with tensor ops, on any device.

    Bit-identical to the atlas (the same sprites, the same order, the same downsampling) and needs no image per
    state - what a fresh layout per trajectory needs."""

    def __init__(self, grid_size: int, image_size: int = 128, supersample: int = 2):
        G, size = grid_size, image_size * supersample
        self.grid_size, self.image_size, self.supersample = G, image_size, supersample
        background = np.zeros((size, size), dtype=np.float32)
        background += np.linspace(0.02, 0.12, size, dtype=np.float32)[:, None]
        base = _Canvas(background)
        _draw_board(base, G, size)
        self.board = torch.from_numpy(base.img.copy())
        self.sprites: list[tuple[int, int, tuple[slice, slice], torch.Tensor, torch.Tensor]] = []
        for key in sorted((c + r, is_agent, c, r) for r in range(G) for c in range(G) for is_agent in (0, 1)):
            _, is_agent, c, r = key
            canvas = _Canvas(np.full((size, size), np.nan, dtype=np.float32))
            canvas.yy, canvas.xx = base.yy, base.xx
            (_draw_agent if is_agent else _draw_wall)(canvas, c, r, G, size)
            drawn = ~np.isnan(canvas.img)
            rows, cols = np.flatnonzero(drawn.any(1)), np.flatnonzero(drawn.any(0))
            box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            value = torch.from_numpy(np.nan_to_num(canvas.img[box]))
            self.sprites.append((is_agent, r * G + c, box, value, torch.from_numpy(drawn[box])))
        self._on: dict[str, tuple] = {}

    def _tensors(self, device) -> tuple:
        key = str(device)
        if key not in self._on:
            self._on[key] = (
                self.board.to(device),
                [(a, cell, box, v.to(device), m.to(device)) for a, cell, box, v, m in self.sprites],
            )
        return self._on[key]

    @torch.no_grad()
    def paint(self, walls: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """walls (B, N) bool, agent cells (B,) -> images (B, H, W) uint8, on walls' device."""
        board, sprites = self._tensors(walls.device)
        img = board.expand(len(cells), *board.shape).clone()
        cells = cells.to(walls.device)
        for is_agent, cell, (ys, xs), value, mask in sprites:  # painter's order: far (small col+row) first
            idx = (cells == cell if is_agent else walls[:, cell]).nonzero()[:, 0]
            if len(idx):
                img[idx, ys, xs] = torch.where(mask, value, img[idx, ys, xs])
        return _downsample(img, self.supersample)


_SHEETS: dict[tuple[int, int], SpriteSheet] = {}


def sprite_sheet(grid_size: int, image_size: int = 128) -> SpriteSheet:
    """The SpriteSheet of a grid size, cut once per process."""
    key = (int(grid_size), int(image_size))
    if key not in _SHEETS:
        _SHEETS[key] = SpriteSheet(*key)
    return _SHEETS[key]


# ── the world: rules, walls, BFS, rendering by one gather from the atlas ──


def transition_tables(walls: np.ndarray) -> np.ndarray:
    """The rules, for K layouts at once: walls (K, G, G) bool -> (K, N, A) the cell after each action. A move off
    the board or into a wall leaves the agent where it is."""
    K, G = walls.shape[0], walls.shape[1]
    row, col = np.divmod(np.arange(G * G), G)
    table = np.empty((K, G * G, len(ACTIONS)), dtype=np.int64)
    for a, (dc, dr) in enumerate(ACTION_DELTAS):
        c, r = col + dc, row + dr
        inside = (c >= 0) & (c < G) & (r >= 0) & (r < G)
        target = np.clip(r, 0, G - 1) * G + np.clip(c, 0, G - 1)
        blocked = ~inside[None] | walls.reshape(K, G * G)[:, target]
        table[:, :, a] = np.where(blocked, np.arange(G * G)[None], target[None])
    return table


def layouts_connected(walls: np.ndarray) -> np.ndarray:
    """(K, G, G) bool -> (K,) bool: whether every free cell of each layout is reachable from every other
    (a flood fill of all K layouts at once)."""
    K, G = walls.shape[0], walls.shape[1]
    free = ~walls.reshape(K, G * G)
    table = transition_tables(walls)
    reach = np.zeros_like(free)
    first = free.argmax(1)
    reach[np.arange(K), first] = free[np.arange(K), first]
    while True:  # moves are symmetric: a free cell is reached when one of its 4 neighbours is
        near = np.take_along_axis(reach, table.reshape(K, -1), 1).reshape(K, G * G, len(ACTIONS)).any(2)
        grown = reach | (near & free)
        if (grown == reach).all():
            return (reach == free).all(1) & free.any(1)
        reach = grown


class World:
    """The grid world: G x G cells, one agent, 4 actions, walls at the border and on blocked cells.

    Deterministic: a move into a wall or off the board leaves the agent where it is. No target, no reward.
    States are cell indices (row * G + col); with ``show_target`` a state also carries a target cell
    (state = agent + N * target) that is drawn but never moves - the original write-up's lesson 01.
    """

    def __init__(
        self,
        grid_size: int = 5,
        walls: str | np.ndarray | None = None,
        show_target: bool = False,
        image_size: int = 128,
        check_connected: bool = True,
    ):
        if not isinstance(grid_size, (int, np.integer)) or grid_size < 2:
            raise ValueError(f"grid_size must be an integer >= 2, got {grid_size!r}")
        if grid_size > 16:
            raise ValueError(f"grid_size must be <= 16 to fit a readable 128x128 image, got {grid_size}")
        self.grid_size = G = int(grid_size)
        self.num_cells = G * G
        self.image_size = image_size
        self.show_target = show_target
        self.walls = layout_walls(walls, G)
        self.free_cells = np.flatnonzero(~self.walls.reshape(-1))
        if len(self.free_cells) < 2:
            raise ValueError("a layout needs at least two free cells")
        self.next_cell = torch.from_numpy(self._transition_table())  # (N, A) cell after each action
        if check_connected:
            d = self.bfs_from(self.free_cells[0])
            if (d[self.free_cells] < 0).any():
                raise ValueError("some free cells of this layout cannot be reached from the others")
        self._atlas: dict[str, torch.Tensor] = {}

    # ── positions and validation ──
    def cell_index(self, col: int, row: int) -> int:
        """Index of cell (col, row); raises ValueError off the grid."""
        self.check_pos((col, row))
        return row * self.grid_size + col

    def cell_pos(self, cell: int | np.ndarray | torch.Tensor) -> np.ndarray:
        """(col, row) of cell indices: (..., 2) int array."""
        cell = np.asarray(cell)
        return np.stack([cell % self.grid_size, cell // self.grid_size], axis=-1)

    def check_pos(self, pos) -> None:
        col, row = pos
        G = self.grid_size
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (col, row)):
            raise TypeError(f"a position is two integers (col, row), got ({col!r}, {row!r})")
        if not (0 <= col < G and 0 <= row < G):
            raise ValueError(f"position (col={col}, row={row}) is off the {G}x{G} grid; expected 0 <= col, row < {G}")

    def check_states(self, state) -> torch.Tensor:
        """State indices as a long tensor; a clear error unless they are integers in [0, num_states)."""
        state = check_int_tensor(state, "state")
        if state.numel() and (state.min() < 0 or state.max() >= self.num_states):
            raise ValueError(
                f"states must lie in [0, {self.num_states}), got values in [{int(state.min())}, {int(state.max())}]"
            )
        return state

    def is_wall(self, cell: int) -> bool:
        return bool(self.walls.reshape(-1)[cell])

    @property
    def num_states(self) -> int:
        return self.num_cells * (self.num_cells if self.show_target else 1)

    def agent_cell(self, state: torch.Tensor) -> torch.Tensor:
        return state % self.num_cells

    # ── dynamics ──
    def _transition_table(self) -> np.ndarray:
        return transition_tables(self.walls[None])[0]

    def step(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Next states after one action each: (B,), (B,) -> (B,). Validates its inputs."""
        state, action = self.check_states(state), check_actions(action)
        if state.shape != action.shape:
            raise ValueError(
                f"state and action must have the same shape, got {tuple(state.shape)} and {tuple(action.shape)}"
            )
        cell = state % self.num_cells
        if self.walls.reshape(-1)[cell.cpu().numpy()].any():
            raise ValueError("the agent cannot stand on a wall cell")
        table = self.next_cell.to(state.device)
        return state - cell + table[cell, action]

    def bfs_from(self, cell: int) -> np.ndarray:
        """Shortest number of moves from ``cell`` to every cell: (N,), -1 where unreachable (walls included,
        when ``cell`` is free)."""
        dist_to = np.full(self.num_cells, -1, dtype=np.int64)
        table = self.next_cell.numpy()
        dist_to[cell] = 0
        queue = deque([cell])
        while queue:
            c = queue.popleft()
            for n in table[c]:
                if dist_to[n] < 0:
                    dist_to[n] = dist_to[c] + 1
                    queue.append(n)
        return dist_to

    def shortest_paths(self) -> np.ndarray:
        """(N, N) BFS distances between all cells (-1 where unreachable). For evaluation only."""
        return np.stack([self.bfs_from(c) for c in range(self.num_cells)])

    def all_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every ordered (start, goal) pair of distinct free cells: two (P,) tensors; 600 on the open 5x5."""
        free = torch.from_numpy(self.free_cells)
        starts, goals = torch.meshgrid(free, free, indexing="ij")
        keep = starts != goals
        return starts[keep], goals[keep]

    # ── rendering ──
    def atlas(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Every state's image, rendered once: (num_states, H, W) uint8 on ``device``."""
        key = str(device)
        if key not in self._atlas:
            cpu = self._atlas.get("cpu")
            if cpu is None:
                cpu = torch.from_numpy(render_atlas(self))
                self._atlas["cpu"] = cpu
            self._atlas[key] = cpu.to(device)
        return self._atlas[key]

    def render(self, state: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """Observations of states by one gather from the atlas: (...,) -> (..., 1, H, W) float in [0, 1]."""
        state = self.check_states(torch.as_tensor(state))
        atlas = self.atlas(device if device is not None else state.device)
        images = atlas.index_select(0, state.reshape(-1).to(atlas.device))  # (B, H, W) uint8: one gather
        return images.view(*state.shape, 1, *atlas.shape[1:]).float().div_(255.0)  # (..., 1, H, W)

    def render_pos(self, col: int, row: int, target: tuple[int, int] | None = None) -> torch.Tensor:
        """The observation of the agent at (col, row): (1, 1, H, W). The public way to get one image."""
        cell = self.cell_index(col, row)
        if self.is_wall(cell):
            raise ValueError(f"(col={col}, row={row}) is a wall cell; the agent cannot stand there")
        state = cell
        if self.show_target:
            if target is None:
                raise ValueError("this world draws a target: pass target=(col, row)")
            state += self.num_cells * self.cell_index(*target)
        return self.render(torch.tensor([state]))

    def __repr__(self) -> str:
        return f"World(grid_size={self.grid_size}, walls={int(self.walls.sum())}, show_target={self.show_target})"


class WorldFamily(World):
    """Several layouts of one grid size seen as one world whose states are (layout k, cell) pairs: k * N + cell.

    Training on a family of layouts and planning in a layout outside it asks whether the model learned the
    rules (walls block, the agent moves one cell) rather than one map. Everything that takes a World - datasets,
    training, calibration, next-state accuracy - takes a family. Its images are painted on demand from the sprite
    sheet (no atlas), so a family can hold tens of thousands of layouts: K * N * 4 integers of rules, K masks.
    """

    def __init__(self, layouts, image_size: int = 128):
        if isinstance(layouts, np.ndarray) and layouts.ndim == 3:
            layouts = list(layouts)
        if not isinstance(layouts, (list, tuple)) or not layouts:
            raise ValueError("a WorldFamily needs a non-empty list of (G, G) bool layouts (or a (K, G, G) array)")
        G = len(layouts[0])
        if any(np.shape(w) != (G, G) for w in layouts):
            raise ValueError("all layouts of a family must have the same grid size")
        walls = np.stack([layout_walls(w, G) for w in layouts])  # (K, G, G), validated
        if not 2 <= G <= 16:
            raise ValueError(f"grid_size must be in [2, 16], got {G}")
        connected = layouts_connected(walls) & ((~walls).reshape(len(walls), -1).sum(1) >= 2)
        if not connected.all():
            raise ValueError(f"layout {int(np.flatnonzero(~connected)[0])} has unreachable free cells (or < 2 free)")
        K, N = len(walls), G * G
        self.layouts = walls
        self.grid_size, self.image_size, self.show_target = G, image_size, False
        self.num_cells = N * K
        self.walls = walls.reshape(K * G, G)  # flat index = k * N + cell
        self.free_cells = np.flatnonzero(~walls.reshape(-1))
        self.next_cell = torch.from_numpy(
            (transition_tables(walls) + N * np.arange(K)[:, None, None]).reshape(K * N, -1)
        )
        self._atlas = {}
        self._masks: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.layouts)

    def member(self, k: int) -> World:
        """Layout k as a World of its own (its states are cells 0..N-1)."""
        return World(self.grid_size, walls=self.layouts[k], image_size=self.image_size)

    @property
    def members(self) -> list[World]:
        return [self.member(k) for k in range(len(self))]

    def render(self, state: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """Observations of states k * N + cell, painted on demand: (...,) -> (..., 1, H, W) float in [0, 1]."""
        state = self.check_states(torch.as_tensor(state))
        images = self._paint(state.reshape(-1), torch.device(device) if device is not None else state.device)
        return images.view(*state.shape, 1, *images.shape[1:]).float().div_(255.0)

    def _paint(self, states: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(B,) states -> (B, H, W) uint8 on ``device``, 512 at a time (bounded memory)."""
        key, N = str(device), self.grid_size**2
        if key not in self._masks:
            self._masks[key] = torch.from_numpy(self.layouts.reshape(len(self), N)).to(device)
        sheet = sprite_sheet(self.grid_size, self.image_size)
        return torch.cat([sheet.paint(self._masks[key][s // N], s % N) for s in states.to(device).split(512)])

    def atlas(self, device: torch.device | str = "cpu") -> torch.Tensor:
        if self.num_cells > 100_000:
            raise ValueError(f"an atlas of {self.num_cells:,} images is too large; use render(states)")
        key = str(device)
        if key not in self._atlas:
            self._atlas[key] = self._paint(torch.arange(self.num_cells), torch.device(device))
        return self._atlas[key]

    def cell_pos(self, cell) -> np.ndarray:
        N = self.grid_size**2
        cell = np.asarray(cell) % N
        return np.stack([cell % self.grid_size, cell // self.grid_size], axis=-1)

    def __repr__(self) -> str:
        return f"WorldFamily({len(self)} layouts of {self.grid_size}x{self.grid_size})"


def random_layout(grid_size: int, wall_fraction: float = 0.2, seed: int = 0, max_tries: int = 1000) -> np.ndarray:
    """A seeded random layout whose free cells are all reachable from each other (checked by BFS)."""
    if not 0 <= wall_fraction < 1:
        raise ValueError(f"wall_fraction must be in [0, 1), got {wall_fraction}")
    rng = np.random.default_rng(seed)
    num_walls = int(round(wall_fraction * grid_size**2))
    for _ in range(max_tries):
        walls = np.zeros(grid_size * grid_size, dtype=bool)
        walls[rng.choice(grid_size**2, size=num_walls, replace=False)] = True
        walls = walls.reshape(grid_size, grid_size)
        world = World(grid_size, walls=walls, check_connected=False)
        dist_from_first = world.bfs_from(world.free_cells[0])
        if (dist_from_first[world.free_cells] >= 0).all():
            return walls
    raise RuntimeError(f"no connected layout with {num_walls} walls found in {max_tries} tries; lower wall_fraction")


# ── procedurally generated layouts: thousands of worlds to learn the rules from, and a held-out set ──

LAYOUT_SPLITS = {"train": 0, "test": 1}  # two random streams; training also drops every reserved test layout
HELDOUT_RESERVED = 1000  # the first 1,000 test layouts of each grid size are never trained on


def generate_layout(grid_size: int, rng: np.random.Generator) -> np.ndarray:
    """One layout from the generator's mix: scattered blocks, a wall with doors (rooms), a U-shaped cup, or two
    parallel walls with doors (corridors), each with some scattered blocks on top. (G, G) bool; may be disconnected
    (procedural_layouts filters)."""
    G = grid_size
    walls = np.zeros((G, G), dtype=bool)
    kind = rng.choice(4, p=(0.4, 0.2, 0.2, 0.2))
    if kind in (1, 3):  # one or two full walls across the board, each with one or two doors
        lines = rng.choice(np.arange(1, G - 1), size=min(1 if kind == 1 else 2, G - 2), replace=False)
        for line in lines:
            cut = np.ones(G, dtype=bool)
            cut[rng.choice(G, size=rng.integers(1, 3), replace=False)] = False
            walls[line] |= cut
        if rng.random() < 0.5:
            walls = walls.T.copy()
    elif kind == 2:  # a cup: three sides of a box, open on a random side
        h, w = rng.integers(3, G + 1), rng.integers(3, G + 1)
        r0, c0 = rng.integers(0, G - h + 1), rng.integers(0, G - w + 1)
        cup = np.zeros((h, w), dtype=bool)
        cup[0], cup[:, 0], cup[:, -1] = True, True, True
        walls[r0 : r0 + h, c0 : c0 + w] = (
            np.rot90(cup, rng.integers(4))[:h, :w] if h == w else cup[:: rng.choice([1, -1])]
        )
    density = rng.uniform(0.0, 0.3 if kind == 0 else 0.12)
    walls |= rng.random((G, G)) < density
    return walls


def _layout_keys(walls: np.ndarray) -> list[bytes]:
    return [np.packbits(w.reshape(-1)).tobytes() + bytes([len(w)]) for w in walls]


def _draw_layouts(grid_size: int, num: int, split: str, seed: int, skip: set[bytes]) -> np.ndarray:
    """``num`` distinct valid layouts from one random stream, none of whose keys is in ``skip``."""
    N = grid_size * grid_size
    seen = set(skip)
    rng = np.random.default_rng([grid_size, LAYOUT_SPLITS[split], seed])
    kept: list[np.ndarray] = []
    while len(kept) < num:
        batch = np.stack([generate_layout(grid_size, rng) for _ in range(2 * (num - len(kept)) + 16)])
        count = batch.reshape(len(batch), N).sum(1)
        ok = layouts_connected(batch) & (count >= 1) & (count <= N // 2)
        for walls, key in zip(batch[ok], _layout_keys(batch[ok])):
            if key not in seen and len(kept) < num:
                seen.add(key)
                kept.append(walls)
    return np.stack(kept)


def _named_keys(grid_size: int) -> set[bytes]:
    return set(_layout_keys(np.stack([layout_walls(n) for n in LAYOUTS]))) if grid_size == 5 else set()


_HELDOUT: dict[int, np.ndarray] = {}


def heldout_layouts(grid_size: int, num: int = 200) -> np.ndarray:
    """The first ``num`` layouts of the held-out stream (num <= HELDOUT_RESERVED): (num, G, G) bool, never a named
    layout. Training layouts (procedural_layouts) never include one of the first HELDOUT_RESERVED."""
    if isinstance(grid_size, bool) or not isinstance(grid_size, (int, np.integer)) or not 3 <= grid_size <= 16:
        raise ValueError(f"grid_size must be an integer in [3, 16] for generated layouts, got {grid_size!r}")
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or not 1 <= num <= HELDOUT_RESERVED:
        raise ValueError(f"num must be an integer in [1, {HELDOUT_RESERVED}], got {num!r}")
    if grid_size not in _HELDOUT:
        _HELDOUT[grid_size] = _draw_layouts(grid_size, HELDOUT_RESERVED, "test", 0, _named_keys(grid_size))
    return _HELDOUT[grid_size][:num].copy()


VALIDATION_START = 500  # held-out layouts 500 on: for choosing a planner's settings, never for reporting


def validation_layouts(grid_size: int, num: int = 200) -> np.ndarray:
    """Layouts to choose settings on: the held-out stream's layouts VALIDATION_START ... + num - 1 (num <= 500).
    Like the test layouts they are never trained on; unlike them (the first 200) they are never reported."""
    most = HELDOUT_RESERVED - VALIDATION_START
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or not 1 <= num <= most:
        raise ValueError(f"num must be an integer in [1, {most}], got {num!r}")
    return heldout_layouts(grid_size, HELDOUT_RESERVED)[VALIDATION_START : VALIDATION_START + num]


def procedural_layouts(grid_size: int, num: int, split: str = "train", seed: int = 0) -> np.ndarray:
    """``num`` distinct layouts from the generator: (num, G, G) bool, connected, at least one wall, at most half
    the board walled. The same (grid_size, num, split, seed) gives the same layouts.

    split="train": a random stream that skips every one of the first HELDOUT_RESERVED held-out layouts and the named
    layouts - so no held-out layout is ever trained on. split="test": the held-out stream itself (heldout_layouts).
    """
    for name, value in (("grid_size", grid_size), ("num", num), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if not 3 <= grid_size <= 16:
        raise ValueError(f"grid_size must be in [3, 16] for procedural layouts, got {grid_size}")
    if num < 1 or seed < 0:
        raise ValueError(f"need num >= 1 and seed >= 0, got num={num}, seed={seed}")
    if split not in LAYOUT_SPLITS:
        raise ValueError(f"split must be one of {sorted(LAYOUT_SPLITS)}, got {split!r}")
    if split == "test":
        if seed != 0:
            raise ValueError("the held-out stream has one seed (0): its layouts are reserved")
        return heldout_layouts(grid_size, num)
    check_memory(float(num) * grid_size**2 * 48, f"procedural_layouts(num={num:,})")
    skip = _named_keys(grid_size) | set(_layout_keys(heldout_layouts(grid_size, HELDOUT_RESERVED)))
    return _draw_layouts(grid_size, num, "train", seed, skip)


def build_world(cfg: Config) -> World:
    """The world a config trains in: its named layout, or with num_layouts > 0 a family of generated layouts."""
    if cfg.num_layouts > 0:
        return WorldFamily(procedural_layouts(cfg.grid_size, cfg.num_layouts, seed=cfg.data_seed))
    return World(cfg.grid_size, walls=cfg.layout, show_target=cfg.show_target)


# ── datasets: integers in memory, pixels on demand ──


@dataclass
class Transitions:
    """Compact trajectories: ``states`` (B, T) and ``actions`` (B, T-1), both small integer tensors.

    50,000 transitions (T=2) take 250 kB; images are rendered from the world's atlas when a batch is drawn.
    """

    states: torch.Tensor  # (B, T) int16 state indices
    actions: torch.Tensor  # (B, T-1) uint8 actions

    def __len__(self) -> int:
        return self.states.shape[0]

    @property
    def nbytes(self) -> int:
        return self.states.nbytes + self.actions.nbytes


def make_transitions(
    world: World,
    num: int = 50_000,
    seq_len: int = 2,
    seed: int = 0,
    exclude_cells: tuple[int, ...] = (),
) -> Transitions:
    """Sample ``num`` trajectories of ``seq_len`` frames: uniform start over free cells, uniform actions.

    ``exclude_cells``: cells the agent never visits (trajectories touching them are resampled) - used to
    ask whether the model places a never-seen cell where the grid says it should be.
    """
    for name, value in (("num", num), ("seq_len", seq_len), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a transition has a before and an after), got {seq_len}")
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    check_memory(8.0 * 6 * (2 * num + 64) * seq_len, f"make_transitions(num={num:,}, seq_len={seq_len})")
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.from_numpy(np.setdiff1d(world.free_cells, np.asarray(exclude_cells, dtype=np.int64)))
    if not len(allowed):
        raise ValueError(f"exclude_cells {exclude_cells} leaves no free cell to start from; exclude fewer cells")
    table, N = world.next_cell, world.num_cells
    kept_states, kept_actions, have, barren = [], [], 0, 0
    while have < num:
        if barren >= 100:
            raise ValueError(
                f"no trajectory of {seq_len} frames avoids the excluded cells {exclude_cells}; exclude fewer cells"
            )
        batch = 2 * (num - have) + 64
        cells = [allowed[torch.randint(len(allowed), (batch,), generator=gen)]]
        actions = torch.randint(len(ACTIONS), (batch, seq_len - 1), generator=gen)
        for t in range(seq_len - 1):
            cells.append(table[cells[-1], actions[:, t]])
        cells = torch.stack(cells, 1)  # (batch, T)
        ok = torch.isin(cells, allowed).all(1)
        states = cells
        if world.show_target:  # the target sits on a random free cell and never moves
            target = torch.from_numpy(world.free_cells)[torch.randint(len(world.free_cells), (batch, 1), generator=gen)]
            states = cells + N * target
        kept_states.append(states[ok])
        kept_actions.append(actions[ok])
        have += int(ok.sum())
        barren = barren + 1 if not ok.any() else 0
    states = torch.cat(kept_states)[:num]
    dtype = torch.int16 if world.num_states < 2**15 else torch.int32
    return Transitions(states.to(dtype), torch.cat(kept_actions)[:num].to(torch.uint8))


def dataset_stats(world: World, data: Transitions) -> dict:
    """Action balance, how often each cell is visited, and the share of moves that hit a wall."""
    states, actions = data.states.long(), data.actions.long()
    cells = world.agent_cell(states)
    return {
        "action_counts": torch.bincount(actions.reshape(-1), minlength=len(ACTIONS)).numpy(),
        "cell_counts": torch.bincount(cells.reshape(-1), minlength=world.num_cells)
        .numpy()
        .reshape(world.grid_size, world.grid_size),
        "wall_hit_share": float((cells[:, 1:] == cells[:, :-1]).float().mean()),
        "num_transitions": len(data) * (states.shape[1] - 1),
        "stored_bytes": data.nbytes,
    }


@dataclass
class PaintedFrames:
    """Every distinct state a dataset visits, painted once: ``frames`` and, per trajectory, ``index`` (B, T) into
    them. A batch is then one gather - the same values as painting it again, so training takes the same path with
    or without it, only faster (painting a layout family's frames on demand is about a third of a CPU step).

    ``frames`` is (U, H, W) uint8, or, painted for an encoder that pools its input to ``size`` first, (U, size,
    size) float: each frame pooled once, as the encoder would pool it in every batch (on a CPU, converting and
    pooling 128x128 frames is about a quarter of a layouts-profile step)."""

    index: torch.Tensor  # (B, T) long, on the frames' device
    frames: torch.Tensor  # (U, H, W) uint8, or (U, size, size) float32 pooled; half the rows when cropped


def paint_frames(
    world: World, data: Transitions, device, progress: bool = False, size: int | None = None, crop: bool = False
) -> PaintedFrames | None:
    """Paint every distinct state of ``data`` once, on ``device``, for sample_batch to gather from. ``size``: the
    encoder's input size (cfg.input_size); below the image size the frames are stored average-pooled to it -
    what Encoder.features does first - and 4x smaller than uint8 at 128 -> 32. ``crop`` (cfg.crop): only the
    middle half of the rows is stored, the rows such an encoder reads - half the memory, the same latents.

    None when it would not pay: a single layout (its atlas is already one gather) or frames above the memory
    limit (then it says so and batches are painted on demand, as before)."""
    if not isinstance(world, WorldFamily):
        return None
    if size is not None and (
        isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1 or world.image_size % size
    ):
        raise ValueError(
            f"size must be a positive integer that divides the image size {world.image_size}, got {size!r}"
        )
    states, index = torch.unique(data.states.long(), return_inverse=True)
    pool = size is not None and size < world.image_size
    side = size if pool else world.image_size
    rows = slice(side // 4, 3 * side // 4) if crop else slice(None)
    need = len(states) * (4 if pool else 1) * side**2 // (2 if crop else 1)
    if need > memory_limit_bytes():
        print(
            f"painting on demand: the {len(states):,} frames of this dataset would take {need / 2**30:.1f} GiB, "
            f"above the limit of {memory_limit_bytes() / 2**30:.1f} GiB ($GRIDJEPA_MEMORY_LIMIT_GB)"
        )
        return None
    device = torch.device(device)
    chunks = states.split(4096)
    if progress and len(chunks) > 4:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="painting frames", mininterval=0.5)
    k = world.image_size // size if pool else 1
    paint = lambda c: F.avg_pool2d(world.render(c, device), k)[:, 0] if pool else world._paint(c, device)
    frames = torch.empty(  # filled chunk by chunk: held once (joining the chunks would hold them twice)
        (len(states), side // (2 if crop else 1), side), dtype=torch.float32 if pool else torch.uint8, device=device
    )
    at = 0
    for c in chunks:
        frames[at : at + len(c)] = paint(c)[:, rows]
        at += len(c)
    return PaintedFrames(index.to(device), frames)


def sample_batch(
    world: World, data: Transitions, idx: torch.Tensor, device, painted: PaintedFrames | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render trajectories ``idx`` on ``device``: obs (B, T, 1, H, W) float, actions (B, T-1) long.
    ``painted``: paint_frames(world, data)'s frames, gathered instead of painting (the same images; pooled to
    the encoder's input size when they were painted with ``size``)."""
    actions = data.actions[idx].long().to(device)
    if painted is not None:
        frames = painted.frames[painted.index[idx.to(painted.index.device)]].to(device).unsqueeze(-3)
        return (frames.float().div_(255.0) if frames.dtype == torch.uint8 else frames), actions
    states = data.states[idx].long().to(device)
    return world.render(states, device), actions


class TransitionDataset(torch.utils.data.Dataset):
    """(obs_t, action, obs_t+1) triples for a standard DataLoader; rendering is one atlas lookup."""

    def __init__(self, world: World, data: Transitions):
        self.world, self.data = world, data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        states = self.data.states[i, :2].long()
        obs = self.world.render(states)  # (2, 1, H, W)
        return obs[0], int(self.data.actions[i, 0]), obs[1]


# ════════════════════════════════════════════════════════════════════════════════════════
# 2. Model (notebook 02)
# ════════════════════════════════════════════════════════════════════════════════════════


# ── distributed: statistics over all ranks ──


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its gradient is the sum of the ranks' gradients (every rank computes the same loss)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all-reduce (sum) across ranks; the identity without torch.distributed."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _AllReduceSum.apply(x)
    return x


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch when torch.distributed is running.

    torch's SyncBatchNorm only runs on GPUs; this one all-reduces the same two moments on any backend,
    so the 2-process CPU test exercises the code path a multi-GPU run takes. Single process: plain BN.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        n = all_reduce_sum(torch.tensor(float(x.shape[0]), device=x.device))
        mean = all_reduce_sum(x.sum(0)) / n  # (C,)
        var = all_reduce_sum(((x - mean) ** 2).sum(0)) / n
        with torch.no_grad():
            m = self.momentum if self.momentum is not None else 0.1
            self.running_mean.lerp_(mean.detach(), m)
            self.running_var.lerp_(var.detach() * n / (n - 1), m)
            self.num_batches_tracked += 1
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


# ── the networks: encoder, predictor, SIGReg, the JEPA ──


class Projector(nn.Module):
    """CLS feature -> latent: Linear -> BatchNorm (or LayerNorm) -> GELU -> Linear, as in LeWM.

    LeWM found that the ViT's own final LayerNorm hinders SIGReg and a BatchNorm projector fixes it;
    notebook 03 shows the LayerNorm variant collapsing.
    """

    def __init__(self, width: int, hidden: int, latent_dim: int, norm: str = "batchnorm"):
        super().__init__()
        if norm not in ("batchnorm", "layernorm"):
            raise ValueError(f"projector_norm must be 'batchnorm' or 'layernorm', got {norm!r}")
        self.net = nn.Sequential(
            nn.Linear(width, hidden),
            GlobalBatchNorm1d(hidden) if norm == "batchnorm" else nn.LayerNorm(hidden),
            nn.GELU(),
            nn.Linear(hidden, latent_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def cls_output(layer: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
    """A norm-first transformer layer's output at the CLS token alone: x (B, N, W) -> (B, W).

    Only attention mixes tokens, so in the last block the CLS output needs only the CLS token's query; the other
    tokens' outputs would never be read. Skipping them skips 16/17 of that block's MLP: on the layouts profile (one
    block, 16 patches) a CPU training step takes ~40% less time (221 -> 124 ms), for the same function."""
    h = layer.norm1(x)
    cls = x[:, :1] + layer.dropout1(layer.self_attn(h[:, :1], h, h, need_weights=False)[0])
    cls = cls + layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm2(cls))))))
    return cls[:, 0]


def conv_stem(width: int, patch_size: int) -> nn.Sequential:
    """Early convolutions (Xiao et al., 2021, "Early Convolutions Help Transformers See Better"): log2(patch_size)
    3x3 stride-2 convolutions with GELUs, then a 1x1 convolution to ``width``. Like ViT's patch embedding it maps
    (B, 1, S, S) to (B, width, S / patch_size, S / patch_size), but each token is built from local features."""
    chans = conv_stem_channels(width, patch_size)
    layers: list[nn.Module] = []
    for a, b in zip(chans, chans[1:]):
        layers += [nn.Conv2d(a, b, kernel_size=3, stride=2, padding=1), nn.GELU()]
    return nn.Sequential(*layers, nn.Conv2d(chans[-1], width, kernel_size=1))


class Encoder(nn.Module):
    """ViT-Tiny-style encoder: image (B, 1, H, W) -> latent (B, D), via patches, a CLS token and a projector.

    With cfg.spatial the CLS token is not used: each patch token is projected (one shared projector) to
    D / (number of patches) channels, and the latent is the grid of them, flattened. With cfg.pool="flat" the patch
    tokens, each through one shared linear layer, are concatenated in board order into the projector; cfg.crop keeps
    the middle half of the rows; cfg.stem="conv" builds the tokens with early convolutions."""

    def __init__(self, cfg: Config, image_size: int = 128):
        super().__init__()
        if image_size % cfg.input_size or cfg.input_size % cfg.patch_size:
            raise ValueError("input_size must divide the image size and patch_size must divide input_size")
        self.image_size, self.input_size = image_size, cfg.input_size
        self.spatial, self.num_patches, self.crop = cfg.spatial, num_patches(cfg), cfg.crop
        if cfg.stem == "conv":
            self.patch_embed = conv_stem(cfg.width, cfg.patch_size)
        else:
            self.patch_embed = nn.Conv2d(1, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_patches + 1, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.width,
            cfg.heads,
            dim_feedforward=4 * cfg.width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)
        out = cfg.latent_dim // self.num_patches if cfg.spatial else cfg.latent_dim
        self.flat = nn.Linear(cfg.width, flat_channels(cfg)) if cfg.pool == "flat" else None
        features = self.num_patches * flat_channels(cfg) if self.flat is not None else cfg.width
        self.projector = Projector(features, cfg.proj_hidden, out, cfg.projector_norm)

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        """The ViT's output before the projector: (B, 1, H, W) -> CLS (B, W); with spatial (B * patches, W); with
        pool="flat" (B, patches x flat_channels). With crop, frames may come already cropped: (B, 1, H / 2, W)."""
        if obs.shape[-1] not in (self.image_size, self.input_size):
            raise ValueError(
                f"the encoder takes {self.image_size}x{self.image_size} images (or frames already pooled to "
                f"input_size {self.input_size}), got {tuple(obs.shape[-2:])}"
            )
        x = obs
        if x.shape[-1] != self.input_size:  # pooling is linear: pool first, then rescale the fewer pixels
            x = F.avg_pool2d(x, self.image_size // self.input_size)  # (B, 1, input, input)
        if self.crop and x.shape[-2] == x.shape[-1]:  # the middle half of the rows, where the board is (frames
            x = x[..., self.input_size // 4 : 3 * self.input_size // 4, :]  # painted cropped have only those)
        x = x * 2 - 1  # [0, 1] -> [-1, 1]
        x = self.patch_embed(x)  # (B, W, h, w)
        x = rearrange(x, "b c h w -> b (h w) c")  # (B, h*w, W)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        if self.spatial:
            return self.norm(self.blocks(x))[:, 1:].flatten(0, 1)  # (B * patches, W)
        if self.flat is not None:
            return self.flat(self.norm(self.blocks(x))[:, 1:]).flatten(1)  # (B, patches * channels), board order
        *early, last = self.blocks.layers
        for layer in early:
            x = layer(x)
        return self.norm(cls_output(last, x))  # (B, W): the same as self.norm(self.blocks(x))[:, 0]

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.projector(self.features(obs)).view(obs.shape[0], -1)  # (B, D)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class AdaLNZeroBlock(nn.Module):
    """Pre-norm transformer block whose norms are shifted/scaled and whose residuals are gated by the action.

    The modulation layer is zero-initialised, so at initialisation every gate is 0 and the block is the
    identity (DiT's "AdaLN-zero"): the action's influence is learned from nothing.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x, cond: (B, T, W)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        x = x + gate1 * self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class Predictor(nn.Module):
    """Causal transformer over the latent history: (B, T, D) latents + (B, T) actions -> (B, T, D) next latents.

    Token t sees frames 0..t and is conditioned on action t; its output is the prediction of latent t+1.
    With the original write-up's T=2 it sees a single frame; trained with T>2 it can use a history.
    """

    max_len = 16

    def __init__(self, cfg: Config):
        super().__init__()
        self.in_proj = nn.Linear(cfg.latent_dim, cfg.pred_width)
        self.time_embed = nn.Parameter(torch.randn(1, self.max_len, cfg.pred_width) * 0.02)
        self.action_embed = nn.Embedding(len(ACTIONS), cfg.pred_width)
        self.blocks = nn.ModuleList(AdaLNZeroBlock(cfg.pred_width, cfg.pred_heads) for _ in range(cfg.pred_depth))
        self.norm = nn.LayerNorm(cfg.pred_width)
        self.out_proj = nn.Linear(cfg.pred_width, cfg.latent_dim)

    def forward(self, emb: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        T = emb.shape[1]
        if T > self.max_len:
            raise ValueError(f"the predictor sees at most {self.max_len} frames, got {T}")
        x = self.in_proj(emb) + self.time_embed[:, :T]  # (B, T, Wp)
        cond = self.action_embed(action)  # (B, T, Wp)
        mask = torch.ones(T, T, dtype=torch.bool, device=emb.device).triu(1)  # True = may not attend
        for block in self.blocks:
            x = block(x, cond, mask)
        return self.out_proj(self.norm(x))  # (B, T, D)


class SpatialPredictor(nn.Module):
    """The predictor for patch latents (cfg.spatial): (B, T, D) + (B, T) actions -> (B, T, D) next latents.

    Each frame's latent is read as its grid of patch tokens; the tokens attend to each other in AdaLN-zero blocks
    conditioned on the action, and each token's change is added to it - so a rule such as "the agent's patch moves
    unless the next one holds a wall" can be learned once for every place on the board. Each step is predicted from
    its own frame (the world is Markov); the history is not used.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.num_tokens = num_patches(cfg)
        self.channels = cfg.latent_dim // self.num_tokens
        self.in_proj = nn.Linear(self.channels, cfg.pred_width)
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_tokens, cfg.pred_width) * 0.02)
        self.action_embed = nn.Embedding(len(ACTIONS), cfg.pred_width)
        self.blocks = nn.ModuleList(AdaLNZeroBlock(cfg.pred_width, cfg.pred_heads) for _ in range(cfg.pred_depth))
        self.norm = nn.LayerNorm(cfg.pred_width)
        self.out_proj = nn.Linear(cfg.pred_width, self.channels)

    def forward(self, emb: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        B, T, D = emb.shape
        tokens = emb.reshape(B * T, self.num_tokens, self.channels)
        x = self.in_proj(tokens) + self.pos_embed  # (B*T, tokens, Wp)
        cond = self.action_embed(action).reshape(B * T, 1, -1).expand(-1, self.num_tokens, -1)
        for block in self.blocks:
            x = block(x, cond)
        return (tokens + self.out_proj(self.norm(x))).reshape(B, T, D)


class _CharacteristicSums(torch.autograd.Function):
    """sum_n cos(t_k x_nm) and sum_n sin(t_k x_nm): x (N, M), t (K,) -> two (M, K). Autograd would evaluate the
    (N, M, K) cosines and sines again in the backward pass; this keeps them (d/dx cos(tx) = -t sin(tx),
    d/dx sin(tx) = t cos(tx)). Same values and gradients as the plain expressions; SIGReg 15-25% faster on a CPU."""

    @staticmethod
    def forward(ctx, x, t):
        xt = x.unsqueeze(-1) * t  # (N, M, K)
        cos, sin = torch.cos(xt), torch.sin(xt)
        ctx.save_for_backward(cos, sin, t)
        return cos.sum(0), sin.sum(0)

    @staticmethod
    def backward(ctx, grad_cos, grad_sin):
        cos, sin, t = ctx.saved_tensors
        return (cos * (grad_sin * t) - sin * (grad_cos * t)).sum(-1), None


def characteristic_sums(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_n cos(t x_n), sum_n sin(t x_n)) for each column of x (N, M) and each t (K,): two (M, K) tensors,
    float32 - the empirical characteristic function, times N, of each column."""
    return _CharacteristicSums.apply(x.float(), t.float())


class SIGReg(nn.Module):
    """Sketched Isotropic Gaussian Regulariser (LeJEPA / LeWM): how far a batch of latents is from N(0, I).

    Project the batch on M random unit directions; for each 1-D projection compute the Epps-Pulley
    statistic  N * integral w(t) |phi_hat(t) - exp(-t^2/2)|^2 dt  with phi_hat the empirical characteristic
    function and w(t) = exp(-t^2/2), by the trapezoid rule on t in [0, 3] (doubled: the integrand is even).
    By Cramer-Wold, all 1-D projections Gaussian <=> the latents are N(0, I). Returns the mean over directions.

    Under torch.distributed the empirical characteristic function is averaged over all ranks before the
    statistic is formed, and ``step`` seeds directions shared by every rank: the loss is the global batch's.
    """

    def __init__(self, num_dirs: int = 256, num_knots: int = 17, t_max: float = 3.0, seed: int = 0):
        super().__init__()
        self.num_dirs, self.seed = num_dirs, seed
        t = torch.linspace(0, t_max, num_knots)
        dt = t_max / (num_knots - 1)
        trapezoid = torch.full((num_knots,), dt)
        trapezoid[[0, -1]] = dt / 2
        self.register_buffer("t", t)
        self.register_buffer("phi_target", torch.exp(-0.5 * t**2))  # characteristic function of N(0, 1)
        self.register_buffer("weights", 2 * trapezoid * torch.exp(-0.5 * t**2))

    def directions(self, dim: int, step: int | None, device) -> torch.Tensor:
        """(D, M) random unit vectors: fresh each call, or a function of ``step`` (shared across ranks)."""
        gen = None if step is None else torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        dirs = torch.randn(dim, self.num_dirs, generator=gen)
        return (dirs / dirs.norm(dim=0, keepdim=True)).to(device)

    def forward(self, emb: torch.Tensor, step: int | None = None) -> torch.Tensor:
        emb = emb.float()
        proj = emb @ self.directions(emb.shape[1], step, emb.device)  # (B, M)
        cos_sum, sin_sum = characteristic_sums(proj, self.t)  # sum over the batch of cos(t x), sin(t x): (M, K)
        n = all_reduce_sum(torch.tensor(float(emb.shape[0]), device=emb.device))
        cos_mean = all_reduce_sum(cos_sum) / n  # (M, K)
        sin_mean = all_reduce_sum(sin_sum) / n
        err = (cos_mean - self.phi_target) ** 2 + sin_mean**2
        return n * (err * self.weights).sum(-1).mean()


def check_images(obs, size: int = 128) -> torch.Tensor:
    """Observations as a (B, 1, size, size) float tensor of finite values in [0, 1], B >= 1; clear errors
    otherwise (0..255 pixels get a hint to divide by 255)."""
    if not isinstance(obs, torch.Tensor) or not obs.dtype.is_floating_point:
        raise TypeError(f"obs must be a float tensor in [0, 1], got {getattr(obs, 'dtype', type(obs).__name__)}")
    if obs.ndim != 4 or obs.shape[1:] != (1, size, size):
        raise ValueError(f"obs must have shape (B, 1, {size}, {size}), got {tuple(obs.shape)}")
    if obs.shape[0] == 0:
        raise ValueError("obs is an empty batch (B = 0); pass at least one image")
    if not torch.isfinite(obs).all():
        raise ValueError("obs holds NaN or inf values; images must be finite floats in [0, 1]")
    lo, hi = float(obs.min()), float(obs.max())
    if lo < 0 or hi > 1:
        hint = "; it looks like 0..255 pixels: divide by 255" if lo >= 0 and hi <= 255 else ""
        raise ValueError(f"obs values must lie in [0, 1], got [{lo:g}, {hi:g}]{hint}")
    return obs


class JEPA(nn.Module):
    """Encoder + predictor. The public API:  encode(obs) -> (B, D);  predict(emb, action) -> (B, D);
    rollout(emb, actions) -> (B, H, D). One encoder serves both frames; no EMA, no stop-gradient."""

    def __init__(self, cfg: Config, image_size: int = 128):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, image_size)
        self.predictor = SpatialPredictor(cfg) if cfg.spatial else Predictor(cfg)
        if cfg.idm_weight > 0:  # a training-time head: (z_t, z_t+1) -> which of the 4 actions was taken
            self.inverse = nn.Sequential(
                nn.Linear(2 * cfg.latent_dim, cfg.pred_width), nn.GELU(), nn.Linear(cfg.pred_width, len(ACTIONS))
            )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        """Observations (B, 1, H, W) float in [0, 1] -> latents (B, D). An inference API: no gradient is
        recorded (training uses forward). Other float dtypes are converted to the model's (float32)."""
        obs = check_images(obs, self.encoder.image_size)
        with torch.no_grad():
            return self.encoder(obs.to(self.device, next(self.parameters()).dtype))

    def predict(self, emb: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """The latent after one action from a single frame: (B, D), (B,) -> (B, D)."""
        action = check_actions(action).to(emb.device)
        if emb.ndim != 2 or action.shape != emb.shape[:1]:
            raise ValueError(f"expected emb (B, D) and action (B,), got {tuple(emb.shape)} and {tuple(action.shape)}")
        self._check_latents(emb)
        return self.predictor(emb[:, None], action[:, None])[:, 0]

    def _check_latents(self, emb) -> None:
        if not isinstance(emb, torch.Tensor) or not emb.dtype.is_floating_point:
            raise TypeError(f"emb must be a float tensor of latents, got {getattr(emb, 'dtype', type(emb).__name__)}")
        if emb.shape[-1] != self.cfg.latent_dim:
            raise ValueError(f"emb must have latent_dim = {self.cfg.latent_dim} columns, got {emb.shape[-1]}")

    def forward(self, obs: torch.Tensor, actions: torch.Tensor, self_feed: bool = False) -> dict[str, torch.Tensor]:
        """The training forward: obs (B, T, 1, H, W), actions (B, T-1) -> latents and predictions.

        Both frames go through the one encoder in one batch (one set of BatchNorm statistics).
        emb (B, T, D); pred (B, T-1, D) with teacher forcing; with ``self_feed`` also rollout (B, T-1, D),
        where the predictor is fed its own predictions. Training calls this (through DDP when distributed).
        """
        B, T = obs.shape[:2]
        # one NaN pixel in a training batch would poison BatchNorm's statistics; any NaN or inf makes the sum
        # non-finite, and one reduction is a fraction of the cost of an element-wise check on a CPU step
        if not torch.isfinite(obs.sum()):
            raise ValueError("obs holds NaN or inf values; images must be finite floats in [0, 1]")
        emb = self.encoder(obs.flatten(0, 1)).float().view(B, T, -1)  # (B, T, D)
        out = {"emb": emb, "pred": self.predictor(emb[:, :-1], actions).float()}  # (B, T-1, D)
        if hasattr(self, "inverse"):
            out["action_logits"] = self.inverse(torch.cat([emb[:, :-1], emb[:, 1:]], -1)).float()  # (B, T-1, A)
        if self_feed:
            out["rollout"] = self.rollout(emb[:, 0], actions).float()  # (B, T-1, D)
        return out

    def rollout(self, emb: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Open-loop imagination: each prediction is fed back as the next input. (B, D), (B, H) -> (B, H, D).

        The predictor sees the last seq_len - 1 frames (real or imagined): one for the original write-up's T=2;
        cfg.rollout_frames, when set, instead."""
        actions = check_actions(actions).to(emb.device)
        if emb.ndim != 2 or actions.ndim != 2 or actions.shape[0] != emb.shape[0]:
            shapes = f"{tuple(emb.shape)} and {tuple(actions.shape)}"
            raise ValueError(f"expected emb (B, D) and actions (B, H), got {shapes}")
        self._check_latents(emb)
        context_len = self.cfg.rollout_frames or max(1, self.cfg.seq_len - 1)  # default: as many as in training
        history = emb[:, None]  # (B, 1, D)
        for h in range(actions.shape[1]):
            context = history[:, -context_len:]
            nxt = self.predictor(context, actions[:, h + 1 - context.shape[1] : h + 1])[:, -1]
            history = torch.cat([history, nxt[:, None]], dim=1)
        return history[:, 1:]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_table(model: JEPA) -> dict[str, int]:
    """Parameter count per part of the model."""
    enc = model.encoder
    return {
        "encoder (ViT)": count_parameters(enc) - count_parameters(enc.projector),
        "projector": count_parameters(enc.projector),
        "predictor": count_parameters(model.predictor),
        "total": count_parameters(model),
    }


# ════════════════════════════════════════════════════════════════════════════════════════
# 3. Training (notebook 03)
# ════════════════════════════════════════════════════════════════════════════════════════


# ── the loss, its schedule, and the measures of a model ──


def smoothness_loss(emb: torch.Tensor) -> torch.Tensor:
    """MSE between consecutive latents of a trajectory, emb (B, T, D) -> scalar: 0 when they coincide, growing
    with their squared distance. It pulls the latents of neighbouring cells together; SIGReg keeps them spread
    out as a whole; the compromise lays the cells out like the world (the graph Laplacian's eigenvectors)."""
    return F.mse_loss(emb[:, 1:], emb[:, :-1])


def smooth_weight_at(step: int | None, cfg: Config) -> float:
    """The smoothness weight at a step: ramped in linearly over the first cfg.smooth_ramp of training.
    Starting at full weight lets it win before SIGReg has spread the latents, and some seeds collapse."""
    ramp_steps = cfg.smooth_ramp * cfg.num_steps
    if step is None or ramp_steps <= 0:
        return cfg.smooth_weight
    return cfg.smooth_weight * min(1.0, (step + 1) / ramp_steps)


def effective_rank(emb: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the normalised singular values of centred latents (B, D): up to min(B, D) when spread,
    near 1 when collapsed to a line. A scalar tensor."""
    s = torch.linalg.svdvals(emb.float() - emb.float().mean(0))
    p = s / s.sum().clamp_min(1e-12)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def jepa_loss(
    model: JEPA,
    sigreg: SIGReg,
    obs: torch.Tensor,
    actions: torch.Tensor,
    cfg: Config,
    step: int | None = None,
    measure: bool = True,
) -> dict[str, torch.Tensor]:
    """Named loss terms for a batch of trajectories: obs (B, T, 1, H, W), actions (B, T-1); with ``measure``,
    the latents' health beside them (latent_std, eff_rank: train() asks for it on the steps it logs).

    pred_loss = MSE(predictor(z_0..z_{T-2}, a), z_1..z_{T-1}) with teacher forcing; with
    cfg.rollout_weight > 0 the predictor is also fed its own predictions (open loop) and that MSE is added;
    with cfg.smooth_weight > 0, the temporal-smoothness term (ramped in) is added.
    loss = pred_loss [+ rollout_weight * rollout_loss] [+ w(step) * smooth_loss] [+ idm_weight * idm_loss]
           + lam * sigreg
    """
    T = obs.shape[1]
    out = model(obs, actions, self_feed=cfg.rollout_weight > 0 and T > 2)  # model may be DDP-wrapped
    emb = out["emb"]  # (B, T, D)
    sig = sigreg(emb.flatten(0, 1), step)
    pred_loss = F.mse_loss(out["pred"], emb[:, 1:])
    terms = {"pred_loss": pred_loss, "sigreg": sig}
    if "rollout" in out:
        terms["rollout_loss"] = F.mse_loss(out["rollout"], emb[:, 1:])
        pred_loss = pred_loss + cfg.rollout_weight * terms["rollout_loss"]
    if cfg.smooth_weight > 0:
        terms["smooth_loss"] = smoothness_loss(emb)
        pred_loss = pred_loss + smooth_weight_at(step, cfg) * terms["smooth_loss"]
    if "action_logits" in out:  # inverse dynamics: the action must be readable from the latent's change
        terms["idm_loss"] = F.cross_entropy(out["action_logits"].flatten(0, 1), actions.flatten())
        pred_loss = pred_loss + cfg.idm_weight * terms["idm_loss"]
    terms["loss"] = pred_loss + cfg.lam * sig
    if measure:  # latent health, logged beside the losses (an SVD: ~4% of a CPU step, so not on every step)
        flat = emb.detach().flatten(0, 1)  # (B*T, D)
        terms["latent_std"] = flat.std(0).mean()
        terms["eff_rank"] = effective_rank(flat)
    return terms


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to 0 at cfg.num_steps. Annealing to 0 also settles BatchNorm."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.num_steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def calibrate_batchnorm(model: JEPA, world: World) -> None:
    """Set the projector's BatchNorm running statistics to those of the data being evaluated.

    The data visits free cells uniformly, so the exact statistics are those of one image per free cell.
    Running averages taken during training lag behind while the learning rate is high and can make a
    good model look broken (see notebook 03); this replaces them with the exact statistics, computed in eval
    mode (no collective ops, so any one rank may call it).
    """
    was_training = model.training
    model.eval()
    states = torch.from_numpy(world.free_cells)
    if world.show_target:
        states = (states[:, None] + world.num_cells * states[None, :]).reshape(-1)
    if len(states) > 2048:  # a large family: a fixed uniform sample of its free cells estimates the statistics
        states = states[torch.randperm(len(states), generator=torch.Generator().manual_seed(0))[:2048]]
    obs = world.render(states, model.device)
    for bn in (
        m for m in model.modules() if isinstance(m, nn.BatchNorm1d)
    ):  # in order: later BNs see earlier ones' new stats
        captured = []
        hook = bn.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
        model.encoder(obs)
        hook.remove()
        x = captured[0].float()  # (P, C): this BatchNorm's input over the evaluated data
        bn.running_mean.copy_(x.mean(0))
        bn.running_var.copy_(x.var(0, unbiased=True) if len(x) > 1 else torch.ones_like(bn.running_var))
    model.train(was_training)


@torch.no_grad()
def encode_cells(model: JEPA, world: World, cells: torch.Tensor) -> torch.Tensor:
    """Render and encode the current cells: (P,) -> (P, D). Identical images give identical latents in
    eval mode, so each distinct cell is encoded once and gathered."""
    unique, inverse = torch.unique(cells, return_inverse=True)
    emb = torch.cat([model.encode(world.render(chunk, model.device)) for chunk in unique.split(2048)])
    return emb[inverse.to(model.device)]


@torch.no_grad()
def encode_states(model: JEPA, world: World, states: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """Latents of states (default: every free cell) in eval mode: (P,) -> (P, D). The model's train/eval mode
    is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        return encode_cells(model, world, torch.as_tensor(world.free_cells if states is None else states).long())
    finally:
        model.train(was_training)


@torch.no_grad()
def next_state_table(model: JEPA, world: World) -> dict[str, torch.Tensor]:
    """Every (free cell, action) pair of one layout with the model's answer: cell, action, the true next cell, the
    cell whose real latent is nearest the predicted one, and whether the move is a wall bump (the agent stays).
    (P,) tensors, P = free cells x 4 - for finding which transitions a model gets wrong - and the latents behind
    them, (P, D) on the CPU: the cell's, the predicted one and the true next cell's."""
    emb = encode_states(model, world)  # (N, D)
    free = torch.from_numpy(world.free_cells)
    cells = repeat(free, "n -> (n a)", a=len(ACTIONS))
    actions = repeat(torch.arange(len(ACTIONS)), "a -> (n a)", n=len(free))
    latent = repeat(emb, "n d -> (n a) d", a=len(ACTIONS))
    pred = model.predict(latent, actions.to(model.device))
    true_next = world.next_cell[cells, actions]
    nearest = free[torch.cdist(pred, emb).argmin(1).cpu()]
    return {
        "cell": cells,
        "action": actions,
        "next": true_next,
        "predicted": nearest,
        "bump": true_next == cells,
        "latent": latent.cpu(),
        "predicted_latent": pred.cpu(),
        "next_latent": emb[torch.searchsorted(free, true_next).to(emb.device)].cpu(),  # free cells are sorted
    }


@torch.no_grad()
def layout_next_state_accuracy(model: JEPA, family: WorldFamily) -> np.ndarray:
    """Next-state accuracy of each layout of a family: (K,). As next_state_accuracy, the nearest real latent is
    sought among the free cells of the same layout - an agent knows which world it stands in."""
    K, N, A = len(family), family.grid_size**2, len(ACTIONS)
    free = torch.from_numpy(family.free_cells)
    emb = encode_states(model, family)  # (F, D), free cells of every layout in order
    pred = model.predict(repeat(emb, "f d -> (f a) d", a=A), torch.arange(A, device=emb.device).repeat(len(free)))
    table = torch.full((K * N, emb.shape[1]), float("nan"), device=emb.device)
    table[free.to(emb.device)] = emb
    table = table.view(K, N, -1)
    layout = free // N
    dist = torch.cdist(pred.view(len(free), A, -1), table[layout.to(emb.device)]).nan_to_num(float("inf"))  # (F,A,N)
    nearest = dist.argmin(-1).cpu() + (layout * N)[:, None]
    right = (nearest == family.next_cell[free]).float()  # (F, A)
    return torch.zeros(K).index_add_(0, layout, right.sum(1)).div_(A * torch.bincount(layout, minlength=K)).numpy()


@torch.no_grad()
def next_state_accuracy(model: JEPA, world: World) -> float:
    """Share of (free cell, action) pairs whose predicted latent is nearest to the true next cell's latent.

    Probe-free: only the model's own latents of the free cells are compared. 100 pairs on the open 5x5.
    """
    if isinstance(world, WorldFamily):
        return float(layout_next_state_accuracy(model, world).mean())
    table = next_state_table(model, world)
    return float((table["predicted"] == table["next"]).float().mean())


@torch.no_grad()
def rollout_error(model: JEPA, world: World, horizon: int = 8, num: int = 512, seed: int = 12345) -> dict:
    """Open-loop prediction quality vs horizon h = 1..H on fresh random trajectories.

    From the real latent of frame 0 the model imagines frames 1..H from the actions alone. Reports the MSE to
    the real latents (relative to the latents' variance: 1 = no better than guessing the mean) and the share
    of imagined latents whose nearest real cell latent is the true cell.
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    data = make_transitions(world, num, horizon + 1, seed)
    states = data.states.long()  # (B, H+1)
    emb = encode_states(model, world, states.reshape(-1)).view(num, horizon + 1, -1)  # (B, H+1, D)
    pred = model.rollout(emb[:, 0], data.actions.long())  # (B, H, D)
    cells = encode_states(model, world)  # (N_free, D)
    nearest = torch.from_numpy(world.free_cells)[torch.cdist(pred.flatten(0, 1), cells).argmin(1).cpu()].view(
        num, horizon
    )
    var = emb.var(dim=(0, 1)).sum()
    return {
        "h": list(range(1, horizon + 1)),
        "relative_mse": (((pred - emb[:, 1:]) ** 2).sum(-1).mean(0) / var).tolist(),
        "accuracy": (nearest == world.agent_cell(states[:, 1:])).float().mean(0).tolist(),
    }


# ── checkpoints ──


CHECKPOINT_KEYS = ("model", "optimizer", "step", "config", "history", "metrics")


def _digest(obj, h) -> None:
    """Feed a nested structure of dicts, lists, tensors and scalars into ``h`` in a fixed order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _digest(v, h)
    else:
        h.update(f"S{obj!r}".encode())


def checkpoint_checksum(state: dict) -> str:
    """sha256 over everything a checkpoint holds except the checksum itself (tensors' bytes in key order)."""
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != "checksum"}, h)
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable) -> None:
    """Write ``path`` through a fresh temporary file in the same folder (exclusive create, so nothing planted at
    a temporary name is followed), then rename it over ``path``. A failed write leaves ``path`` untouched and
    removes its temporary file; a leftover from a killed process has a unique name and blocks nothing."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces a symlink at ``path`` itself, never its target
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OSError(f"cannot write {path}: {e.strerror or e}") from e
        raise


def save_checkpoint(
    path: str | Path,
    model: JEPA,
    cfg: Config,
    opt=None,
    step: int = 0,
    history=None,
    metrics: dict | None = None,
    train_seconds: float = 0.0,
) -> None:
    """Model, optimiser, step, config, history, metrics and the training time so far (summed over resumes)
    in one file with a sha256 checksum, written atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the folder {path.parent} for checkpoint {path}: {e.strerror or e}") from e
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict() if opt is not None else {},
        "step": step,
        "config": dataclasses.asdict(cfg),
        "history": history or {},
        "metrics": metrics or {},
        "train_seconds": float(train_seconds),
    }
    state["checksum"] = checkpoint_checksum(state)
    _atomic_write(path, lambda f: torch.save(state, f))


BOOKKEEPING = ("log_every", "eval_every", "ckpt_every", "profile")


def config_from_dict(values: dict, source: str = "config") -> Config:
    """A validated Config from a saved dict (unknown keys ignored, missing ones at their defaults)."""
    if not isinstance(values, dict):
        raise ValueError(f"{source}: the config must be a dict, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(Config)}
    try:
        return validate_config(Config(**{k: v for k, v in values.items() if k in names}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source} holds an invalid config: {e}") from e


def config_differences(saved: Config, cfg: Config, same_run: bool) -> list[str]:
    """'model field width: checkpoint=64 vs config=96' for each field that differs (training fields too with
    ``same_run``; bookkeeping fields never)."""
    model_names = set(saved.model_fields())
    lines = []
    for name, value in dataclasses.asdict(saved).items():
        if name in BOOKKEEPING or not (same_run or name in model_names) or getattr(cfg, name) == value:
            continue
        kind = "model field" if name in model_names else "training field"
        lines.append(f"{kind} {name}: checkpoint={value!r} vs config={getattr(cfg, name)!r}")
    return lines


def load_checkpoint(
    path: str | Path,
    cfg: Config | None = None,
    model: JEPA | None = None,
    device: torch.device | str = "cpu",
    same_run: bool = False,
) -> dict:
    """Load a checkpoint (weights_only=True). Before any model is built: its checksum is verified, its config
    validated (types, ranges, model size) and its step checked (0 <= step <= num_steps). With ``cfg``, refuse
    one whose architecture fields differ (with ``same_run``, any training field: resuming with another lam or
    schedule would mix two runs). Checkpoints written before checksums existed load without that check.

    Returns the checkpoint dict with "cfg" (its Config) and "model_obj" (a JEPA in eval mode, weights loaded).
    """
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"checkpoint {path} cannot be read (corrupt, truncated or not a checkpoint): {e}") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        raise ValueError(f"{path} is not a GridJEPA checkpoint (missing {missing})")
    if "checksum" in ckpt and checkpoint_checksum(ckpt) != ckpt["checksum"]:
        raise ValueError(
            f"checkpoint {path} fails its integrity check (sha256 mismatch): the file was corrupted or "
            f"edited after it was written; do not use it - retrain, or restore a good copy"
        )
    saved = config_from_dict(ckpt["config"], f"checkpoint {path}")
    step = ckpt["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= saved.num_steps:
        raise ValueError(f"checkpoint {path} has step {step!r}; expected an integer in [0, {saved.num_steps}]")
    if cfg is not None:
        diff = config_differences(saved, cfg, same_run)
        if diff:
            raise ValueError(
                f"checkpoint {path} was made with another config ({', '.join(diff)}); "
                f"build the model from the checkpoint's config (load_model) or start a new run under another name"
            )
    if model is None:
        model = JEPA(saved).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path}: its weights do not fit its config: {e}") from e
    model.eval()
    ckpt["cfg"], ckpt["model_obj"] = saved, model
    ckpt.setdefault("train_seconds", float(ckpt["metrics"].get("train_seconds", 0.0) or 0.0))
    return ckpt


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[JEPA, Config]:
    """A trained model and its config from a checkpoint - the entry point of notebooks 04 and 05."""
    ckpt = load_checkpoint(path, device=device)
    return ckpt["model_obj"], ckpt["cfg"]


def load_run(path: str | Path, device: torch.device | str = "cpu") -> tuple[JEPA, Config, dict]:
    """``load_model`` plus what the run recorded, for any checkpoint the series writes (notebook 03's or the
    command line's): info has "step", "metrics" (possibly empty) and "history" from the checkpoint itself, and
    "command", "train_seconds", "device" (and the JSON's metrics) only when the command line's JSON is beside it."""
    ckpt = load_checkpoint(path, device=device)
    info = {
        "path": str(path),
        "step": ckpt.get("step", 0),
        "metrics": dict(ckpt.get("metrics") or {}),
        "history": ckpt.get("history") or {},
        "command": None,
    }
    side = Path(path).with_suffix(".json")
    if side.exists():
        saved = json.loads(side.read_text())
        info["metrics"] = {**info["metrics"], **saved.get("metrics", {})}
        info.update({k: v for k, v in saved.items() if k not in ("metrics", "config")})
    return ckpt["model_obj"], ckpt["cfg"], info


# ── output files: one lock per output, a writable folder checked before training ──


_HELD_LOCKS: dict[str, int] = {}  # lock path -> how many times this process holds it (locks are re-entrant)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def output_lock(path: str | Path):
    """Hold ``<path>.lock`` (exclusive create; it records pid and host) while a run writes ``path``.

    A second process asking for the same output is refused with the holder's pid. A lock left by a dead
    process on this host is stale and taken over. Re-entrant within one process (train inside main).
    """
    lock = Path(str(path) + ".lock")
    key = str(lock.resolve())
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key] += 1
        try:
            yield lock
        finally:
            _HELD_LOCKS[key] -= 1
        return
    host = socket.gethostname()
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            break
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
                pid, their_host = int(holder["pid"]), holder.get("host")
            except (OSError, ValueError, KeyError, TypeError):
                pid, their_host = None, None
            if attempt == 0 and pid is not None and their_host == host and not _pid_alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()  # stale: its process is gone
                continue
            who = f"process {pid} on {their_host}" if pid is not None else "another process (unreadable lock file)"
            raise RuntimeError(
                f"{path} is being written by {who}: lock file {lock}. Wait for that run, pick another output "
                f"path, or delete the lock file if no such run exists"
            ) from None
        except OSError as e:
            raise OSError(f"cannot create the lock file {lock}: {e.strerror or e}") from e
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": host, "started": time.time()}, f)
    _HELD_LOCKS[key] = 1
    try:
        yield lock
    finally:
        _HELD_LOCKS.pop(key, None)
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def check_writable(path: str | Path) -> None:
    """Fail now, naming ``path``, if a file cannot be created next to it (rather than after training)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OSError(f"cannot write {path}: its folder {path.parent} is not writable ({e.strerror or e})") from e
    if path.exists() and (path.is_dir() or not os.access(path, os.R_OK)):
        raise OSError(f"cannot use {path} as an output: it is a folder or unreadable")


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


def train_step(
    model: JEPA,
    sigreg: SIGReg,
    opt: torch.optim.Optimizer,
    obs: torch.Tensor,
    actions: torch.Tensor,
    cfg: Config,
    step: int,
    measure: bool = True,
) -> dict[str, torch.Tensor]:
    """One optimisation step, as train() takes it: schedule, loss (bf16 autocast on CUDA), backward, clip, AdamW.

    obs (B, T, 1, H, W), actions (B, T-1); returns jepa_loss's named terms (with the latents' health if
    ``measure``). ``model`` may be DDP-wrapped; ``opt`` is make_optimizer's."""
    model.train()
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=obs.device.type == "cuda"):
        terms = jepa_loss(model, sigreg, obs, actions, cfg, step, measure)
    if not torch.isfinite(terms["loss"]):  # before any weight is touched
        raise FloatingPointError(
            f"loss became {terms['loss'].item()} at step {step}: lower lr, or raise lam "
            f"(now {cfg.lam}) if the latents collapsed first"
        )
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return terms


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW at cfg.lr and cfg.weight_decay over the model's parameters - fused (all parameters in one kernel, ~4 ms
    less per layouts step on a 2-core CPU) on the devices where this torch has it."""
    device = next(model.parameters()).device
    fused = device.type == "cuda" or (
        device.type == "cpu" and torch.torch_version.TorchVersion(torch.__version__) >= "2.4"
    )
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def collapse_warning(latent_std: float, cfg: Config) -> str | None:
    """A message with what to try when the latents have (almost) stopped varying."""
    if latent_std < 0.05:
        return (
            f"COLLAPSE: the latent std is {latent_std:.4f} (healthy is ~1). The encoder maps every image to "
            f"nearly the same vector. Try a larger lam (now {cfg.lam}) or projector_norm='batchnorm' "
            f"(now {cfg.projector_norm!r})"
            + (f", or a smaller smooth_weight (now {cfg.smooth_weight:g})." if cfg.smooth_weight > 0 else ".")
        )
    return None


def _log(history: dict, key: str, value) -> None:
    history.setdefault(key, []).append(value)


def _progress(iterable, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc="training", mininterval=0.5)


def bar_postfix(bar, **values) -> None:
    if hasattr(bar, "set_postfix"):
        bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()}, refresh=False)


def _train(cfg, world, data, ckpt_path, resume, on_log, progress, device, stop_after) -> TrainResult:
    device = torch.device(device) if device is not None else default_device()
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world_size}")
    world = world or build_world(cfg)
    data = data or make_transitions(world, cfg.num_transitions, cfg.seq_len, cfg.data_seed)
    # a large family is watched on its first 32 layouts: the curve's next-state accuracy is on training layouts
    monitor = WorldFamily(world.layouts[:32]) if isinstance(world, WorldFamily) and len(world) > 32 else world
    torch.manual_seed(cfg.seed)
    model = JEPA(cfg, world.image_size).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cuda.matmul.allow_tf32 = True
    sigreg = SIGReg(cfg.sigreg_dirs, seed=cfg.seed).to(device)
    opt = make_optimizer(model, cfg)
    history: dict[str, list] = {}
    start, earlier_seconds = 0, 0.0
    if ckpt_path is not None and resume and Path(ckpt_path).exists():
        ckpt = load_checkpoint(ckpt_path, cfg, model=model, device=device, same_run=True)
        if ckpt["optimizer"]:  # a finished run's final checkpoint keeps no optimiser state
            opt.load_state_dict(ckpt["optimizer"])
        start, history, earlier_seconds = ckpt["step"], ckpt["history"], ckpt["train_seconds"]
        if _is_main_process() and progress:
            print(f"resumed from {ckpt_path} at step {start}/{cfg.num_steps}")
    train_model = nn.parallel.DistributedDataParallel(model) if distributed else model
    steps = range(start, cfg.num_steps if stop_after is None else min(cfg.num_steps, start + stop_after))
    notes: list[str] = []
    t0 = time.perf_counter()  # painting the frames counts as training time
    painted = (
        paint_frames(world, data, device, progress and _is_main_process(), cfg.input_size, cfg.crop)
        if len(steps)
        else None
    )
    bar = _progress(steps, progress and _is_main_process())
    for step in bar:
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
        idx = idx[rank * cfg.batch_size // world_size : (rank + 1) * cfg.batch_size // world_size]
        obs, actions = sample_batch(world, data, idx, device, painted)
        done = step + 1
        logged = done % cfg.log_every == 0 or done == cfg.num_steps
        terms = train_step(train_model, sigreg, opt, obs, actions, cfg, step, measure=logged)
        if logged:
            _log(history, "step", done)
            _log(history, "lr", lr_at(step, cfg))
            for k, v in terms.items():
                _log(history, k, float(v.detach()))
            bar_postfix(bar, pred=history["pred_loss"][-1], sig=history["sigreg"][-1], std=history["latent_std"][-1])
            if on_log is not None and _is_main_process():
                on_log(history)
        if _is_main_process() and (done % cfg.eval_every == 0 or done == cfg.num_steps):
            calibrate_batchnorm(model, world)
            _log(history, "eval_step", done)
            _log(history, "next_state_acc", next_state_accuracy(model, monitor))
            note = collapse_warning(history["latent_std"][-1], cfg) if history.get("latent_std") else None
            if note and not notes:  # say it once per run
                notes.append(note)
                print(note)
        if ckpt_path is not None and _is_main_process() and (done % cfg.ckpt_every == 0 or done == cfg.num_steps):
            seconds = earlier_seconds + time.perf_counter() - t0
            save_checkpoint(ckpt_path, model, cfg, opt, done, history, train_seconds=seconds)
    train_seconds = time.perf_counter() - t0
    calibrate_batchnorm(model, world)
    model.eval()
    return TrainResult(
        model, history, world, data, cfg, train_seconds, notes, earlier_seconds + train_seconds, len(steps)
    )


def train(
    cfg: Config,
    world: World | None = None,
    data: Transitions | None = None,
    ckpt_path: str | Path | None = None,
    resume: bool = True,
    on_log: Callable[[dict], None] | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train a JEPA with cfg: MSE(predicted, real next latent) + lam * SIGReg, AdamW, warmup + cosine.

    Reproducible: batch k and SIGReg's directions at step k are functions of (seed, k), so a run resumed
    from a checkpoint follows the same path as one that never stopped. ``ckpt_path``: a checkpoint is
    written every cfg.ckpt_every steps and at the end; with ``resume`` an existing one is continued.
    ``stop_after``: leave after this many steps (simulates a disconnect). Under torchrun each rank takes
    its slice of the global batch (DistributedDataParallel, global SIGReg and BatchNorm).
    ``on_log``: called with the history each time a log line is added (every cfg.log_every steps and at the
    last), on the main process only - e.g. ``plot = LivePlot(); train(cfg, on_log=plot.update); plot.close()``.
    While it runs, ``<ckpt_path>.lock`` keeps a second process from writing the same checkpoint.
    """
    validate_config(cfg)
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 0):
        raise ValueError(f"stop_after must be an integer >= 0 or None, got {stop_after!r}")
    if ckpt_path is not None and _is_main_process():
        check_writable(ckpt_path)
        with output_lock(ckpt_path):
            return _train(cfg, world, data, ckpt_path, resume, on_log, progress, device, stop_after)
    return _train(cfg, world, data, ckpt_path, resume, on_log, progress, device, stop_after)


# ── how long training will take, measured before it starts ──


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def estimate_train_time(
    cfg: Config, device: torch.device | str | None = None, timed_steps: int = 5, world: World | None = None
) -> dict:
    """How long train(cfg) will take here, before it starts: FLOPs of one step (forward + backward, counted by
    torch's FlopCounterMode on one real batch) and the measured time of ``timed_steps`` steps after a warm-up
    step; total = cfg.num_steps x step time, plus painting a layout family's frames once (paint_frames, timed
    per frame). Evaluation and checkpoints add a little on top.

    Returns {"flops_per_step", "seconds_per_step", "steps", "paint_seconds", "total_seconds", "device"}."""
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(device) if device is not None else default_device()
    world = world or build_world(cfg)
    data = make_transitions(world, max(4 * cfg.batch_size, 256), cfg.seq_len, seed=cfg.data_seed)
    gen = torch.Generator().manual_seed(0)
    model = JEPA(cfg, world.image_size).to(device)
    sigreg = SIGReg(cfg.sigreg_dirs, seed=cfg.seed).to(device)
    opt = make_optimizer(model, cfg)
    world.render(data.states[:1], device)  # a first call cuts the sprite sheet: not part of painting
    t0 = time.perf_counter()
    painted = paint_frames(world, data, device, size=cfg.input_size, crop=cfg.crop)  # train() paints them once
    _synchronize(device)
    paint_seconds = 0.0
    if painted is not None:  # per distinct frame, times the distinct frames of the full dataset (same share)
        share = len(painted.frames) / data.states.numel()
        paint_seconds = (time.perf_counter() - t0) / len(painted.frames) * share * cfg.num_transitions * cfg.seq_len
    batch = lambda: sample_batch(
        world, data, torch.randint(len(data), (cfg.batch_size,), generator=gen), device, painted
    )
    obs, actions = batch()
    with FlopCounterMode(display=False) as counter:
        terms = jepa_loss(model, sigreg, obs, actions, cfg, 0)
        terms["loss"].backward()
    flops = int(counter.get_total_flops())
    train_step(model, sigreg, opt, obs, actions, cfg, 0)  # warm-up: allocations, kernel selection
    _synchronize(device)
    t0 = time.perf_counter()
    for step in range(timed_steps):
        obs, actions = batch()  # rendering is part of a step
        train_step(model, sigreg, opt, obs, actions, cfg, step, measure=False)  # as on unlogged steps
    _synchronize(device)
    per_step = (time.perf_counter() - t0) / timed_steps
    return {
        "flops_per_step": flops,
        "seconds_per_step": per_step,
        "steps": cfg.num_steps,
        "paint_seconds": paint_seconds,
        "total_seconds": per_step * cfg.num_steps + paint_seconds,
        "device": str(device),
    }


def format_estimate(est: dict, cfg: Config) -> str:
    """One line for estimate_train_time's result."""
    total = est["total_seconds"]
    when = f"{total:.0f} s" if total < 120 else f"{total / 60:.1f} min" if total < 7200 else f"{total / 3600:.1f} h"
    return (
        f"profile {cfg.profile}: {est['flops_per_step'] / 1e9:.1f} GFLOP per step, "
        f"{est['seconds_per_step'] * 1e3:.0f} ms per step on {est['device']} -> {est['steps']:,} steps ~ {when} "
        "(plus evaluations)"
    )


# ════════════════════════════════════════════════════════════════════════════════════════
# 4. Analysis (notebook 04): probes scored honestly, PCA
# ════════════════════════════════════════════════════════════════════════════════════════


@dataclass
class LinearProbe:
    """y = x @ weight + bias: a fitted scikit-learn linear model's coefficients, callable on numpy arrays and
    torch tensors (the planners decode imagined latents on the model's device)."""

    weight: np.ndarray  # (D, 2)
    bias: np.ndarray  # (2,)

    def __call__(self, x) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            return x @ torch.as_tensor(self.weight, dtype=x.dtype, device=x.device) + torch.as_tensor(
                self.bias, dtype=x.dtype, device=x.device
            )
        return np.asarray(x) @ self.weight + self.bias


def fit_probe(x: np.ndarray, y: np.ndarray, alpha: float = 0.0) -> LinearProbe:
    """Fit a linear probe from latents x (P, D) to targets y (P, k): sklearn's LinearRegression (least squares;
    the minimum-norm solution when P <= D), or Ridge(alpha) for alpha > 0."""
    from sklearn.linear_model import LinearRegression, Ridge

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    reg = (Ridge(alpha=alpha) if alpha > 0 else LinearRegression()).fit(x, y)
    return LinearProbe(np.asarray(reg.coef_, np.float64).reshape(-1, x.shape[1]).T, np.atleast_1d(reg.intercept_))


RIDGE_ALPHAS = tuple(np.logspace(-3, 4, 15))


def ridge_alpha_loo(x: np.ndarray, y: np.ndarray, alphas=RIDGE_ALPHAS) -> float:
    """The ridge alpha with the smallest leave-one-out error: sklearn's RidgeCV (efficient closed-form LOO)."""
    from sklearn.linear_model import RidgeCV

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(RidgeCV(alphas=alphas).fit(x, y).alpha_)


def r2_score(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Coefficient of determination per output column (sklearn's): (P, k) -> (k,). Negative = worse than the mean."""
    from sklearn.metrics import r2_score as sk_r2_score

    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    return np.atleast_1d(sk_r2_score(y, pred, multioutput="raw_values"))


def probe_report(emb, pos, num_splits: int = 20, holdout: int | None = None, seed: int = 0) -> dict:
    """R^2 of linear probes emb -> pos, three honest ways:

    fit      - fit and scored on the same cells (the write-up's 1.00; proves little with P points in D >> P dims);
    heldout  - fit on some cells, scored on the others, ``num_splits`` random splits (sklearn's ShuffleSplit);
    ridge    - the same held-out test with ridge regression, alpha by leave-one-out on the fit cells.
    Each R^2 is the mean over (col, row).
    """
    from sklearn.model_selection import ShuffleSplit

    emb, pos = np.asarray(emb, np.float64), np.asarray(pos, np.float64)
    P = len(emb)
    if emb.ndim != 2 or pos.ndim != 2 or len(pos) != P:
        raise ValueError(f"expected emb (P, D) and pos (P, k), got {emb.shape} and {pos.shape}")
    if not (np.isfinite(emb).all() and np.isfinite(pos).all()):
        raise ValueError("emb and pos must be finite (no NaN or inf)")
    if P < 4:
        raise ValueError(f"probe_report needs at least 4 points (2 to fit, 2 to score), got {P}")
    holdout = holdout or max(2, round(P * 0.3))
    if not 2 <= holdout <= P - 2:
        raise ValueError(f"holdout must be in [2, P - 2] = [2, {P - 2}] (R^2 needs 2 points to score), got {holdout}")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    plain, ridge = [], []
    for fit, test in ShuffleSplit(n_splits=num_splits, test_size=holdout, random_state=seed).split(emb):
        plain.append(r2_score(pos[test], fit_probe(emb[fit], pos[fit])(emb[test])).mean())
        alpha = ridge_alpha_loo(emb[fit], pos[fit])
        ridge.append(r2_score(pos[test], fit_probe(emb[fit], pos[fit], alpha)(emb[test])).mean())
    fit_r2 = r2_score(pos, fit_probe(emb, pos)(emb))
    return {
        "fit_col": float(fit_r2[0]),
        "fit_row": float(fit_r2[1]),
        "fit": float(fit_r2.mean()),
        "heldout_mean": float(np.mean(plain)),
        "heldout_std": float(np.std(plain)),
        "ridge_heldout_mean": float(np.mean(ridge)),
        "ridge_heldout_std": float(np.std(ridge)),
        "num_splits": num_splits,
        "holdout": holdout,
    }


def pca(emb, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Project latents (P, D) on their principal components (sklearn's PCA): (P, k) coordinates and the
    (min(P, D),) explained-variance ratios of all components."""
    from sklearn.decomposition import PCA

    x = np.asarray(emb, np.float64)
    fitted = PCA(svd_solver="full").fit(x)
    k = k or len(fitted.explained_variance_ratio_)
    return fitted.transform(x)[:, :k], fitted.explained_variance_ratio_


def latent_vs_grid_distance(emb, world: World) -> dict:
    """Does latent L2 distance track grid distance? Over all pairs of free cells (emb: (N, D) in free-cell order):
    L2 between latents, the number of moves between cells (BFS; Manhattan on the open grid), and scipy's
    Spearman rank correlation of the two (ties ranked properly)."""
    from scipy.stats import spearmanr

    emb = np.asarray(emb, np.float64)
    free = world.free_cells
    i, j = np.triu_indices(len(emb), k=1)
    l2 = np.linalg.norm(emb[i] - emb[j], axis=1)
    moves = world.shortest_paths()[free[i], free[j]]
    rho, pvalue = spearmanr(l2, moves)
    return {"spearman": float(rho), "pvalue": float(pvalue), "l2": l2, "grid_distance": moves, "pairs": (i, j)}


def geometry_report(model: JEPA, world: World, num_splits: int = 20) -> dict:
    """Is the latent space a map of the world? On the latents of every free cell: the variance on the first two
    principal components, Spearman's rank correlation of latent L2 with the BFS distance between cells,
    held-out-cell probe R^2 (``probe_report``), latent std and effective rank."""
    emb = encode_states(model, world).cpu().numpy()
    pos = world.cell_pos(world.free_cells)
    _, ratio = pca(emb)
    probes = probe_report(emb, pos, num_splits=num_splits)
    return {
        "pc1": float(ratio[0]),
        "pc2": float(ratio[1]),
        "spearman_l2_grid": latent_vs_grid_distance(emb, world)["spearman"],
        "probe_r2_heldout": probes["heldout_mean"],
        "probe_r2_heldout_std": probes["heldout_std"],
        "probe_r2_ridge_heldout": probes["ridge_heldout_mean"],
        "probe_r2_fit": probes["fit"],
        "latent_std": float(emb.std(0).mean()),
        "effective_rank": float(effective_rank(torch.from_numpy(emb))),
    }


def untrained_model(cfg: Config, world: World | None = None, seed: int = 1234) -> JEPA:
    """Same architecture, random weights, BatchNorm calibrated like a trained one (on ``world``, default the
    config's): the baseline any claim must beat. Leaves the global random state alone."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = JEPA(cfg)
    calibrate_batchnorm(model, world or build_world(cfg))
    return model.eval()


# ════════════════════════════════════════════════════════════════════════════════════════
# 5. Planning (notebook 05): batched MPC over all start->goal pairs at once
# ════════════════════════════════════════════════════════════════════════════════════════
# A policy maps (cells (P,), goals (P,)) to a dict with "action" (P,) and "scores" (P, A): the planner's
# predicted cost of each first action (lower is better). run_mpc acts in the real world and repeats.


Policy = Callable[[torch.Tensor, torch.Tensor], dict]


@torch.no_grad()
def imagine_next(model: JEPA, world: World, cells: torch.Tensor) -> torch.Tensor:
    """The 4 imagined next latents of each cell: (P,) -> (P, A, D)."""
    emb = encode_cells(model, world, cells)  # (P, D)
    actions = repeat(torch.arange(len(ACTIONS), device=emb.device), "a -> (p a)", p=len(cells))
    pred = model.predict(repeat(emb, "p d -> (p a) d", a=len(ACTIONS)), actions)
    return rearrange(pred, "(p a) d -> p a d", a=len(ACTIONS))


def greedy_decoder_policy(model: JEPA, world: World, decode: Callable[[torch.Tensor], torch.Tensor]) -> Policy:
    """The original write-up's planner: imagine the 4 next latents, decode each to a (col, row), pick the smallest
    Manhattan distance to the goal (ties: the first action)."""

    def policy(cells: torch.Tensor, goals: torch.Tensor) -> dict:
        imagined = decode(imagine_next(model, world, cells).flatten(0, 1)).view(len(cells), len(ACTIONS), 2).cpu()
        goal_pos = torch.from_numpy(world.cell_pos(goals.numpy())).float()  # (P, 2)
        scores = (imagined - goal_pos[:, None]).abs().sum(-1)  # (P, A)
        return {"action": scores.argmin(1), "scores": scores, "imagined": imagined}

    return policy


def probe_policy(model: JEPA, world: World, probe: LinearProbe) -> Policy:
    """Greedy planner decoding imagined latents with a linear probe (the original write-up's)."""
    return greedy_decoder_policy(model, world, lambda z: probe(z.float().cpu()))


def nearest_cell_policy(model: JEPA, world: World) -> Policy:
    """Probe-free greedy planner: decode each imagined latent as the cell whose real latent is nearest (L2)."""
    emb = encode_states(model, world)  # (N, D)
    pos = torch.from_numpy(world.cell_pos(world.free_cells)).float()
    return greedy_decoder_policy(model, world, lambda z: pos[torch.cdist(z.float(), emb.float()).argmin(1).cpu()])


def latent_greedy_policy(model: JEPA, world: World) -> Policy:
    """Probe-free, graph-free greedy planner with the latent cost: imagine the 4 next latents and take the
    action whose latent is nearest (L2) to the goal image's latent. Only as good as the latent is a map."""

    def policy(cells: torch.Tensor, goals: torch.Tensor) -> dict:
        goal_emb = encode_cells(model, world, goals)  # (P, D)
        scores = ((imagine_next(model, world, cells) - goal_emb[:, None]) ** 2).sum(-1).cpu()  # (P, A)
        return {"action": scores.argmin(1), "scores": scores}

    return policy


def random_policy(seed: int = 0) -> Policy:
    """Uniformly random actions: the floor any planner must clear."""
    gen = torch.Generator().manual_seed(seed)

    def policy(cells: torch.Tensor, goals: torch.Tensor) -> dict:
        return {
            "action": torch.randint(len(ACTIONS), (len(cells),), generator=gen),
            "scores": torch.zeros(len(cells), len(ACTIONS)),
        }

    return policy


def bfs_policy(world: World) -> Policy:
    """The optimum, from the true map: step to a neighbour one move closer to the goal."""
    distances = torch.from_numpy(world.shortest_paths()).float()  # (N, N)

    def policy(cells: torch.Tensor, goals: torch.Tensor) -> dict:
        nxt = world.next_cell[cells]  # (P, A)
        d = distances[nxt, goals[:, None]]
        scores = torch.where(d < 0, torch.full_like(d, 1e9), d) + (nxt == cells[:, None]).float() * 1e6
        return {"action": scores.argmin(1), "scores": scores}

    return policy


LATENT_COSTS = ("final", "steps")  # imagined_costs' two ways to score an imagined sequence against a goal latent


def check_latent_cost(cost: str) -> None:
    if cost not in LATENT_COSTS:
        raise ValueError(f"cost must be one of {LATENT_COSTS}, got {cost!r}")


@torch.no_grad()
def imagined_costs(
    model: JEPA, world: World, cells: torch.Tensor, goals: torch.Tensor, horizon: int, cost: str = "steps"
) -> torch.Tensor:
    """Latent cost of every action sequence of length H from every cell to every goal image: (P, 4^H).

    Column s is the sequence with base-4 code s (first action most significant). Two costs, both from the
    model alone (no probe, no positions):
      "final" - ||z_H - z_goal||^2 at the end of the imagined rollout (LeWM's cost);
      "steps" - min over h of (||z_h - z_goal|| / step + h): the imagined number of moves, steps taken plus
                steps still to go, where ``step`` is the length of one imagined move from the start latent
                (the largest of the 4, so a wall bump does not set it). A sequence that reaches the goal
                sooner wins, and one that passes through it is as good as one that ends there.
    The imagined rollout depends only on the start frame and the actions, so it is computed once per distinct
    start cell (U <= N) and shared by every pair starting there: (U * 4^H) rollouts, not (P * S).
    """
    check_latent_cost(cost)
    seqs = torch.cartesian_prod(*[torch.arange(len(ACTIONS))] * horizon).view(-1, horizon)  # (4^H, H)
    start_u, start_inv = torch.unique(cells, return_inverse=True)
    goal_u, goal_inv = torch.unique(goals, return_inverse=True)
    emb = encode_cells(model, world, start_u)  # (U, D)
    goal_emb = encode_cells(model, world, goal_u)  # (Ug, D)
    S, U = len(seqs), len(start_u)
    z = model.rollout(repeat(emb, "u d -> (u s) d", s=S), repeat(seqs, "s h -> (u s) h", u=U).to(emb.device))
    z = z.view(U, S, horizon, -1)  # (U, S, H, D)
    if cost == "final":
        best = torch.cdist(z[:, :, -1].flatten(0, 1), goal_emb).view(U, S, -1) ** 2  # (U, S, Ug)
    else:
        first = torch.arange(len(ACTIONS)) * len(ACTIONS) ** (horizon - 1)  # one sequence per first action
        step = (z[:, first, 0] - emb[:, None]).norm(dim=-1).amax(1)  # (U,) the longest imagined first move
        d = torch.cdist(z.flatten(0, 2), goal_emb).view(U, S, horizon, -1)  # (U, S, H, Ug)
        d = d / step.clamp_min(1e-6)[:, None, None, None] + torch.arange(1, horizon + 1, device=d.device)[:, None]
        best = d.min(2).values  # (U, S, Ug)
    return best.cpu()[start_inv, :, goal_inv]  # (P, S)


def check_search_size(model: JEPA, world: World, horizon: int, who: str) -> None:
    """horizon H >= 1, and the 4^H imagined rollouts of imagined_costs within the memory limit."""
    if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)):
        raise TypeError(f"{who}: horizon H must be an integer >= 1, got {horizon!r}")
    if horizon < 1:
        raise ValueError(f"horizon H must be >= 1, got {horizon}")
    U, S = len(world.free_cells), len(ACTIONS) ** min(int(horizon), 64)
    per_rollout = horizon * (model.cfg.latent_dim + U + 4 * model.cfg.pred_width) + 2 * horizon
    check_memory(4.0 * U * S * per_rollout, f"{who} with horizon={horizon} ({S:,} action sequences per start cell)")


def sequence_code(seqs: torch.Tensor) -> torch.Tensor:
    """Base-4 index of action sequences (..., H) -> (...), matching imagined_costs' columns."""
    H = seqs.shape[-1]
    return (seqs * len(ACTIONS) ** torch.arange(H - 1, -1, -1)).sum(-1)


def _first_action_scores(costs: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Best cost of the sequences starting with each action: (P, S), (P, S) -> (P, A) (inf if none)."""
    scores = torch.full((costs.shape[0], len(ACTIONS)), float("inf"))
    return scores.scatter_reduce(1, first, costs, reduce="amin")


def exhaustive_policy(model: JEPA, world: World, horizon: int = 4, cost: str = "steps") -> Policy:
    """Search all 4^H action sequences for every pair at once; execute the first action of the best."""
    check_search_size(model, world, horizon, "exhaustive_policy")
    check_latent_cost(cost)
    first = torch.arange(len(ACTIONS) ** horizon) // len(ACTIONS) ** (horizon - 1)  # (4^H,) first action

    def policy(cells: torch.Tensor, goals: torch.Tensor) -> dict:
        costs = imagined_costs(model, world, cells, goals, horizon, cost)  # (P, 4^H)
        scores = _first_action_scores(costs, first.expand_as(costs))
        return {"action": scores.argmin(1), "scores": scores}

    return policy


def cem_policy(
    model: JEPA,
    world: World,
    horizon: int = 4,
    samples: int = 64,
    elites: int = 8,
    iterations: int = 3,
    smoothing: float = 0.1,
    seed: int = 0,
    cost: str = "steps",
) -> Policy:
    """Cross-entropy method over discrete action sequences (as LeWM plans, made categorical):
    sample sequences from per-step categorical distributions, keep the elites, refit the probabilities
    to them, repeat; execute the first action of the best sequence seen. Batched over all pairs; sampled
    sequences are scored by the model's imagined rollouts (computed once per start cell, see imagined_costs)."""
    check_search_size(model, world, horizon, "cem_policy")
    check_latent_cost(cost)
    if not 1 <= elites <= samples:
        raise ValueError(f"need 1 <= elites <= samples, got elites={elites}, samples={samples}")
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    if not (isinstance(smoothing, (int, float)) and 0 <= smoothing <= 1):
        raise ValueError(f"smoothing must be a number in [0, 1], got {smoothing!r}")
    gen = torch.Generator().manual_seed(seed)

    def policy(cells: torch.Tensor, goals: torch.Tensor) -> dict:
        P, A = len(cells), len(ACTIONS)
        table = imagined_costs(model, world, cells, goals, horizon, cost)  # (P, 4^H)
        probs = torch.full((P, horizon, A), 1 / A)
        best_cost, best_seq = torch.full((P,), float("inf")), torch.zeros(P, horizon, dtype=torch.long)
        scores = torch.full((P, A), float("inf"))
        best_per_iter = []
        for _ in range(iterations):
            seqs = torch.multinomial(probs.flatten(0, 1), samples, replacement=True, generator=gen)
            seqs = rearrange(seqs, "(p h) s -> p s h", p=P)  # (P, S, H)
            costs = table.gather(1, sequence_code(seqs))  # (P, S)
            scores = torch.minimum(scores, _first_action_scores(costs, seqs[:, :, 0]))
            order = costs.argsort(1)[:, :elites]  # (P, E)
            elite = torch.gather(seqs, 1, repeat(order, "p e -> p e h", h=horizon))  # (P, E, H)
            probs = (1 - smoothing) * F.one_hot(elite, A).float().mean(1) + smoothing / A  # (P, H, A)
            top = costs.gather(1, order[:, :1])[:, 0]
            better = top < best_cost
            best_cost, best_seq[better] = torch.where(better, top, best_cost), elite[better, 0]
            best_per_iter.append(best_cost.clone())
        return {"action": best_seq[:, 0], "scores": scores, "best_cost_per_iter": torch.stack(best_per_iter, 1)}

    return policy


def _bfs_reverse(edges: np.ndarray, goal: int) -> np.ndarray:
    V = len(edges)
    dist_to = np.full(V, -1)
    dist_to[goal] = 0
    frontier = [goal]
    while frontier:
        reach = np.isin(edges, frontier).any(1) & (dist_to < 0)
        dist_to[reach] = dist_to[frontier[0]] + 1
        frontier = list(np.flatnonzero(reach))
    return dist_to


def graph_policy(model: JEPA, world: World, frames: torch.Tensor | None = None) -> Policy:
    """Plan by breadth-first search in the model's imagined graph - no probe, no position labels.

    Nodes: the latents of the distinct frames the agent has seen (here: one per free cell, deduplicated by
    image, never by position). Edges: for each node and action, the node nearest to the predicted latent.
    The goal image is snapped to its nearest node; the first action of a shortest imagined path is taken.
    """
    states = torch.from_numpy(world.free_cells) if frames is None else frames
    nodes = encode_cells(model, world, states)  # (V, D)
    V = len(states)
    pred = model.predict(
        repeat(nodes, "v d -> (v a) d", a=len(ACTIONS)),
        repeat(torch.arange(len(ACTIONS), device=nodes.device), "a -> (v a)", v=V),
    )
    edges = torch.cdist(pred, nodes).argmin(1).view(V, len(ACTIONS)).cpu().numpy()  # (V, A) imagined next node
    hops = np.full((V, V), -1)  # hops[goal, v]: imagined moves from v to goal, by BFS on reversed edges
    for g in range(V):
        hops[g] = _bfs_reverse(edges, g)

    def node_of(cells: torch.Tensor) -> np.ndarray:
        return torch.cdist(encode_cells(model, world, cells), nodes).argmin(1).cpu().numpy()

    def policy(cells: torch.Tensor, goals: torch.Tensor) -> dict:
        here, there = node_of(cells), node_of(goals)
        nxt = edges[here]  # (P, A)
        d = hops[there[:, None], nxt].astype(np.float64)
        d[d < 0] = np.inf
        d[nxt == here[:, None]] += 0.5  # prefer moving over bumping into a wall at equal distance
        scores = torch.from_numpy(d).float()
        return {"action": scores.argmin(1), "scores": scores}

    return policy


IMAGINE_RULES = ("consistent", "undo", "radius")  # imagine_map's rules, newest first


@torch.no_grad()
def imagine_map(
    model: JEPA,
    start: torch.Tensor,
    max_depth: int = 32,
    max_nodes: int = 256,
    merge: float = 0.5,
    rule: str = "consistent",
) -> dict:
    """Breadth-first search in imagination from start latents alone: (U, D) -> the imagined places around each.

    From each start latent the model imagines the 4 next latents, then the 4 after each of those, and so on. Each
    imagined latent is either the place it came from again (a wall bump: the agent stays), a place already found
    (a second way to the same cell), or a new place, one move deeper. Three rules tell them apart:

    * ``rule="consistent"`` (default): the undo test for bumps, and a merge that must agree with it. A real move
      joins the nearest place already found, or one found at the same depth from another parent (within ``merge`` x
      the parent's longest real move), only if that place is one such move from the parent too: the opposite action,
      imagined from it, lands nearer the parent than the move went. Two new places reached from one parent are never
      one place (distinct moves from a cell reach distinct cells). So a door whose latent lies near a cell diagonal
      to it is not lost in that cell. It costs one more imagined step for each real move the merge decides.
    * ``rule="undo"``: an imagined move is real when undoing it - the opposite action, imagined from the new latent -
      lands nearer the parent than the move went; otherwise it is a wall bump and dropped. This test has no length
      scale, so it holds where the learned map is stretched (a move across a door several times longer than one
      along a wall). A real move is then the place already found within ``merge`` x (the parent's longest real
      move) of it, whatever that place is, or else a new place; it is never its own parent.
    * ``rule="radius"`` (the earlier rule): an imagined latent within ``merge`` x (the parent's longest imagined
      move) of a place already found is that place, the parent included - so on a stretched map a short real move
      is taken for a bump.

    The radius is local because a learned map is not evenly spaced. The search stops when no new place appears (or at
    max_depth / max_nodes). Nothing but the model and the start latent is used: no layout, no positions, no other
    image.

    Returns nodes (U, V, D), count (U,), depth (U, V), first (U, V) the first action of the path to each node
    (-1 at the start), tol (U, V) each place's radius.
    """
    if rule not in IMAGINE_RULES:
        raise ValueError(f"rule must be one of {IMAGINE_RULES}, got {rule!r}")
    U, D, A = start.shape[0], start.shape[1], len(ACTIONS)
    dev = start.device
    actions = torch.arange(A, device=dev)
    nodes = start.new_zeros(U, max_nodes, D)
    nodes[:, 0] = start
    depth = torch.full((U, max_nodes), -1, dtype=torch.long, device=dev)
    first = torch.full((U, max_nodes), -1, dtype=torch.long, device=dev)
    tol = start.new_zeros(U, max_nodes)
    depth[:, 0] = 0
    count = torch.ones(U, dtype=torch.long, device=dev)
    front_u, front_v = torch.arange(U, device=dev), torch.zeros(U, dtype=torch.long, device=dev)
    for level in range(1, max_depth + 1):
        if not len(front_u):
            break
        parent = nodes[front_u, front_v]  # (F, D)
        step = actions.repeat(len(front_u))
        pred = model.predict(repeat(parent, "f d -> (f a) d", a=A), step)  # (F*A, D)
        went = (pred.view(-1, A, D) - parent[:, None]).norm(dim=-1)  # (F, A) how far each imagined move went
        if rule != "radius":
            undone = model.predict(pred, OPPOSITE.to(dev)[step]).view(-1, A, D)  # the move, then its opposite
            real = (undone - parent[:, None]).norm(dim=-1) < went  # (F, A) back nearer than it went: a real move
            longest = torch.where(real.any(1), went.masked_fill(~real, 0).amax(1), went.amax(1))
        else:
            real, longest = torch.ones_like(went, dtype=torch.bool), went.amax(1)
        radius = merge * longest.clamp_min(1e-6)  # (F,)
        if level == 1:
            tol[:, 0] = radius
        ctol = repeat(radius, "f -> (f a)", a=A)
        cu = repeat(front_u, "f -> (f a)", a=A)
        cfirst = step if level == 1 else repeat(first[front_u, front_v], "f -> (f a)", a=A)
        own = repeat(front_v, "f -> (f a)", a=A) if rule != "radius" else torch.full_like(cu, -1)  # never a match
        slots = torch.arange(max_nodes, device=dev)[None]
        chunks = [  # (C,) the nearest place this search already has, and its distance, in chunks
            torch.cdist(p[:, None], nodes[c])[:, 0]
            .masked_fill((slots >= count[c][:, None]) | (slots == o[:, None]), float("inf"))
            .min(1)
            for p, c, o in zip(pred.split(256), cu.split(256), own.split(256))
        ]
        nearest, place = torch.cat([c.values for c in chunks]), torch.cat([c.indices for c in chunks])
        if rule == "consistent":  # that place must be one such move from the parent too, or this is a new place
            parents, went_c, opposite = repeat(parent, "f d -> (f a) d", a=A), went.reshape(-1), OPPOSITE.to(dev)[step]
            one_move = lambda q, c: (model.predict(q, opposite[c]) - parents[c]).norm(dim=-1) < went_c[c]
            merging = (real.reshape(-1) & (nearest < ctol)).nonzero().squeeze(1)  # the real moves the merge decides
            nearest[merging] = nearest[merging].masked_fill(
                ~one_move(nodes[cu[merging], place[merging]], merging), float("inf")
            )
        new = (nearest >= ctol) & real.reshape(-1)
        index = torch.arange(len(pred), device=dev)[new]  # each new latent's place among this level's candidates
        pred, cu, cfirst, ctol = pred[new], cu[new], cfirst[new], ctol[new]
        if len(pred):  # two new latents of one search that coincide are one place: keep the first
            close = torch.tril((torch.cdist(pred, pred) < ctol[:, None]) & (cu[:, None] == cu[None]), diagonal=-1)
            if rule == "consistent" and close.any():  # the same test; one parent's moves reach distinct cells
                later, earlier = close.nonzero(as_tuple=True)
                same = one_move(pred[earlier], index[later]) & (index[later] // A != index[earlier] // A)
                close[later, earlier] = same
            keep = ~close.any(1)
            pred, cu, cfirst, ctol = pred[keep], cu[keep], cfirst[keep], ctol[keep]
        order = torch.argsort(cu, stable=True)
        pred, cu, cfirst, ctol = pred[order], cu[order], cfirst[order], ctol[order]
        rank = torch.arange(len(cu), device=dev) - torch.searchsorted(cu, cu)  # position among this search's new
        slot = count[cu] + rank
        fits = slot < max_nodes
        pred, cu, cfirst, ctol, slot = pred[fits], cu[fits], cfirst[fits], ctol[fits], slot[fits]
        nodes[cu, slot], depth[cu, slot], first[cu, slot], tol[cu, slot] = pred, level, cfirst, ctol
        count += torch.bincount(cu, minlength=U)
        front_u, front_v = cu, slot
    return {"nodes": nodes, "count": count, "depth": depth, "first": first, "tol": tol}


def _imagine_all(model: JEPA, emb: torch.Tensor, max_depth: int, max_nodes: int, merge: float, rule: str) -> dict:
    parts = [imagine_map(model, z, max_depth, max_nodes, merge, rule) for z in emb.split(256)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _search_settings(world: World, max_depth, merge, rule: str) -> tuple[int, int]:
    """The imagination search's settings checked, each named in its error, and its size: (max_depth, max_nodes),
    max_depth None -> 2G, room for 2G^2 + 1 places (imagination_policy and imagined_map_fidelity search alike)."""
    max_depth = 2 * world.grid_size if max_depth is None else max_depth
    if isinstance(max_depth, bool) or not isinstance(max_depth, (int, np.integer)) or max_depth < 1:
        raise ValueError(f"max_depth must be an integer >= 1, got {max_depth!r}")
    if isinstance(merge, bool) or not isinstance(merge, (int, float)) or not 0 < merge < 1:
        raise ValueError(f"merge must be a number in (0, 1), got {merge!r}")
    if rule not in IMAGINE_RULES:
        raise ValueError(f"rule must be one of {IMAGINE_RULES}, got {rule!r}")
    return max_depth, 2 * world.grid_size**2 + 1


def imagination_policy(
    model: JEPA,
    world: World,
    max_depth: int | None = None,
    merge: float = 0.5,
    meet: str = "either",
    rule: str = "consistent",
) -> Policy:
    """Plan from two images and the model, nothing else: imagine the places reachable from the current image and
    the places reachable from the goal image (imagine_map; moves are reversible, so a place k moves from the goal is
    k moves to it), find where the two searches meet, and take the first action of the shortest imagined path through
    a meeting place; replan after every step. Searching from both ends halves the depth of each imagined rollout, and
    with it the drift of the imagined latents. A search depends only on its image, so one search per image serves every
    pair and every step that sees it. If the searches do not meet, the planner heads for the imagined place nearest
    the goal image.

    ``rule`` tells a wall bump from a real move, and when a move reaches a place already found (imagine_map):
    "consistent" (default) imagines the opposite action to ask whether the move comes back, and merges it only into a
    place that passes the same test from the parent; "undo" asks the first question only and merges into whatever
    place is near; "radius", the earliest rule, calls anything within ``merge`` x the longest move a bump.
    ``meet``: two imagined places, one from each search, are the same place when "either" search would take the
    other's place as its own (closer than the larger of their two radii) or only when "both" would (the smaller).
    A meeting compares latents that drifted from opposite ends, so "either" allows for both drifts. The defaults
    were chosen on data no reported figure uses: "either" with the earlier rule (merge 0.4) by bench/studies.py
    imagine-tuning, the layouts models on the validation layouts; the undo rule and merge 0.5 on the cpu recipe
    trained on 8 validation layouts, 2 seeds each (mean solved: radius 0.4 82.9%, undo 0.5 92.2%; the undo rule's
    figures for the schedules compared are bench/studies.py recipe-tuning's), and on the layouts models on the
    validation layouts (imagine-tuning: GPU-trained 95.4% -> 97.9%; the CPU-trained model of the time 53.6% ->
    50.7%; the CPU model retrained at batch 256 since, 87.9% -> 90.1%, at 6,500 steps, 94.7% -> 96.9%, and
    at 7,500, 96.1% -> 98.3%: its best of the twelve settings each time). The consistent rule keeps merge 0.5 and
    "either" (its best of six on both layouts models: 97.90% and 98.30% solved, against the undo rule's 97.90% and
    98.25%; at most 0.05 point below it at any setting, and the same on the single-layout models). It mends a failure
    the undo rule has on some trained maps: a door whose latent lies near a cell diagonal to it merges into that cell,
    and a room is lost.
    """
    max_depth, max_nodes = _search_settings(world, max_depth, merge, rule)
    if meet not in ("either", "both"):
        raise ValueError(f"meet must be 'either' or 'both', got {meet!r}")
    seen: dict[int, dict] = {}  # a search depends only on its image: one per image, kept for the episode

    empty = {"nodes": 0.0, "depth": -1, "first": -1, "tol": 0.0}  # what imagine_map leaves in unused slots

    def searches(images: torch.Tensor) -> dict:
        todo = [int(s) for s in images if int(s) not in seen]
        if todo:
            found = _imagine_all(
                model, encode_cells(model, world, torch.tensor(todo)), max_depth, max_nodes, merge, rule
            )
            for i, s in enumerate(todo):  # kept trimmed to the places found: memory grows with places, not max_nodes
                n = int(found["count"][i])
                seen[s] = {k: v[i, :n] if k in empty else v[i] for k, v in found.items()}
        width = max(seen[int(s)]["depth"].shape[0] for s in images)  # stacked, padded as imagine_map pads
        pad = lambda k, v: F.pad(v, (0, 0) * (v.dim() - 1) + (0, width - v.shape[0]), value=empty[k])
        return {
            k: torch.stack([pad(k, seen[int(s)][k]) if k in empty else seen[int(s)][k] for s in images])
            for k in seen[int(images[0])]
        }

    def policy(cells: torch.Tensor, goals: torch.Tensor) -> dict:
        start_u, start_inv = torch.unique(cells, return_inverse=True)
        goal_u, goal_inv = torch.unique(goals, return_inverse=True)
        ahead, back = searches(start_u), searches(goal_u)
        dev = ahead["nodes"].device
        start_inv, goal_inv = start_inv.to(dev), goal_inv.to(dev)
        scores = torch.full((len(cells), len(ACTIONS)), float("inf"), device=dev)
        for rows in torch.arange(len(cells), device=dev).split(256):
            s, t = start_inv[rows], goal_inv[rows]
            dist = torch.cdist(ahead["nodes"][s], back["nodes"][t])  # (R, Vs, Vg)
            radius = (torch.maximum if meet == "either" else torch.minimum)(
                ahead["tol"][s][:, :, None], back["tol"][t][:, None, :]
            )
            valid = (ahead["depth"][s] >= 0)[:, :, None] & (back["depth"][t] >= 0)[:, None, :]
            met = valid & (dist < radius)
            length = (ahead["depth"][s][:, :, None] + back["depth"][t][:, None, :]).float()
            # a meeting costs its imagined path length; without one, (after every meeting) the distance to the
            # goal image's latent in units of the merge radius
            far = 1e3 + dist[:, :, :1] / (2 * ahead["tol"][s][:, :, None].clamp_min(1e-6)) + length[:, :, :1]
            cost = torch.where(met, length, float("inf")).amin(2)  # (R, Vs)
            cost = torch.where(torch.isinf(cost), far[:, :, 0], cost)
            first = ahead["first"][s]
            cost[first < 0] = float("inf")
            scores[rows] = scores[rows].scatter_reduce(1, first.clamp_min(0), cost, reduce="amin")
        scores = scores.cpu()
        return {"action": scores.argmin(1), "scores": scores, "imagined_places": ahead["count"][start_inv].cpu()}

    return policy


def imagination_settings() -> dict:
    """imagination_policy's bump rule, merge radius and meeting rule as defaults - what a figure planned with it used,
    recorded beside the figure (imagine_rule, imagine_merge, imagine_meet)."""
    defaults = inspect.signature(imagination_policy).parameters
    return {f"imagine_{k}": defaults[k].default for k in ("rule", "merge", "meet")}


def shortest_distances(world: World, starts: torch.Tensor, goals: torch.Tensor) -> torch.Tensor:
    """BFS distance of each (start, goal) pair, -1 where unreachable: one BFS per distinct start (so a family of
    many layouts costs no more than its pairs). For evaluation only."""
    unique, inverse = torch.unique(starts, return_inverse=True)
    rows = torch.from_numpy(np.stack([world.bfs_from(int(s)) for s in unique]))  # (U, num_cells)
    return rows[inverse, goals]


def step_budget(world: World, optimal: torch.Tensor) -> int:
    """run_mpc's default number of steps for a batch of pairs with these BFS distances: 2 x the longest + G (31 on
    the 5x5 held-out pairs, 64 on 8x8), room for a detour around each wall a planner meets."""
    return 2 * int(optimal.max()) + world.grid_size


@dataclass
class PlanResult:
    """Outcome of planning every pair: where each episode went and how long it took."""

    starts: torch.Tensor  # (P,)
    goals: torch.Tensor  # (P,)
    paths: torch.Tensor  # (P, max_steps + 1) cell after each step (stays at the goal once reached)
    steps: torch.Tensor  # (P,) steps to reach the goal (max_steps + 1 if never)
    optimal_steps: torch.Tensor  # (P,) BFS distance
    seconds: float
    trace: list = field(default_factory=list)  # per step: the policy's dict (when record=True)

    @property
    def success(self) -> torch.Tensor:
        return self.steps <= self.paths.shape[1] - 1

    @property
    def optimal(self) -> torch.Tensor:
        return self.success & (self.steps == self.optimal_steps)

    def summary(self) -> dict:
        return {
            "pairs": len(self.starts),
            "success": float(self.success.float().mean()),
            "optimal": float(self.optimal.float().mean()),
            "seconds": self.seconds,
            "mean_steps_solved": float(self.steps[self.success].float().mean()) if self.success.any() else float("nan"),
        }

    def by_distance(self) -> dict[int, dict]:
        """Success and optimal share per BFS distance."""
        out = {}
        for d in sorted(set(self.optimal_steps.tolist())):
            m = self.optimal_steps == d
            out[d] = {
                "pairs": int(m.sum()),
                "success": float(self.success[m].float().mean()),
                "optimal": float(self.optimal[m].float().mean()),
            }
        return out


def run_mpc(
    world: World,
    policy: Policy,
    starts: torch.Tensor | None = None,
    goals: torch.Tensor | None = None,
    max_steps: int | None = None,
    record: bool = False,
    remember_bumps: bool = False,
    remember_tried: bool = False,
) -> PlanResult:
    """Closed-loop control of every pair at once: observe -> policy -> act in the real world -> repeat.

    Defaults to all ordered pairs of distinct free cells. Episodes that reached their goal stop there.

    ``remember_bumps``: the agent keeps one fact from its own past - an action after which its image did not change
    walked into a wall, so in this episode it is not taken again from that image; the next-best action by the
    policy's scores is taken instead. In a deterministic world a planner that decides from (image, goal image) alone,
    the same way each time, repeats a bump forever, so for such a planner this changes only episodes that would
    otherwise fail. Each episode remembers its own bumps. With ``record``, a step where memory overrode the policy
    keeps the policy's own choice as "policy_action".

    ``remember_tried``: the agent remembers every action it took from every image in this episode (a bump is one
    case: the image it took it from is the image it sees again). Back at an image it has seen, it takes the action it
    has taken least often from there, the policy's best among those - so an action the model calls a wall bump (an
    infinite score) is tried once every other action has been. The same reasoning holds: a planner that decides from
    (image, goal image) alone, back at an image, would repeat what it did there and loop forever, so this too changes
    only episodes that would otherwise fail - it turns a loop into an exploration led by the policy's scores. With
    both memories, remember_tried decides (a bump is one of the actions it counts).
    """
    if (starts is None) != (goals is None):
        raise ValueError("pass both starts and goals (one goal per start), or neither for every pair")
    if starts is None:
        starts, goals = world.all_pairs()
    starts, goals = (
        check_int_tensor(torch.as_tensor(starts), "starts"),
        check_int_tensor(torch.as_tensor(goals), "goals"),
    )
    if starts.ndim != 1 or starts.shape != goals.shape or not len(starts):
        raise ValueError(
            f"starts and goals must be non-empty 1-D tensors of the same length, got shapes "
            f"{tuple(starts.shape)} and {tuple(goals.shape)}"
        )
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer))):
        raise TypeError(f"max_steps must be an integer >= 1 or None, got {max_steps!r}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    check_flags(remember_bumps=remember_bumps, remember_tried=remember_tried)
    for name, cells in (("start", starts), ("goal", goals)):
        if cells.numel() and (cells.min() < 0 or cells.max() >= world.num_cells):
            raise ValueError(f"{name} cells must lie in [0, {world.num_cells})")
        if world.walls.reshape(-1)[cells.numpy()].any():
            bad = int(cells[torch.from_numpy(world.walls.reshape(-1)[cells.numpy()])][0])
            raise ValueError(f"{name} cell {tuple(int(v) for v in world.cell_pos(bad))} is a wall")
    optimal = shortest_distances(world, starts, goals)
    if (optimal < 0).any():
        raise ValueError("some goals cannot be reached from their start in this layout")
    max_steps = max_steps if max_steps is not None else step_budget(world, optimal)
    t0 = time.perf_counter()
    cells = starts.clone()
    paths, trace = [cells.clone()], []
    steps = torch.full_like(starts, max_steps + 1)
    steps[cells == goals] = 0
    A = len(ACTIONS)
    bumps = torch.zeros(0, dtype=torch.long)  # (episode, cell, action) of each remembered bump, as one number
    N = world.grid_size**2  # an episode stays in one layout: its cells, counted within that layout
    if remember_tried:  # times each action was taken, per episode and image
        check_memory(4.0 * len(starts) * N * A, f"run_mpc(remember_tried=True) for {len(starts):,} pairs")
    tried = torch.zeros(len(starts), N, A, dtype=torch.int32) if remember_tried else None
    for t in range(max_steps):
        active = cells != goals
        if not active.any():
            paths.extend([cells.clone()] * (max_steps - t))
            break
        out = policy(cells[active], goals[active])
        if not isinstance(out, dict) or "action" not in out:
            raise TypeError("a policy must return a dict with an 'action' tensor")
        action = check_actions(out["action"]).cpu()
        n = int(active.sum())
        if action.shape != (n,):
            raise ValueError(f"the policy returned actions of shape {tuple(action.shape)} for {n} pairs")
        if (remember_bumps or remember_tried) and "scores" not in out:
            which = "remember_tried" if remember_tried else "remember_bumps"
            raise TypeError(f"{which} needs a policy that returns 'scores' (its cost of each action)")
        if remember_tried:
            episodes, local = active.nonzero()[:, 0], cells[active] % N
            taken = tried[episodes, local].float()  # (n, A) how often each action was taken from this image
            least = taken == taken.amin(1, keepdim=True)
            # an action the policy rules out (a score of inf) is still preferred to one taken more often from here
            scores = out["scores"].detach().float().cpu().nan_to_num(posinf=torch.finfo(torch.float32).max)
            mine = action  # kept when no other action was taken fewer times from here
            best = scores.masked_fill(~least, float("inf")).argmin(1)
            action = torch.where(least.gather(1, mine[:, None])[:, 0], mine, best)
            out = out | {"action": action, "policy_action": mine}
            tried[episodes, local, action] += 1
        elif remember_bumps:  # this step's (episode, cell, action) keys, (n, A)
            here = (active.nonzero()[:, 0, None] * world.num_cells + cells[active, None]) * A + torch.arange(A)
            if len(bumps):
                known = torch.isin(here, bumps)  # (n, A) actions this episode already saw go nowhere from here
                scores = out["scores"].detach().float().cpu().masked_fill(known, float("inf"))
                mine = action
                action = torch.where(known.gather(1, action[:, None])[:, 0], scores.argmin(1), action)
                out = out | {"action": action, "policy_action": mine}
        if record:
            trace.append({k: v.clone() for k, v in out.items()} | {"active": active.clone()})
        moved = world.next_cell[cells[active], action]
        if remember_bumps and not remember_tried:
            bumps = torch.cat([bumps, here.gather(1, action[:, None])[:, 0][moved == cells[active]]])
        cells[active] = moved
        steps[(cells == goals) & active] = t + 1
        paths.append(cells.clone())
    return PlanResult(starts, goals, torch.stack(paths, 1), steps, optimal, time.perf_counter() - t0, trace)


def sample_pairs(world: World, per_layout: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_layout`` seeded (start, goal) pairs of distinct free cells in each layout of a world (or family):
    two (P,) tensors. Every pair is reachable (layouts are connected)."""
    if isinstance(per_layout, bool) or not isinstance(per_layout, (int, np.integer)) or per_layout < 1:
        raise ValueError(f"per_layout must be an integer >= 1, got {per_layout!r}")
    rng = np.random.default_rng(seed)
    N = world.grid_size**2
    starts, goals = [], []
    for k in range(world.num_cells // N):
        free = world.free_cells[(world.free_cells >= k * N) & (world.free_cells < (k + 1) * N)]
        pick = np.stack([rng.choice(free, size=2, replace=False) for _ in range(per_layout)])
        starts.append(pick[:, 0])
        goals.append(pick[:, 1])
    return torch.from_numpy(np.concatenate(starts)), torch.from_numpy(np.concatenate(goals))


PLANNERS = ("probe", "latent", "nearest", "cem", "search", "imagine", "graph", "random")


def make_policy(name: str, model: JEPA, world: World, probe: LinearProbe | None = None) -> Policy:
    """A planner by name: probe (the write-up's), latent (greedy one-step latent L2 to the goal image), nearest
    (probe-free greedy), cem and search (4^H) with the latent cost, graph (privileged: every cell's image), random."""
    if name == "probe":
        if probe is None:
            probe = fit_probe(encode_states(model, world).cpu().numpy(), world.cell_pos(world.free_cells))
        return probe_policy(model, world, probe)
    makers = {
        "latent": latent_greedy_policy,
        "nearest": nearest_cell_policy,
        "cem": cem_policy,
        "search": exhaustive_policy,
        "imagine": imagination_policy,
        "graph": graph_policy,
    }
    if name == "random":
        return random_policy()
    if name not in makers:
        raise ValueError(f"unknown planner {name!r}; expected one of {PLANNERS}")
    return makers[name](model, world)


@torch.no_grad()
def unseen_layout_report(
    model: JEPA,
    layouts: np.ndarray,
    per_layout: int = 10,
    planners: tuple[str, ...] = ("imagine", "graph", "random"),
    probe: LinearProbe | None = None,
    seed: int = 0,
) -> dict:
    """How a model does in layouts (K, G, G) - e.g. held-out ones it never trained on: next-state accuracy over every
    (free cell, action) pair of each layout, and planning ``per_layout`` seeded start -> goal pairs per layout with
    each planner. "imagine" uses only the two images and the model; "imagine_memory" is the same agent remembering
    its own wall bumps (run_mpc's remember_bumps), "imagine_tried" the same agent remembering every action it took
    from every image (run_mpc's remember_tried); "graph" is privileged (it encodes every free cell of the layout
    first); "probe" needs a ``probe`` fitted elsewhere (on training layouts); BFS is the optimum that "optimal" is
    measured against. Returns plain numbers (per-layout accuracies included)."""
    family = WorldFamily(layouts, image_size=model.encoder.image_size)
    N = family.grid_size**2
    acc = layout_next_state_accuracy(model, family)
    starts, goals = sample_pairs(family, per_layout, seed)
    report = {
        "layouts": len(family),
        "pairs": len(starts),
        "next_state_accuracy": float(acc.mean()),
        "layouts_all_transitions_right": float((acc == 1).mean()),
        "next_state_accuracy_per_layout": [round(float(a), 4) for a in acc],
    }
    for name in planners:
        if name == "graph":  # privileged: built from every free cell's image of the layout, so layout by layout
            parts = []
            for k in range(len(family)):
                member, mine = family.member(k), (starts // N) == k
                parts.append(run_mpc(member, graph_policy(model, member), starts[mine] - k * N, goals[mine] - k * N))
            success = torch.cat([p.success for p in parts]).float()
            optimal = torch.cat([p.optimal for p in parts]).float()
            seconds = sum(p.seconds for p in parts)
            report[name] = {"success": float(success.mean()), "optimal": float(optimal.mean()), "seconds": seconds}
            continue
        if name == "probe":
            if probe is None:
                raise ValueError("the probe planner needs probe= (fitted on training layouts, never on these)")
            policy = probe_policy(model, family, probe)
        else:
            policy = make_policy(name.removesuffix("_memory").removesuffix("_tried"), model, family)
        memory = {"remember_bumps": name.endswith("_memory"), "remember_tried": name.endswith("_tried")}
        summary = run_mpc(family, policy, starts, goals, **memory).summary()
        report[name] = {k: summary[k] for k in ("success", "optimal", "seconds")}
    return report


@torch.no_grad()
def imagined_map_fidelity(
    model: JEPA, world: World, max_depth: int | None = None, merge: float = 0.5, rule: str = "consistent"
) -> dict:
    """How true the imagination search's maps are (privileged: an analysis for the reader, never for planning): from
    every free cell of ``world`` (each member of a WorldFamily on its own), imagine_map runs with imagination_policy's
    settings, and each imagined place is read as the free cell whose true frame's latent lies nearest it. Per depth
    d = 1..max_depth (default 2G, as the planner searches): "complete", the share of searches that imagine every cell
    within d moves at its true (BFS) distance; "no_phantom", the share with no place within d moves that is a cell
    found twice or at the wrong distance. Returns plain lists and the number of searches."""
    if not isinstance(world, World):
        raise TypeError(f"world must be a World or WorldFamily, got {type(world).__name__}")
    max_depth, max_nodes = _search_settings(world, max_depth, merge, rule)
    depths = np.arange(1, max_depth + 1)
    complete, clean = [], []
    was_training = model.training
    model.eval()  # as the planner runs it
    try:
        for member in world.members if isinstance(world, WorldFamily) else [world]:
            free = torch.from_numpy(member.free_cells)
            frames = encode_cells(model, member, free)  # the searches start from these, and are read by them
            found = imagine_map(model, frames, max_depth, max_nodes, merge, rule)
            for u, cell in enumerate(free.tolist()):
                n = int(found["count"][u])
                place = free[torch.cdist(found["nodes"][u, :n], frames).argmin(1).cpu()].numpy()  # (n,) as cells
                depth, true = found["depth"][u, :n].cpu().numpy(), member.bfs_from(cell)
                found_at_true = {int(c) for c, k in zip(place, depth) if true[c] == k}  # cells found at their distance
                complete.append([all(f in found_at_true for f in free.tolist() if true[f] <= d) for d in depths])
                right = true[place] == depth  # (n,) each place at its cell's true distance
                near = depth[None] <= depths[:, None]  # (D, n) the places within d moves
                clean.append([bool(right[m].all()) and len(set(place[m].tolist())) == int(m.sum()) for m in near])
    finally:
        model.train(was_training)
    return {
        "depth": depths.tolist(),
        "complete": np.mean(complete, 0).tolist(),
        "no_phantom": np.mean(clean, 0).tolist(),
        "searches": len(complete),
    }


# ════════════════════════════════════════════════════════════════════════════════════════
# Plots and widgets (used by the notebooks)
# ════════════════════════════════════════════════════════════════════════════════════════


def show_source(obj) -> str:
    """Show the module's own code for ``obj`` (a function, class or method) in a notebook, as a Python code block,
    so the page shows the code that runs - one source of truth. Prints it outside IPython. Returns the source."""
    import textwrap

    src = textwrap.dedent(inspect.getsource(obj))
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(Markdown(f"```python\n{src}```"))
    else:
        print(src)
    return src


def plot_history(history: dict, axes=None):
    """Five panels vs step: prediction loss, SIGReg, latent std, effective rank, next-state accuracy.

    A collapse shows as the std and the rank falling together while the prediction loss goes to 0.
    """
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 5, figsize=(17, 3))
    for ax in axes:
        ax.clear()
    steps = history.get("step", [])
    axes[0].semilogy(steps, history.get("pred_loss", []), label="teacher-forced")
    if "rollout_loss" in history:
        axes[0].semilogy(steps, history["rollout_loss"], label="self-fed rollout")
        axes[0].legend(fontsize=8)
    axes[0].set_title("prediction MSE")
    axes[1].semilogy(steps, history.get("sigreg", []), color="C1")
    axes[1].set_title("SIGReg")
    axes[2].semilogy(steps, history.get("latent_std", []), color="C2")
    axes[2].set_title("latent std per dim (~1 healthy)")
    axes[3].plot(steps, history.get("eff_rank", []), color="C4")
    axes[3].set_title("effective rank of a batch")
    axes[4].plot(history.get("eval_step", []), history.get("next_state_acc", []), "o-", color="C3", ms=3)
    axes[4].set_ylim(-0.05, 1.05)
    axes[4].set_title("next-state accuracy")
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].figure.tight_layout()
    return axes


class LivePlot:
    """Loss and latent-health curves redrawn in place in a notebook while training runs."""

    def __init__(self):
        import matplotlib.pyplot as plt
        from IPython.display import display

        self.plt = plt
        self.fig, self.axes = plt.subplots(1, 5, figsize=(17, 3))
        self.handle = display(self.fig, display_id=True)
        self.last, self.history = 0.0, None
        plt.close(self.fig)

    def update(self, history: dict, every_seconds: float = 3.0) -> None:
        """Redraw at most every few seconds: drawing costs more than a CPU training step."""
        self.history = history
        if time.perf_counter() - self.last >= every_seconds:
            plot_history(history, self.axes)
            self.handle.update(self.fig)
            self.last = time.perf_counter()

    def close(self) -> None:
        if self.history is not None:
            self.update(self.history, every_seconds=0)  # the final state
        self.plt.close(self.fig)


def show_grid(world: World, ax=None, path=None, goal=None, imagined=None, title: str | None = None):
    """A top-down map of the grid: walls, optional path (cells), goal and imagined positions."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    G = world.grid_size
    ax.imshow(np.where(world.walls, 0.25, 0.92), cmap="gray", vmin=0, vmax=1, extent=(-0.5, G - 0.5, G - 0.5, -0.5))
    ax.set_xticks(range(G))
    ax.set_yticks(range(G))
    ax.set_xlabel("col")
    ax.set_ylabel("row")
    ax.grid(False)
    if path is not None:
        p = world.cell_pos(np.asarray(path))
        ax.plot(p[:, 0], p[:, 1], "-o", color="C0", ms=4)
        ax.plot(*p[-1], "o", color="C0", ms=12, label="agent")
    if goal is not None:
        ax.plot(*world.cell_pos(int(goal)), "*", color="C3", ms=16, label="goal")
    if imagined is not None:
        for a, (x, y) in enumerate(np.asarray(imagined)):
            ax.annotate(ACTIONS[a][0].upper(), (x, y), color="C2", ha="center", va="center", fontsize=9, weight="bold")
    if title:
        ax.set_title(title)
    return ax


def image_to_png(images: list[np.ndarray], scale: int = 2) -> bytes:
    """Grayscale images side by side (a small gap between) as PNG bytes, for ipywidgets.Image."""
    from PIL import Image

    gap = np.full((images[0].shape[0], 6), 255, np.uint8)
    row = np.concatenate(sum(([np.asarray(im), gap] for im in images), [])[:-1], axis=1)
    img = Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="png")
    return buf.getvalue()


def transition_explorer(world: World):
    """Widget: pick a start cell and an action, see the image before and after. Works on ipywidgets 7.7 and 8.

    Returns the widget box; its children are driven headlessly by setting .value (observers run at once).
    """
    import ipywidgets as W

    G = world.grid_size
    col = W.Dropdown(options=list(range(G)), value=int(world.free_cells[0] % G), description="col")
    row = W.Dropdown(options=list(range(G)), value=int(world.free_cells[0] // G), description="row")
    action = W.ToggleButtons(options=[(name, i) for i, name in enumerate(ACTIONS)], value=3, description="action")
    image = W.Image(format="png")
    label = W.HTML()
    atlas = world.atlas()

    def update(_=None):
        cell = row.value * G + col.value
        if world.is_wall(cell):
            label.value = f"<b>({col.value}, {row.value}) is a wall</b> - pick another cell"
            image.value = image_to_png([atlas[world.free_cells[0]].numpy()])
            return
        after = int(world.step(torch.tensor([cell]), torch.tensor([action.value]))[0])
        bumped = " - <b>blocked by a wall, the agent stays</b>" if after == cell else ""
        image.value = image_to_png([atlas[cell].numpy(), atlas[after].numpy()])
        after_pos = tuple(int(v) for v in world.cell_pos(after))
        move = f"--{ACTIONS[action.value]}--&gt;"
        label.value = f"before ({col.value}, {row.value}) &nbsp; {move} &nbsp; after {after_pos}{bumped}"

    for w in (col, row, action):
        w.observe(update, names="value")
    update()
    box = W.VBox([W.HBox([col, row]), action, image, label])
    box.update = update
    return box


def planning_player(
    world: World,
    policies: dict[str, Policy],
    start: int | None = None,
    goal: int | None = None,
    max_steps: int | None = None,
    remember_bumps: bool = False,
    remember_tried: bool = False,
):
    """Widget: choose a planner, a start and a goal, then Play or step through the episode.

    Shows the current frame, the map with the path so far, the 4 actions' predicted scores and the
    chosen action. The "remember bumps" and "remember what it tried" boxes plan as run_mpc(remember_bumps=...,
    remember_tried=...) does (their initial states: ``remember_bumps``, ``remember_tried``). Works on ipywidgets 7.7
    and 8 (Play and IntSlider linked in Python, not in the browser).
    """
    import ipywidgets as W
    import matplotlib.pyplot as plt

    free = [int(c) for c in world.free_cells]
    names = {f"({c % world.grid_size}, {c // world.grid_size})": c for c in free}
    planner = W.Dropdown(options=list(policies), description="planner")
    start_w = W.Dropdown(
        options=list(names.items()), value=start if start is not None else free[0], description="start"
    )
    goal_w = W.Dropdown(options=list(names.items()), value=goal if goal is not None else free[-1], description="goal")
    check_flags(remember_bumps=remember_bumps, remember_tried=remember_tried)
    memory = W.Checkbox(value=remember_bumps, description="remember bumps", indent=False)
    tried = W.Checkbox(value=remember_tried, description="remember what it tried", indent=False)
    step = W.IntSlider(min=0, max=0, description="step")
    play = W.Play(min=0, max=0, interval=600)
    W.link((play, "value"), (step, "value"))
    frame, board = W.Image(format="png"), W.Image(format="png")
    info = W.HTML()
    state = {}

    def replan(_=None):
        if start_w.value == goal_w.value:
            info.value = "start and goal are the same cell: pick another goal"
            state["result"] = None
            return
        res = run_mpc(
            world,
            policies[planner.value],
            torch.tensor([start_w.value]),
            torch.tensor([goal_w.value]),
            max_steps=max_steps,
            record=True,
            remember_bumps=memory.value,
            remember_tried=tried.value,
        )
        state["result"] = res
        last = int(min(res.steps[0], res.paths.shape[1] - 1))
        step.max = play.max = last
        step.value = play.value = 0
        show()

    def show(_=None):
        res = state.get("result")
        if res is None:
            return
        t = step.value
        cell = int(res.paths[0, t])
        frame.value = image_to_png([world.atlas()[cell].numpy()])
        fig, ax = plt.subplots(figsize=(3, 3))
        rec = res.trace[t] if t < len(res.trace) else None
        imagined = rec["imagined"][0] if rec is not None and "imagined" in rec else None
        show_grid(world, ax, path=res.paths[0, : t + 1].numpy(), goal=goal_w.value, imagined=imagined)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
        plt.close(fig)
        board.value = buf.getvalue()
        status = "reached the goal" if cell == goal_w.value else f"step {t}/{step.max}"
        lines = [
            f"<b>{planner.value}</b>: {status} &nbsp; (optimal: {int(res.optimal_steps[0])} steps; "
            f"{'solved in ' + str(int(res.steps[0])) if bool(res.success[0]) else 'not solved'})"
        ]
        if rec is not None:
            scores = rec["scores"][0]
            chosen = int(rec["action"][0])
            cells_txt = " ".join(
                f"{'<b>' if a == chosen else ''}{name}: {float(scores[a]):.2f}{'</b>' if a == chosen else ''}"
                for a, name in enumerate(ACTIONS)
            )
            lines.append(f"predicted cost per action - {cells_txt} &nbsp; -> <b>{ACTIONS[chosen]}</b>")
            wanted = int(rec.get("policy_action", rec["action"])[0])
            if wanted != chosen and tried.value:
                lines.append(
                    f"(back at this image: {ACTIONS[wanted]} was taken from it more often than {ACTIONS[chosen]})"
                )
            elif wanted != chosen:
                lines.append(f"({ACTIONS[wanted]} already went nowhere from this image: remembered)")
        info.value = "<br>".join(lines)

    for w in (planner, start_w, goal_w, memory, tried):
        w.observe(replan, names="value")
    step.observe(show, names="value")
    replan()
    box = W.VBox(
        [
            W.HBox([planner, start_w, goal_w]),
            W.HBox([memory, tried]),
            W.HBox([play, step]),
            W.HBox([frame, board]),
            info,
        ]
    )
    box.state = state
    box.controls = {"planner": planner, "start": start_w, "goal": goal_w, "memory": memory, "tried": tried}
    box.controls |= {"step": step, "play": play}
    return box


# ════════════════════════════════════════════════════════════════════════════════════════
# The main job: train, analyse, plan, report
# ════════════════════════════════════════════════════════════════════════════════════════


def evaluate_unseen(model: JEPA, world: WorldFamily, num_layouts: int = 200, per_layout: int = 10) -> dict:
    """Headline metrics of a model trained on generated layouts, measured in worlds it never saw: the first
    ``num_layouts`` held-out layouts (``per_layout`` pairs each) and, on 5x5, the four named ones (100 pairs each).
    Planners: imagine (only the two images and the model), imagine_memory (the same, remembering its wall bumps),
    imagine_tried (the same, remembering every action it took from every image), graph (privileged), the greedy
    probe (its probe fitted on 200 training layouts), random. Optimal means as short as BFS."""
    calibrate_batchnorm(model, world)
    seen = WorldFamily(world.layouts[:200], image_size=world.image_size)
    probe = fit_probe(encode_states(model, seen).cpu().numpy(), seen.cell_pos(seen.free_cells))
    planners = ("imagine", "imagine_memory", "imagine_tried", "graph", "probe", "random")
    sets = {"heldout": heldout_layouts(world.grid_size, num_layouts)}
    if world.grid_size == 5:
        sets["named"] = np.stack([layout_walls(name) for name in LAYOUTS])
    metrics = {"training_layouts_next_state_accuracy": next_state_accuracy(model, seen)}
    metrics |= imagination_settings()  # the search's settings, as these figures were planned
    for name, layouts in sets.items():
        report = unseen_layout_report(model, layouts, per_layout if name == "heldout" else 100, planners, probe)
        metrics[f"{name}_next_state_accuracy"] = report["next_state_accuracy"]
        metrics[f"{name}_layouts_all_right"] = report["layouts_all_transitions_right"]
        metrics[f"{name}_pairs"] = report["pairs"]
        for planner in planners:
            metrics[f"{name}_{planner}_success"] = report[planner]["success"]
            metrics[f"{name}_{planner}_optimal"] = report[planner]["optimal"]
    return metrics


def evaluate(
    model: JEPA,
    world: World,
    cfg: Config,
    planner: str = "probe",
    remember_bumps: bool = False,
    remember_tried: bool = False,
) -> dict:
    """Headline metrics of a trained model on its world: next-state accuracy, the latent's geometry (PCA, latent vs
    grid distance, held-out probes), planning with ``planner`` (its agent remembering its wall bumps with
    ``remember_bumps``, or every action it took with ``remember_tried``, as run_mpc) and with the latent cost alone
    (greedy, no probe). A model trained on generated layouts is measured in layouts it never saw instead
    (evaluate_unseen: planned with each memory and without)."""
    if isinstance(world, WorldFamily):  # the smoke profile (CI) measures 20 held-out layouts, the others 200
        return evaluate_unseen(model, world, num_layouts=20 if cfg.profile == "smoke" else 200)
    calibrate_batchnorm(model, world)
    geometry = geometry_report(model, world)
    memory = {"remember_bumps": remember_bumps, "remember_tried": remember_tried}
    plan = run_mpc(world, make_policy(planner, model, world), **memory).summary()
    latent = run_mpc(world, latent_greedy_policy(model, world)).summary()
    return {
        "next_state_accuracy": next_state_accuracy(model, world),
        "latent_std": geometry["latent_std"],
        "effective_rank": geometry["effective_rank"],
        "pc1_plus_pc2": geometry["pc1"] + geometry["pc2"],
        "spearman_l2_grid": geometry["spearman_l2_grid"],
        "probe_r2_fit": geometry["probe_r2_fit"],
        "probe_r2_heldout": geometry["probe_r2_heldout"],
        "probe_r2_heldout_std": geometry["probe_r2_heldout_std"],
        "probe_r2_ridge_heldout": geometry["probe_r2_ridge_heldout"],
        "planner": planner,
        "remember_bumps": remember_bumps,
        "remember_tried": remember_tried,
        "plan_success": plan["success"],
        "plan_optimal": plan["optimal"],
        "plan_seconds": plan["seconds"],
        "latent_greedy_success": latent["success"],
        "latent_greedy_optimal": latent["optimal"],
    }


RECORD_KIND = "gridjepa run record"


def training_fields(cfg: Config) -> dict:
    """Every field that changes what training produces (all but the bookkeeping ones)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in BOOKKEEPING}


def config_hash(cfg: Config) -> str:
    """A short hash of the training fields: runs that differ in any of them get different default names."""
    return hashlib.sha256(json.dumps(training_fields(cfg), sort_keys=True).encode()).hexdigest()[:8]


def default_out_path(cfg: Config) -> Path:
    """runs/<profile>_<layout, or "procedural">_seed<seed>_<hash of the training fields>.pt"""
    layout = "procedural" if cfg.num_layouts else cfg.layout
    return REPO_ROOT / "runs" / f"{cfg.profile}_{layout}_seed{cfg.seed}_{config_hash(cfg)}.pt"


def record_path(out: str | Path) -> Path:
    """The run record beside checkpoint ``<stem>.pt``: ``<stem>.json``."""
    return Path(out).with_suffix(".json")


def read_record(out: str | Path, cfg: Config) -> dict | None:
    """The existing record of checkpoint ``out`` (None if there is none). Refuses - so that it is never
    overwritten - a file there that is a link, not JSON, not a record this project wrote, or the record of a
    run with other training fields."""
    path = record_path(out)
    if not os.path.lexists(path):
        return None
    if path.is_symlink() or not path.is_file():
        raise FileExistsError(f"refusing to overwrite {path}: it is a link or not a regular file")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FileExistsError(f"refusing to overwrite {path}: it is not a run record ({e})") from None
    ours = isinstance(record, dict) and isinstance(record.get("config"), dict) and "command" in record
    if not ours or record.get("kind", RECORD_KIND) != RECORD_KIND:
        raise FileExistsError(f"refusing to overwrite {path}: it is not a run record written by gridjepa_utils.py")
    if record.get("checkpoint", Path(out).name) != Path(out).name:
        raise FileExistsError(f"refusing to overwrite {path}: it records checkpoint {record['checkpoint']!r}")
    saved = {k: v for k, v in record["config"].items() if k not in BOOKKEEPING}
    diff = [
        f"{k}: record={v!r} vs config={getattr(cfg, k, None)!r}" for k, v in saved.items() if getattr(cfg, k, None) != v
    ]
    if diff:
        raise FileExistsError(
            f"refusing to overwrite {path}: it records a run with other training fields ({', '.join(diff)})"
        )
    return record


def write_record(out: str | Path, record: dict) -> None:
    path = record_path(out)
    _atomic_write(path, lambda f: f.write(json.dumps(record, indent=2).encode()))


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, torch {torch.__version__})"


def _main_run(args, argv, cfg: Config, out: Path, device: torch.device) -> dict:
    record = read_record(out, cfg) if _is_main_process() else None  # refuses before any training
    result = train(cfg, ckpt_path=out, resume=True, device=device)
    if not _is_main_process():
        return {}
    metrics = evaluate(result.model.cpu(), result.world, cfg, args.planner, args.remember_bumps, args.remember_tried)
    command = "python gridjepa_utils.py " + " ".join(argv if argv is not None else sys.argv[1:])
    evaluation = {
        "command": command,
        "planner": args.planner,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": describe_device(device),
        "metrics": metrics,
    }
    if result.steps_trained or record is None:
        metrics["train_seconds"] = result.total_train_seconds
        save_checkpoint(
            out, result.model, cfg, None, cfg.num_steps, result.history, metrics, result.total_train_seconds
        )
        evaluations = (record or {}).get("evaluations", [])
        record = {
            "kind": RECORD_KIND,
            "checkpoint": out.name,
            "config": dataclasses.asdict(cfg),
            "command": (record or {}).get("command", command) if not result.steps_trained else command,
            "train_seconds": result.total_train_seconds,
            "device": describe_device(device),
            "metrics": metrics,
            "evaluations": evaluations,
        }
    record.setdefault("kind", RECORD_KIND)
    record.setdefault("checkpoint", out.name)
    record.setdefault("evaluations", [])
    record["evaluations"].append(evaluation)
    write_record(out, record)
    print(
        f"\n{cfg.profile} profile, "
        + (f"{cfg.num_layouts:,} generated layouts" if cfg.num_layouts else f"layout {args.layout}")
        + f", seed {args.seed}: "
        f"{result.steps_trained} steps trained now, {result.total_train_seconds:.1f} s of training in all"
    )
    for k, v in metrics.items():
        print(f"  {k:24s} {v:.4f}" if isinstance(v, float) else f"  {k:24s} {v}")
    print(f"checkpoint: {out}\nrecord:     {record_path(out)}")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    """Train with a profile (or resume), evaluate, print the headline metrics, save checkpoint + run record.

    A rerun of a finished run only evaluates: its evaluation is appended to the record's "evaluations",
    and the original command, training time and metrics stay as they were.
    """
    parser = argparse.ArgumentParser(description="Train a GridJEPA world model, then analyse and plan with it.")
    parser.add_argument(
        "--profile", default=None, choices=sorted(PROFILES), help="default: $GRIDJEPA_PROFILE or by device"
    )
    parser.add_argument("--layout", default="open", choices=sorted(LAYOUTS))
    parser.add_argument(
        "--layouts",
        default=None,
        help="'procedural': train on 50,000 generated layouts and evaluate on held-out ones (with the 'layouts' "
        "profile, 'layouts_gpu' on a GPU, unless --profile is given); or a number of generated training layouts",
    )
    parser.add_argument("--planner", default="probe", choices=PLANNERS)
    parser.add_argument(
        "--remember-bumps",
        action="store_true",
        help="plan with an agent that does not repeat an action which left its image unchanged (run_mpc)",
    )
    parser.add_argument(
        "--remember-tried",
        action="store_true",
        help="plan with an agent that, back at an image, takes an action it has taken least often from there (run_mpc)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lam", type=float, default=None, help="SIGReg weight >= 0 (default: the profile's)")
    parser.add_argument(
        "--smooth",
        type=float,
        default=None,
        help="temporal-smoothness weight >= 0 (default: the profile's; 0 = the original write-up's pure objective)",
    )
    parser.add_argument(
        "--smooth-ramp",
        type=float,
        default=None,
        help="fraction of training over which the smoothness weight ramps in, in [0, 1] (default: the profile's; "
        "1: over all of it, what obstacle layouts need - notebook 05)",
    )
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="training steps >= 1 (default: the profile's)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size >= 1 (default: the profile's)")
    parser.add_argument(
        "--out",
        default=None,
        help="checkpoint path ending in .pt; the run record is <stem>.json beside it "
        "(default: runs/<profile>_<layout>_seed<seed>_<hash of the training settings>.pt)",
    )
    args = parser.parse_args(argv)
    overrides = {"layout": args.layout, "seed": args.seed}
    if args.layouts is not None:
        if args.layouts == "procedural":
            overrides["num_layouts"] = PROFILES["layouts"]["num_layouts"]
        elif args.layouts.isdigit():
            overrides["num_layouts"] = int(args.layouts)
        else:
            parser.error(f"--layouts must be 'procedural' or a whole number of layouts, got {args.layouts!r}")
        args.profile = args.profile or ("layouts_gpu" if torch.cuda.is_available() else "layouts")
    for key, value in (
        ("lam", args.lam),
        ("smooth_weight", args.smooth),
        ("smooth_ramp", args.smooth_ramp),
        ("seq_len", args.seq_len),
        ("num_steps", args.steps),
        ("batch_size", args.batch_size),
    ):
        if value is not None:
            overrides[key] = value
    try:
        cfg = make_config(args.profile, **overrides)
    except (TypeError, ValueError) as e:
        message = str(e)
        for field, flag in (("num_steps", "--steps"), ("smooth_ramp", "--smooth-ramp"), ("batch_size", "--batch-size")):
            message = message.replace(f"Config.{field}", f"{flag} (Config.{field})")  # flags named unlike their field
        parser.error(message)
    out = Path(args.out) if args.out else default_out_path(cfg)
    if out.suffix != ".pt":
        parser.error(f"--out must end in .pt (its run record is written beside it as <stem>.json), got {str(out)!r}")
    if "LOCAL_RANK" in os.environ and not dist.is_initialized():  # started by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = (
        torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}") if torch.cuda.is_available() else torch.device("cpu")
    )
    lock = output_lock(out) if _is_main_process() else contextlib.nullcontext()
    try:
        if _is_main_process():
            check_writable(out)
        with lock:
            metrics = _main_run(args, argv, cfg, out, device)
    except (OSError, RuntimeError, ValueError) as e:  # refusals: a message, exit status 1, nothing overwritten
        if dist.is_initialized():
            dist.destroy_process_group()
        print(f"error: {e}", file=sys.stderr)
        if args.out and ("another config" in str(e) or "other training fields" in str(e)):
            print("hint: pick another --out, or leave --out out to get a name of this config's own", file=sys.stderr)
        raise SystemExit(1) from None
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
