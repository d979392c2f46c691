"""scripts/gpu-check's verdict (scripts/gpu_check_verdict.py) on recorded outputs: ctest's JUnit
file of `ctest -L cuda` and gpu_check_runs.py's gpu-check.json, one directory per case under
tests/fixtures/gpu-check/. Each case asserts the exit code and that a reason names what failed.

    python tests/test_gpu_check_verdict.py        (ctest: GpuCheck.Verdict)
"""
import copy
import json
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURES = os.path.join(HERE, "fixtures", "gpu-check")
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check_verdict.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.dont_write_bytecode = True  # no scripts/__pycache__ in the source tree
import gpu_check_verdict as v  # noqa: E402

BUDGET_TEST = "Cuda.TheBudgetFigureIsWithinFivePercentOfWhatTheDriverReports"
TWO_GPU_TEST = "Cuda.NcclAveragesGradientsOverTwoGpus"


def junit(case):
    return os.path.join(FIXTURES, case, "ctest-cuda.xml")


def runs(case):
    return os.path.join(FIXTURES, case, "gpu-check.json")


def judge(case, gpu=True, junit_case=None, runs_case=None):
    return v.verdict(junit(junit_case or case), runs(runs_case or case), gpu)


def cli(*args):
    p = subprocess.run([sys.executable, SCRIPT] + list(args), capture_output=True, text=True)
    return p.returncode, p.stdout.splitlines()


class RecordedCases(unittest.TestCase):
    def assertOneReason(self, reasons, *parts):
        self.assertEqual(len(reasons), 1, reasons)
        for part in parts:
            self.assertIn(part, reasons[0])

    def test_a_passing_run_is_verified(self):
        code, reasons = judge("pass")
        self.assertEqual((code, reasons), (v.EXIT_VERIFIED, []))
        rc, out = cli("--junit", junit("pass"), "--runs", runs("pass"))
        self.assertEqual(rc, 0, out)
        self.assertEqual(len(out), 1, out)
        # The excluded test is named, and not counted among the 6 that passed.
        self.assertIn("VERIFIED: 6 cuda tests passed", out[0])
        self.assertIn(TWO_GPU_TEST + ", needs two GPUs", out[0])
        self.assertIn("8 real runs", out[0])

    def test_a_failing_cuda_test_is_named_with_its_assertion(self):
        code, reasons = judge("failing-test")
        self.assertEqual(code, v.EXIT_FAILED)
        self.assertOneReason(reasons, "cuda test " + BUDGET_TEST + " failed",
                             "test_cuda.cpp:140", "exceeds 0.05 * driver")
        rc, out = cli("--junit", junit("failing-test"), "--runs", runs("failing-test"))
        self.assertEqual(rc, 1)
        self.assertEqual(out[-1], "gpu-check: NOT VERIFIED: 1 problem (above)")
        self.assertIn(BUDGET_TEST, out[0])

    def test_a_skipped_test_is_not_a_pass(self):
        code, reasons = judge("skipped-test")
        self.assertEqual(code, v.EXIT_FAILED)
        self.assertOneReason(reasons, "cuda test " + BUDGET_TEST + " was skipped",
                             "nvidia-smi does not report this process's memory by pid")

    def test_a_skip_ctest_reports_as_run_is_still_a_skip(self):
        # status "run", but GTest's "[  SKIPPED ]" in its output (no skip expression in ctest).
        code, reasons = judge("skipped-test-status-run")
        self.assertEqual(code, v.EXIT_FAILED)
        self.assertOneReason(reasons, "Cuda.Fp16LossScalingSkipsAStepOnInf was skipped",
                             "no CUDA device")

    def test_a_run_over_budget_names_the_run_its_peak_and_budget(self):
        code, reasons = judge("over-budget")
        self.assertEqual(code, v.EXIT_FAILED)
        self.assertOneReason(reasons, "train --budget 8G --micro-batch 16 --precision bf16 "
                             "--checkpointing on", "over budget", "peak 8509.4 MiB",
                             "budget 8192.0 MiB")

    def test_a_run_without_the_driver_figure_is_named_with_nvidia_smis_error(self):
        code, reasons = judge("no-driver-figure")
        self.assertEqual(code, v.EXIT_FAILED)
        self.assertOneReason(reasons, "driver figure not read for run `autotune run --budget 24G`",
                             "GPU is lost")

    def test_a_failed_run_names_its_arguments_and_exit_code(self):
        code, reasons = judge("failed-run")
        self.assertEqual(code, v.EXIT_FAILED)
        self.assertOneReason(reasons, "run `autotune run --budget 8G` exited with code 1",
                             "illegal memory access")

    def test_no_gpu_is_its_own_code_and_one_line(self):
        self.assertEqual(v.verdict(junit("no-gpu"), runs("no-gpu"), False),
                         (v.EXIT_NO_GPU, ["no CUDA device: nothing verified"]))
        # Whatever else was recorded: a passing run's files change nothing without a GPU.
        self.assertEqual(judge("pass", gpu=False)[0], v.EXIT_NO_GPU)
        rc, out = cli("--no-gpu")
        self.assertEqual((rc, out), (3, ["no CUDA device: nothing verified"]))

    def test_tests_all_skipped_for_want_of_a_device_fail_when_torch_saw_one(self):
        # What the old gpu-check counted as passed: every cuda test skipped.
        code, reasons = judge("no-gpu", runs_case="pass")
        self.assertEqual(code, v.EXIT_FAILED)
        skipped = [r for r in reasons if "was skipped" in r]
        self.assertEqual(len(skipped), 7, reasons)
        # The two-GPU test is excluded only when skipped for needing two GPUs.
        self.assertTrue(any(TWO_GPU_TEST in r for r in skipped), reasons)
        self.assertIn("no cuda test ran and passed (7 found)", reasons)


