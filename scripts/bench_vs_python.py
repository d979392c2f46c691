"""Driver of scripts/bench-vs-python (run it through that script). See its header."""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

THREADS = 2
WARMUP_STEPS = 3  # not timed: first steps pay allocation, AdamW state creation and compilation

# name -> the plan and the model, as autotune presets or JSON configs and as ref_trainer.py flags
GPT_SHAPES = {
    "gpt-mini": dict(n_layer=4, n_head=4, d_model=128, seq_len=128),
    "gpt-4x256": dict(n_layer=4, n_head=4, d_model=256, seq_len=256),
    "gpt-10m": dict(n_layer=6, n_head=6, d_model=384, seq_len=256),
}
CONFIGS = [
    dict(name="gpt-mini", shape="gpt-mini", micro_batch=16, precision="fp32", ckpt="off"),
    dict(name="gpt-mini ckpt", shape="gpt-mini", micro_batch=16, precision="fp32", ckpt="on"),
    dict(name="gpt-4x256", shape="gpt-4x256", micro_batch=8, precision="fp32", ckpt="off"),
    dict(name="gpt-4x256 ckpt", shape="gpt-4x256", micro_batch=8, precision="fp32", ckpt="on"),
    dict(name="gpt-10m", shape="gpt-10m", micro_batch=4, precision="fp32", ckpt="off"),
    dict(name="gpt-10m ckpt", shape="gpt-10m", micro_batch=4, precision="fp32", ckpt="on"),
    # bf16 autocast: as fast as fp32 or faster with AVX-512-BF16/AMX, ~0.01x without (AVX2 only):
    # the smallest model, so either CPU finishes it.
    dict(name="gpt-mini bf16", shape="gpt-mini", micro_batch=16, precision="bf16", ckpt="off"),
    dict(name="lstm-small", shape="lstm-small", micro_batch=16, precision="fp32", ckpt="off"),
    # A user's model: the TorchScript interpreter (C++) against the same nn.Module in Python.
    dict(name="t5_small (TorchScript)", shape="t5_small", micro_batch=16, precision="fp32",
         ckpt="off"),
]
EXAMPLES = {"t5_small": "T5Small"}  # examples/NAME.py:CLASS, exported as NAME.pt
LSTM_SMALL = dict(channels=16, hidden=128, layers=2, seq_len=200, outputs=4)
# Same computation: relative loss difference allowed at step 1 (same weights, same batch: only
# summation order differs) and at step 10 (fused vs per-tensor AdamW, rounding compounds).
TOL_STEP1, TOL_STEP10 = 1e-5, 1e-3


def median(v):
    return statistics.median(v) if v else float("nan")


def model_files(tmp):
    paths = {}
    for name, shape in GPT_SHAPES.items():
        if name in ("gpt-mini", "gpt-10m"):
            paths[name] = name  # built-in presets
            continue
        p = os.path.join(tmp, name + ".json")
        with open(p, "w") as f:
            json.dump(dict(name=name, vocab_size=256, **shape), f)
        paths[name] = p
    return paths


def run_cpp(a, cfg, steps, models, tmp):
    run_dir = tempfile.mkdtemp(dir=tmp)
    if cfg["shape"] in EXAMPLES:
        ex = os.path.join(a.root, "examples", cfg["shape"])
        model, data = ex + ".pt", ["--data", ex + ".safetensors"]
    elif cfg["shape"] == "lstm-small":
        model, data = "lstm-small", []
    else:
        model, data = models[cfg["shape"]], ["--data", a.data]
    cmd = [a.autotune, "train", "--model", model] + data + ["--device", "cpu",
           "--micro-batch", str(cfg["micro_batch"]), "--grad-accum", "1",
           "--precision", cfg["precision"], "--checkpointing", cfg["ckpt"], "--steps", str(steps),
           "--eval-sequences", "0", "--log-every", "1", "--run-dir", run_dir]
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS=str(THREADS)))
    if p.returncode != 0:  # e.g. a --baseline-bin that predates the configuration's workload
        lines = p.stderr.strip().splitlines()
        return dict(error=lines[-1][:200] if lines else f"exit {p.returncode}")
    log = os.path.join(run_dir, "steps.jsonl")
    if not os.path.exists(log):
        # An older binary (--baseline-bin) without the step log: its step lines, whole ms.
        rows = re.findall(r"step +\d+/\d+ \| loss ([0-9.]+) .*?\| (\d+) ms \|", p.stderr)
        return dict(losses=[float(l) for l, _ in rows], step_ms=[float(ms) for _, ms in rows],
                    page_faults=[], allocations=[], segment_maps=[])
    with open(log) as f:
        rows = [json.loads(line) for line in f]
    return dict(losses=[r["loss"] for r in rows], step_ms=[r["step_ms"] for r in rows],
                page_faults=[r["page_faults"] for r in rows],
                allocations=[r["cpu_allocations"] for r in rows],
                segment_maps=[r["cpu_segment_maps"] for r in rows])


