"""autotune's Python client (python/autotune), in real child processes the way a training script
runs it: standalone (the defaults, or the plan of AUTOTUNE_PROFILE) and under autotune (the plan
in AUTOTUNE_PLAN, steps reported on AUTOTUNE_REPORT_FD, a trial ending itself with exit 0).
Standard library only; run by ctest as PythonClient.*."""

import json
import os
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_PROFILE = os.path.join(ROOT, "tests", "fixtures", "report", "profile.json")


def run_script(code, env=None, pass_fds=()):
    """Runs `code` in a fresh Python with python/ on its path; returns the CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOTUNE_")}
    full_env["PYTHONPATH"] = os.path.join(ROOT, "python")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, timeout=60, pass_fds=pass_fds)


PRINT_PLAN = """
import json, autotune
p = autotune.plan(global_batch=64, micro_batch=16, precision="bf16", checkpointing=True,
                  num_workers=8)
print(json.dumps(p.as_dict()))
autotune.step(samples=p.micro_batch * p.grad_accum)
print("after step")
"""


class Standalone(unittest.TestCase):
    def test_defaults_are_the_plan(self):
        r = run_script(PRINT_PLAN)
        self.assertEqual(r.returncode, 0, r.stderr)
        lines = r.stdout.splitlines()
        self.assertEqual(json.loads(lines[0]), {
            "micro_batch": 16, "grad_accum": 4, "precision": "bf16", "checkpointing": True,
            "global_batch": 64, "num_workers": 8})
        self.assertEqual(lines[1], "after step")  # step() alone neither reports nor exits

    def test_the_profile_named_by_AUTOTUNE_PROFILE_is_the_plan(self):
        with open(FIXTURE_PROFILE) as f:
            stored = json.load(f)["plan"]
        r = run_script(PRINT_PLAN, {"AUTOTUNE_PROFILE": FIXTURE_PROFILE})
        self.assertEqual(r.returncode, 0, r.stderr)
        p = json.loads(r.stdout.splitlines()[0])
        for key in ("micro_batch", "grad_accum", "precision", "checkpointing"):
            self.assertEqual(p[key], stored[key], key)
        self.assertEqual(p["global_batch"], stored["micro_batch"] * stored["grad_accum"])
        self.assertEqual(p["num_workers"], 8)  # a knob the profile does not hold: the script's

    def test_an_unreadable_profile_is_named(self):
        r = run_script(PRINT_PLAN, {"AUTOTUNE_PROFILE": "/nonexistent/profile.json"})
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("AUTOTUNE_PROFILE=/nonexistent/profile.json", r.stderr)

    def test_a_micro_batch_that_does_not_divide_is_refused(self):
        r = run_script("import autotune; autotune.plan(global_batch=64, micro_batch=12)")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("micro_batch 12 does not divide global_batch 64", r.stderr)


class UnderAutotune(unittest.TestCase):
    def trial_env(self, write_fd, steps):
        plan = {"micro_batch": 4, "grad_accum": 8, "precision": "fp32", "checkpointing": False,
                "global_batch": 32, "knobs": {"num_workers": 2}}
        return {"AUTOTUNE_PLAN": json.dumps(plan), "AUTOTUNE_ROLE": "trial",
                "AUTOTUNE_TRIAL_STEPS": str(steps), "AUTOTUNE_REPORT_FD": str(write_fd)}

    def test_a_trial_follows_the_plan_reports_each_step_and_ends_with_exit_0(self):
        read_fd, write_fd = os.pipe()
        code = """
import json, autotune
p = autotune.plan(global_batch=64, micro_batch=64, num_workers=8)
print(json.dumps(p.as_dict()), flush=True)
while True:  # the user's loop: the trial ends it
    autotune.step(samples=p.micro_batch * p.grad_accum, tokens=p.global_batch * 128)
"""
        r = run_script(code, self.trial_env(write_fd, 3), pass_fds=(write_fd,))
        os.close(write_fd)
        with os.fdopen(read_fd) as f:
            records = [json.loads(line) for line in f]
        self.assertEqual(r.returncode, 0, r.stderr)
        p = json.loads(r.stdout.splitlines()[0])
        self.assertEqual((p["micro_batch"], p["grad_accum"], p["global_batch"]), (4, 8, 32))
        self.assertEqual(p["num_workers"], 2)  # the plan's value of a declared knob
        self.assertEqual(records[0]["event"], "plan")
        self.assertEqual(records[0]["declared"], {"num_workers": 8})
        steps = [r for r in records if r["event"] == "step"]
        self.assertEqual([s["step"] for s in steps], [1, 2, 3])
        self.assertTrue(all(s["samples"] == 32 and s["tokens"] == 32 * 128 for s in steps))
        self.assertTrue(all(a["time"] <= b["time"] for a, b in zip(steps, steps[1:])))

    def test_describe_says_what_plan_declares_and_leaves(self):
        read_fd, write_fd = os.pipe()
        code = """
import autotune
autotune.plan(global_batch=48, micro_batch=16, precision="bf16", num_workers=4)
print("past plan()")
"""
        r = run_script(code, {"AUTOTUNE_ROLE": "describe", "AUTOTUNE_REPORT_FD": str(write_fd)},
                       pass_fds=(write_fd,))
        os.close(write_fd)
        with os.fdopen(read_fd) as f:
            records = [json.loads(line) for line in f]
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn("past plan()", r.stdout)
        self.assertEqual(len(records), 1)
        self.assertEqual(records[0]["declared"], {"num_workers": 4})
        self.assertEqual(records[0]["applies"], {"precision": True, "checkpointing": False})
        self.assertEqual(records[0]["script_defaults"]["global_batch"], 48)
        self.assertEqual(records[0]["script_defaults"]["micro_batch"], 16)

    def test_a_run_is_not_ended_by_the_client(self):
        read_fd, write_fd = os.pipe()
        env = self.trial_env(write_fd, 2)
        env["AUTOTUNE_ROLE"] = "run"
        code = """
import autotune
p = autotune.plan(global_batch=64)
for _ in range(5):
    autotune.step(samples=p.global_batch)
print("trained 5 steps")
"""
        r = run_script(code, env, pass_fds=(write_fd,))
        os.close(write_fd)
        with os.fdopen(read_fd) as f:
            steps = [json.loads(line) for line in f if '"step"' in line]
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("trained 5 steps", r.stdout)
        self.assertEqual(len(steps), 5)

    def test_a_cuda_run_where_torch_sees_no_gpu_is_refused_with_the_fix(self):
        import torch
        if torch.cuda.is_available():
            self.skipTest("this torch sees a GPU; Cuda.ScriptModeTunesTheExampleWithinADeviceBudget "
                          "covers the device figures there")
        read_fd, write_fd = os.pipe()
        env = self.trial_env(write_fd, 2)
        env.update({"AUTOTUNE_DEVICE": "cuda:0", "AUTOTUNE_DEVICE_BUDGET_BYTES": str(2**30)})
        r = run_script("import autotune\nautotune.plan(global_batch=32)\nprint('past plan()')",
                       env, pass_fds=(write_fd,))
        os.close(write_fd)
        os.close(read_fd)
        self.assertNotEqual(r.returncode, 0)
        self.assertNotIn("past plan()", r.stdout)
        self.assertIn("--device cuda:0, but its torch sees no CUDA device", r.stderr)
        self.assertIn("run autotune with --device cpu", r.stderr.splitlines()[-1])


if __name__ == "__main__":
    unittest.main(verbosity=2)
