"""A Hugging Face Trainer script, as in the seeds' BERT and T5 reports: a small BERT-style
sequence classifier built from a config (nothing is downloaded) on synthetic token sequences.
It reads its plan from autotune through autotune.hf and runs the same with or without it:

    python examples/scripts/hf_classifier.py
    autotune run --budget 1G -- python examples/scripts/hf_classifier.py

--auto-find-batch-size instead hands the batch to Accelerate's own search (for comparison:
it halves the batch on an out-of-memory error, and the effective batch shrinks with it).
"""

import argparse
import os

import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import autotune
import autotune.hf


class Tokens(Dataset):
    """Sequences of random token ids; the label is whether token 7 occurs in the first half."""

    def __init__(self, samples, seq_len, vocab):
        self.samples, self.seq_len, self.vocab = samples, seq_len, vocab

    def __len__(self):
        return self.samples

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, self.vocab, (self.seq_len,), generator=g)
        label = int((ids[: self.seq_len // 2] == 7).any())
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": label}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--auto-find-batch-size", action="store_true",
                    help="let Accelerate search the batch instead (no autotune)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (the Trainer's own GPU)")
    ap.add_argument("--output-dir", default=os.environ.get("TMPDIR", "/tmp") + "/hf_classifier")
    args = ap.parse_args()

    plan = autotune.plan(global_batch=args.global_batch, micro_batch=args.global_batch,
                         precision="fp32", checkpointing=False, num_workers=2)
    config = BertConfig(vocab_size=2048, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=4, intermediate_size=4 * args.hidden,
                        max_position_embeddings=args.seq_len, num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    data = Tokens(plan.global_batch * args.steps, args.seq_len, config.vocab_size)
    common = dict(output_dir=args.output_dir, max_steps=args.steps, learning_rate=3e-4,
                  logging_steps=10, save_strategy="no", report_to=[], use_cpu=args.device == "cpu",
                  disable_tqdm=True)
    if args.auto_find_batch_size:
        training = TrainingArguments(per_device_train_batch_size=args.global_batch,
                                     auto_find_batch_size=True, dataloader_num_workers=2,
                                     **common)
        callbacks = []
    else:
        training = TrainingArguments(**autotune.hf.training_args(plan), **common)
        callbacks = [autotune.hf.StepCallback()]
    trainer = Trainer(model=model, args=training, train_dataset=data, callbacks=callbacks)
    result = trainer.train()
    print("trained %d steps, batch %d x %d, loss %.4f" % (
        result.global_step, trainer._train_batch_size, training.gradient_accumulation_steps,
        result.training_loss), flush=True)


if __name__ == "__main__":
    main()
