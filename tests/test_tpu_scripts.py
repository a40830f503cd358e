"""tpu/*.sh: the dry-run output for a v5p-64 slice and two v5p-64 slices, and that it is exact.

No gcloud here. A fake `gcloud` first on PATH records every call: a dry run must make none,
and a real run against the fake must make exactly the calls its dry run printed. A third mode
of the fake runs `ssh --command` payloads with bash in a scratch $HOME (a local "worker"), so
launch / status / stop really start tmux, write logs and stop the run.
"""

import json
import os
import shlex
import shutil
import subprocess
import textwrap
import time

import pytest

from conftest import REPO

TPU = REPO / "tpu"
ONE_SLICE = TPU / "examples" / "v5p-64.env"
TWO_SLICES = TPU / "examples" / "v5p-64x2.env"
SCRIPTS = ("create", "sync", "setup", "launch", "status", "stop", "delete", "babysit")
LOC = "--zone=us-east5-a --project=my-gcp-project"

FAKE_GCLOUD = textwrap.dedent('''\
    #!/usr/bin/env python3
    """A stand-in for gcloud: records its argv; answers describe / ssh as the test asks."""
    import json, os, shutil, subprocess, sys
    args, log = sys.argv[1:], os.environ["FAKE_GCLOUD_LOG"]
    with open(log, "a") as f:
        f.write(json.dumps(args) + "\\n")
    mode = os.environ.get("FAKE_GCLOUD_MODE", "record")
    if mode == "fail":
        sys.exit(99)

    def pop(name, default):
        seq = [s for s in os.environ.get(name, "").split(",") if s]
        counter = log + "." + name
        i = int(open(counter).read()) if os.path.exists(counter) else 0
        open(counter, "w").write(str(i + 1))
        return seq[i] if i < len(seq) else default

    if "describe" in args:
        state = pop("FAKE_STATES", "READY")
        if state == "absent":
            print("ERROR: NOT_FOUND", file=sys.stderr)
            sys.exit(1)
        print(state)
    elif "ssh" in args:
        command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
        if mode == "local":
            sys.exit(subprocess.call(["bash", "-c", command], cwd=os.environ["HOME"]))
        if "--worker=0" in args:
            print("t1v-n-0: run_state=" + pop("FAKE_RUN_STATES", "exited 0"))
    elif "scp" in args and mode == "local":
        i = args.index("scp")
        shutil.copy(args[i + 1], os.path.join(os.environ["HOME"], args[i + 2].split(":", 1)[1]))
''')


@pytest.fixture
def fake(tmp_path):
    """Run a tpu script with the fake gcloud first on PATH; returns (result, recorded calls)."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    home.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    log = tmp_path / "gcloud_calls.jsonl"

    def run(script, *args, mode="record", env=None, timeout=60):
        for counter in tmp_path.glob("gcloud_calls.jsonl.*"):
            counter.unlink()
        if log.exists():
            log.unlink()
        full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_GCLOUD_LOG": str(log),
                    "FAKE_GCLOUD_MODE": mode, "TMPDIR": str(tmp_path), "HOME": str(home), "POLL_SECONDS": "0",
                    **(env or {})}
        result = subprocess.run(["bash", str(TPU / f"{script}.sh"), *args], env=full_env, cwd=REPO,
                                capture_output=True, text=True, timeout=timeout)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return result, calls

    run.home = home
    return run


def printed_commands(stdout):
    """The gcloud commands of a dry run's output, as argv lists (comments and local commands dropped)."""
    return [shlex.split(line)[1:] for line in stdout.splitlines() if line.startswith("gcloud ")]


