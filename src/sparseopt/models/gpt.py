"""A small GPT-style decoder for SuPar/μP experiments (paper 004's proxy architecture, laptop sized).

Pre-LN blocks, ALiBi attention biases (no positional embedding), SwiGLU MLP, tied or untied embeddings. The hidden
projections are plain ``nn.Linear`` modules that :class:`sparseopt.SparseTraining` can mask:

    blocks.{i}.attn.qkv.weight   (3d, d)     hidden
    blocks.{i}.attn.proj.weight  (d, d)      hidden, residual projection
    blocks.{i}.ffn.up.weight     (2h, d)     hidden (gate and up, fused)
    blocks.{i}.ffn.down.weight   (d, h)      hidden, residual projection

Select exactly those with ``include=GPT.SPARSE_INCLUDE`` (``["blocks.*"]``). The unembedding is not an
``nn.Linear`` so default selections never pick it. Forward multipliers (α_in, α_out/m_d, attention scale) come from
:meth:`GPT.set_parameterization`; without one the model is SP (1, 1, 1/sqrt(d_head)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layer: int = 4
    d_head: int = 32
    ctx: int = 128
    ffn_ratio: float = 3.0
    tied: bool = True
    bias: bool = False

    def __post_init__(self) -> None:
        for k in ("vocab_size", "d_model", "n_layer", "d_head", "ctx"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive int, got {v!r}")
        if self.d_model % self.d_head:
            raise ValueError(f"d_model={self.d_model} is not a multiple of d_head={self.d_head}")
        if not self.ffn_ratio > 0:
            raise ValueError(f"ffn_ratio must be positive, got {self.ffn_ratio!r}")

    @property
    def n_head(self) -> int:
        return self.d_model // self.d_head

    @property
    def d_ffn(self) -> int:
        return max(1, int(round(self.ffn_ratio * self.d_model)))


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al.): geometric 2^(-8 i / n); non-powers of two interleave the next power."""
    def pow2(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        return torch.tensor(pow2(n_head))
    closest = 2 ** math.floor(math.log2(n_head))
    extra = pow2(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(pow2(closest) + extra)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.scale = 1.0 / math.sqrt(cfg.d_head)
        self.register_buffer("slopes", alibi_slopes(cfg.n_head), persistent=False)

    def bias_mask(self, t: int, device, dtype) -> torch.Tensor:
        pos = torch.arange(t, device=device)
        dist = (pos[:, None] - pos[None, :]).to(dtype)  # i - j >= 0 for visible keys
        bias = -self.slopes.to(dtype)[:, None, None] * dist
        return bias.masked_fill(pos[None, :] > pos[:, None], float("-inf"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias_mask(t, x.device, q.dtype),
                                           scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, 2 * cfg.d_ffn, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ffn, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.ffn = SwiGLU(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class Unembedding(nn.Module):
    """Untied readout weight (vocab, d); deliberately not an nn.Linear so sparse selections skip it."""

    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, d))
        nn.init.normal_(self.weight, std=0.02)


class GPT(nn.Module):
    """Byte-level GPT decoder; ``forward(idx) -> logits (B, T, vocab)``; ``loss(idx, targets)``."""

    SPARSE_INCLUDE = ("blocks.*",)

    def __init__(self, cfg: GPTConfig | None = None, parameterization=None, **kwargs) -> None:
        super().__init__()
        if cfg is None:
            cfg = GPTConfig(**kwargs)
        elif kwargs:
            raise TypeError("give either a GPTConfig or keyword arguments, not both")
        self.cfg = cfg
        self.n_layer = cfg.n_layer
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = None if cfg.tied else Unembedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.wte.weight, std=0.02)
        for name, p in self.named_parameters():
            if p.dim() == 2 and name.startswith("blocks."):
                nn.init.normal_(p, std=0.02)
        self.input_mult = 1.0
        self.output_mult = 1.0
        if parameterization is not None:
            self.set_parameterization(parameterization)

    # ---- parameterization hooks -------------------------------------------------------------------------
    def set_parameterization(self, parameterization) -> GPT:
        """Read α_in, α_out/m_d and the attention scale from a :class:`~sparseopt.parameterization.Parameterization`
        (does not re-initialise: call ``parameterization.init_(model)`` for that)."""
        mults = parameterization.forward_multipliers(self.cfg.d_head)
        self.input_mult = mults["input_mult"]
        self.output_mult = mults["output_mult"]
        for block in self.blocks:
            block.attn.scale = mults["attn_scale"]
        return self

    def roles(self) -> dict[str, str]:
        out = {}
        for name, p in self.named_parameters():
            if name == "wte.weight":
                out[name] = "input"
            elif name == "lm_head.weight":
                out[name] = "output"
            elif p.dim() >= 2:
                out[name] = "hidden"
            else:
                out[name] = "vector"
        return out

    def residual_projections(self) -> list[str]:
        return [f"blocks.{i}.{m}.weight" for i in range(self.cfg.n_layer) for m in ("attn.proj", "ffn.down")]

    def hidden_names(self) -> list[str]:
        return [n for n, r in self.roles().items() if r == "hidden"]

    # ---- forward --------------------------------------------------------------------------------------------
    def unembedding_weight(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, time) token ids, got shape {tuple(idx.shape)}")
        if idx.shape[1] > self.cfg.ctx:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds the context {self.cfg.ctx}")
        x = self.wte(idx) * self.input_mult
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.unembedding_weight()) * self.output_mult

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def gpt_tiny(**kwargs) -> GPT:
    """The laptop default: d=128, 4 layers, 4 heads of 32, ctx 128, byte vocab (~0.9 M parameters)."""
    return GPT(GPTConfig(**kwargs))
