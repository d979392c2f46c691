#!/usr/bin/env python3
"""EMG to joint angles, in the shape of seed 001 (a TDS-LSTM): windows of 16 EMG channels x 2,000
samples -> 20 joint angles, through time-depth-separable convolution blocks and an LSTM.

Writes examples/emg_regressor.pt (TorchScript, following autotune's block contract, so activation
checkpointing is available) and examples/emg_regressor.safetensors (128 synthetic windows:
"emg" [N, 2000, 16] F32, "angles" [N, 2000, 20] F32). Then:

  build/autotune --budget 2G --model examples/emg_regressor.pt \\
      --data examples/emg_regressor.safetensors --global-batch 32 --steps 50 --run-dir runs/emg

and the trained weights come back with
  model = EmgRegressor(); model.load_state_dict(torch.jit.load("runs/emg/model.pt").state_dict())
"""
import math
import os
import sys
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_io import save_file  # noqa: E402

CHANNELS, SAMPLES, JOINTS = 16, 2000, 20
STRIDE = 4  # the stem downsamples 2,000 samples to 500 frames; angles are predicted per frame


class TDSBlock(nn.Module):
    """Time-depth separable block: a depthwise temporal convolution, then a pointwise MLP, each
    residual and layer-normed. [B, T, C] -> [B, T, C]."""

    def __init__(self, c: int, kernel: int = 9, dropout: float = 0.1):
        super().__init__()
        self.conv = nn.Conv1d(c, c, kernel, padding=kernel // 2, groups=c)
        self.ln1 = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 2 * c)
        self.fc2 = nn.Linear(2 * c, c)
        self.ln2 = nn.LayerNorm(c)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + F.relu(self.conv(x.transpose(1, 2)).transpose(1, 2)))
        return self.ln2(x + self.drop(self.fc2(F.relu(self.fc1(x)))))


class EmgRegressor(nn.Module):
    def __init__(self, c: int = 128, n_blocks: int = 4, hidden: int = 128):
        super().__init__()
        self.stride = STRIDE  # TorchScript reads module attributes, not Python globals
        self.stem = nn.Conv1d(CHANNELS, c, kernel_size=STRIDE * 2, stride=STRIDE, padding=STRIDE // 2)
        self.blocks = nn.ModuleList([TDSBlock(c) for _ in range(n_blocks)])
        self.lstm = nn.LSTM(c, hidden, num_layers=2, batch_first=True)
        self.out = nn.Linear(hidden, JOINTS)

    @torch.jit.export
    def embed(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.stem(batch["emg"].transpose(1, 2)).transpose(1, 2)  # [B, 500, c]

    @torch.jit.export
    def head(self, x: torch.Tensor, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        y = self.out(self.lstm(x)[0])                          # [B, 500, joints]
        target = batch["angles"][:, :: self.stride][:, : y.size(1)]  # the angle at each frame
        return F.mse_loss(y.float(), target)

    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.embed(batch)
        for block in self.blocks:
            x = block(x)
        return self.head(x, batch)


def synthetic_windows(n: int, seed: int = 0):
    """Joint angles as sums of slow sinusoids; EMG as a fixed mixing of their velocities + noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(SAMPLES, dtype=torch.float32) / 1000.0  # 2 s at 1 kHz
    freq = 0.2 + 1.5 * torch.rand(n, 1, JOINTS, generator=g)
    phase = 2 * math.pi * torch.rand(n, 1, JOINTS, generator=g)
    angles = torch.sin(2 * math.pi * freq * t.view(1, -1, 1) + phase)  # [N, T, joints]
    velocity = torch.diff(angles, dim=1, prepend=angles[:, :1])
    mixing = torch.randn(JOINTS, CHANNELS, generator=g)
    emg = 200 * velocity @ mixing + 0.05 * torch.randn(n, SAMPLES, CHANNELS, generator=g)
    return emg, angles


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    torch.manual_seed(0)
    model = EmgRegressor()
    torch.jit.script(model).save(os.path.join(here, "emg_regressor.pt"))
    emg, angles = synthetic_windows(128)
    save_file({"emg": emg, "angles": angles}, os.path.join(here, "emg_regressor.safetensors"),
              {"example": "emg_regressor"})
    n = sum(p.numel() for p in model.parameters())
    print(f"emg_regressor: {n:,} parameters; wrote {here}/emg_regressor.pt and .safetensors")


if __name__ == "__main__":
    main()
