#!/usr/bin/env python3
"""The Python PyTorch reference for scripts/bench-vs-python: the same models as autotune's
built-in workloads (src/models/gpt.cpp, src/models/lstm_workload.cpp), built in the same order from the same
seed, so the weights are bit-identical; the same data windows (the (seed, step, index) hash of
include/autotune/workload.h); the same AdamW groups, warmup + cosine schedule and clipping
(src/train/trainer.cpp). It trains the way a PyTorch user writes it (eager by default, or
torch.compile) and prints one JSON object: per-step losses and times, page faults and CPU
allocations per step.

  ref_trainer.py --workload gpt --n-layer 4 --n-head 4 --d-model 128 --seq-len 128 \
      --data data/corpus.tok --micro-batch 8 --grad-accum 4 --steps 20 [--compile] [--bf16]
"""
import argparse
import json
import math
import mmap
import os
import resource
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

M64 = (1 << 64) - 1
VALIDATION_STREAM = 0x5A17 << 40


def splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def sample_hash(seed, stream, index):
    return splitmix64(seed ^ splitmix64(stream ^ splitmix64(index & M64)))


# ---- GPT (src/models/gpt.cpp) ---------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d_model, n_head, dropout):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        # Registration order = C++ registration order: the RNG draws of the default inits match.
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.attn_proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.mlp_proj = nn.Linear(4 * d_model, d_model)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        heads = lambda t: t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), dropout_p=self.dropout
                                           if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.resid_drop(self.attn_proj(y))
        return x + self.resid_drop(self.mlp_proj(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    def __init__(self, n_layer, n_head, d_model, seq_len, vocab_size, dropout, checkpointing):
        super().__init__()
        self.checkpointing = checkpointing
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(d_model, n_head, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d_model)
        # GPT-2 init, in named_parameters order, as GptModel's constructor.
        resid_std = 0.02 / math.sqrt(2.0 * n_layer)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "ln" in name:
                    continue
                if p.dim() == 1:
                    p.zero_()
                else:
                    resid = "attn_proj.weight" in name or "mlp_proj.weight" in name
                    p.normal_(0.0, resid_std if resid else 0.02)

    def forward(self, idx, targets):
        T = idx.size(1)
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        for block in self.blocks:
            if self.checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))


class TokenData:
    """autotune's .tok file: a 64-byte header, then uint16 tokens (train split, then val)."""

    def __init__(self, path, seed):
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        magic, _version, vocab, dtype_bytes = struct.unpack_from("<8sIII", self.map, 0)
        self.train_tokens, self.val_tokens = struct.unpack_from("<QQ", self.map, 24)
        assert magic == b"ATTOKENS" and dtype_bytes == 2, "not an autotune token file"
        self.vocab, self.seed = vocab, seed
        n = self.train_tokens + self.val_tokens
        # Little-endian uint16 read as int16 then masked: torch has few uint16 kernels.
        self.tokens = torch.frombuffer(self.map, dtype=torch.int16, count=n, offset=64)

    def batch(self, stream, first, count, T, val=False):
        base = self.train_tokens if val else 0
        n_starts = (self.val_tokens if val else self.train_tokens) - T
        rows = []
        for i in range(count):
            off = base + sample_hash(self.seed, stream, first + i) % n_starts
            rows.append(self.tokens[off:off + T + 1])
        buf = torch.stack(rows).to(torch.int64) & 0xFFFF  # [count, T+1]
        return buf[:, :T], buf[:, 1:]


# ---- LSTM regressor (src/models/lstm_workload.cpp) -----------------------------------------------------
class LstmRegressor(nn.Module):
    def __init__(self, channels, hidden, layers, outputs):
        super().__init__()
        self.lstm = nn.LSTM(channels, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x, target):
        return F.mse_loss(self.head(self.lstm(x)[0]).float(), target)


