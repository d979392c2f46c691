"""autotune's plan in a Hugging Face Trainer.

    import autotune, autotune.hf
    plan = autotune.plan(global_batch=32, micro_batch=32, precision="fp32",
                         checkpointing=False, num_workers=2)
    args = TrainingArguments(output_dir="out", max_steps=100, **autotune.hf.training_args(plan))
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[autotune.hf.StepCallback()])

transformers is imported only when these are called, so `import autotune.hf` costs nothing.
"""

from . import step

__all__ = ["training_args", "StepCallback"]


def training_args(plan):
    """The TrainingArguments keywords that carry the plan: per-device batch, accumulation,
    precision, gradient checkpointing and (where the plan has it) DataLoader workers."""
    from transformers import TrainingArguments

    # transformers 5 renamed gradient_checkpointing (the old name warns, and goes in v6).
    fields = getattr(TrainingArguments, "__dataclass_fields__", {})
    checkpointing = ("activation_checkpointing" if "activation_checkpointing" in fields
                     else "gradient_checkpointing")
    kwargs = {
        "per_device_train_batch_size": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "bf16": plan.precision == "bf16",
        "fp16": plan.precision == "fp16",
        checkpointing: plan.checkpointing,
    }
    if "num_workers" in plan.knobs:
        kwargs["dataloader_num_workers"] = plan.num_workers
    return kwargs


def StepCallback():
    """A TrainerCallback that reports each optimizer step (the samples it trained: per-device
    batch x accumulation x processes) to autotune."""
    from transformers import TrainerCallback

    class _AutotuneStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step(samples=args.per_device_train_batch_size * args.gradient_accumulation_steps *
                 max(1, args.world_size))

    return _AutotuneStep()