def run_py(a, cfg, steps, compile_):
    cmd = [sys.executable, os.path.join(a.root, "scripts", "ref_trainer.py"),
           "--micro-batch", str(cfg["micro_batch"]), "--steps", str(steps),
           "--precision", cfg["precision"], "--checkpointing", cfg["ckpt"],
           "--threads", str(THREADS), "--count-allocations", "--data", a.data]
    if cfg["shape"] in EXAMPLES:
        ex = os.path.join(a.root, "examples", cfg["shape"])
        cmd += ["--workload", "module", "--module", f"{ex}.py:{EXAMPLES[cfg['shape']]}",
                "--data", ex + ".safetensors"]
    elif cfg["shape"] == "lstm-small":
        cmd += ["--workload", "lstm"] + sum(
            [["--" + k.replace("_", "-"), str(v)] for k, v in LSTM_SMALL.items()], [])
    else:
        cmd += sum([["--" + k.replace("_", "-"), str(v)]
                    for k, v in GPT_SHAPES[cfg["shape"]].items()], [])
    if compile_:
        cmd.append("--compile")
    p = subprocess.run(cmd, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS=str(THREADS)))
    if p.returncode != 0:
        return dict(error=p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed")
    d = json.loads(p.stdout.strip().splitlines()[-1])
    d["allocations"] = [d.pop("allocations_per_step")] if "allocations_per_step" in d else []
    return d


def tokens_per_step(cfg):
    if cfg["shape"] in EXAMPLES:
        return cfg["micro_batch"]  # samples
    seq = LSTM_SMALL["seq_len"] if cfg["shape"] == "lstm-small" else GPT_SHAPES[cfg["shape"]][
        "seq_len"]
    return cfg["micro_batch"] * seq


def summarize(cfg, run):
    """tokens/s of the median timed step, faults and allocations per step."""
    timed = run["step_ms"][WARMUP_STEPS:]
    def per_step(key):  # None where the side does not count it
        v = run.get(key) or []
        return median(v[WARMUP_STEPS:] or v) if v else None
    return dict(tokens_per_s=tokens_per_step(cfg) / median(timed) * 1e3,
                page_faults=per_step("page_faults"), allocations=per_step("allocations"),
                segment_maps=per_step("segment_maps"))


def check_same_computation(a, configs, models, tmp):
    rows = []
    for cfg in configs:
        if cfg["precision"] != "fp32":
            continue
        cpp = run_cpp(a, cfg, 10, models, tmp)
        py = run_py(a, cfg, 10, False)
        if "error" in cpp or "error" in py:
            print(f"check {cfg['name']}: {cpp.get('error') or py.get('error')}", file=sys.stderr)
            rows.append(dict(config=cfg["name"], ok=False, error=cpp.get("error") or py.get("error")))
            continue
        d1 = abs(cpp["losses"][0] - py["losses"][0]) / abs(py["losses"][0])
        d10 = abs(cpp["losses"][9] - py["losses"][9]) / abs(py["losses"][9])
        ok = d1 <= TOL_STEP1 and d10 <= TOL_STEP10
        rows.append(dict(config=cfg["name"], cpp_step1=cpp["losses"][0], py_step1=py["losses"][0],
                         cpp_step10=cpp["losses"][9], py_step10=py["losses"][9], rel_diff_step1=d1,
                         rel_diff_step10=d10, ok=ok))
        print(f"check {cfg['name']:<16} step 1: {cpp['losses'][0]:.6f} vs {py['losses'][0]:.6f} "
              f"({d1:.1e})  step 10: {cpp['losses'][9]:.6f} vs {py['losses'][9]:.6f} ({d10:.1e})"
              f"  {'ok' if ok else 'DIFFERENT'}", file=sys.stderr)
    return rows


def num(v):
    return "-" if v is None else f"{v:,.0f}"


def fmt_spread(vals):
    return f"{median(vals):,.0f} ({min(vals):,.0f}-{max(vals):,.0f})"


def markdown(result):
    sides = result["sides"]
    out = []
    out.append(f"Command: `{result['command']}` ({result['rounds']} rounds alternated, "
               f"{result['threads']} threads, torch {result['torch']}, CPU capability "
               f"{result['cpu_capability']}, median step of steps "
               f"{WARMUP_STEPS + 1}-N per run; tokens/s median (min-max) over rounds; a ratio is the "
               f"median (min-max) of the rounds' ratios, both sides of a round run back to "
               f"back).\n")
    head = "| configuration | mb | " + " | ".join(f"{s} tok/s" for s in sides) + " | C++ ÷ eager"
    if "compile" in sides:
        head += " | C++ ÷ compile"
    if "baseline" in sides:
        head += " | C++ ÷ baseline"
    out.append(head + " |")
    out.append("|" + "---|" * (head.count("|") - 1))
    for c in result["configs"]:
        r = c["results"]
        row = f"| {c['name']} | {c['micro_batch']} | "
        row += " | ".join(fmt_spread(r[s]["tokens_per_s"]) if r.get(s) and not r[s].get("error")
                          else (r[s]["error"][:60] if r.get(s) else "-") for s in sides)
        for other in ["eager", "compile", "baseline"]:
            if other not in sides:
                continue
            if r.get(other) and not r[other].get("error"):
                rs = c["ratios_vs_" + other]
                row += f" | {c['ratio_vs_' + other]:.2f} ({min(rs):.2f}-{max(rs):.2f})"
            else:
                row += " | -"
        out.append(row + " |")
    out.append("")
    out.append("| configuration | page faults / step (" + ", ".join(sides) +
               ") | CPU allocations / step (" + ", ".join(sides) + ") | C++ segments mapped / step |")
    out.append("|---|---|---|---|")
    for c in result["configs"]:
        r = c["results"]
        def counted(side, key):
            if not r.get(side) or r[side].get("error"):
                return "-"
            v = [x for x in r[side][key] if x is not None]
            return num(median(v)) if v else "-"
        pf = ", ".join(counted(s, "page_faults") for s in sides)
        al = ", ".join(counted(s, "allocations") for s in sides)
        sm = counted("cpp", "segment_maps")
        out.append(f"| {c['name']} | {pf} | {al} | {sm} |")
    out.append("")
    out.append("Same computation (fp32, seed 1337): relative loss difference C++ vs Python eager, "
               f"allowed {TOL_STEP1:g} at step 1 and {TOL_STEP10:g} at step 10.\n")
    out.append("| configuration | step 1 C++ / Python | step 10 C++ / Python | ok |")
    out.append("|---|---|---|---|")
    for c in result["check"]:
        if "error" in c:
            out.append(f"| {c['config']} | {c['error']} | - | NO |")
            continue
        out.append(f"| {c['config']} | {c['cpp_step1']:.6f} / {c['py_step1']:.6f} "
                   f"({c['rel_diff_step1']:.1e}) | {c['cpp_step10']:.6f} / {c['py_step10']:.6f} "
                   f"({c['rel_diff_step10']:.1e}) | {'yes' if c['ok'] else 'NO'} |")
    return "\n".join(out) + "\n"


def write_docs(root, md):
    path = os.path.join(root, "docs", "BENCHMARKS.md")
    begin, end = "<!-- bench-vs-python:begin -->", "<!-- bench-vs-python:end -->"
    text = open(path).read()
    block = f"{begin}\n{md}{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text += "\n## Trainer vs Python PyTorch (`scripts/bench-vs-python`)\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--autotune", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--configs", default="", help="comma-separated names (default: all)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--baseline-bin", default="")
    ap.add_argument("--no-docs", action="store_true")
    a = ap.parse_args()
    a.data = os.path.join(a.root, "data", "corpus.tok")
    import torch
    configs = [c for c in CONFIGS if not a.configs or c["name"] in a.configs.split(",")]
    sides = ["cpp", "eager"] + ([] if a.no_compile else ["compile"]) + (
        ["baseline"] if a.baseline_bin else [])
    tmp = tempfile.mkdtemp(prefix="bench-vs-python-")
    models = model_files(tmp)
    for name in EXAMPLES:  # the examples' model and data files, made by their scripts
        if any(c["shape"] == name for c in configs) and not os.path.exists(
                os.path.join(a.root, "examples", name + ".pt")):
            subprocess.run([sys.executable, os.path.join(a.root, "examples", name + ".py")],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    check = check_same_computation(a, configs, models, tmp)

    runs = {c["name"]: {s: [] for s in sides} for c in configs}
    for rnd in range(a.rounds):
        for cfg in configs:
            order = sides if rnd % 2 == 0 else list(reversed(sides))
            for side in order:
                if side == "baseline" and cfg["shape"] in EXAMPLES:
                    continue  # the baseline binary predates TorchScript models
                steps = cfg.get("steps", a.steps)
                t0 = time.time()
                if side == "cpp":
                    r = run_cpp(a, cfg, steps, models, tmp)
                elif side == "baseline":
                    r = run_cpp(argparse.Namespace(**{**vars(a), "autotune": a.baseline_bin}), cfg,
                                steps, models, tmp)
                else:
                    r = run_py(a, cfg, steps, side == "compile")
                if "error" in r:
                    runs[cfg["name"]][side].append(r)
                    print(f"round {rnd + 1} {cfg['name']:<16} {side:<8} error: {r['error']}",
                          file=sys.stderr)
                    continue
                s = summarize(cfg, r)
                runs[cfg["name"]][side].append(s)
                print(f"round {rnd + 1} {cfg['name']:<16} {side:<8} {s['tokens_per_s']:>9,.0f} "
                      f"tok/s  faults/step {num(s['page_faults']):>7}  allocs/step "
                      f"{num(s['allocations']):>6}  ({time.time() - t0:.0f} s)", file=sys.stderr)

    out_configs = []
    for cfg in configs:
        res = {}
        for side in sides:
            ok = [r for r in runs[cfg["name"]][side] if "error" not in r]
            if not ok:
                errs = runs[cfg["name"]][side]
                res[side] = dict(error=errs[0]["error"] if errs else "not run")
                continue
            res[side] = {k: [r[k] for r in ok] for k in ok[0]}
        entry = dict(name=cfg["name"], micro_batch=cfg["micro_batch"], precision=cfg["precision"],
                     checkpointing=cfg["ckpt"], results=res)
        for other in ["eager", "compile", "baseline"]:
            if other in res and "error" not in res[other] and "error" not in res["cpp"]:
                # Per round: the two sides ran back to back there, so a slow spell of this shared
                # machine hits both; the ratio is the median of the rounds' ratios.
                ratios = [c / o for c, o in zip(res["cpp"]["tokens_per_s"],
                                                 res[other]["tokens_per_s"])]
                entry["ratio_vs_" + other] = median(ratios)
                entry["ratios_vs_" + other] = ratios
        out_configs.append(entry)
    command = os.environ.get("AUTOTUNE_BENCH_COMMAND", "scripts/bench-vs-python").strip()
    result = dict(command=command, rounds=a.rounds, steps=a.steps, threads=THREADS,
                  torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability(), sides=sides, check=check, configs=out_configs,
                  date=time.strftime("%Y-%m-%d"))
    os.makedirs(os.path.join(a.root, "docs", "bench"), exist_ok=True)
    with open(os.path.join(a.root, "docs", "bench", "vs-python.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    print(md)
    if not a.no_docs:
        write_docs(a.root, md)
    if not all(c["ok"] for c in check):
        print("bench-vs-python: C++ and Python do not compute the same thing (see the check)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
