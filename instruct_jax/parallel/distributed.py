"""Multi-host runs: every host runs the same program; `jax.distributed` joins them into one job.

A TPU pod slice (v5p-64: 8 hosts x 4 chips) or several slices are driven by one process per
host, all running the same command. After `initialize()` each process sees every device of
the job in `jax.devices()` (its own in `jax.local_devices()`), the mesh spans all of them, and
every jitted step is one SPMD program over the whole mesh. What changes for the code around it:

  * data: each process builds only the batch rows its devices hold, wherever the mesh puts them
    (data/loader.py: `process_rows` + `jax.make_array_from_callback`); the batch order is a pure
    function of (seed, step), so hosts agree without talking to each other;
  * checkpoints: every process calls save / restore, orbax writes each host's shards, process
    0 writes the manifest (checkpoint.py);
  * logging: metrics.jsonl, TensorBoard, the progress bar and console lines come from process 0.

When to initialise — `plan()`, a pure function of the flags, the environment and the config:

    explicit   --coordinator HOST:PORT --num-processes N --process-id I (or the env vars
               INSTRUCT_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID, or --set distributed.*)
               -> initialise with exactly these (CPU and GPU clusters, local rehearsal)
    TPU VM     nothing given, TPU chips on the PCI bus -> initialise and let JAX ask the TPU
               metadata server for the workers (one slice or, with MEGASCALE_* set by queued
               resources, several)
    otherwise  a single process; nothing to do

`launch_local()` runs one command as N processes on this machine (127.0.0.1, D emulated CPU
devices each, gloo collectives): the tests use it to prove the multi-host path without a pod.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, MutableMapping, Optional, Sequence

from instruct_jax.errors import ConfigError

# ----------------------------------------------------------------------------- multi-host
@dataclass
class DistributedConfig:
    """Joining a multi-process job (parallel/distributed.py, docs/MULTIHOST.md). The CLI flags
    --coordinator / --num-processes / --process-id and env vars INSTRUCT_JAX_* take precedence."""

    mode: str = "auto"  # auto: join when a coordinator is given or on a TPU VM | on: always | off: one process
    coordinator: str = ""  # host:port of process 0's coordinator service ("" = flag / env / discovered)
    num_processes: int = 0  # processes in the job (0 = flag / env / discovered)
    process_id: int = -1  # this process's index in [0, num_processes) (-1 = flag / env / discovered)
    timeout_s: int = 300  # how long process 0 waits for every process to join


ENV_COORDINATOR = "INSTRUCT_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "INSTRUCT_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "INSTRUCT_JAX_PROCESS_ID"
_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are PCI devices of Google's vendor id (so is the gVNIC network card)
# TPU PCI device ids (v3, plc, v4, v5p, v5e, v6e, 7x); JAX's own table is used when it has one.
_TPU_PCI_DEVICES = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"})
# Emulated CPU devices (tests, laptops) are served by one XLA CPU thread pool of max(cores, devices)
# threads, and a collective holds a pool thread while it waits for the other devices. With one thread
# per device, programs with collectives queued faster than they finish can take every thread and
# deadlock (XLA aborts after 60 s: "Termination timeout ... Exiting"; gloo across processes waits
# 30 min); two threads per device leave room. A rarer deadlock inside one program is XLA's own
# and not cured by this (docs/MULTIHOST.md).
_CPU_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
CPU_THREADS_PER_DEVICE = 2
_CPU_THREADS_ENV = "PJRT_NPROC"  # read by XLA when it creates the CPU client


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `initialize` will do. None fields are left for JAX to discover (TPU metadata)."""

    initialize: bool
    coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    reason: str = ""


def _tpu_device_ids() -> frozenset:
    try:
        from jax._src import hardware_utils  # private, so only an addition to our table

        return _TPU_PCI_DEVICES | frozenset(hardware_utils._TPU_PCI_DEVICE_IDS)
    except (ImportError, AttributeError):
        return _TPU_PCI_DEVICES


