"""A plain PyTorch training loop with a DataLoader, as in the EMG report of the field notes: an
LSTM regressor on multichannel signal windows. It reads its plan from autotune and runs the same
with or without it:

    python examples/scripts/lstm_regressor.py                      # its own settings
    autotune run --budget 700M -- python examples/scripts/lstm_regressor.py
    autotune run --budget 4G --device cuda -- python examples/scripts/lstm_regressor.py --device cuda

Synthetic signals (a sum of channel sines with noise, deterministic per sample), so nothing is
downloaded; the target is each window's mean of the next 10 samples of channel 0.
"""

import argparse
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset

import autotune


class Signals(Dataset):
    """Windows [seq_len, channels] of synthetic multichannel signals, one per index."""

    def __init__(self, samples, seq_len, channels):
        self.samples, self.seq_len, self.channels = samples, seq_len, channels

    def __len__(self):
        return self.samples

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        t = torch.arange(self.seq_len + 10, dtype=torch.float32)
        freq = 0.01 + 0.2 * torch.rand(self.channels, generator=g)
        phase = 2 * math.pi * torch.rand(self.channels, generator=g)
        x = torch.sin(t[:, None] * freq + phase) + 0.1 * torch.randn(
            self.seq_len + 10, self.channels, generator=g)
        return x[: self.seq_len], x[self.seq_len:, 0].mean().reshape(1)


class Regressor(nn.Module):
    """Stacked LSTM layers ([B, T, C] -> [B, T, H] each), then a linear head on the last step."""

    def __init__(self, channels, hidden, layers):
        super().__init__()
        self.lstms = nn.ModuleList(
            nn.LSTM(channels if i == 0 else hidden, hidden, batch_first=True) for i in range(layers))
        self.head = nn.Linear(hidden, 1)
        self.checkpointing = False

    def forward(self, x):
        for lstm in self.lstms:
            if self.checkpointing and self.training:
                # Keeps only each layer's input; its gates are recomputed in backward.
                x = checkpoint(lambda inp, m=lstm: m(inp)[0], x, use_reentrant=False)
            else:
                x = lstm(x)[0]
        return self.head(x[:, -1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps")
    ap.add_argument("--seq-len", type=int, default=400)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = ap.parse_args()
    device = torch.device(args.device)

    plan = autotune.plan(global_batch=args.global_batch, micro_batch=args.global_batch,
                         precision="fp32", checkpointing=False, num_workers=2)
    torch.manual_seed(0)
    model = Regressor(args.channels, args.hidden, args.layers).to(device)
    model.checkpointing = plan.checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = Signals(plan.global_batch * args.steps, args.seq_len, args.channels)
    loader = DataLoader(data, batch_size=plan.micro_batch, shuffle=True, drop_last=True,
                        num_workers=plan.num_workers, persistent_workers=plan.num_workers > 0)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.precision)
    # fp16's narrow range needs loss scaling; bf16 and fp32 do not (the scaler is then a no-op).
    scaler = torch.amp.GradScaler(device.type, enabled=plan.precision == "fp16")

    model.train()
    step = 0
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=low, enabled=low is not None):
            loss = nn.functional.mse_loss(model(x).float(), y) / plan.grad_accum
        scaler.scale(loss).backward()
        if (i + 1) % plan.grad_accum:
            continue
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        step += 1
        autotune.step(samples=plan.micro_batch * plan.grad_accum)
        if step % 10 == 0:
            print("step %d  loss %.4f" % (step, loss.item() * plan.grad_accum), flush=True)
        if step == args.steps:
            break
    print("trained %d steps with %s" % (step, plan), flush=True)


if __name__ == "__main__":
    main()
