#!/usr/bin/env python3
"""A small T5-style encoder-decoder (seeds 002 and 003: T5 chat models), byte-level: RMSNorm,
gated-GELU feed-forward, relative attention replaced by learned positions to stay small. The
task: turn a line of text into upper case.

Following autotune's block contract needs a single state through `blocks`: the state is the
encoder's and the decoder's sequences side by side, [B, S + T, d]. The first blocks are encoder
layers (they update the source half); the rest are decoder layers (causal self-attention and
cross-attention to the encoded source; they update the target half).

Writes examples/t5_small.pt and examples/t5_small.safetensors (4,096 pairs: "input_ids",
"decoder_input_ids", "labels", each [N, 64] I64). Then:

  build/autotune --budget 2G --model examples/t5_small.pt --data examples/t5_small.safetensors \\
      --global-batch 32 --steps 100
"""
import os
import sys
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_io import save_file  # noqa: E402

VOCAB, S, T = 259, 64, 64  # 256 bytes + pad, bos, eos
PAD, BOS, EOS = 256, 257, 258


class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)


class GatedFF(nn.Module):
    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.wi_0 = nn.Linear(d, 2 * d, bias=False)
        self.wi_1 = nn.Linear(d, 2 * d, bias=False)
        self.wo = nn.Linear(2 * d, d, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.drop(F.gelu(self.wi_0(x)) * self.wi_1(x)))


def attention(q, k, v, heads: int, causal: bool, dropout: float, training: bool):
    B, Tq, d = q.shape
    hs = d // heads
    q = q.view(B, Tq, heads, hs).transpose(1, 2)
    k = k.view(B, k.size(1), heads, hs).transpose(1, 2)
    v = v.view(B, v.size(1), heads, hs).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout if training else 0.0, is_causal=causal)
    return y.transpose(1, 2).reshape(B, Tq, d)


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.p, self.s = heads, dropout, S  # attributes: TorchScript has no globals
        self.ln1 = RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.ln2 = RMSNorm(d)
        self.ff = GatedFF(d, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        src, tgt = state[:, : self.s], state[:, self.s :]
        q, k, v = self.qkv(self.ln1(src)).chunk(3, dim=-1)
        src = src + self.drop(self.o(attention(q, k, v, self.heads, False, self.p, self.training)))
        src = src + self.drop(self.ff(self.ln2(src)))
        return torch.cat([src, tgt], dim=1)


class DecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.p, self.s = heads, dropout, S
        self.ln1 = RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o1 = nn.Linear(d, d, bias=False)
        self.ln2 = RMSNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * d, bias=False)
        self.o2 = nn.Linear(d, d, bias=False)
        self.ln3 = RMSNorm(d)
        self.ff = GatedFF(d, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        src, tgt = state[:, : self.s], state[:, self.s :]
        q, k, v = self.qkv(self.ln1(tgt)).chunk(3, dim=-1)
        tgt = tgt + self.drop(self.o1(attention(q, k, v, self.heads, True, self.p, self.training)))
        k, v = self.kv(src).chunk(2, dim=-1)  # the encoder's output (after its final norm)
        tgt = tgt + self.drop(self.o2(attention(self.q(self.ln2(tgt)), k, v, self.heads, False, self.p,
                                                self.training)))
        tgt = tgt + self.drop(self.ff(self.ln3(tgt)))
        return torch.cat([src, tgt], dim=1)


class FinalEncoderNorm(nn.Module):
    """Between the encoder and the decoder layers: T5's final encoder norm, on the source half."""

    def __init__(self, d: int):
        super().__init__()
        self.ln = RMSNorm(d)
        self.s = S

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.ln(state[:, : self.s]), state[:, self.s :]], dim=1)


class T5Small(nn.Module):
    def __init__(self, d: int = 256, heads: int = 4, n_enc: int = 4, n_dec: int = 4, dropout: float = 0.1):
        super().__init__()
        self.shared = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.zeros(S + T, d))
        layers = [EncoderLayer(d, heads, dropout) for _ in range(n_enc)]
        layers.append(FinalEncoderNorm(d))
        layers += [DecoderLayer(d, heads, dropout) for _ in range(n_dec)]
        self.blocks = nn.ModuleList(layers)
        self.ln_f = RMSNorm(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)
        self.s, self.vocab, self.pad = S, VOCAB, PAD
        nn.init.normal_(self.pos, std=0.02)

    @torch.jit.export
    def embed(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        ids = torch.cat([batch["input_ids"], batch["decoder_input_ids"]], dim=1)
        return self.shared(ids) + self.pos

    @torch.jit.export
    def head(self, x: torch.Tensor, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.lm_head(self.ln_f(x[:, self.s :]))
        return F.cross_entropy(logits.float().reshape(-1, self.vocab), batch["labels"].reshape(-1),
                               ignore_index=self.pad)

    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.embed(batch)
        for block in self.blocks:
            x = block(x)
        return self.head(x, batch)


def lines_of_text():
    root = "/usr/share/games/fortunes"
    lines = []
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if name.endswith((".dat", ".u8")) or not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                lines += [l.strip() for l in f.read().split(b"\n") if 8 <= len(l.strip()) < S - 1]
    if not lines:  # no fortunes installed: random lower-case words
        g = torch.Generator().manual_seed(0)
        lines = [bytes(97 + torch.randint(0, 26, (40,), generator=g)).replace(b"e", b" ")
                 for _ in range(5000)]
    return lines


def pairs(n: int):
    lines = lines_of_text()[:n]
    def pad(ids, length):
        return ids[:length] + [PAD] * (length - len(ids[:length]))
    src = [pad(list(l), S) for l in lines]
    tgt = [list(l.upper()) + [EOS] for l in lines]
    labels = [pad(t, T) for t in tgt]
    dec_in = [pad([BOS] + t[:-1], T) for t in tgt]
    return {"input_ids": torch.tensor(src), "decoder_input_ids": torch.tensor(dec_in),
            "labels": torch.tensor(labels)}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    torch.manual_seed(0)
    model = T5Small()
    torch.jit.script(model).save(os.path.join(here, "t5_small.pt"))
    save_file(pairs(4096), os.path.join(here, "t5_small.safetensors"), {"example": "t5_small"})
    n = sum(p.numel() for p in model.parameters())
    print(f"t5_small: {n:,} parameters; wrote {here}/t5_small.pt and .safetensors")


if __name__ == "__main__":
    main()
