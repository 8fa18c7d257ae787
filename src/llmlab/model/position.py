"""Position information: sinusoidal and learned absolute embeddings, RoPE with its context-extension
scalings, and ALiBi slopes.

RoPE uses the "rotate half" layout (the first and second halves of the rotary dims form the pairs), which
is what Hugging Face Llama/Qwen2/Mistral checkpoints expect.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d))."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    inv = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)[:, : dim // 2]
    return table.float()


# ---------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies θ_i for i in [0, rotary_dim/2) and the attention scaling applied to cos/sin.

    Plain RoPE (Su et al. 2021): θ_i = base^(-2i/d). The scalings stretch the usable context by `rope_factor`:
      linear      position interpolation (Chen et al. 2023): θ_i / s
      ntk         NTK-aware base change (bloc97 2023): base' = base · s^(d/(d-2))
      dynamic_ntk base' = base · (s·L/L0 - (s-1))^(d/(d-2)) once the sequence length L exceeds L0
      yarn        YaRN (Peng et al. 2023): per-dim blend of θ_i and θ_i/s by a linear ramp over the
                  wavelengths between β_fast and β_slow rotations in L0; cos/sin scaled by
                  mscale(m)/mscale(m_all), mscale(m) = 0.1·m·ln(s) + 1 (0.1·ln(s) + 1 by default)
      llama3      Llama 3.1: θ_i/s for wavelengths above L0/low_freq_factor, θ_i below
                  L0/high_freq_factor, smooth blend between
    """
    d = cfg.rotary_dim
    base = cfg.rope_theta
    s = cfg.rope_factor
    L0 = cfg.rope_original_max_seq_len
    exponents = torch.arange(0, d, 2, dtype=torch.float64) / d
    kind = cfg.rope_scaling
    scaling = 1.0
    if kind == "ntk":
        base = base * s ** (d / (d - 2))
    elif kind == "dynamic_ntk" and seq_len is not None and seq_len > L0:
        base = base * (s * seq_len / L0 - (s - 1)) ** (d / (d - 2))
    inv_freq = base ** -exponents
    if kind == "linear":
        inv_freq = inv_freq / s
    elif kind == "yarn":
        inv_freq, scaling = _yarn(inv_freq, cfg)
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, cfg)
    return inv_freq.float(), scaling


def _yarn_correction_dim(n_rotations: float, d: int, base: float, L0: int) -> float:
    # The dimension index whose wavelength fits n_rotations times into L0: solve L0 / (2π base^(2i/d)) = n.
    return d * math.log(L0 / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def _yarn(inv_freq: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    d, s, L0 = cfg.rotary_dim, cfg.rope_factor, cfg.rope_original_max_seq_len
    low = max(math.floor(_yarn_correction_dim(cfg.yarn_beta_fast, d, cfg.rope_theta, L0)), 0)
    high = min(math.ceil(_yarn_correction_dim(cfg.yarn_beta_slow, d, cfg.rope_theta, L0)), d - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 for high-frequency dims (kept), 0 for low-frequency dims (interpolated)
    inv = inv_freq / s * (1 - extrapolate) + inv_freq * extrapolate
    return inv, yarn_mscale(s, cfg.yarn_mscale) / yarn_mscale(s, cfg.yarn_mscale_all_dim)


def yarn_mscale(s: float, m: float) -> float:
    """YaRN's attention temperature √(1/t) = 0.1·m·ln(s) + 1 (Peng et al. 2023, eq. 22 with DeepSeek's weight m);
    1 when nothing is stretched or m = 0."""
    return 0.1 * m * math.log(s) + 1.0 if s > 1 else 1.0


def _llama3(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    s, L0 = cfg.rope_factor, cfg.rope_original_max_seq_len
    lo, hi = cfg.llama3_low_freq_factor, cfg.llama3_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (L0 / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * inv_freq / s + smooth * inv_freq
    out = torch.where(wavelen > L0 / lo, inv_freq / s, inv_freq)
    mid = (wavelen <= L0 / lo) & (wavelen >= L0 / hi)
    return torch.where(mid, blended, out)


class Rotary(nn.Module):
    """Computes cos/sin for given positions; recomputes θ per sequence when dynamic NTK sees a longer one."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        inv_freq, self.scaling = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype,
                sequences: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, rotary_dim] (broadcast over heads). sequences [B, T]: which
        sequence each token belongs to when a row packs several (runs of equal ids); None: one per row."""
        inv_freq = self.inv_freq
        if self.cfg.rope_scaling == "dynamic_ntk" and int(positions.max()) >= self.cfg.rope_original_max_seq_len:
            inv_freq = self._dynamic_inv_freq(positions, sequences).to(inv_freq)
        angles = positions[..., None].float() * inv_freq
        angles = torch.cat((angles, angles), dim=-1)[:, None]
        return (angles.cos() * self.scaling).to(dtype), (angles.sin() * self.scaling).to(dtype)

    def _dynamic_inv_freq(self, positions: torch.Tensor, sequences: torch.Tensor | None) -> torch.Tensor:
        """[B, T, rotary_dim/2]: θ for each token by the length of its own sequence (its largest position + 1),
        so padding or a longer neighbour in the batch or the packed row changes nothing (transformers takes the
        batch's longest row for all)."""
        if sequences is None:
            length = positions.amax(dim=-1, keepdim=True).expand_as(positions) + 1
        else:
            run = run_starts(sequences).long().cumsum(dim=1) - 1  # index of each token's run within its row
            last = torch.zeros_like(positions).scatter_reduce(1, run, positions, "amax", include_self=False)
            length = last.gather(1, run) + 1
        L0 = self.cfg.rope_original_max_seq_len
        lengths, index = torch.unique(length.clamp(min=L0), return_inverse=True)  # up to L0 all are plain RoPE
        table = torch.stack([rope_inv_freq(self.cfg, n)[0] for n in lengths.tolist()])
        return table.to(positions.device)[index]


def run_starts(ids: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: True where a run of equal ids (a packed document or sequence) begins."""
    return F.pad(ids[:, 1:] != ids[:, :-1], (1, 0), value=True)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; rotates the first cos.shape[-1] dims (partial rotary leaves the rest as they are)."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


# ---------------------------------------------------------------------------------------------- ALiBi
def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Press et al. 2022: for n a power of two, slopes 2^(-8/n), 2^(-16/n), ...; otherwise the slopes of the
    nearest lower power of two followed by every other slope of the next power of two."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if n_heads & (n_heads - 1) == 0:
        return torch.tensor(power_of_two(n_heads))
    lower = 2 ** math.floor(math.log2(n_heads))
    extra = power_of_two(2 * lower)[0::2][: n_heads - lower]
    return torch.tensor(power_of_two(lower) + extra)
