#!/usr/bin/env python3
"""A three-stream fusion classifier in the shape of seed 000: text (768), video (256) and audio
(768) features of a clip, fused by cross-attention, classified into 300 clusters.

Writes examples/fusion_classifier.pt (TorchScript, block contract) and
examples/fusion_classifier.safetensors (1,024 synthetic clips: "text" [N, 16, 768] F16,
"video" [N, 8, 256] F16, "audio" [N, 16, 768] F16, "label" [N] I64; features stored in F16 and
widened by the model, as extracted features often are). Then:

  build/autotune --budget 1G --model examples/fusion_classifier.pt \\
      --data examples/fusion_classifier.safetensors --global-batch 64 --steps 50
"""
import os
import sys
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_io import save_file  # noqa: E402

TEXT, VIDEO, AUDIO, CLASSES = 768, 256, 768, 300
T_TEXT, T_VIDEO, T_AUDIO = 16, 8, 16


class FusionBlock(nn.Module):
    """Text tokens attend to video and audio tokens, then to each other, then an MLP.
    The state is all three streams side by side: [B, T_TEXT + T_VIDEO + T_AUDIO, d]."""

    def __init__(self, d: int, heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.t_text = T_TEXT  # TorchScript reads module attributes, not Python globals
        self.ln_q = nn.LayerNorm(d)
        self.ln_kv = nn.LayerNorm(d)
        self.cross = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ln_s = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ln_m = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        text, other = x[:, : self.t_text], x[:, self.t_text :]
        q, kv = self.ln_q(text), self.ln_kv(other)
        text = text + self.drop(self.cross(q, kv, kv, need_weights=False)[0])
        s = self.ln_s(text)
        text = text + self.drop(self.self_attn(s, s, s, need_weights=False)[0])
        text = text + self.drop(self.mlp(self.ln_m(text)))
        return torch.cat([text, other], dim=1)


class FusionClassifier(nn.Module):
    def __init__(self, d: int = 256, n_blocks: int = 4):
        super().__init__()
        self.text_in = nn.Linear(TEXT, d)
        self.video_in = nn.Linear(VIDEO, d)
        self.audio_in = nn.Linear(AUDIO, d)
        self.stream = nn.Parameter(torch.zeros(3, d))  # which stream a token came from
        self.blocks = nn.ModuleList([FusionBlock(d) for _ in range(n_blocks)])
        self.ln = nn.LayerNorm(d)
        self.classify = nn.Linear(d, CLASSES)
        self.t_text = T_TEXT

    @torch.jit.export
    def embed(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        text = self.text_in(batch["text"].float()) + self.stream[0]
        video = self.video_in(batch["video"].float()) + self.stream[1]
        audio = self.audio_in(batch["audio"].float()) + self.stream[2]
        return torch.cat([text, video, audio], dim=1)

    @torch.jit.export
    def head(self, x: torch.Tensor, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.classify(self.ln(x[:, : self.t_text].mean(dim=1)))
        return F.cross_entropy(logits.float(), batch["label"])

    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.embed(batch)
        for block in self.blocks:
            x = block(x)
        return self.head(x, batch)


def synthetic_clips(n: int, seed: int = 0):
    """Each class has a prototype per stream; a clip is its prototype plus noise."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, CLASSES, (n,), generator=g)
    out = {}
    for name, dim, t in [("text", TEXT, T_TEXT), ("video", VIDEO, T_VIDEO), ("audio", AUDIO, T_AUDIO)]:
        proto = torch.randn(CLASSES, 1, dim, generator=g)
        out[name] = (proto[label] + 2.0 * torch.randn(n, t, dim, generator=g)).half()
    out["label"] = label
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    torch.manual_seed(0)
    model = FusionClassifier()
    torch.jit.script(model).save(os.path.join(here, "fusion_classifier.pt"))
    save_file(synthetic_clips(1024), os.path.join(here, "fusion_classifier.safetensors"),
              {"example": "fusion_classifier"})
    n = sum(p.numel() for p in model.parameters())
    print(f"fusion_classifier: {n:,} parameters; wrote {here}/fusion_classifier.pt and .safetensors")


if __name__ == "__main__":
    main()
