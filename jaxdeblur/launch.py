"""Runs one command as several JAX processes on this machine: a multi-host run in miniature.

Every process of a multi-host run executes the same program; `jax.distributed` connects
them through a coordinator, and each process feeds its own share of the global batch to
its own devices. This launcher starts ``--processes`` copies of a command on localhost,
each with ``--local-devices`` forced CPU devices, so that the per-process code paths (data
shards, collectives across processes, checkpoints written together, files written once)
run on one machine exactly as on a TPU pod slice or a GPU cluster::

  python -m jaxdeblur.launch --processes 2 --local-devices 4 -- \\
      python train_scripts/ufpnet.py --workdir runs/ufpnet_2x4

Each process gets, in its environment:

* ``JAXDEBLUR_COORDINATOR`` = ``127.0.0.1:<port>`` (a port the OS reports free),
  ``JAXDEBLUR_NUM_PROCESSES`` = N and ``JAXDEBLUR_PROCESS_ID`` = 0 .. N-1, which
  `jaxdeblur.train.mesh.initialize_distributed` turns into ``jax.distributed.initialize``
  (with gloo collectives for the CPU); ``JAX_COORDINATOR_BIND_ADDRESS`` keeps the
  coordinator on the loopback interface;
* with ``--local-devices D``: ``JAX_PLATFORMS=cpu`` and
  ``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (so N x D devices in all);
* ``JAX_COMPILATION_CACHE_DIR`` = ``--compilation-cache`` (default
  ``<log dir>/compilation_cache``) unless already set: process 0 writes what it compiles
  there, so that a restart given the same folder compiles less.

A single process (``--processes 1``) gets none of the ``JAXDEBLUR_*`` variables: it runs
as a plain program on its D devices, the reference a multi-process run must match.

Every line a process prints is shown prefixed with ``[process i]`` and kept in
``<log dir>/process_<i>.log``. When a process exits with a non-zero status (a crash, a
``kill -9``), the others would wait for it forever in their next collective: the
launcher stops them (SIGTERM, then SIGKILL after ``grace`` seconds) and fails with a
message naming the process and its exit status. ``--timeout`` stops a run that hangs.
Ctrl-C (or SIGTERM) to the launcher is passed on to every process, and the launcher waits
for them to end (training loops stop after the same step and save it). Exit status of the
command line: 0 when every process succeeded, 1 otherwise.

Only for one machine: the coordinator listens on the loopback interface, and the forced
devices are CPU devices. On a cluster every host starts its own process (README,
"Several processes").

Python::

  from jaxdeblur import launch
  launch.run([sys.executable, "train_scripts/ufpnet.py", "--workdir", "runs/x"],
             processes=2, local_devices=4, timeout=600)
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence

#: Environment variables read by `jaxdeblur.train.mesh.initialize_distributed`.
COORDINATOR_ENV = "JAXDEBLUR_COORDINATOR"
NUM_PROCESSES_ENV = "JAXDEBLUR_NUM_PROCESSES"
PROCESS_ID_ENV = "JAXDEBLUR_PROCESS_ID"

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
#: Lines of a failed process's output quoted in the error message.
_TAIL_LINES = 20


class LaunchError(RuntimeError):
    """A launched process failed, or the run timed out; the others have been stopped.

    Attributes:
      process_id: the process that failed first (None for a timeout).
      returncode: its exit status (negative: killed by that signal), or None.
      log_dir: the folder of the ``process_<i>.log`` files.
    """

    def __init__(self, message: str, *, process_id: int | None, returncode: int | None,
                 log_dir: pathlib.Path):
        super().__init__(message)
        self.process_id, self.returncode, self.log_dir = process_id, returncode, log_dir


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS reports free (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_environment(process_id: int, num_processes: int, coordinator: str, *,
                        local_devices: int | None = None,
                        compilation_cache: str | os.PathLike | None = None,
                        base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of process ``process_id`` of ``num_processes``.

    Args:
      process_id: 0 .. num_processes - 1.
      num_processes: how many processes take part (1: no ``JAXDEBLUR_*`` variables).
      coordinator: ``host:port`` of the coordinator (process 0 serves it).
      local_devices: forced CPU devices per process, or None to leave the platform alone.
      compilation_cache: JAX's persistent compilation cache folder, unless ``base`` sets
        ``JAX_COMPILATION_CACHE_DIR`` already: process 0 writes the programs it compiles
        there, and a restart (every process) reads them back instead of compiling again.
      base: the environment to extend (default: this process's).

    Returns:
      A new dict.

    Example:
      >>> env = process_environment(1, 2, "127.0.0.1:1234", local_devices=4, base={})
      >>> env["JAXDEBLUR_PROCESS_ID"], env["XLA_FLAGS"]
      ('1', '--xla_force_host_platform_device_count=4')
    """
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    env = dict(os.environ if base is None else base)
    # Lines reach the launcher (and its log files) as they are printed, not when a
    # block-buffered pipe fills.
    env["PYTHONUNBUFFERED"] = "1"
    for name in (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV):
        env.pop(name, None)
    if num_processes > 1:
        env[COORDINATOR_ENV] = coordinator
        env[NUM_PROCESSES_ENV] = str(num_processes)
        env[PROCESS_ID_ENV] = str(process_id)
        env["JAX_COORDINATOR_BIND_ADDRESS"] = coordinator
    if compilation_cache is not None:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", os.fspath(compilation_cache))
    if local_devices is not None:
        if local_devices < 1:
            raise ValueError(f"local_devices must be >= 1, got {local_devices}")
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith(_DEVICE_COUNT_FLAG)]
        env["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_COUNT_FLAG}={local_devices}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


def _describe_status(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
            return f"was killed by {name} (exit status {returncode})"
        except ValueError:
            pass
    return f"exited with status {returncode}"


class Job:
    """N running processes of one command (`start`); `wait` supervises them.

    Attributes:
      processes: the ``subprocess.Popen`` of each process, by process id.
      log_dir: where ``process_<i>.log`` are written.
      coordinator: the ``host:port`` given to the processes.
      grace: seconds between SIGTERM and SIGKILL in `stop`.
      interrupted: the signal passed on by `interrupt`, or None.
    """

    def __init__(self, processes: list[subprocess.Popen], log_dir: pathlib.Path,
                 coordinator: str, *, echo: bool, grace: float):
        self.processes, self.log_dir, self.coordinator = processes, log_dir, coordinator
        self.grace = grace
        self.interrupted: int | None = None
        self._lock = threading.Lock()
        self._tails = [collections.deque(maxlen=_TAIL_LINES) for _ in processes]
        # When each process ended (monotonic seconds): a failure is blamed on the process
        # that ended first, not on the ones that fail because it is gone.
        self._ended: list[float | None] = [None] * len(processes)
        self._threads = []
        for i in range(len(processes)):
            # Created (empty) before any reader starts: a log is readable once `start` returns.
            self.log_file(i).write_text("", encoding="utf-8")
            self._threads.append(threading.Thread(target=self._read, args=(i, echo),
                                                  daemon=True))
            self._threads.append(threading.Thread(target=self._reap, args=(i,), daemon=True))
        for thread in self._threads:
            thread.start()

    def log_file(self, process_id: int) -> pathlib.Path:
        return self.log_dir / f"process_{process_id}.log"

    def _read(self, process_id: int, echo: bool) -> None:
        prefix = f"[process {process_id}] "
        with open(self.log_file(process_id), "a", encoding="utf-8") as log:
            for raw in self.processes[process_id].stdout:
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                log.write(line + "\n")
                log.flush()
                self._tails[process_id].append(line)
                if echo:
                    with self._lock:
                        print(prefix + line, flush=True)

    def _reap(self, process_id: int) -> None:
        self.processes[process_id].wait()
        self._ended[process_id] = time.monotonic()

    def returncodes(self) -> list[int | None]:
        """Each process's exit status so far (None: still running)."""
        return [p.poll() for p in self.processes]

    def wait(self, timeout: float | None = None) -> None:
        """Waits until every process has exited with status 0.

        Args:
          timeout: seconds from now; None waits as long as the processes run.

        Raises:
          LaunchError: a process exited with a non-zero status (the others are stopped
            first; the message names the process that ended first, its status and its
            last lines), the processes ended after `interrupt`, or the timeout passed
            (every process is stopped).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                ended = list(self._ended)
                codes = [p.returncode if t is not None else None
                         for p, t in zip(self.processes, ended)]
                if all(code == 0 for code in codes):
                    self._join_threads()
                    return
                if self.interrupted is not None:
                    self._wait_interrupted(ended, deadline)
                failed = sorted((t, i) for i, (t, code) in enumerate(zip(ended, codes))
                                if code not in (None, 0))
                if failed:
                    self._fail(failed[0][1])
                if deadline is not None and time.monotonic() > deadline:
                    running = [i for i, code in enumerate(codes) if code is None]
                    self.stop()
                    raise LaunchError(
                        f"timed out after {timeout:g} s with process"
                        f"{'es' if len(running) > 1 else ''} "
                        f"{', '.join(map(str, running))} still running (a hang, or a "
                        f"timeout too short); stopped every process. Logs: {self.log_dir}",
                        process_id=None, returncode=None, log_dir=self.log_dir)
                time.sleep(0.05)
        except BaseException:
            # A failure, KeyboardInterrupt or the caller's own timeout: no process may
            # outlive the launcher.
            self.stop()
            raise

    def _fail(self, first: int) -> None:
        """Stops the others and raises the LaunchError that names process ``first``."""
        self.stop()
        code = self.processes[first].returncode
        tail = "\n  ".join(self._tails[first]) or "(no output)"
        others = [i for i in range(len(self.processes)) if i != first]
        stopped = (f"; stopped the other process{'es' if len(others) > 1 else ''} "
                   f"({', '.join(map(str, others))})" if others else "")
        raise LaunchError(
            f"process {first} of {len(self.processes)} (pid {self.processes[first].pid}) "
            f"{_describe_status(code)}{stopped}. Its last lines:\n  {tail}\n"
            f"Logs of every process: {self.log_dir}",
            process_id=first, returncode=code, log_dir=self.log_dir)

    def _wait_interrupted(self, ended: list, deadline: float | None) -> None:
        """After `interrupt`: lets the processes end on their own, then raises."""
        if all(t is None for t in ended):
            return
        # One has ended; the others get `grace` seconds to finish what they save (a
        # process blocked in a collective with the ended one would never finish).
        limit = min(t for t in ended if t is not None) + self.grace
        if deadline is not None:
            limit = min(limit, deadline)
        while time.monotonic() < limit and any(t is None for t in self._ended):
            time.sleep(0.05)
        self.stop()
        codes = [p.returncode for p in self.processes]
        raise LaunchError(
            f"stopped by {signal.Signals(self.interrupted).name}; exit statuses "
            + ", ".join(f"process {i}: {code}" for i, code in enumerate(codes))
            + f". Logs: {self.log_dir}",
            process_id=None, returncode=None, log_dir=self.log_dir)

    def interrupt(self, signum: int) -> None:
        """Passes ``signum`` (SIGINT, SIGTERM) on to every process and lets them end on
        their own (training loops stop after their step and save a checkpoint together):
        `wait` then waits for the others up to ``grace`` seconds after the first ends,
        instead of stopping them at once."""
        self.interrupted = signum
        self.signal(signum)

    def signal(self, signum: int) -> None:
        """Sends ``signum`` to every running process (and the processes it started)."""
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signum)
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        """SIGTERM to every running process, SIGKILL to those still running after
        ``grace`` seconds (a process blocked in a collective never reaches its handler);
        returns once every process has ended and its output has been read."""
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self.processes):
            time.sleep(0.05)
        self.signal(signal.SIGKILL)
        for proc in self.processes:
            proc.wait()
        self._join_threads()

    def _join_threads(self) -> None:
        for thread in self._threads:
            # A grandchild that keeps the pipe open must not hang the launcher.
            thread.join(timeout=10)

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(command: Sequence[str], *, processes: int, local_devices: int | None = None,
          log_dir: str | os.PathLike | None = None,
          compilation_cache: str | os.PathLike | None = None,
          env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
          echo: bool = True, grace: float = 10.0) -> Job:
    """Starts ``processes`` copies of ``command`` on localhost; returns at once.

    Args:
      command: the program and its arguments, the same for every process.
      processes: how many processes (N >= 1).
      local_devices: forced CPU devices per process (None: the platform's own devices).
      log_dir: where ``process_<i>.log`` go (created); default a new temporary folder.
      compilation_cache: JAX's persistent compilation cache (`process_environment`);
        default ``<log_dir>/compilation_cache``. Give the same folder to a restart to
        skip compiling again.
      env: the base environment (default: this process's).
      cwd: the working directory of the processes.
      echo: print the pids (``[launch] ... pids 0:<pid> 1:<pid>``) and every line of
        output, prefixed with ``[process i]``.
      grace: seconds between SIGTERM and SIGKILL when processes are stopped.

    Returns:
      The `Job`; use it as a context manager (or call ``stop``) so that no process
      outlives the caller.
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if not command:
        raise ValueError("no command given")
    log_dir = pathlib.Path(log_dir) if log_dir is not None else pathlib.Path(
        tempfile.mkdtemp(prefix="jaxdeblur_launch_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    if compilation_cache is None:
        compilation_cache = log_dir / "compilation_cache"
    coordinator = f"127.0.0.1:{free_port()}"
    started: list[subprocess.Popen] = []
    try:
        for process_id in range(processes):
            started.append(subprocess.Popen(
                list(command), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=process_environment(process_id, processes, coordinator,
                                        local_devices=local_devices,
                                        compilation_cache=compilation_cache, base=env),
                # Its own process group: stopping a process also stops what it started.
                start_new_session=True))
    except BaseException:
        for proc in started:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise
    if echo:
        print(f"[launch] {processes} process(es), coordinator {coordinator}, logs in "
              f"{log_dir}; pids " + " ".join(f"{i}:{p.pid}" for i, p in enumerate(started)),
              flush=True)
    return Job(started, log_dir, coordinator, echo=echo, grace=grace)


def run(command: Sequence[str], *, processes: int, local_devices: int | None = None,
        log_dir: str | os.PathLike | None = None, timeout: float | None = None,
        compilation_cache: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
        echo: bool = True, grace: float = 10.0) -> pathlib.Path:
    """`start`, then wait for every process; returns the log folder.

    Raises:
      LaunchError: a process failed or the run timed out (see `Job.wait`); no process
        is left running.
    """
    job = start(command, processes=processes, local_devices=local_devices, log_dir=log_dir,
                compilation_cache=compilation_cache, env=env, cwd=cwd, echo=echo,
                grace=grace)
    with job:
        job.wait(timeout)
    return job.log_dir


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jaxdeblur.launch",
        description="Run a command as N JAX processes on this machine (a local multi-host "
                    "run): python -m jaxdeblur.launch --processes 2 --local-devices 4 -- "
                    "python train_scripts/ufpnet.py --workdir runs/x")
    parser.add_argument("--processes", type=int, required=True,
                        help="number of processes (each one process of a multi-host run)")
    parser.add_argument("--local-devices", type=int, default=None,
                        help="forced CPU devices per process (sets JAX_PLATFORMS=cpu)")
    parser.add_argument("--log-dir", default=None,
                        help="folder for process_<i>.log (default: a new temporary folder)")
    parser.add_argument("--compilation-cache", default=None,
                        help="JAX's persistent compilation cache folder (default: "
                             "<log dir>/compilation_cache); reuse it across restarts")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds after which every process is stopped (default: none)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds between SIGTERM and SIGKILL when stopping processes")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the command every process runs, after --")
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        parser.error("give the command to run after --, e.g. -- python train.py")
    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    if args.local_devices is not None and args.local_devices < 1:
        parser.error(f"--local-devices must be >= 1, got {args.local_devices}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0: every process succeeded)."""
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    job = start(args.command, processes=args.processes, local_devices=args.local_devices,
                log_dir=args.log_dir, compilation_cache=args.compilation_cache,
                grace=args.grace)

    def forward(signum, frame):
        # Ctrl-C or SIGTERM to the launcher reaches every process (each runs in its own
        # process group, away from the terminal's): training loops stop after their
        # current step and save a checkpoint together.
        del frame
        print(f"[launch] {signal.Signals(signum).name}: passed on to every process",
              file=sys.stderr, flush=True)
        job.interrupt(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with job:
            job.wait(args.timeout)
    except LaunchError as err:
        print(f"[launch] error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(f"[launch] all {args.processes} process(es) finished; logs in {job.log_dir}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
