"""Every process the pipeline starts goes through `start`, and ends when the process that started it dies.

The rule: a child (the temporary Prefect server, a loopback or served teacher, `accelerate launch` and its
ranks) must not outlive its starter, however the starter ends (SIGKILL, the OOM killer, a CI timeout
included), because an orphan keeps a port, a GPU or the profile's database. A `finally` cannot promise
that, so `start` runs the command under a lifeline: a small Python wrapper (this file run as a script,
`python -I processes.py FD -- CMD...`, stdlib only) that holds the read end of a pipe whose write end only the starter
holds. The kernel closes that end when the starter dies, whatever kills it; the wrapper sees end-of-file and
stops the command's whole process group (SIGTERM, then SIGKILL after a grace period). The command also gets
PR_SET_PDEATHSIG from the wrapper on Linux, so a killed wrapper takes it along. Third-party commands
(`transformers serve`, `vllm serve`, `accelerate launch`) need no change for this.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Any

GRACE_S = 5.0  # how long a stopped command has to exit after SIGTERM before its group is killed


class Child(subprocess.Popen):
    """A started command (its lifeline wrapper, to be exact); `stop()` ends it and its process group."""

    lifeline: int | None = None  # the pipe's write end; closing it stops the command

    def stop(self, grace_s: float = 2 * GRACE_S + 1) -> None:
        """Terminate (the wrapper forwards it to the command's group), kill if still there after `grace_s`."""
        if self.poll() is None:
            self.terminate()
            try:
                self.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
                self.wait()
        if self.lifeline is not None:
            os.close(self.lifeline)
            self.lifeline = None

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.stop()


def start(cmd: list[str], **popen: Any) -> Child:
    """`subprocess.Popen(cmd, **popen)` under a lifeline (see the module docstring); same keyword arguments."""
    read_end, write_end = os.pipe()  # both non-inheritable: only the wrapper gets the read end (pass_fds)
    try:
        # -I: the wrapper reads no PYTHON* variables and puts no directory on sys.path; the command gets the env
        child = Child([sys.executable, "-I", os.path.abspath(__file__), str(read_end), "--", *cmd],
                      pass_fds=(read_end, *popen.pop("pass_fds", ())), **popen)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    child.lifeline = write_end
    return child


def _die_with_parent() -> None:
    """In the command, between fork and exec: SIGKILL when the wrapper (its parent) dies (Linux only)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _stop_group(proc: subprocess.Popen, signum: int) -> int:
    for sig, wait_s in ((signum, GRACE_S), (signal.SIGKILL, GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def main(argv: list[str]) -> int:
    """The lifeline wrapper: run CMD in a session of its own until it exits, the pipe ends, or a signal comes."""
    fd, cmd = int(argv[0]), argv[2:]
    stop = threading.Event()
    why: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        why.append(signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    proc = subprocess.Popen(cmd, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def watch_lifeline() -> None:
        while os.read(fd, 1):  # the starter never writes: this returns b"" when its end closes
            pass
        stop.set()

    threading.Thread(target=watch_lifeline, daemon=True).start()
    while not stop.wait(0.1):
        code = proc.poll()
        if code is not None:
            _stop_group(proc, signal.SIGTERM)  # what the command left running in its group
            return 128 - code if code < 0 else code
    code = _stop_group(proc, why[0] if why else signal.SIGTERM)
    return 128 + why[0] if why else 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
