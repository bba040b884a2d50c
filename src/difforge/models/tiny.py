"""PixArt-style DiT and SD-style UNet pieces, small enough for CPU tests and demos.

The structure follows the real models so that graph rewrites see what they will see
there: adaLN-single modulation, self- and cross-attention with separate q/k/v
linears, GELU-tanh MLP, gated residuals (DiT); GroupNorm + SiLU + conv with a time
embedding and a skip (UNet resblock).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps, as in DiT/diffusers."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (diffusers' layout)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(context_dim, dim)
        self.to_v = nn.Linear(context_dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, c = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.view(b, -1, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.dropout(self.to_out(out))


class DiTBlock(nn.Module):
    """PixArt block: adaLN-single modulated self-attn, cross-attn, GELU-tanh MLP."""

    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn1 = Attention(dim, heads)
        self.attn2 = Attention(dim, heads, context_dim=dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff1 = nn.Linear(dim, 4 * dim)
        self.ff2 = nn.Linear(4 * dim, dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, context: torch.Tensor, t6: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        mods = (self.scale_shift_table[None] + t6.reshape(b, 6, -1)).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.attn1(h)
        x = x + self.attn2(x, context)
        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        h = self.ff2(F.gelu(self.ff1(h), approximate="tanh"))
        return x + gate_mlp * h


class TinyDiT(nn.Module):
    """A PixArt-α-shaped transformer: patchify, adaLN-single, N blocks, unpatchify."""

    def __init__(
        self,
        in_channels: int = 4,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        patch: int = 2,
        caption_dim: int = 48,
    ) -> None:
        super().__init__()
        self.patch, self.in_channels, self.dim = patch, in_channels, dim
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.t_embed = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.caption_proj = nn.Sequential(
            nn.Linear(caption_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, dim) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.out_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.proj_out = nn.Linear(dim, patch * patch * in_channels)

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, caption: torch.Tensor
    ) -> torch.Tensor:
        b, c, h, w = latents.shape
        p = self.patch
        x = self.patch_embed(latents).flatten(2).transpose(1, 2)
        t = self.t_embed(timestep_embedding(timestep, 256).to(x.dtype))
        t6 = self.t_block(t)
        context = self.caption_proj(caption)
        for block in self.blocks:
            x = block(x, context, t6)
        shift, scale = (self.out_table[None] + t[:, None]).chunk(2, dim=1)
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)
        x = x.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h, w)


class UNetResBlock(nn.Module):
    """SD UNet resnet block: GroupNorm, SiLU, conv, + time embedding, again, + skip."""

    def __init__(self, channels: int, out_channels: int, temb_dim: int, groups: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels, eps=1e-5)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-5)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (
            nn.Conv2d(channels, out_channels, 1) if channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class TinyUNet(nn.Module):
    """Conv in, one down and one up level of resblocks with a skip, conv out."""

    def __init__(self, in_channels: int = 4, channels: int = 32, temb_dim: int = 64) -> None:
        super().__init__()
        self.temb_dim = temb_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(temb_dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim)
        )
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = UNetResBlock(channels, 2 * channels, temb_dim)
        self.downsample = nn.Conv2d(2 * channels, 2 * channels, 3, stride=2, padding=1)
        self.mid = UNetResBlock(2 * channels, 2 * channels, temb_dim)
        self.up = UNetResBlock(4 * channels, channels, temb_dim)
        self.norm_out = nn.GroupNorm(8, channels)
        self.conv_out = nn.Conv2d(channels, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(timestep, self.temb_dim).to(x.dtype))
        h0 = self.down(self.conv_in(x), temb)
        h = self.mid(self.downsample(h0), temb)
        h = F.interpolate(h, size=h0.shape[-2:], mode="nearest")
        h = self.up(torch.cat([h, h0], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))