def on_tpu_vm(pci_root: str = "/sys/bus/pci/devices") -> bool:
    """Whether TPU chips are attached to this machine: read from sysfs, before any backend starts."""
    tpu_ids = _tpu_device_ids()
    for folder in glob.glob(os.path.join(pci_root, "*")):
        try:
            with open(os.path.join(folder, "vendor")) as f:
                vendor = f.read().strip()
            with open(os.path.join(folder, "device")) as f:
                device = f.read().strip()
        except OSError:
            continue
        if vendor == _GOOGLE_PCI_VENDOR and device in tpu_ids:
            return True
    return False


def _pick(key: str, *candidates, cast=str):
    """The first candidate that is set (not None / "" / the config's 'unset' value), cast."""
    for value in candidates:
        if value is None or value == "":
            continue
        try:
            return cast(value)
        except ValueError:
            raise ConfigError(key, f"expected an integer, got {value!r}") from None
    return None


def plan(cfg: DistributedConfig, *, coordinator: Optional[str] = None, num_processes: Optional[int] = None,
         process_id: Optional[int] = None, env: Optional[Mapping[str, str]] = None,
         tpu: Optional[bool] = None) -> Plan:
    """Decide whether and how to join a multi-process job. Precedence: flags > env vars > config.

    `tpu` (default: `on_tpu_vm()`) is a parameter so that the decision is testable anywhere.
    """
    env = os.environ if env is None else env
    coord = _pick("distributed.coordinator", coordinator, env.get(ENV_COORDINATOR), cfg.coordinator)
    count = _pick("distributed.num_processes", num_processes, env.get(ENV_NUM_PROCESSES),
                  cfg.num_processes or None, cast=int)
    pid = _pick("distributed.process_id", process_id, env.get(ENV_PROCESS_ID),
                None if cfg.process_id < 0 else cfg.process_id, cast=int)
    if cfg.mode not in ("auto", "on", "off"):
        raise ConfigError("distributed.mode", f"expected one of ['auto', 'on', 'off'], got {cfg.mode!r}")
    if count is not None and count < 1:
        raise ConfigError("distributed.num_processes", f"must be >= 1, got {count}")
    if pid is not None and count is not None and not 0 <= pid < count:
        raise ConfigError("distributed.process_id", f"must be in [0, {count}), got {pid}")
    explicit = any(v is not None for v in (coord, count, pid))
    if cfg.mode == "off":
        if count is not None and count > 1:
            raise ConfigError("distributed.mode", f"is 'off' but {count} processes were asked for")
        return Plan(False, reason="distributed.mode=off")
    if count == 1 and cfg.mode == "auto":
        return Plan(False, reason="one process")
    tpu = on_tpu_vm() if tpu is None else tpu
    if explicit and not tpu:
        missing = [name for name, v in (("coordinator", coord), ("num_processes", count), ("process_id", pid))
                   if v is None]
        if missing:
            raise ConfigError("distributed." + missing[0],
                              f"a multi-process run off TPU VMs needs the coordinator address, the process count "
                              f"and this process's id; missing {missing} (flags --coordinator / --num-processes "
                              f"/ --process-id or env {ENV_COORDINATOR} / {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID})")
        return Plan(True, coord, count, pid, reason="explicit coordinator")
    if explicit:
        return Plan(True, coord, count, pid, reason="TPU VM, partly explicit")
    if tpu:
        return Plan(True, reason="TPU VM: workers discovered from the TPU metadata")
    if cfg.mode == "on":
        return Plan(True, reason="distributed.mode=on: cluster discovered by JAX (Slurm, Open MPI, ...)")
    return Plan(False, reason="no coordinator given and not on a TPU VM")


