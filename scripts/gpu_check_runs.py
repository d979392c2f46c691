"""The real runs of scripts/gpu-check (run through that script): autotune on a CUDA GPU, with
nvidia-smi polling the process's memory, written to OUT/gpu-check.json.

The driver's figure of a run: the largest used_memory nvidia-smi reports for the run's pid
(driver_method "per_pid"). Where no row ever names that pid (a container: nvidia-smi shows the
host's pids, or none), the largest rise of the device's total used memory (--query-gpu=
memory.used, sampled before the run starts and while it runs) stands in ("device_used_diff"; it
counts any other process's memory on the device too). Each row records driver_figure_read and the
first error nvidia-smi gave (driver_error): a missing nvidia-smi is an error, never a 0 figure.
Exits 1 when a run failed, went over its budget or has no driver figure (the verdict module,
scripts/gpu_check_verdict.py, names each), else 0; scripts/gpu-check's exit status is the
verdict's."""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True  # no scripts/__pycache__ in the source tree
from gpu_check_verdict import run_reasons  # noqa: E402

MIB = 1 << 20


def nvidia_smi(args):
    """nvidia-smi's stdout lines; raises RuntimeError with the reason when it fails."""
    try:
        q = subprocess.run(["nvidia-smi"] + args + ["--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        raise RuntimeError("nvidia-smi not found on PATH") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError("nvidia-smi %s did not answer within 10 s" % args[0]) from None
    except OSError as e:
        raise RuntimeError("nvidia-smi could not run: %s" % e) from None
    if q.returncode != 0:
        said = (q.stderr.strip() or q.stdout.strip()).splitlines()
        raise RuntimeError("nvidia-smi %s exited with code %d: %s"
                           % (args[0], q.returncode, said[-1] if said else "no output"))
    return [line for line in q.stdout.splitlines() if line.strip()]


def device_used_mib():
    """{gpu index: used MiB} of every device."""
    used = {}
    for line in nvidia_smi(["--query-gpu=index,memory.used"]):
        index, mib = [x.strip() for x in line.split(",")[:2]]
        try:
            used[index] = int(mib)
        except ValueError:
            raise RuntimeError("nvidia-smi --query-gpu: unexpected line %r" % line) from None
    return used


def process_used_mib(pid):
    """used_memory of `pid`, or None where no row names it."""
    found = None
    for line in nvidia_smi(["--query-compute-apps=pid,used_memory"]):
        fields = [x.strip() for x in line.split(",")]
        if len(fields) < 2 or fields[0] != str(pid):
            continue
        try:
            found = max(found or 0, int(fields[1]))
        except ValueError:  # "[N/A]": the driver does not tell this process's memory
            raise RuntimeError("nvidia-smi --query-compute-apps: used_memory %r for pid %s"
                               % (fields[1], pid)) from None
    return found


class DriverPoll:
    """Polls nvidia-smi while a run's process lives: its per-pid peak and the device's total."""

    def __init__(self):
        self.error = None
        self.pid_peak_mib = None
        self.device_rise_mib = None
        self.before = None
        try:
            self.before = device_used_mib()
        except RuntimeError as e:
            self.note(e)

    def note(self, e):
        if self.error is None:
            self.error = str(e)

    def poll(self, pid, stop):
        while not stop.is_set():
            try:
                mib = process_used_mib(pid)
                if mib is not None:
                    self.pid_peak_mib = max(self.pid_peak_mib or 0, mib)
            except RuntimeError as e:
                self.note(e)
            if self.before is not None:
                try:
                    now = device_used_mib()
                    rise = max([now[i] - self.before[i] for i in now if i in self.before] or [0])
                    self.device_rise_mib = max(self.device_rise_mib or 0, rise)
                except RuntimeError as e:
                    self.note(e)
            if self.error and self.error.startswith("nvidia-smi not found"):
                break  # nothing more to learn
            stop.wait(0.2)

    def figure(self):
        """(bytes, method, read)."""
        if self.pid_peak_mib:
            return self.pid_peak_mib * MIB, "per_pid", True
        if self.device_rise_mib:
            return self.device_rise_mib * MIB, "device_used_diff", True
        if self.error is None:
            self.error = ("nvidia-smi named no process with the run's pid and the device's used "
                          "memory did not rise")
        return 0, None, False


def run(bin_, name, args, timeout):
    t0 = time.time()
    driver = DriverPoll()  # the device's used memory before the process starts
    p = subprocess.Popen([bin_] + args + ["--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    stop = threading.Event()
    th = threading.Thread(target=driver.poll, args=(p.pid, stop))
    th.start()
    timed_out = False
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        p.kill()
        out, err = p.communicate()
    stop.set()
    th.join()
    figure, method, read = driver.figure()
    row = {"name": name, "args": args, "exit_code": p.returncode, "timed_out": timed_out,
           "timeout_s": timeout, "seconds": time.time() - t0, "driver_peak_bytes": figure,
           "driver_method": method, "driver_figure_read": read, "driver_error": driver.error,
           "stderr_tail": err.strip().splitlines()[-3:]}
    try:
        j = json.loads(out)
        mem = j.get("memory", {})
        row.update({"plan": j.get("plan"), "trials": len(j.get("trials", [])),
                    "budget_bytes": j.get("budget_bytes"), "peak_bytes": mem.get("peak_bytes"),
                    "allocator": mem.get("allocator"), "tokens_per_s": j.get("tokens_per_s"),
                    "precision_speed": j.get("precision_speed"),
                    "within_budget": j.get("within_budget"), "reused_profile": j.get("reused_profile")})
        # `train` reports no within_budget: its peak against its budget.
        if row["within_budget"] is None and row["peak_bytes"] is not None and row["budget_bytes"]:
            row["within_budget"] = row["peak_bytes"] <= row["budget_bytes"]
        if row["peak_bytes"] and row["driver_peak_bytes"]:
            row["figure_over_driver"] = row["peak_bytes"] / row["driver_peak_bytes"]
    except (json.JSONDecodeError, TypeError, AttributeError):
        pass
    print(json.dumps({k: v for k, v in row.items() if k != "stderr_tail"}), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    common = ["--model", "gpt2-small", "--data", a.data, "--device", "cuda", "--global-batch", "32",
              "--eval-sequences", "8", "--profile-dir", os.path.join(a.out, "profiles")]
    rows = {"tuned": [], "grid": []}
    for budget in ["8G", "24G"]:  # probe, choose, train 20 steps, under each budget
        rows["tuned"].append(run(a.bin, "run --budget %s" % budget,
                                 ["--budget", budget, "--steps", "20", "--reprobe"] + common, 240))
    grid = [("4", "fp32", "off"), ("4", "bf16", "off"), ("8", "bf16", "off"), ("8", "bf16", "on"),
            ("16", "bf16", "on"), ("2", "fp16", "off")]
    for mb, prec, ckpt in grid:  # explicit plans under the 8G budget's cap
        rows["grid"].append(run(a.bin, "train --budget 8G --micro-batch %s --precision %s "
                                       "--checkpointing %s" % (mb, prec, ckpt),
                                ["train", "--budget", "8G", "--micro-batch", mb,
                                 "--precision", prec, "--checkpointing", ckpt,
                                 "--steps", "8"] + common, 90))
    speed = {r["plan"]["precision"]: r["tokens_per_s"] for r in rows["grid"]
             if r.get("plan") and r["plan"]["micro_batch"] == 4 and not r["plan"]["checkpointing"]}
    if speed.get("fp32") and speed.get("bf16"):
        rows["bf16_over_fp32_tokens_per_s"] = speed["bf16"] / speed["fp32"]
    rows["any_refusal"] = any((r.get("allocator") or {}).get("device_num_ooms", 0) > 0
                              for r in rows["tuned"] + rows["grid"])
    with open(os.path.join(a.out, "gpu-check.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("gpu-check: wrote", os.path.join(a.out, "gpu-check.json"), file=sys.stderr)
    problems = run_reasons(rows)
    if problems:  # scripts/gpu-check prints them in its verdict
        print("gpu-check: %d problem(s) in the real runs; `scripts/gpu_check_verdict.py --junit F "
              "--runs %s` names them" % (len(problems), os.path.join(a.out, "gpu-check.json")),
              file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
