"""Behaviour unchanged across a restructure: run the same jobs from two checkouts on one machine and compare.

    git worktree add /tmp/before <parent commit>
    python benchmarks/behaviour_check.py --before /tmp/before --after . --out docs/behaviour_check.json [--pipeline]

For each checkout (each run with its own package on PYTHONPATH, 8 emulated CPU devices, the same data files):
tiny pretraining, SFT (from that pretraining), the tiny reward model and the toy PPO run; with --pipeline also
the README's main job for seed 0. Compared: every metrics.jsonl row's losses, rewards, scores and KL (exactly),
report.json without its wall times (exactly), and the tiny SFT step time (median over the non-evaluation rows
of --timing-runs runs of each checkout, alternated so both see the same machine load). Also checks that the
newer code restores the older code's checkpoint and loads its exports: it resumes the old SFT run, initialises
SFT from the old pretraining export and scores with the old reward model (scores equal to the old code's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WALL_KEYS = ("seconds", "wall", "time", "tokens_per_sec", "mfu")
COMPARED = ("loss", "reward", "score", "kl", "accuracy", "value", "entropy", "gold", "win")


def run(repo: str, args: list[str], log: str, data: str) -> None:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=os.path.abspath(repo),
               INSTRUCT_JAX_DATA=data, JAX_PLATFORMS="cpu")
    with open(log, "w") as f:
        result = subprocess.run([sys.executable, "-m", "instruct_jax", *args], cwd=repo, env=env, stdout=f,
                                stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed in {repo}: see {log}")


def jobs(out: str, pipeline: bool) -> list[tuple[str, list[str]]]:
    j = [("tiny-pt", ["pretrain", "--experiment", "experiments/tiny_cpu.py:pretrain"]),
         ("tiny-sft", ["sft", "--experiment", "experiments/tiny_cpu.py:sft", "--set",
                       f"train.init_from={out}/tiny-pt"]),
         ("tiny-rm", ["rm", "--experiment", "experiments/tiny_rm.py", "--set", f"train.init_from={out}/tiny-pt"]),
         ("tiny-ppo-toy", ["ppo", "--experiment", "experiments/tiny_ppo.py:toy", "--set",
                           f"train.init_from={out}/tiny-pt"])]
    if pipeline:
        j.append(("pipeline", ["pipeline", "--experiment", "experiments/tiny_cpu.py"]))
    return j


def numbers(path: str) -> list[dict]:
    rows = [json.loads(line) for line in open(path)]
    return [{k: v for k, v in r.items() if any(c in k for c in COMPARED) and not any(w in k for w in WALL_KEYS)}
            for r in rows]


def without_walls(node):
    if isinstance(node, dict):
        return {k: without_walls(v) for k, v in node.items() if not any(w in k for w in WALL_KEYS)}
    if isinstance(node, list):
        return [without_walls(x) for x in node]
    return node


def sft_step_times(repo: str, work: str, data: str, pt: str) -> list[float]:
    shutil.rmtree(work, ignore_errors=True)
    run(repo, ["sft", "--experiment", "experiments/tiny_cpu.py:sft", "--workdir", work, "--set",
               f"train.init_from={pt}"], work + ".log", data)
    rows = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
    return [r["step_time"] for r in rows[1:] if "eval_loss" not in r and "step_time" in r]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True)
    p.add_argument("--after", required=True)
    p.add_argument("--out", default=None, help="JSON results (default: print only)")
    p.add_argument("--pipeline", action="store_true", help="also the main job for seed 0 (about 10 minutes each)")
    p.add_argument("--timing-runs", type=int, default=3)
    p.add_argument("--data", default=os.path.join(HERE, "..", "data"), help="the data folder both checkouts read")
    a = p.parse_args()
    data = os.path.abspath(a.data)
    root = tempfile.mkdtemp(prefix="behaviour_check_")
    result = {"before": os.path.abspath(a.before), "after": os.path.abspath(a.after), "jobs": {}, "seconds": {}}
    for side, repo in (("before", a.before), ("after", a.after)):
        out = os.path.join(root, side)
        os.makedirs(out)
        for name, args in jobs(out, a.pipeline):
            start = time.perf_counter()
            run(repo, args + ["--workdir", os.path.join(out, name)], os.path.join(out, name + ".log"), data)
            result["seconds"][f"{side}/{name}"] = round(time.perf_counter() - start, 1)
    for name, _ in jobs("", a.pipeline):
        before, after = os.path.join(root, "before", name), os.path.join(root, "after", name)
        entry = {"metrics_rows": len(numbers(os.path.join(before, "metrics.jsonl")))} if name != "pipeline" else {}
        if name != "pipeline":
            entry["metrics_identical"] = numbers(os.path.join(before, "metrics.jsonl")) == numbers(
                os.path.join(after, "metrics.jsonl"))
        else:
            entry["report_identical"] = without_walls(json.load(open(os.path.join(before, "report.json")))) == \
                without_walls(json.load(open(os.path.join(after, "report.json"))))
        result["jobs"][name] = entry
    # Old checkpoints and exports under the new code.
    old, new_repo = os.path.join(root, "before"), a.after
    resumed = os.path.join(root, "resume-sft")
    shutil.copytree(os.path.join(old, "tiny-sft"), resumed)
    run(new_repo, ["sft", "--experiment", "experiments/tiny_cpu.py:sft", "--workdir", resumed, "--set",
                   f"train.init_from={old}/tiny-pt"], resumed + ".log", data)
    result["restore_old_checkpoint"] = "resumed from checkpoint" in open(resumed + ".log").read()
    pairs = os.path.join(root, "pairs.jsonl")
    with open(pairs, "w") as f:
        for prompt, response in (("Say something.", "good sweet day"), ("Say something.", "bad foul day"),
                                 ("Hi", "good good good good good good")):
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    scores = {}
    for side, repo in (("before", a.before), ("after", a.after)):
        target = os.path.join(root, f"scores_{side}.jsonl")
        run(repo, ["score", "--experiment", "experiments/tiny_rm.py", "--workdir", os.path.join(old, "tiny-rm"),
                   "--input", pairs, "--output", target], target + ".log", data)
        scores[side] = [json.loads(line)["score"] for line in open(target)]
    result["old_reward_export_scores_identical"] = scores["before"] == scores["after"]
    # Step time, alternated.
    times = {"before": [], "after": []}
    for i in range(a.timing_runs):
        for side, repo in (("before", a.before), ("after", a.after)):
            times[side] += sft_step_times(repo, os.path.join(root, f"timing-{side}-{i}"), data,
                                          os.path.join(old, "tiny-pt"))
    result["tiny_sft_step_time_median_s"] = {s: statistics.median(t) for s, t in times.items()}
    result["tiny_sft_step_time_spread_s"] = {s: [min(t), max(t)] for s, t in times.items()}
    print(json.dumps(result, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    shutil.rmtree(root, ignore_errors=True)
    ok = all(v for j in result["jobs"].values() for k, v in j.items() if k.endswith("identical"))
    ok = ok and result["restore_old_checkpoint"] and result["old_reward_export_scores_identical"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
