"""A GPT-style causal language model, nanoGPT-like and small enough for edge boards.

Token + position embeddings, pre-LayerNorm transformer blocks (causal self-attention, GELU MLP),
a final LayerNorm and a language-model head **tied** to the token embedding.

Layer groups: ``embed`` (token and position embeddings), ``blocks.0`` .. ``blocks.{L-1}``, ``head``
(the final LayerNorm). The tied head weight has one owner and one wire name: ``embed.tok.weight``.
The head is computed as ``x @ embed.tok.weight.T`` (no second module holding the tensor), so
``state_dict()``, ``named_parameters()`` and the exported ONNX all carry that tensor once. Whoever
trains ``embed`` therefore trains the output projection too; ``head`` alone trains only ``ln_f``.

Input: int64 token ids [B, T] with T <= block_size; output: logits [B, T, vocab_size].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 259  # byte-level: 256 bytes + <bos>, <eos>, <pad>
    block_size: int = 64  # longest sequence (position embeddings)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads
    n_embd: int = 128  # model width (divisible by n_head)
    dropout: float = 0.0  # attention and residual dropout
    bias: bool = True  # biases in Linear and LayerNorm


class CausalSelfAttention(nn.Module):
    mask: torch.Tensor  # bool [1, 1, block_size, block_size], lower triangle: position i sees 0..i

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd {config.n_embd} is not divisible by n_head {config.n_head}")
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)
        mask = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer("mask", mask.view(1, 1, config.block_size, config.block_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape  # [B, T, C]
        qkv = self.qkv(x)  # [B, T, 3C]
        q, k, v = qkv[..., :c], qkv[..., c : 2 * c], qkv[..., 2 * c :]  # slicing, not split (exporters)
        q = q.reshape(b, t, self.n_head, c // self.n_head).transpose(1, 2)  # [B, H, T, D]
        k = k.reshape(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.reshape(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))  # [B, H, T, T]
        att = att.masked_fill(~self.mask[:, :, :t, :t], float("-inf"))
        att = self.drop(torch.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, t, c)  # [B, T, C]
        out: torch.Tensor = self.drop(self.proj(y))
        return out


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.drop(self.proj(F.gelu(self.fc(x))))  # [B, T, C]
        return out


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        out: torch.Tensor = x + self.mlp(self.ln_2(x))
        return out


class Embeddings(nn.Module):
    """Token and position embeddings; ``tok.weight`` is also the (tied) output projection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        positions = torch.arange(t, dtype=torch.long, device=idx.device)  # [T]
        out: torch.Tensor = self.drop(self.tok(idx) + self.pos(positions))  # [B, T, C]
        return out


class Head(nn.Module):
    """The final LayerNorm; the projection to the vocabulary uses the embedding's weight."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor, tok_weight: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.ln_f(x) @ tok_weight.t()  # [B, T, V]
        return out


class GPT(nn.Module):
    """Groups: embed, blocks.0 .. blocks.{n_layer-1}, head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Embeddings(config)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.head = Head(config)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():  # GPT-2: scaled init of residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def group_names(self) -> list[str]:
        return ["embed", *(f"blocks.{i}" for i in range(len(self.blocks))), "head"]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds block_size {self.config.block_size}")
        x = self.embed(idx)  # [B, T, C]
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.head(x, self.embed.tok.weight)  # [B, T, V]
        return logits
