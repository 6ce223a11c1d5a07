"""The `cpu` profile's training recipe written as plain PyTorch, with no project code: the yardstick that
bench/benchmark.py times the project's training against.

Same model (a one-block ViT on 32x32 pooled frames with a CLS token and a BatchNorm projector, a two-block AdaLN-zero
predictor), same loss (MSE to the next latent + lam * SIGReg + a ramped smoothness term), same batch, AdamW, warm-up
and cosine schedule and gradient clipping. What it leaves out is what the project adds: the 25 cells' images are
plain squares in a preloaded uint8 atlas, and there are no checks, logs, evaluations or checkpoints.

    python bench/baseline.py --steps 100    # steps/s of this loop alone
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# the `cpu` profile's numbers, restated (nothing is read from the project)
RECIPE = dict(grid=5, image=128, input=32, patch=8, width=128, depth=1, heads=4, latent=192, proj_hidden=2048)
RECIPE |= dict(pred_width=128, pred_depth=2, pred_heads=4, lam=0.1, dirs=256, knots=17, smooth=5.0, ramp=0.5)
RECIPE |= dict(batch=64, steps=450, lr=1e-3, weight_decay=1e-3, warmup=50, clip=1.0, transitions=50_000)
MOVES = ((0, -1), (0, 1), (-1, 0), (1, 0))  # (dcol, drow) of up, down, left, right


def make_data(r: dict = RECIPE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An open G x G grid: atlas (N, H, W) uint8, one bright square per cell; states (B, 2) long; actions (B,) long."""
    G, S = r["grid"], r["image"]
    atlas = torch.full((G * G, S, S), 30, dtype=torch.uint8)
    side = S // G
    for cell in range(G * G):
        row, col = divmod(cell, G)
        atlas[cell, row * side : (row + 1) * side, col * side : (col + 1) * side] = 220
    nxt = torch.empty(G * G, 4, dtype=torch.long)  # the cell after each action; off the board stays put
    for cell in range(G * G):
        row, col = divmod(cell, G)
        for a, (dc, dr) in enumerate(MOVES):
            c, rr = col + dc, row + dr
            nxt[cell, a] = rr * G + c if 0 <= c < G and 0 <= rr < G else cell
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(G * G, (r["transitions"],), generator=gen)
    actions = torch.randint(4, (r["transitions"],), generator=gen)
    return atlas, torch.stack([start, nxt[start, actions]], 1), actions


