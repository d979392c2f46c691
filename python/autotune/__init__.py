"""autotune's client for your own training script (script mode).

    import autotune
    plan = autotune.plan(global_batch=64, micro_batch=64, precision="fp32",
                         checkpointing=False, num_workers=8)
    loader = DataLoader(ds, batch_size=plan.micro_batch, num_workers=plan.num_workers)
    for batch in loader:                      # one micro-batch
        ...backward...
        if (i + 1) % plan.grad_accum == 0:    # one optimizer step of plan.global_batch samples
            opt.step(); opt.zero_grad()
            autotune.step(samples=plan.micro_batch * plan.grad_accum)

Under `autotune [run|probe] --budget SIZE -- python train.py`, plan() is the trial's or the
run's plan and step() reports each optimizer step to autotune; a trial ends by itself (exit 0)
once its steps are timed. Run alone, plan() is the plan of the profile named by
AUTOTUNE_PROFILE if set (`autotune probe` writes it), else the defaults given, and step() does
nothing. Pure Python; torch is imported only where the script already uses CUDA.
"""

import json
import os
import time

__all__ = ["Plan", "plan", "step"]

PRECISIONS = ("fp32", "bf16", "fp16")
# What autotune sets in a trial's or a run's environment (the names are the contract with the C++
# side, tools/autotune and src/run/script_trials.cpp).
ENV_PLAN = "AUTOTUNE_PLAN"  # JSON: the plan to follow
ENV_ROLE = "AUTOTUNE_ROLE"  # "describe" (say what plan() declares, leave), "trial" or "run"
ENV_TRIAL_STEPS = "AUTOTUNE_TRIAL_STEPS"  # a trial exits 0 after this many optimizer steps
ENV_REPORT_FD = "AUTOTUNE_REPORT_FD"  # JSON lines to autotune: the declared knobs, each step
ENV_PROFILE = "AUTOTUNE_PROFILE"  # standalone: the profile whose plan to use
# `autotune --device cuda[:N]`: the device whose memory the budget is about, the budget in bytes,
# and the device memory in use outside this process when autotune started it (other processes,
# autotune's own context), which is not this process's.
ENV_DEVICE = "AUTOTUNE_DEVICE"
ENV_DEVICE_BUDGET = "AUTOTUNE_DEVICE_BUDGET_BYTES"
ENV_DEVICE_OUTSIDE = "AUTOTUNE_DEVICE_OUTSIDE_BYTES"


class Plan:
    """A training plan: micro_batch samples per forward/backward, grad_accum micro-batches per
    optimizer step (micro_batch * grad_accum == global_batch), precision ("fp32", "bf16" or
    "fp16"), checkpointing (bool), and every knob the script declared (num_workers, ...)."""

    def __init__(self, micro_batch, grad_accum, precision, checkpointing, knobs=None):
        self.micro_batch = int(micro_batch)
        self.grad_accum = int(grad_accum)
        self.precision = str(precision)
        self.checkpointing = bool(checkpointing)
        self.knobs = dict(knobs or {})
        for name, value in self.knobs.items():
            setattr(self, name, value)

    @property
    def global_batch(self):
        return self.micro_batch * self.grad_accum

    def as_dict(self):
        d = {"micro_batch": self.micro_batch, "grad_accum": self.grad_accum,
             "precision": self.precision, "checkpointing": self.checkpointing,
             "global_batch": self.global_batch}
        d.update(self.knobs)
        return d

    def __repr__(self):
        return "Plan(%s)" % ", ".join("%s=%r" % kv for kv in self.as_dict().items())


class _State:
    steps = 0
    report = None  # a file object on AUTOTUNE_REPORT_FD
    trial_steps = 0
    guard = None  # a _DeviceGuard under `autotune --device cuda`


def _fail(message):
    raise ValueError("autotune.plan: " + message)


def _report(record):
    if _State.report is None:
        fd = os.environ.get(ENV_REPORT_FD)
        if not fd:
            return
        _State.report = os.fdopen(int(fd), "w", buffering=1, closefd=False)
    _State.report.write(json.dumps(record) + "\n")
    _State.report.flush()


def _split(global_batch, micro_batch):
    if micro_batch < 1 or global_batch % micro_batch != 0:
        _fail("micro_batch %d does not divide global_batch %d; pick a divisor"
              % (micro_batch, global_batch))
    return global_batch // micro_batch


