"""A tiny character-level GPT and its data, built locally: the model of ``stability.py``.

The text is Python's own standard library source (no download): the top-level ``.py`` files
of ``sysconfig.get_paths()["stdlib"]`` in sorted order, cut at a fixed number of characters;
the last 10% is the validation split. The model is nanoGPT's shape (token + position
embeddings, pre-LayerNorm blocks with causal self-attention and a 4x GELU MLP, final
LayerNorm, linear head) without dropout or weight tying, initialised as GPT-2.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VOCAB",
    "Corpus",
    "ModelConfig",
    "TinyGPT",
    "batch_offsets",
    "encode",
    "lm_loss",
    "make_optimizer",
    "stdlib_text",
    "windows",
]

# A fixed vocabulary, so the model's shape does not depend on which files were read: tab,
# newline and printable ASCII; anything else (rare non-ASCII in docstrings) becomes "?".
VOCAB = "\t\n" + "".join(chr(code) for code in range(32, 127))
_INDEX = {ch: i for i, ch in enumerate(VOCAB)}
_UNKNOWN = _INDEX["?"]


def stdlib_text(max_chars: int) -> str:
    """The first ``max_chars`` characters of the standard library's top-level ``.py`` files,
    in sorted order: the same text on every machine with the same Python version."""
    root = Path(sysconfig.get_paths()["stdlib"])
    pieces: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        pieces.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(pieces[-1])
        if total >= max_chars:
            break
    return "".join(pieces)[:max_chars]


def encode(text: str) -> torch.Tensor:
    """Character ids in ``VOCAB`` (int64); unknown characters map to ``?``."""
    return torch.tensor([_INDEX.get(ch, _UNKNOWN) for ch in text], dtype=torch.long)


@dataclass
class Corpus:
    """Train and validation ids. The last ``val_fraction`` of the text is validation, so the
    split is fixed and no validation window overlaps a training one."""

    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def from_stdlib(cls, max_chars: int, val_fraction: float = 0.1) -> Corpus:
        ids = encode(stdlib_text(max_chars))
        cut = int(len(ids) * (1.0 - val_fraction))
        return cls(ids[:cut], ids[cut:])


def windows(
    ids: torch.Tensor, offsets: torch.Tensor, context: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-character targets of the windows starting at ``offsets``."""
    rows = ids.unfold(0, context + 1, 1)[offsets]
    return rows[:, :-1], rows[:, 1:]


def batch_offsets(n_ids: int, context: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Window starts for every training step, drawn from ``seed`` alone, so every
    configuration trained with one seed sees the same batches in the same order."""
    generator = torch.Generator().manual_seed(1_000 + seed)
    return torch.randint(0, n_ids - context - 1, (steps, batch_size), generator=generator)


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    context: int = 64
    vocab: int = len(VOCAB)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (
            t.view(batch, length, self.n_heads, width // self.n_heads).transpose(1, 2)
            for t in self.qkv(x).split(width, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out: torch.Tensor = self.proj(y.transpose(1, 2).reshape(batch, length, width))
        return out


class Block(nn.Module):
    """Pre-LayerNorm: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` with a 4x GELU MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.fc_out = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        out: torch.Tensor = x + self.fc_out(F.gelu(self.fc(self.ln_2(x))))
        return out


class TinyGPT(nn.Module):
    """nanoGPT without dropout or weight tying (tied weights would make one gradguard layer
    out of two); GPT-2 init: normal(0, 0.02), residual projections scaled by
    ``1/sqrt(2 * n_layers)``, zero biases."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab)
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.dim() == 2:
                residual = name.endswith(("proj.weight", "fc_out.weight"))
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if residual else 0.02
                nn.init.normal_(param, 0.0, std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.tok_emb(ids) + self.pos_emb(positions)
        for block in self.blocks:
            h = block(h)
        logits: torch.Tensor = self.head(self.ln_f(h))
        return logits


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy, in nats."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW as nanoGPT sets it up: betas (0.9, 0.95), weight decay 0.1 on matrices and
    embeddings, none on biases and LayerNorm gains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