@pytest.mark.parametrize("env_file", [ONE_SLICE, TWO_SLICES], ids=["v5p-64", "2x v5p-64"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_runs_nothing_and_prints_what_a_real_run_does(fake, env_file, script):
    dry, calls = fake(script, "--env", str(env_file), "--dry-run", mode="fail")
    assert dry.returncode == 0, dry.stderr
    assert calls == []  # not even a describe
    printed = printed_commands(dry.stdout)
    assert printed and all(cmd[:2] == ["compute", "tpus"] for cmd in printed)
    # The same script against the fake gcloud calls exactly the printed commands, in order.
    if script == "babysit":
        # The dry run shows three passes: missing -> create; READY -> set up and launch; PREEMPTED ->
        # delete. The real loop then sees the TPU READY again, sets it up, finds the run finished.
        up = "READY" if env_file == ONE_SLICE else "ACTIVE"
        real, calls = fake(script, "--env", str(env_file),
                           env={"FAKE_STATES": f"absent,{up},PREEMPTED,{up}",
                                "FAKE_RUN_STATES": "not launched,exited 0"})
        assert real.returncode == 0, real.stderr
        assert calls[:len(printed)] == printed
        assert "run finished" in real.stderr
        return
    states = {"create": "absent"}.get(script, "READY")
    real, calls = fake(script, "--env", str(env_file), env={"FAKE_STATES": states})
    assert real.returncode == 0, real.stderr
    assert calls == printed


def test_v5p_64_single_slice_commands(fake):
    out = {s: fake(s, "--env", str(ONE_SLICE), "--dry-run", mode="fail")[0].stdout for s in SCRIPTS}
    name = "instruct-jax-v5p64"
    assert (f"gcloud compute tpus tpu-vm create {name} {LOC} --accelerator-type=v5p-64 "
            f"--version=v2-alpha-tpuv5") in out["create"].splitlines()
    assert f"gcloud compute tpus tpu-vm describe {name} {LOC} --format='value(state)'" in out["create"]
    assert f"gcloud compute tpus tpu-vm delete {name} {LOC} --quiet" in out["delete"].splitlines()
    for script in ("sync", "setup", "launch", "status", "stop"):
        for cmd in printed_commands(out[script]):
            if cmd[3] in ("ssh", "scp"):
                assert "--worker=all" in cmd and not any(a.startswith("--node") for a in cmd), cmd
    (launch,) = printed_commands(out["launch"])
    payload = launch[-1].split("=", 1)[1]
    assert ("tmux new-session -d -s instruct_jax 'bash tpu/worker_run.sh venvs/instruct_jax instruct_jax_logs "
            "instruct_jax python -m instruct_jax sft --experiment experiments/llama3_8b_sft_v5p128.py --workdir "
            "/mnt/gcs/my-instruct-jax-bucket/runs/llama3-8b-sft-v5p64'") in payload
    setup = printed_commands(out["setup"])[-1][-1]
    assert "'jax[tpu]==0.10.2'" in setup and "-r instruct_jax/requirements.txt" in setup
    assert "gcsfuse --implicit-dirs my-instruct-jax-bucket /mnt/gcs/my-instruct-jax-bucket" in setup
    assert "kill -TERM $pid" in printed_commands(out["stop"])[0][-1]


def test_two_slice_commands_use_one_queued_resource(fake):
    out = {s: fake(s, "--env", str(TWO_SLICES), "--dry-run", mode="fail")[0].stdout for s in SCRIPTS}
    name = "instruct-jax-2xv5p64"
    assert (f"gcloud compute tpus queued-resources create {name} {LOC} --accelerator-type=v5p-64 "
            f"--runtime-version=v2-alpha-tpuv5 --node-count=2 --node-prefix={name} --spot") in out["create"].splitlines()
    assert f"gcloud compute tpus queued-resources delete {name} {LOC} --force --quiet" in out["delete"].splitlines()
    for script in ("sync", "setup", "launch", "status", "stop"):
        for cmd in printed_commands(out[script]):
            if cmd[3] in ("ssh", "scp"):
                assert cmd[2] == "queued-resources" and "--node=all" in cmd and "--worker=all" in cmd, cmd
    assert "--set mesh.dcn_data=2 mesh.num_slices=2" in out["launch"]
    babysit = printed_commands(out["babysit"])
    assert [c[3] for c in babysit] == ["describe", "create", "describe", "scp", "ssh", "ssh", "ssh", "ssh", "ssh",
                                       "describe", "delete"]
    assert ["--node=0", "--worker=0"] == [a for a in babysit[6] if a.startswith(("--node", "--worker"))]


def test_command_after_double_dash_overrides_the_env_file(fake):
    dry, _ = fake("launch", "--env", str(ONE_SLICE), "--dry-run", "--restart", "--",
                  "python", "-m", "instruct_jax", "sft", "--experiment", "experiments/tiny_cpu.py:sft",
                  "--set", "train.steps=5", "optim.learning_rate=1e-3", mode="fail")
    assert dry.returncode == 0, dry.stderr
    stop, launch = printed_commands(dry.stdout)  # --restart stops the old run first
    assert "kill -TERM" in stop[-1]
    assert ("instruct_jax python -m instruct_jax sft --experiment experiments/tiny_cpu.py:sft --set train.steps=5 "
            "optim.learning_rate=1e-3'") in launch[-1]


@pytest.mark.parametrize("env_text, args, message", [
    ("", ["--dry-run"], "must set PROJECT"),
    ("PROJECT=p\nZONE=z\nNAME=n\nACCELERATOR=v5p-64\nNUM_SLICES=2\nMODE=vm\n", ["--dry-run"], "needs MODE=queued"),
    ("PROJECT=p\nZONE=z\nNAME=n\nACCELERATOR=tpu7x-8\n", ["--dry-run"], "no default RUNTIME_VERSION"),
    ("PROJECT=p\nZONE=z\nNAME=n\nACCELERATOR=v5p-8\n", ["--dry-run", "--bogus"], "unknown option --bogus"),
    ("PROJECT=p\nZONE=z\nNAME=n\nACCELERATOR=v5p-8\n", ["--dry-run"], "nothing to launch"),
])
def test_bad_env_files_and_options_are_named(fake, tmp_path, env_text, args, message):
    env_file = tmp_path / "bad.env"
    env_file.write_text(env_text)
    result, calls = fake("launch", "--env", str(env_file), *args, mode="fail")
    assert result.returncode != 0 and message in result.stderr and calls == []
    missing, _ = fake("create", "--env", str(tmp_path / "nope.env"), "--dry-run", mode="fail")
    assert missing.returncode != 0 and "not found" in missing.stderr


def test_help_prints_the_header(fake):
    result, calls = fake("babysit", "--help", mode="fail")
    assert result.returncode == 0 and "preemptible" in result.stdout and calls == []


# ----------------------------------------------------------------------------- a local "worker"
@pytest.mark.skipif(shutil.which("tmux") is None or shutil.which("git") is None, reason="needs tmux and git")
def test_sync_launch_status_stop_on_a_local_worker(fake, tmp_path):
    """Payloads run with bash in a scratch $HOME: the run starts in tmux, logs, and stops on SIGTERM."""
    session = f"ij_test_{os.getpid()}"
    env_file = tmp_path / "local.env"
    env_file.write_text(f"PROJECT=p\nZONE=z\nNAME=local\nACCELERATOR=v5p-8\nSESSION={session}\n"
                        "STOP_GRACE_SECONDS=20\n")
    venv = fake.home / "venvs" / "instruct_jax" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text("")  # worker_run.sh sources it
    # A stand-in for the trainer: logs steps; on SIGTERM says what the trainer says and exits 0.
    script = ("import signal, sys, time\n"
              "def stop(*_):\n"
              "    print('preemption signal received: saved checkpoint at step 3, exiting cleanly', flush=True)\n"
              "    sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, stop)\n"
              "for step in range(1000):\n"
              "    print('step', step, flush=True); time.sleep(0.2)\n")
    try:
        result, _ = fake("sync", "--env", str(env_file), mode="local")
        assert result.returncode == 0, result.stderr
        assert (fake.home / "instruct_jax" / "tpu" / "worker_run.sh").is_file()
        assert (fake.home / "instruct_jax" / "instruct_jax" / "__main__.py").is_file()
        result, _ = fake("launch", "--env", str(env_file), "--", "python3", "-c", script, mode="local")
        assert result.returncode == 0, result.stderr
        log = fake.home / "instruct_jax_logs" / f"{session}.log"
        deadline = time.time() + 30
        while time.time() < deadline and not (log.exists() and "step 2" in log.read_text()):
            time.sleep(0.2)
        again, _ = fake("launch", "--env", str(env_file), "--", "python3", "-c", script, mode="local")
        assert "already running" in again.stdout  # re-running launch leaves a running session alone
        status, _ = fake("status", "--env", str(env_file), "--lines", "2", mode="local")
        assert "run_state=running" in status.stdout and "step" in status.stdout, status.stdout + status.stderr
        stop, _ = fake("stop", "--env", str(env_file), mode="local")
        assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stderr
        # stop returns only after worker_run.sh recorded how the run ended (no polling here: a stop
        # that killed the tmux session first would lose the exit status on a loaded host).
        exit_file = fake.home / "instruct_jax_logs" / f"{session}.exit"
        assert exit_file.read_text().strip() == "preempted"  # exit 0 after a preemption notice: not finished
        status, _ = fake("status", "--env", str(env_file), "--lines", "0", mode="local")
        assert "run_state=exited preempted" in status.stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
