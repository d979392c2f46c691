"""The verdict of scripts/gpu-check: whether a GPU run verified the CUDA path (stdlib only).

    python3 scripts/gpu_check_verdict.py --junit OUT/ctest-cuda.xml --runs OUT/gpu-check.json
    python3 scripts/gpu_check_verdict.py --no-gpu

It reads what scripts/gpu-check recorded: ctest's JUnit file of `ctest -L cuda` (--output-junit)
and gpu-check.json as scripts/gpu_check_runs.py writes it, and prints one line per problem, then
the verdict line. Exit status:

    0  verified: at least one cuda test existed, every cuda test ran and passed (a skipped,
       not-run or disabled test is not a pass, unless EXCLUDED lists it and it was skipped for
       the reason given there), every real run exited 0 within its budget, and the driver's
       figure of its memory was read
    1  not verified: the lines above the verdict name what (a test that failed or was skipped,
       a run's arguments and exit code, a run over budget with its peak and budget, a run whose
       driver figure was not read, a missing or unreadable result file)
    2  usage (argparse)
    3  no CUDA device: the one line "no CUDA device: nothing verified"

--skip-runs (GPU_CHECK_SKIP_RUNS=1) judges the tests only; the verdict line then says so.
"""
import argparse
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

EXIT_VERIFIED = 0
EXIT_FAILED = 1
EXIT_NO_GPU = 3
NO_GPU_LINE = "no CUDA device: nothing verified"

# Tests that may be skipped without failing the check, each with the text its skip message must
# hold (a skip for any other reason, e.g. "no CUDA device", still fails). They are left out of the
# count of verified tests and named in the verdict line.
EXCLUDED = {
    # Two NCCL ranks need two devices (two ranks cannot share one); a one-GPU machine skips it.
    # Cuda.NcclCarriesARanksCollectivesOnTheDevice checks what one rank can show.
    "Cuda.NcclAveragesGradientsOverTwoGpus": "needs two GPUs",
}

MIB = 1 << 20
# Arguments every real run shares (paths and common settings): left out of a run's label.
_COMMON_WITH_VALUE = {"--data", "--profile-dir", "--device", "--global-batch", "--eval-sequences",
                      "--model"}


