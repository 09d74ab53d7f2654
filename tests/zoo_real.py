"""Real architectures for the healthy side of the zoo, small enough for one CPU thread.

Each is the shape practitioners train, at toy scale, with its usual recipe:

* ``NanoGPT``: nanoGPT's model (token + position embeddings, pre-LayerNorm blocks of causal
  self-attention and a 4x GELU MLP, final LayerNorm, a head tied to the token embedding,
  GPT-2 init), AdamW (betas 0.9/0.95, weight decay 0.1 on matrices) with linear warm-up,
  character-level on Python's own standard library source;
* ``ResNet``: a stem and three basic residual blocks (conv-BN-ReLU-conv-BN plus the
  shortcut, a 1x1 conv+BN where the shape changes, the last BN of each block
  zero-initialised as torchvision's ``zero_init_residual``) on 8x8 digits, SGD with
  Nesterov momentum and weight decay;
* ``CharLSTM``: embedding -> 2-layer LSTM -> linear head, Adam, on the same text;
* ``ViT``: 2x2 patches of 8x8 digits through a strided conv, a class token and learnt
  positions, pre-LayerNorm ``nn.TransformerEncoderLayer`` blocks, AdamW with warm-up.

The text is the first characters of the standard library's top-level ``.py`` files in
sorted order (no download; the same on every machine with the same Python version).
"""

from __future__ import annotations

import math
import sysconfig
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VOCAB",
    "CharLSTM",
    "NanoGPT",
    "ResNet",
    "ViT",
    "char_windows",
    "python_text_ids",
    "warmup",
]

# Tab, newline and printable ASCII; anything else becomes "?".
VOCAB = "\t\n" + "".join(chr(code) for code in range(32, 127))
_INDEX = {ch: i for i, ch in enumerate(VOCAB)}


@lru_cache(maxsize=1)
def python_text_ids(max_chars: int = 200_000) -> torch.Tensor:
    """Character ids of the first ``max_chars`` characters of the standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    pieces: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        pieces.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(pieces[-1])
        if total >= max_chars:
            break
    text = "".join(pieces)[:max_chars]
    unknown = _INDEX["?"]
    return torch.tensor([_INDEX.get(ch, unknown) for ch in text], dtype=torch.long)


def char_windows(
    context: int, batch_size: int, seed: int
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """A source of (inputs, next-character targets) batches of random text windows."""
    ids = python_text_ids()
    rows = ids.unfold(0, context + 1, 1)
    gen = torch.Generator().manual_seed(seed)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        picked = rows[torch.randint(0, rows.shape[0], (batch_size,), generator=gen)]
        return picked[:, :-1], picked[:, 1:]

    return draw


def warmup(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from lr/steps to lr over ``steps`` steps, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / steps))


# ---------------------------------------------------------------------------- nanoGPT
class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (
            t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)
            for t in self.c_attn(x).split(width, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out: torch.Tensor = self.c_proj(y.transpose(1, 2).reshape(batch, length, width))
        return out


class GPTBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        out: torch.Tensor = x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))
        return out


class NanoGPT(nn.Module):
    """nanoGPT at toy scale (no dropout); the head shares the token embedding's weight."""

    def __init__(self, layers: int = 2, width: int = 64, heads: int = 4, context: int = 32) -> None:
        super().__init__()
        self.wte = nn.Embedding(len(VOCAB), width)
        self.wpe = nn.Embedding(context, width)
        self.h = nn.ModuleList(GPTBlock(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, len(VOCAB), bias=False)
        self.lm_head.weight = self.wte.weight
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(param, 0.0, std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        logits: torch.Tensor = self.lm_head(self.ln_f(x))
        return logits


# ---------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        nn.init.zeros_(self.bn2.weight)  # torchvision's zero_init_residual
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem + three basic blocks (16, 32 with stride 2, 32 channels), global pool, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.layer3 = BasicBlock(32, 32)
        self.fc = nn.Linear(32, 10)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        out: torch.Tensor = self.fc(x.mean(dim=(2, 3)))
        return out


# ---------------------------------------------------------------------------- LSTM
class CharLSTM(nn.Module):
    """Character embedding -> 2-layer LSTM -> linear head over the vocabulary."""

    def __init__(self, embed: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, len(VOCAB))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.embed(ids))
        out: torch.Tensor = self.head(states)
        return out


# ---------------------------------------------------------------------------- ViT
class ViT(nn.Module):
    """2x2 patches of an 8x8 image (16 tokens) + a class token, pre-LN encoder, head."""

    def __init__(self, width: int = 48, layers: int = 3, heads: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, width, kernel_size=2, stride=2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            dim_feedforward=2 * width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(images).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.pos_embed
        out: torch.Tensor = self.head(self.norm(self.encoder(x))[:, 0])
        return out