class EdgeCases(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        with open(runs("pass")) as f:
            self.runs = json.load(f)

    def tearDown(self):
        self.tmp.cleanup()

    def write(self, name, text):
        path = os.path.join(self.tmp.name, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_no_cuda_test_at_all_fails(self):
        empty = self.write("empty.xml", '<?xml version="1.0" encoding="UTF-8"?>\n'
                           '<testsuite name="Linux-c++" tests="0" failures="0"></testsuite>\n')
        code, reasons = v.verdict(empty, runs("pass"), True)
        self.assertEqual(code, v.EXIT_FAILED)
        self.assertEqual(reasons, ["no cuda test in the ctest results: `ctest -L cuda` found none"])

    def test_missing_or_broken_result_files_fail(self):
        code, reasons = v.verdict(os.path.join(self.tmp.name, "none.xml"), runs("pass"), True)
        self.assertEqual(code, v.EXIT_FAILED)
        self.assertIn("no ctest JUnit results", reasons[0])
        code, reasons = v.verdict(self.write("bad.xml", "<testsuite"), runs("pass"), True)
        self.assertEqual(code, v.EXIT_FAILED)
        self.assertIn("not XML", reasons[0])
        code, reasons = v.verdict(junit("pass"), os.path.join(self.tmp.name, "none.json"), True)
        self.assertEqual(code, v.EXIT_FAILED)
        self.assertIn("no real-run results", reasons[0])
        code, reasons = v.verdict(junit("pass"), self.write("bad.json", "{"), True)
        self.assertEqual(code, v.EXIT_FAILED)
        self.assertIn("not gpu-check.json", reasons[0])

    def test_a_crashed_test_names_ctests_word_for_it(self):
        with open(junit("pass")) as f:
            text = f.read()
        crashed = text.replace('classname="Cuda.MeterCountsKnownAllocations" time="0.62" '
                               'status="run">', 'classname="Cuda.MeterCountsKnownAllocations" '
                               'time="0.62" status="fail">\n\t\t<failure message="SEGFAULT"/>')
        self.assertNotEqual(crashed, text)
        code, reasons = v.verdict(self.write("crash.xml", crashed), runs("pass"), True)
        self.assertEqual(code, v.EXIT_FAILED)
        self.assertEqual(len(reasons), 1, reasons)
        self.assertIn("Cuda.MeterCountsKnownAllocations failed (SEGFAULT)", reasons[0])

    def test_the_excluded_test_counts_when_it_fails(self):
        with open(junit("pass")) as f:
            text = f.read()
        start = text.index('<testcase name="%s"' % TWO_GPU_TEST)
        case = text[start:text.index("</testcase>", start)]
        failing = case.replace('status="notrun"', 'status="fail"').replace(
            '<skipped message="SKIP_REGULAR_EXPRESSION_MATCHED"/>', '<failure message="Failed"/>')
        code, reasons = v.verdict(self.write("two.xml", text.replace(case, failing)),
                                  runs("pass"), True)
        self.assertEqual(code, v.EXIT_FAILED)
        self.assertEqual(len(reasons), 1, reasons)
        self.assertIn(TWO_GPU_TEST + " failed", reasons[0])

    def test_a_timed_out_run_and_an_old_row_without_the_driver_fields(self):
        rows = copy.deepcopy(self.runs)
        rows["grid"][0].update({"timed_out": True, "exit_code": -9, "within_budget": None,
                                "peak_bytes": None})
        old = rows["grid"][1]  # as gpu_check_runs.py wrote it before: a 0 figure, no flag
        for key in ("driver_figure_read", "driver_method", "driver_error"):
            del old[key]
        old["driver_peak_bytes"] = 0
        code, reasons = v.verdict(junit("pass"), self.write("r.json", json.dumps(rows)), True)
        self.assertEqual(code, v.EXIT_FAILED)
        self.assertEqual(len(reasons), 2, reasons)
        self.assertIn("--micro-batch 4 --precision fp32 --checkpointing off` ran over its 90 s "
                      "time limit", reasons[0])
        self.assertIn("driver figure not read for run `autotune train --budget 8G --micro-batch 4"
                      " --precision bf16", reasons[1])

    def test_a_row_without_within_budget_is_judged_by_its_peak_and_budget(self):
        rows = copy.deepcopy(self.runs)
        row = rows["tuned"][0]
        del row["within_budget"]
        del row["name"]  # the label then comes from the arguments, without the shared ones
        row["peak_bytes"] = row["budget_bytes"] + (64 << 20)
        code, reasons = v.verdict(junit("pass"), self.write("r.json", json.dumps(rows)), True)
        self.assertEqual(code, v.EXIT_FAILED)
        self.assertEqual(reasons, ["run `autotune --budget 8G --steps 20 --reprobe` over budget: "
                                   "peak 8256.0 MiB > budget 8192.0 MiB"])

    def test_no_real_run_recorded_fails(self):
        path = self.write("r.json", json.dumps({"tuned": [], "grid": []}))
        self.assertEqual(v.verdict(junit("pass"), path, True),
                         (v.EXIT_FAILED, ["no real run recorded in gpu-check.json"]))

    def test_the_cli_needs_its_files_unless_there_is_no_gpu(self):
        rc, _ = cli("--junit", junit("pass"))
        self.assertEqual(rc, 2)


if __name__ == "__main__":
    unittest.main(verbosity=2)