def _one_line(text, limit=300):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---- the cuda tests (ctest --output-junit) ------------------------------------------------------
def _gtest_message(output, marker):
    """'file:line: <first line after it>' for the first gtest line ending in ': <marker>'."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(.*?):(\d+): " + marker + r"$", line.strip())
        if not m:
            continue
        rest = next((x.strip() for x in lines[i + 1:] if x.strip()), "")
        return "%s:%s: %s" % (os.path.basename(m.group(1)), m.group(2), rest)
    return ""


def read_tests(junit_path):
    """[(name, outcome, detail)] from ctest's JUnit file; outcome is passed, failed or skipped.

    ctest writes status "run" (exit 0), "fail", "notrun" (a skip: SKIP_REGULAR_EXPRESSION, which
    gtest_discover_tests sets to GTest's "[  SKIPPED ]") or "disabled". A "run" whose output holds
    "[  SKIPPED ]" (a ctest without the skip expression) is a skip too. Raises OSError or
    ET.ParseError."""
    root = ET.parse(junit_path).getroot()
    tests = []
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        status = case.get("status", "")
        output = case.findtext("system-out") or ""
        gtest_skipped = re.search(r"^\[  SKIPPED \] ", output, re.M) is not None
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        if status == "fail" or failure is not None:
            why = (failure.get("message", "") if failure is not None else "") or "Failed"
            where = _gtest_message(output, "Failure")  # the first failed assertion
            if where:
                detail = "at " + where
            else:  # a crash, a timeout: ctest's word and the last line of output
                last = [x.strip() for x in output.splitlines() if x.strip()]
                detail = "(%s): %s" % (why, last[-1] if last else "no output")
            tests.append((name, "failed", detail))
        elif status in ("notrun", "disabled", "skipped") or case.find("skipped") is not None \
                or gtest_skipped:
            skipped = case.find("skipped")
            detail = _gtest_message(output, "Skipped")
            if detail:  # the skip's own message, not the file and line
                detail = detail.split(": ", 1)[1] or detail
            else:
                detail = (skipped.get("message") if skipped is not None else "") or status
            tests.append((name, "skipped", detail))
        elif status in ("run", ""):
            tests.append((name, "passed", ""))
        else:
            tests.append((name, "failed", "(ctest status '%s')" % status))
    return tests


def test_reasons(tests):
    """(reasons, passed names, excluded names) for read_tests' list."""
    reasons, passed, excluded = [], [], []
    for name, outcome, detail in tests:
        if outcome == "passed":
            passed.append(name)
        elif outcome == "skipped" and name in EXCLUDED and EXCLUDED[name] in detail:
            excluded.append(name)
        elif outcome == "skipped":
            reasons.append(_one_line("cuda test %s was skipped, not run (a skip is not a pass): %s"
                                     % (name, detail)))
        else:
            reasons.append(_one_line("cuda test %s failed %s" % (name, detail)))
    if not tests:
        reasons.append("no cuda test in the ctest results: `ctest -L cuda` found none")
    elif not passed:
        reasons.append("no cuda test ran and passed (%d found)" % len(tests))
    return reasons, passed, excluded


# ---- the real runs (gpu-check.json) --------------------------------------------------------------
def run_label(row):
    """The run's name (gpu_check_runs.py records one), else its arguments bar the shared ones."""
    if row.get("name"):
        return row["name"]
    args, out, skip = row.get("args") or [], [], False
    for a in args:
        if skip:
            skip = False
        elif a in _COMMON_WITH_VALUE:
            skip = True
        elif a != "--json":
            out.append(str(a))
    return " ".join(out) or "(no arguments)"


def runs_of(runs):
    """Every real run's row in gpu-check.json, tuned then grid."""
    rows = []
    for key in ("tuned", "grid"):
        rows += [r for r in (runs.get(key) or []) if isinstance(r, dict)]
    return rows


def _mib(b):
    return "%.1f MiB" % (b / MIB)


def run_reasons(runs):
    """One line per problem of the real runs: exit code, budget, driver figure."""
    rows = runs_of(runs)
    if not rows:
        return ["no real run recorded in gpu-check.json"]
    reasons = []
    for row in rows:
        label = "run `autotune %s`" % run_label(row)
        code = row.get("exit_code")
        tail = row.get("stderr_tail") or []
        last = (": " + _one_line(tail[-1], 120)) if tail else ""
        if row.get("timed_out"):
            reasons.append("%s ran over its %s s time limit and was killed%s"
                           % (label, row.get("timeout_s", "?"), last))
        elif code != 0:
            reasons.append("%s exited with code %s%s" % (label, code, last))
        peak, budget = row.get("peak_bytes"), row.get("budget_bytes")
        within = row.get("within_budget")
        if within is None and peak is not None and budget is not None:
            within = peak <= budget
        if within is False:
            reasons.append("%s over budget: peak %s > budget %s"
                           % (label, _mib(peak or 0), _mib(budget or 0)))
        elif within is None and code == 0 and not row.get("timed_out"):
            reasons.append("%s reported no peak and budget (no JSON result): within budget unknown"
                           % label)
        read = row.get("driver_figure_read")
        if read is None:  # a row from before the field existed
            read = bool(row.get("driver_peak_bytes"))
        if not read:
            why = row.get("driver_error") or "no figure"
            reasons.append(_one_line("driver figure not read for %s (nvidia-smi): %s"
                                     % (label, why)))
    return reasons


# ---- the verdict ---------------------------------------------------------------------------------
def verdict(junit_path, runs_path, gpu_seen, skip_runs=False):
    """(exit code, reasons): EXIT_VERIFIED with no reasons, EXIT_FAILED with one line per problem,
    or EXIT_NO_GPU with exactly [NO_GPU_LINE] when torch saw no CUDA device."""
    if not gpu_seen:
        return EXIT_NO_GPU, [NO_GPU_LINE]
    reasons = []
    try:
        reasons += test_reasons(read_tests(junit_path))[0]
    except (OSError, TypeError) as e:
        reasons.append("no ctest JUnit results at %s (the build failed, or ctest did not run or is "
                       "older than 3.21): %s" % (junit_path, getattr(e, "strerror", None) or e))
    except ET.ParseError as e:
        reasons.append("ctest JUnit results %s are not XML: %s" % (junit_path, e))
    if not skip_runs:
        try:
            with open(runs_path) as f:
                runs = json.load(f)
            if not isinstance(runs, dict):
                raise ValueError("not a JSON object")
            reasons += run_reasons(runs)
        except (OSError, TypeError) as e:
            reasons.append("no real-run results at %s (scripts/gpu_check_runs.py did not write "
                           "them): %s" % (runs_path, getattr(e, "strerror", None) or e))
        except ValueError as e:
            reasons.append("real-run results %s are not gpu-check.json: %s" % (runs_path, e))
    return (EXIT_FAILED if reasons else EXIT_VERIFIED), reasons


def verdict_line(code, reasons, junit_path=None, runs_path=None, skip_runs=False):
    """The last line gpu-check prints."""
    if code == EXIT_NO_GPU:
        return NO_GPU_LINE
    if code != EXIT_VERIFIED:
        return "gpu-check: NOT VERIFIED: %d problem%s (above)" % (len(reasons),
                                                                  "" if len(reasons) == 1 else "s")
    _, passed, excluded = test_reasons(read_tests(junit_path))
    line = "gpu-check: VERIFIED: %d cuda test%s passed" % (len(passed),
                                                           "" if len(passed) == 1 else "s")
    if excluded:
        line += " (excluded: %s)" % ", ".join("%s, %s" % (n, EXCLUDED[n]) for n in excluded)
    if skip_runs:
        return line + "; real runs skipped (GPU_CHECK_SKIP_RUNS=1)"
    with open(runs_path) as f:
        rows = runs_of(json.load(f))
    methods = sorted({r.get("driver_method") or "per_pid" for r in rows})
    return line + "; %d real run%s exited 0 within budget, driver figure read for each (%s)" % (
        len(rows), "" if len(rows) == 1 else "s", ", ".join(methods))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--junit", help="ctest --output-junit file of `ctest -L cuda`")
    ap.add_argument("--runs", help="gpu-check.json of scripts/gpu_check_runs.py")
    ap.add_argument("--no-gpu", action="store_true", help="torch saw no CUDA device")
    ap.add_argument("--skip-runs", action="store_true", help="judge the tests only")
    a = ap.parse_args(argv)
    if not a.no_gpu and (not a.junit or (not a.runs and not a.skip_runs)):
        ap.error("give --junit and --runs (or --skip-runs), or --no-gpu")
    code, reasons = verdict(a.junit, a.runs, not a.no_gpu, a.skip_runs)
    if code == EXIT_NO_GPU:
        print(NO_GPU_LINE, flush=True)
        return code
    for r in reasons:
        print("gpu-check: " + r)
    print(verdict_line(code, reasons, a.junit, a.runs, a.skip_runs), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
