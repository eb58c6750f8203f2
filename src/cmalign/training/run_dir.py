"""What makes a run directory safe to trust: one writer at a time, preemption that checkpoints, writes
that fail with one clear line, and a clean slate for a run that starts afresh.

- RunLock: an exclusive fcntl.flock on `<run>/.cmalign.lock`. The OS drops it when the process dies,
  SIGKILL included, so a killed run never leaves a stale lock; a second writer is refused in one line.
- StopSignals: the first SIGTERM/SIGINT asks the loop to finish its step, checkpoint and stop
  (Preempted, exit code 128 + signal); a second one exits at once.
- writing / atomic_dir / ensure_writable_dir: an OSError while writing (a full disk, a read-only
  location) becomes a UserError naming the file and the cause; folders are written under a temporary
  name and renamed into place, so a failed write leaves the previous version (or nothing), never half.
- clear_run_artefacts: what `--overwrite` (or a restart of a run killed before its first checkpoint)
  removes, AFTER the new run has validated its config and taken the lock.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

from cmalign.errors import UserError

try:  # POSIX only; elsewhere runs are not locked (stated in RunLock)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

LOCK_NAME = ".cmalign.lock"

# Everything a run writes into its directory. --overwrite removes exactly these (and temporaries of
# them), so nothing of the old run can be resumed from, pruned against or mistaken for the new one,
# while files a user put beside them stay.
RUN_ARTEFACTS = ("config.yaml", "metrics.jsonl", "metrics.jsonl.tmp", "tensorboard", "grids", "checkpoints", "adapter",
                 "final_eval.json", "final_eval_chains.csv", "report.md", "reward.png", "gold.png", "divergence.png", "before_after.png",
                 "heldout.png", "report.html", "report_images")


# --- writing -------------------------------------------------------------------------------------
def _cause(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    text = exc.strerror or str(exc) or type(exc).__name__
    return f"{text} ({name})" if name else text


_OS_ERROR_TEXT = re.compile(r"(?:I/O error|IoError)\W.*?(?:os error |code: )(\d+)", re.S)


def write_error_cause(exc: BaseException) -> str | None:
    """The cause of a failed write, in one phrase: an OSError, or a library's wrapping of one (safetensors
    raises SafetensorError "I/O error: No space left on device (os error 28)"); None for anything else."""
    if isinstance(exc, OSError):
        return _cause(exc)
    match = _OS_ERROR_TEXT.search(str(exc)) if type(exc).__name__ == "SafetensorError" else None
    if match is None:
        return None
    code = int(match.group(1))
    return _cause(OSError(code, os.strerror(code)))


@contextlib.contextmanager
def writing(what: str, path):
    """Turn an OSError (or a library's wrapping of one) raised inside the block into one line:
    `cannot write WHAT PATH: CAUSE`."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        cause = write_error_cause(exc)
        if cause is None:
            raise
        raise UserError(f"cannot write {what} {path}: {cause}") from None


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_dir(final: Path, what: str):
    """Yield a temporary sibling folder; when the block succeeds it replaces `final` (the old one is
    moved aside first and removed after, as POSIX cannot rename over a non-empty folder). On an error
    the temporary folder is removed and `final` is left as it was; an OSError becomes a UserError."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    old = final.with_name(f".{final.name}.old")
    with writing(what, final):
        _rmtree(tmp)
        tmp.mkdir(parents=True)
    try:
        with writing(what, final):
            yield tmp
            _rmtree(old)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
    except BaseException:
        _rmtree(tmp)
        if old.exists() and not final.exists():  # the swap itself failed: put the old one back
            with contextlib.suppress(OSError):
                os.replace(old, final)
        raise
    _rmtree(old)


def ensure_writable_dir(path, what: str = "output folder") -> Path:
    """Create `path` if needed and prove it writable with a small probe file, so that a command fails
    before its expensive work rather than after it. Probing beats os.access: root passes every
    permission check, while a full disk or a read-only mount only shows when something is written."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {p} exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{what} {p} cannot be created: {_cause(exc)}") from None
    try:
        fd, name = tempfile.mkstemp(prefix=".cmalign-write-test-", dir=p)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        raise UserError(f"{what} {p} is not writable: {_cause(exc)}") from None
    return p


def ensure_writable_file(path, what: str = "output file") -> Path:
    """The same check for a file to be written: its folder is writable and it is not a folder."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} {p} is a directory; give a file name")
    ensure_writable_dir(p.parent if str(p.parent) else Path("."), f"the folder of {what}")
    return p


def clear_run_artefacts(run_dir: Path, keep: tuple[str, ...] = ()) -> list[str]:
    """Remove what an earlier run left in run_dir (RUN_ARTEFACTS and their temporaries). Call it only
    after the new run's config is validated and its lock is held. Returns the names removed."""
    run_dir = Path(run_dir)
    removed = []
    if not run_dir.is_dir():
        return removed
    for entry in run_dir.iterdir():
        name = entry.name
        base = name[1:].rsplit(".", 1)[0] if name.startswith(".") and name.endswith((".tmp", ".old")) else name
        if name in keep or (name not in RUN_ARTEFACTS and base not in RUN_ARTEFACTS):
            continue
        with writing("(removing the old run's)", entry):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        removed.append(name)
    return sorted(removed)


