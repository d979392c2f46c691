"""The real runs of scripts/gpu-check (run through that script): autotune on a CUDA GPU, with
nvidia-smi polling the process's memory, written to OUT/gpu-check.json."""
import argparse
import json
import os
import subprocess
import sys
import threading
import time


def driver_peak_mib(pid, stop, result):
    """Largest used_memory nvidia-smi reports for `pid` until `stop` is set."""
    peak = 0
    while not stop.is_set():
        try:
            q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                "--format=csv,noheader,nounits"], capture_output=True, text=True,
                               timeout=5).stdout
            for line in q.splitlines():
                p, mib = [x.strip() for x in line.split(",")[:2]]
                if p == str(pid):
                    peak = max(peak, int(mib))
        except Exception:  # noqa: BLE001 -- a missing nvidia-smi leaves the figure at 0
            pass
        time.sleep(0.2)
    result["driver_peak_mib"] = peak


def run(bin_, args, timeout):
    t0 = time.time()
    p = subprocess.Popen([bin_] + args + ["--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    stop, poll = threading.Event(), {}
    th = threading.Thread(target=driver_peak_mib, args=(p.pid, stop, poll))
    th.start()
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    stop.set()
    th.join()
    row = {"args": args, "exit_code": p.returncode, "seconds": time.time() - t0,
           "driver_peak_bytes": poll.get("driver_peak_mib", 0) << 20,
           "stderr_tail": err.strip().splitlines()[-3:]}
    try:
        j = json.loads(out)
        mem = j.get("memory", {})
        row.update({"plan": j.get("plan"), "trials": len(j.get("trials", [])),
                    "budget_bytes": j.get("budget_bytes"), "peak_bytes": mem.get("peak_bytes"),
                    "allocator": mem.get("allocator"), "tokens_per_s": j.get("tokens_per_s"),
                    "precision_speed": j.get("precision_speed"),
                    "within_budget": j.get("within_budget"), "reused_profile": j.get("reused_profile")})
        if row["peak_bytes"] and row["driver_peak_bytes"]:
            row["figure_over_driver"] = row["peak_bytes"] / row["driver_peak_bytes"]
    except (json.JSONDecodeError, TypeError):
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
        rows["tuned"].append(run(a.bin, ["--budget", budget, "--steps", "20", "--reprobe"] + common,
                                 240))
    grid = [("4", "fp32", "off"), ("4", "bf16", "off"), ("8", "bf16", "off"), ("8", "bf16", "on"),
            ("16", "bf16", "on"), ("2", "fp16", "off")]
    for mb, prec, ckpt in grid:  # explicit plans under the 8G budget's cap
        rows["grid"].append(run(a.bin, ["train", "--budget", "8G", "--micro-batch", mb,
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


if __name__ == "__main__":
    main()
