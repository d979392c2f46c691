"""Script mode's figures: both example scripts (examples/scripts) tuned at two binding budgets,
and the Hugging Face script under Accelerate's own batch-size search at the same budget.

For each example: its own full-batch fp32 peak first (one pinned trial), then `autotune run` at
85% and 75% of it. Printed and written to docs/bench/script-mode.json: trials, seconds to a plan,
the plan, the full run's peak / budget, samples/s, and the per-trial cost of starting the script
(a trial's process time minus its timed steps, median over its trials).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = os.path.join(ROOT, ".venv", "bin", "python")
EXAMPLES = {
    "lstm_regressor": ([PY, os.path.join(ROOT, "examples/scripts/lstm_regressor.py"),
                        "--seq-len", "200", "--hidden", "128"], 64),
    "hf_classifier": ([PY, os.path.join(ROOT, "examples/scripts/hf_classifier.py"),
                       "--seq-len", "128", "--layers", "2", "--hidden", "128"], 16),
}


def autotune(binary, args, command):
    t0 = time.monotonic()
    r = subprocess.run([binary] + args + ["--json", "--device", "cpu", "--"] + command,
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("bench-script-mode: autotune failed: " + r.stderr.strip().splitlines()[-1])
    out = json.loads(r.stdout)
    out["wall_clock_s"] = time.monotonic() - t0
    return out


def describe(plan):
    s = "micro_batch=%d grad_accum=%d %s checkpointing=%s" % (
        plan["micro_batch"], plan["grad_accum"], plan["precision"],
        "on" if plan["checkpointing"] else "off")
    if plan.get("num_workers", -1) >= 0:
        s += " num_workers=%d" % plan["num_workers"]
    return s


def memory_cgroup(limit_bytes, name):
    """A v1 or v2 memory cgroup under this process's, with a limit; its directory."""
    with open("/proc/self/cgroup") as f:
        lines = f.read().splitlines()
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            parent = "/sys/fs/cgroup/memory" + rel
            d = os.path.join(parent, name)
            os.makedirs(d, exist_ok=True)
            open(os.path.join(d, "memory.limit_in_bytes"), "w").write(str(limit_bytes))
            return d
    parent = "/sys/fs/cgroup" + lines[0].split(":", 2)[2]
    d = os.path.join(parent, name)
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, "memory.max"), "w").write(str(limit_bytes))
    return d


def accelerate_search(budget, command, steps):
    """The HF script with --auto-find-batch-size (Accelerate's search, no autotune) in a cgroup
    whose limit is the budget."""
    d = memory_cgroup(budget, "bench-accelerate-%d" % os.getpid())
    t0 = time.monotonic()
    r = subprocess.run(["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', d] + command +
                       ["--steps", str(steps), "--auto-find-batch-size"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")))
    wall = time.monotonic() - t0
    last = [l for l in (r.stdout + r.stderr).splitlines() if l.strip()]
    try:
        os.rmdir(d)
    except OSError:
        pass
    return {"exit_code": r.returncode, "killed": r.returncode in (-9, 137),
            "wall_s": wall, "last_line": last[-1] if last else "",
            "trained_line": next((l for l in r.stdout.splitlines() if l.startswith("trained")), "")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--autotune", default=os.path.join(ROOT, "build", "autotune"))
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps of each full run")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    results = {"command": "scripts/bench-script-mode", "examples": {}}
    store = os.path.join(os.environ.get("TMPDIR", "/tmp"), "bench-script-mode-%d" % os.getpid())
    for name, (command, batch) in EXAMPLES.items():
        full = autotune(args.autotune, ["probe", "--budget", "8G", "--global-batch", str(batch),
                                        "--micro-batch", str(batch), "--precision", "fp32",
                                        "--checkpointing", "off", "--profile-dir",
                                        store + "/full-" + name], command)
        full_peak = full["verified_peak_bytes"]
        rows = []
        for share in (0.85, 0.75):
            budget = int(full_peak * share)
            r = autotune(args.autotune, ["run", "--budget", str(budget), "--global-batch",
                                         str(batch), "--profile-dir", store + "/" + name],
                         command + ["--steps", str(args.steps)])
            overhead = [t["process_s"] - t["wall_s"] for t in r["trials"] if t.get("process_s")]
            rows.append({"budget_bytes": budget, "share_of_full_peak": share,
                         "trials": len(r["trials"]), "probe_s": r["probe_s"],
                         "plan": describe(r["plan"]), "peak_bytes": r["peak_bytes"],
                         "peak_over_budget": r["peak_bytes"] / budget,
                         "samples_per_s": r["samples_per_s"],
                         "trial_overhead_s_median": statistics.median(overhead) if overhead else 0,
                         "start_s": r["script"]["start_s"]})
            print("%-15s budget %6.1f MiB (%.0f%% of %.1f MiB): %d trials, %.0f s to a plan, %s, "
                  "peak/budget %.3f, %.1f samples/s, trial start-up %.1f s" % (
                      name, budget / 2**20, share * 100, full_peak / 2**20, rows[-1]["trials"],
                      rows[-1]["probe_s"], rows[-1]["plan"], rows[-1]["peak_over_budget"],
                      rows[-1]["samples_per_s"], rows[-1]["trial_overhead_s_median"]), flush=True)
        results["examples"][name] = {"full_batch_fp32_peak_bytes": full_peak, "global_batch": batch,
                                     "runs": rows}
        if name == "hf_classifier":
            for row in rows:
                acc = accelerate_search(row["budget_bytes"], command, args.steps)
                row["accelerate_auto_find_batch_size"] = acc
                print("%-15s budget %6.1f MiB, Accelerate auto_find_batch_size: exit %d, %.0f s, %s"
                      % (name, row["budget_bytes"] / 2**20, acc["exit_code"], acc["wall_s"],
                         acc["trained_line"] or acc["last_line"]), flush=True)
    if not args.no_docs:
        with open(os.path.join(ROOT, "docs", "bench", "script-mode.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