class LstmData:
    """The synthetic EMG-like windows of LstmWorkload::windows, computed the same way."""

    def __init__(self, channels, outputs, seed):
        self.C, self.K, self.seed = channels, outputs, seed
        g = torch.Generator().manual_seed(splitmix64(seed))
        self.mixing = torch.randn(outputs, channels, generator=g)

    def batch(self, stream, first, count, T, val=False):
        K = self.K
        f1, f2, p1, p2 = (torch.empty(count, 1, K, dtype=torch.float64) for _ in range(4))
        for i in range(count):
            h = sample_hash(self.seed, stream, first + i)
            for k in range(K):
                hk = splitmix64((h + k) & M64)
                f1[i, 0, k] = 0.01 + 0.05 * (hk & 0xFFFF) / 65535.0
                f2[i, 0, k] = 0.02 + 0.08 * ((hk >> 16) & 0xFFFF) / 65535.0
                p1[i, 0, k] = 6.283 * ((hk >> 32) & 0xFFFF) / 65535.0
                p2[i, 0, k] = 6.283 * ((hk >> 48) & 0xFFFF) / 65535.0
        t = torch.arange(T, dtype=torch.float64).view(1, T, 1)
        angles = (torch.sin(f1 * t + p1) + 0.5 * torch.sin(f2 * t + p2)).float()  # [B, T, K]
        velocity = torch.cat([torch.zeros(count, 1, K), angles.diff(dim=1)], 1) * 10.0
        g = torch.Generator().manual_seed(splitmix64((self.seed ^ stream ^ (first * 7919)) & M64))
        signal = velocity @ self.mixing + 0.05 * torch.randn(count, T, self.C, generator=g)
        return signal, angles


# ---- a user's module on safetensors samples (src/models/torchscript_workload.cpp) ---------------------
class NamedData:
    """Samples of a safetensors file placed by the (seed, step, index) hash; the last 10% are the
    validation set, as NamedTensorData does."""

    def __init__(self, path, seed):
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                        "examples"))
        from safetensors_io import load_file
        self.tensors, self.seed = load_file(path), seed
        n = next(iter(self.tensors.values())).shape[0]
        self.n_train = n - max(1, n // 10)

    def batch(self, stream, first, count, T=None, val=False):
        rows = torch.tensor([sample_hash(self.seed, stream, first + i) % self.n_train
                             for i in range(count)])
        return {k: v.index_select(0, rows) for k, v in self.tensors.items()}


def load_module(spec):
    """FILE.py:CLASS, built after torch.manual_seed (as the example scripts export it)."""
    import importlib.util
    path, cls = spec.rsplit(":", 1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    mod_spec = importlib.util.spec_from_file_location("user_model", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return getattr(mod, cls)()


# ---- training (src/train/trainer.cpp) -----------------------------------------------------------------
def learning_rate(lr, min_lr, steps, step):
    warmup = min(100, steps // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def count_allocations(step_fn):
    """CPU allocations of one step, from the profiler's memory events (the same c10 reporter
    autotune's counting allocator reports to)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step_fn()
    n = 0
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]" and e.nbytes() > 0:
            n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workload", choices=["gpt", "lstm", "module"], default="gpt")
    ap.add_argument("--module", default="", help="module workload: FILE.py:CLASS")
    ap.add_argument("--init-seed", type=int, default=0,
                    help="module workload: the seed its weights were made with")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=256)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--outputs", type=int, default=4)
    ap.add_argument("--data", default="data/corpus.tok")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--checkpointing", choices=["on", "off"], default="off")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    ap.add_argument("--count-allocations", action="store_true",
                    help="after the timed steps, count one step's allocations with the profiler")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)

    torch.manual_seed(a.seed)  # GptWorkload::build / LstmWorkload::build
    if a.workload == "gpt":
        model = GPT(a.n_layer, a.n_head, a.d_model, a.seq_len, a.vocab_size, a.dropout,
                    a.checkpointing == "on")
        data, T = TokenData(a.data, a.seed), a.seq_len
    elif a.workload == "lstm":
        model = LstmRegressor(a.channels, a.hidden, a.layers, a.outputs)
        data, T = LstmData(a.channels, a.outputs, a.seed), a.seq_len
    else:
        torch.manual_seed(a.init_seed)  # the exported .pt holds the weights made with this seed
        model = load_module(a.module)
        data, T = NamedData(a.data, a.seed), 1
    model.train()
    torch.manual_seed(a.seed)  # train(): dropout masks from the seed
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    params = list(model.parameters())
    step_model = torch.compile(model) if a.compile else model
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16")

    def train_step(step):
        for g in opt.param_groups:
            g["lr"] = learning_rate(a.lr, a.lr / 10, a.steps, step)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for m in range(a.grad_accum):
            b = data.batch(step, m * a.micro_batch, a.micro_batch, T)
            with autocast:
                loss = (step_model(b) if a.workload == "module" else step_model(*b)) / a.grad_accum
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss_sum

    losses, step_ms, faults = [], [], []
    for step in range(a.steps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        losses.append(train_step(step))
        step_ms.append((time.perf_counter() - t0) * 1e3)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    out = {"losses": losses, "step_ms": step_ms, "page_faults": faults,
           "tokens_per_step": a.micro_batch * a.grad_accum * T, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "compile": a.compile}
    if a.count_allocations:
        out["allocations_per_step"] = count_allocations(lambda: train_step(a.steps - 1))
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