def initialize(p: Plan, timeout_s: int = 300) -> bool:
    """Carry out a plan: join the job (before anything touches devices). Returns whether it did.

    Calling it again in the same process is a no-op. CPU collectives across processes use gloo
    (without it XLA's CPU client cannot run a computation whose devices span processes); the
    setting only concerns the CPU backend, so it is harmless on TPU.
    """
    import jax

    if not p.initialize or jax.distributed.is_initialized():
        return False
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=p.coordinator, num_processes=p.num_processes,
                               process_id=p.process_id, initialization_timeout=timeout_s)
    if jax.process_index() != 0:
        # Console lines come from process 0; the others only speak up for warnings and errors.
        for name in ("", "absl", "jax", "orbax", "instruct_jax"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return True


def describe() -> str:
    """One line about the job: processes, devices, slices (call after initialize)."""
    import jax

    slices = {getattr(d, "slice_index", 0) for d in jax.devices()}
    return (f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local of "
            f"{jax.device_count()} {jax.devices()[0].platform} devices in {len(slices)} slice(s)")


# ----------------------------------------------------------------------------- local rehearsal
def skip_absent_tpu(env: MutableMapping[str, str], pci_root: str = "/sys/bus/pci/devices",
                    dev_root: str = "/dev") -> bool:
    """Set JAX_PLATFORMS=cpu where libtpu is installed but nothing else could run JAX: no Google PCI device,
    no /dev/accel* or /dev/vfio (how TPU chips appear), no CUDA / ROCm plugin, JAX_PLATFORMS not already set.

    With the test requirements (libtpu, for the compile-only pod plans) on a CPU machine, JAX's TPU probe
    otherwise prints an alarming "unexpected worker hostname" error at every start. Any sign of an accelerator
    leaves the choice to JAX. Returns whether it set the variable.
    """
    import importlib.util

    if env.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return False
    if glob.glob(os.path.join(dev_root, "accel*")) or os.path.exists(os.path.join(dev_root, "vfio")):
        return False
    for folder in glob.glob(os.path.join(pci_root, "*")):
        try:
            with open(os.path.join(folder, "vendor")) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return False
        except OSError:
            continue
    plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm6_plugin", "jax_rocm7_plugin", "jax_plugins")
    if any(importlib.util.find_spec(m) is not None for m in plugins):
        return False
    env["JAX_PLATFORMS"] = "cpu"
    return True


def emulate_cpu_devices(env: MutableMapping[str, str], devices: Optional[int] = None) -> None:
    """Set `env` (os.environ before jax is imported, or a child process's) up for emulated CPU devices.

    XLA_FLAGS gets `devices` per process, replacing a count already there (None keeps it). When
    devices are emulated, XLA's CPU thread pool gets CPU_THREADS_PER_DEVICE threads per device unless
    PJRT_NPROC is already set. Without a device count (a GPU or TPU run) nothing changes.
    """
    flags = env.get("XLA_FLAGS", "").split()
    if devices is not None:
        count = f"{_CPU_DEVICE_COUNT_FLAG}={devices}"
        flags = [count if f.startswith(_CPU_DEVICE_COUNT_FLAG) else f for f in flags]
        flags += [] if count in flags else [count]
        env["XLA_FLAGS"] = " ".join(flags)
    counts = [f for f in flags if f.startswith(_CPU_DEVICE_COUNT_FLAG + "=")]
    if counts and _CPU_THREADS_ENV not in env:
        env[_CPU_THREADS_ENV] = str(CPU_THREADS_PER_DEVICE * int(counts[-1].split("=", 1)[1]))


@dataclasses.dataclass
class ProcessResult:
    process_id: int
    returncode: int
    output: str  # stdout and stderr, interleaved
    timed_out: bool = False  # still running at the deadline: killed (after a Python traceback dump)

    def summary(self, tail_chars: int = 4000) -> str:
        """For a failure message: how the process ended, XLA's fatal log lines (an abort's reason,
        which the thread-stack dumps after it push out of any tail), then the end of its output."""
        fatal = [line for line in self.output.splitlines() if re.match(r"F\d{4} ", line)][:5]
        ended = "timed out" if self.timed_out else "exited"
        return "\n".join([f"process {self.process_id} {ended} with {self.returncode}", *fatal, "...",
                          self.output[-tail_chars:]])


def _dump_stacks_and_kill(procs: Sequence[subprocess.Popen], wait_s: float = 5.0) -> None:
    """SIGABRT (faulthandler prints every thread's Python stack), then SIGKILL whatever is left."""
    for p in procs:
        p.send_signal(signal.SIGABRT)
    end = time.monotonic() + wait_s
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_local(argv: Sequence[str], num_processes: int, devices_per_process: int, *,
                 pass_as: str = "flags", env: Optional[Mapping[str, str]] = None,
                 per_process_env: Optional[Sequence[Mapping[str, str]]] = None, cwd: Optional[str] = None,
                 timeout_s: float = 600, grace_s: float = 30,
                 while_running: Optional[Callable[[list[subprocess.Popen]], None]] = None) -> list[ProcessResult]:
    """Run `python <argv>` as `num_processes` processes joined on 127.0.0.1; wait; return their outputs.

    Each process gets `devices_per_process` emulated CPU devices. The coordinator address, the
    process count and the id reach each process as CLI flags appended to argv (pass_as="flags",
    for `-m instruct_jax <command> ...`) or as INSTRUCT_JAX_* env vars (pass_as="env", for any
    script that calls `initialize(plan(...))`). If one process fails, the others would wait in a
    collective until the coordinator's heartbeat times out, so after `grace_s` they are killed.
    A process still running at `timeout_s` first gets SIGABRT, which makes Python's faulthandler
    (enabled in every process) print each thread's stack to its log, then SIGKILL; its result has
    `timed_out=True`, so a hang is told apart from a process that killed itself.
    `while_running(procs)` runs in a thread once all are started (e.g. to send one a SIGTERM).

        results = launch_local(["-m", "instruct_jax", "sft", "--experiment", "experiments/tiny_cpu.py",
                                "--workdir", "runs/mh"], num_processes=2, devices_per_process=4)
        assert all(r.returncode == 0 for r in results), results[0].output
    """
    if pass_as not in ("flags", "env"):
        raise ValueError(f"pass_as must be 'flags' or 'env', got {pass_as!r}")
    coordinator = f"127.0.0.1:{free_port()}"
    base_env = {**os.environ, **(env or {})}
    base_env["JAX_PLATFORMS"] = "cpu"
    base_env["PYTHONFAULTHANDLER"] = "1"
    emulate_cpu_devices(base_env, devices_per_process)
    procs, logs = [], []
    with tempfile.TemporaryDirectory(prefix="instruct_jax_launch_") as tmp:
        for i in range(num_processes):
            proc_env = {**base_env, **(per_process_env[i] if per_process_env else {})}
            args = [sys.executable, *argv]
            if pass_as == "flags":
                args += ["--coordinator", coordinator, "--num-processes", str(num_processes), "--process-id", str(i)]
            else:
                proc_env.update({ENV_COORDINATOR: coordinator, ENV_NUM_PROCESSES: str(num_processes),
                                 ENV_PROCESS_ID: str(i)})
            log = open(os.path.join(tmp, f"process_{i}.log"), "w+")
            logs.append(log)
            procs.append(subprocess.Popen(args, env=proc_env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                          text=True))
        if while_running is not None:
            threading.Thread(target=while_running, args=(procs,), daemon=True).start()
        deadline, first_failure, timed_out = time.monotonic() + timeout_s, None, set()
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if first_failure is None and any(p.poll() not in (None, 0) for p in procs):
                first_failure = now
            if now > deadline and not timed_out:
                timed_out = {i for i, p in enumerate(procs) if p.poll() is None}
                _dump_stacks_and_kill([procs[i] for i in timed_out])
            elif first_failure is not None and now - first_failure > grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
        results = []
        for i, (p, log) in enumerate(zip(procs, logs)):
            log.seek(0)
            results.append(ProcessResult(i, p.wait(), log.read(), i in timed_out))
            log.close()
    return results