class Encoder(nn.Module):
    """(B, 1, 128, 128) -> (B, D): average-pool to 32x32, 8x8 patches, CLS token, pre-norm blocks, BN projector."""

    def __init__(self, r: dict = RECIPE):
        super().__init__()
        self.pool = r["image"] // r["input"]
        self.patch = nn.Conv2d(1, r["width"], r["patch"], r["patch"])
        self.cls = nn.Parameter(torch.zeros(1, 1, r["width"]))
        self.pos = nn.Parameter(torch.randn(1, (r["input"] // r["patch"]) ** 2 + 1, r["width"]) * 0.02)
        layer = nn.TransformerEncoderLayer(r["width"], r["heads"], 4 * r["width"], 0.0, "gelu", batch_first=True)
        layer.norm_first = True
        self.blocks = nn.TransformerEncoder(layer, r["depth"], enable_nested_tensor=False)
        self.norm = nn.LayerNorm(r["width"])
        self.proj = nn.Sequential(
            nn.Linear(r["width"], r["proj_hidden"]),
            nn.BatchNorm1d(r["proj_hidden"]),
            nn.GELU(),
            nn.Linear(r["proj_hidden"], r["latent"]),
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = self.patch(F.avg_pool2d(obs, self.pool) * 2 - 1).flatten(2).transpose(1, 2)  # (B, P, W)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        return self.proj(self.norm(self.blocks(x))[:, 0])  # (B, D)


class Block(nn.Module):
    """Pre-norm transformer block, its norms shifted/scaled and residuals gated by the action (AdaLN-zero)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.mod = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.mod[1].weight)
        nn.init.zeros_(self.mod[1].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.mod(cond).chunk(6, -1)
        h = self.norm1(x) * (1 + sc1) + sh1
        x = x + g1 * self.attn(h, h, h, need_weights=False)[0]
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)


class Predictor(nn.Module):
    """(B, 1, D) latent + (B, 1) action -> (B, 1, D) next latent."""

    def __init__(self, r: dict = RECIPE):
        super().__init__()
        W = r["pred_width"]
        self.inp, self.time = nn.Linear(r["latent"], W), nn.Parameter(torch.randn(1, 16, W) * 0.02)
        self.act = nn.Embedding(4, W)
        self.blocks = nn.ModuleList(Block(W, r["pred_heads"]) for _ in range(r["pred_depth"]))
        self.norm, self.out = nn.LayerNorm(W), nn.Linear(W, r["latent"])

    def forward(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        x, cond = self.inp(z) + self.time[:, : z.shape[1]], self.act(a)
        for block in self.blocks:
            x = block(x, cond)
        return self.out(self.norm(x))


def sigreg(z: torch.Tensor, r: dict = RECIPE) -> torch.Tensor:
    """Epps-Pulley statistic of z (B, D) on random unit directions, against N(0, 1): trapezoid rule on [0, 3]."""
    dirs = torch.randn(z.shape[1], r["dirs"])
    x = z @ (dirs / dirs.norm(dim=0))  # (B, M)
    t = torch.linspace(0, 3, r["knots"])
    w = torch.full_like(t, 3 / (r["knots"] - 1))
    w[[0, -1]] /= 2
    xt = x.unsqueeze(-1) * t  # (B, M, K)
    err = (xt.cos().mean(0) - torch.exp(-0.5 * t**2)) ** 2 + xt.sin().mean(0) ** 2
    return len(z) * (err * 2 * w * torch.exp(-0.5 * t**2)).sum(-1).mean()


def lr_at(step: int, r: dict = RECIPE) -> float:
    if step < r["warmup"]:
        return r["lr"] * (step + 1) / r["warmup"]
    return r["lr"] * 0.5 * (1 + math.cos(math.pi * (step - r["warmup"]) / max(1, r["steps"] - r["warmup"])))


class Baseline:
    """The model, its optimiser and its data; ``step(k)`` takes training step k."""

    def __init__(self, r: dict = RECIPE, seed: int = 0, device="cpu"):
        torch.manual_seed(seed)
        self.r, self.device = r, torch.device(device)
        self.encoder, self.predictor = Encoder(r).to(device), Predictor(r).to(device)
        self.params = [*self.encoder.parameters(), *self.predictor.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=r["lr"], weight_decay=r["weight_decay"])
        atlas, self.states, self.actions = make_data(r, seed)
        self.atlas = atlas.to(device)

    def loss(self, obs: torch.Tensor, actions: torch.Tensor, step: int) -> torch.Tensor:
        """obs (B, 2, 1, H, W), actions (B,) -> the scalar loss."""
        B = obs.shape[0]
        z = self.encoder(obs.flatten(0, 1)).view(B, 2, -1)  # (B, 2, D)
        pred = self.predictor(z[:, :1], actions[:, None])  # (B, 1, D)
        smooth = self.r["smooth"] * min(1.0, (step + 1) / (self.r["ramp"] * self.r["steps"]))
        loss = F.mse_loss(pred, z[:, 1:]) + self.r["lam"] * sigreg(z.flatten(0, 1), self.r)
        return loss + smooth * F.mse_loss(z[:, 1:], z[:, :-1])

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.states), (self.r["batch"],), generator=torch.Generator().manual_seed(step))
        obs = self.atlas[self.states[idx].to(self.device)].float().div_(255).unsqueeze(2)  # (B, 2, 1, H, W)
        return obs, self.actions[idx].to(self.device)

    def step(self, step: int, loss_fn=None) -> float:
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, self.r)
        obs, actions = self.batch(step)
        loss = (loss_fn or self.loss)(obs, actions, step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.params, self.r["clip"])
        self.opt.step()
        return loss.detach()


def steps_per_second(steps: int, device="cpu", seed: int = 0) -> float:
    """Steps/s of ``steps`` baseline steps (after 3 warm-up steps), synchronised on a GPU."""
    run = Baseline(device=device, seed=seed)
    for k in range(3):
        run.step(k)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(3, 3 + steps):
        run.step(k)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    print(f"baseline ({args.device}): {steps_per_second(args.steps, args.device):.2f} steps/s")