def _from_profile(path, knobs):
    try:
        with open(path) as f:
            profile = json.load(f)
        p = profile["plan"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError("%s=%s: cannot read its plan (%s); unset it or give a profile that "
                         "`autotune probe` wrote" % (ENV_PROFILE, path, e)) from None
    chosen = dict(knobs)
    # A knob autotune chose (num_workers where memory needed fewer) is a key of the plan;
    # -1 or absent: the script's own.
    chosen.update({k: p[k] for k in knobs if isinstance(p.get(k), int) and p[k] >= 0})
    return Plan(p["micro_batch"], p["grad_accum"], p["precision"], p["checkpointing"], chosen)


def plan(global_batch, micro_batch=None, precision=None, checkpointing=None, **knobs):
    """The plan to train with. The arguments are the script's own settings: they are the plan
    when the script runs alone, and tell autotune which knobs the script honours. Give precision
    (default "fp32") and checkpointing (default False) only if the script applies them: a script
    that does not pass precision is tuned in fp32 alone, one that does not pass checkpointing
    without it. Every other keyword, such as num_workers=8, is a knob the script honours. Under
    autotune, its --global-batch wins over global_batch."""
    declared = {"precision": precision is not None, "checkpointing": checkpointing is not None}
    precision = "fp32" if precision is None else precision
    checkpointing = False if checkpointing is None else bool(checkpointing)
    if precision not in PRECISIONS:
        _fail("precision %r: use fp32, bf16 or fp16" % (precision,))
    global_batch = int(global_batch)
    micro_batch = global_batch if micro_batch is None else int(micro_batch)
    if os.environ.get(ENV_ROLE) == "describe":
        # autotune asks what the script honours before its first trial: say it and leave.
        _report({"event": "plan", "declared": knobs, "applies": declared, "script_defaults": {
            "global_batch": global_batch, "micro_batch": micro_batch, "precision": precision,
            "checkpointing": checkpointing}, "pid": os.getpid()})
        _leave()
    given = os.environ.get(ENV_PLAN)
    if given:
        p = json.loads(given)
        chosen = dict(knobs)
        chosen.update({k: v for k, v in p.get("knobs", {}).items() if k in knobs})
        result = Plan(p["micro_batch"], p["grad_accum"], p["precision"], p["checkpointing"],
                      chosen)
        _State.trial_steps = int(os.environ.get(ENV_TRIAL_STEPS, "0") or 0)
        if os.environ.get(ENV_DEVICE, "").startswith("cuda"):
            _State.guard = _DeviceGuard(os.environ[ENV_DEVICE],
                                        int(os.environ.get(ENV_DEVICE_BUDGET, "0") or 0),
                                        int(os.environ.get(ENV_DEVICE_OUTSIDE, "0") or 0))
        _report({"event": "plan", "declared": knobs, "applies": declared, "pid": os.getpid()})
    elif os.environ.get(ENV_PROFILE):
        result = _from_profile(os.environ[ENV_PROFILE], knobs)
    else:
        result = Plan(micro_batch, _split(global_batch, micro_batch), precision, checkpointing,
                      knobs)
    _State.steps = 0
    return result


class _DeviceGuard:
    """The budget on a CUDA device, as autotune's own trainer keeps it (src/memory/cuda_memory.cpp):
    the figure is the caching allocator's peak reserved bytes plus the context (what the driver
    charges this process beyond them: total - free - reserved - what was in use outside it), and
    the allocator's per-process memory fraction is (budget - context) / total, so an allocation
    past the budget raises torch.OutOfMemoryError instead of reaching the device's limit. The
    context grows as kernels load, so it is measured again after each step and the fraction
    follows it."""

    def __init__(self, device, budget_bytes, outside_bytes):
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("autotune runs this script with --device %s, but its torch sees no "
                               "CUDA device (torch %s); run autotune with --device cpu, or install "
                               "a CUDA build of torch" % (device, torch.__version__))
        self.torch = torch
        self.index = torch.device(device).index
        if self.index is None:
            self.index = torch.cuda.current_device()
        # budget_bytes 0: measured only (autotune asks what a plan needs beyond the budget).
        self.budget_bytes, self.outside_bytes = budget_bytes, outside_bytes
        self.context_bytes = -1  # none measured yet: the first measure() sets the fraction
        self.measure()

    def measure(self):
        """The context now; the fraction set again where it grew."""
        cuda = self.torch.cuda
        free, total = cuda.mem_get_info(self.index)  # initialises the context the first time
        context = max(0, total - free - cuda.memory_reserved(self.index) - self.outside_bytes)
        if context > self.context_bytes:
            self.context_bytes = context
            if self.budget_bytes > 0:
                allocator = max(0, self.budget_bytes - context)
                cuda.set_per_process_memory_fraction(min(1.0, allocator / total), self.index)

    def figures(self):
        self.measure()
        return {"device_peak_reserved_bytes": int(self.torch.cuda.max_memory_reserved(self.index)),
                "device_context_bytes": int(self.context_bytes)}


def _device_figures():
    """The device's figures where the script uses CUDA: under `--device cuda` the guard's, else
    the caching allocator's peak reserved bytes where the script initialised CUDA itself."""
    if _State.guard is not None:
        return _State.guard.figures()
    import sys
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"device_peak_reserved_bytes": int(torch.cuda.max_memory_reserved())}


def step(samples, tokens=None):
    """Call after each optimizer step with the samples (and tokens, if they count) it trained on.
    In a trial it ends the process with exit 0 once the trial's steps are done."""
    _State.steps += 1
    if os.environ.get(ENV_PLAN) is None:
        return
    record = {"event": "step", "step": _State.steps, "samples": int(samples),
              "time": time.monotonic()}
    if tokens is not None:
        record["tokens"] = int(tokens)
    record.update(_device_figures())
    _report(record)
    if os.environ.get(ENV_ROLE) == "trial" and _State.trial_steps and \
            _State.steps >= _State.trial_steps:
        _leave()


def _leave():
    """Ends a trial: exit 0, without the script's own clean-up (saving a model, ...), which a
    trial must not run; DataLoader workers leave with their parent."""
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