def umask() -> int:
    """The process umask, read without changing it where /proc says it (Linux), else set-and-restore."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


# --- one writer per run directory ---------------------------------------------------------------
class RunLock:
    """Exclusive lock on a run directory for the life of a run (also a context manager).

    fcntl.flock on `<run>/.cmalign.lock`: held per open file, released by the OS when the process
    exits or is killed, so there are no stale locks to clean up. The file records the holder's pid and
    host for the refusal message. Without fcntl (Windows) runs are not locked. On NFS, flock is only
    as reliable as the server's lock support."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        self.created = False  # the run directory did not exist before acquire()

    def acquire(self) -> "RunLock":
        if self.fd is not None or fcntl is None:
            return self
        existed = self.run_dir.exists()
        ensure_writable_dir(self.run_dir, "run directory")
        with writing("the run lock", self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            with contextlib.suppress(OSError, UnicodeDecodeError):
                holder = os.pread(fd, 200, 0).decode().strip()
            os.close(fd)  # the folder is the other writer's: nothing of it is touched
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"cannot lock the run directory {self.run_dir}: {_cause(exc)}") from None
            who = f" ({holder})" if holder else ""
            raise UserError(f"{self.run_dir} is being written by another cmalign process{who}; wait for it to "
                            "finish or choose another output_dir") from None
        with contextlib.suppress(OSError):  # informative only: a full disk must not stop the run here
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd, self.created = fd, not existed
        return self

    def release(self, discard: bool = False) -> None:
        """Give the lock back. discard=True (a run whose set-up failed) also removes the lock file and
        the run directory if this lock created it and nothing else was written there, so that a refused
        command leaves no empty run behind."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            if discard and self.created:
                with contextlib.suppress(OSError):
                    self._remove_empty_dir()
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _remove_empty_dir(self) -> None:
        if {p.name for p in self.run_dir.iterdir()} <= {LOCK_NAME}:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.run_dir.rmdir()

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        self.release()


# --- preemption -------------------------------------------------------------------------------------
class Preempted(Exception):
    """A run stopped by SIGTERM/SIGINT after checkpointing its current step. The CLI prints the
    message (with the exact resume command) and exits with `exit_code` (128 + signal number)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, run_dir: Path):
        self.signum, self.step, self.checkpoint, self.run_dir = signum, step, checkpoint, Path(run_dir)
        self.signame = signal.Signals(signum).name
        self.exit_code = 128 + signum
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint"
        super().__init__(f"stopped by {self.signame} at step {step}; {where}. Resume with "
                         f"train(config with output_dir={str(self.run_dir)!r}, resume='latest')")

    def cli_message(self, argv: list[str]) -> str:
        return (f"cmalign: stopped by {self.signame} at step {self.step}; checkpoint {self.checkpoint}\n"
                f"cmalign: resume with: {resume_command(argv, self.run_dir)}")


class StopSignals:
    """While active: the first SIGTERM or SIGINT sets `signum` (the loop finishes its step, writes a
    checkpoint and raises Preempted); a second one exits the process at once (128 + signal), as a
    user pressing Ctrl-C twice expects. Handlers are only installed from the main thread (signal's
    rule); elsewhere this does nothing and the previous behaviour stays."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            print(f"\ncmalign: {signal.Signals(signum).name} received: finishing this step, then writing a checkpoint "
                  "(send it again to exit at once)", file=sys.stderr, flush=True)
            return
        print(f"cmalign: {signal.Signals(signum).name} again: exiting now; resume from the last checkpoint",
              file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(128 + signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def resume_command(argv: list[str], run_dir: Path) -> str:
    """The command line that continues this run: the same arguments without --overwrite and any
    earlier --resume / --output-dir, plus `--resume latest --output-dir RUN`."""
    out, skip = [], False
    drop_with_value = ("--resume", "--output-dir", "--output_dir")
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--overwrite":
            continue
        if a in drop_with_value:
            skip = True
            continue
        if a.startswith(tuple(f"{d}=" for d in drop_with_value)):
            continue
        out.append(a)
    launcher = "" if int(os.environ.get("WORLD_SIZE", "1")) <= 1 else " (under the same launcher, e.g. accelerate launch)"
    return shlex.join(["cmalign", *out, "--resume", "latest", "--output-dir", str(run_dir)]) + launcher
