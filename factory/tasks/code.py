"""Run untrusted generated code against unit tests, inside a sandbox.

HumanEval semantics: ``program`` is the full function (prompt + completion),
``test`` defines ``check(candidate)``, and the verdict is whether
``check(<entry_point>)`` returns without raising::

    result = check(prompt + completion, problem["test"], problem["entry_point"], timeout_s=10)
    result.passed, result.reason

The code runs in a separate process under bubblewrap (``bwrap``); see
``docs/sandbox.md`` for the layers. In short: new mount / PID / network / IPC /
UTS (/ cgroup) namespaces, a read-only view of only the system and Python
directories, a private size-capped tmpfs as cwd, no network, a scrubbed
environment, an unprivileged uid, rlimits on CPU, address space, processes,
file size and open files, a wall-clock limit, and the whole PID namespace
killed when the check ends.

Where bubblewrap is missing or cannot create namespaces, ``check`` raises
``SandboxUnavailableError`` instead of running the code -- unless the caller
opts into the weaker ``sandbox="process"`` mode (a plain subprocess with the
same rlimits, scrubbed environment and a temporary cwd, but with the host's
filesystem and network visible). Choose per call (``check(...,
sandbox="process")``) or process-wide (``configure(sandbox="process")``).

What no sandbox mode can do: guarantee an honest verdict. The test runs in the
same interpreter as the candidate, so a program written to game the harness
(objects whose ``__eq__`` is always true, introspecting the launcher) can pass.
Cheap exits (``sys.exit(0)``, ``os._exit(0)``, killing itself) are reported as
failures: a pass needs a verdict record carrying a per-run random token.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import marshal
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from factory.errors import FactoryError

__all__ = [
    "CheckResult",
    "SandboxConfig",
    "SandboxUnavailableError",
    "check",
    "check_many",
    "configure",
    "get_config",
    "sandbox_status",
]

SANDBOX_MODES = ("bwrap", "process")

INSTALL_HINT = (
    "Install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`, or run "
    "`.ci/install-system-deps.sh`; Fedora: `dnf install bubblewrap`). In a "
    "container, bwrap also needs permission to create namespaces (run the "
    "container with user namespaces allowed, e.g. docker "
    "`--security-opt seccomp=unconfined --security-opt apparmor=unconfined`, "
    "or as a privileged container; on the host "
    "`sysctl kernel.unprivileged_userns_clone=1` / "
    "`kernel.apparmor_restrict_unprivileged_userns=0`). To run generated code "
    "WITHOUT namespace isolation instead (weaker: a plain subprocess with "
    "rlimits; the code can read the host filesystem and use the network), opt "
    "in with `check(..., sandbox=\"process\")` or "
    "`factory.tasks.code.configure(sandbox=\"process\")`."
)


class SandboxUnavailableError(FactoryError, RuntimeError):
    """The requested sandbox cannot be used here; untrusted code was not run."""


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one check.

    passed: ``check(entry_point)`` returned without raising, inside the limits.
    reason: short text -- ``"passed"``, ``"AssertionError at test line 7: ..."``,
        ``"timed out after 10s (wall clock)"``, ``"SyntaxError in program: ..."``.
    duration_s: wall time of the sandboxed run (startup included).
    output: tail of the program's stdout+stderr (for debugging).
    """

    passed: bool
    reason: str
    duration_s: float = 0.0
    output: str = ""


@dataclass(frozen=True)
class SandboxConfig:
    """Process-wide defaults; change with ``configure(...)``.

    sandbox: ``"bwrap"`` (default; refuses to run without bubblewrap) or
        ``"process"`` (weaker opt-in: plain subprocess with rlimits).
    bwrap_path: the bwrap executable; None = ``shutil.which("bwrap")``.
    python: interpreter that runs the code; None = the base interpreter of the
        running Python (not the venv: only its stdlib is visible inside).
    memory_bytes: RLIMIT_AS (address space) per process.
    max_processes: RLIMIT_NPROC -- processes+threads of the sandbox's uid.
    max_file_bytes: RLIMIT_FSIZE -- largest file it may write (also caps the
        captured stdout/stderr).
    max_open_files: RLIMIT_NOFILE.
    tmpfs_bytes: size of the private /tmp (the cwd) and of /dev/shm.
    cpu_grace_s: RLIMIT_CPU is ceil(timeout_s) + cpu_grace_s seconds.
    output_bytes: how much of the output tail is kept in the result.
    uid_range: (first, count) of host uids used for sandboxed code when the
        host process is root; None = chosen from /proc/self/uid_map. Each
        running check gets its own uid so RLIMIT_NPROC is per check.
    site_packages: let the interpreter import its site-packages (default:
        stdlib only, ``python -I -S -B``; HumanEval needs nothing else).
    """

    sandbox: str = "bwrap"
    bwrap_path: str | None = None
    python: str | None = None
    memory_bytes: int = 2 << 30
    max_processes: int = 64
    max_file_bytes: int = 16 << 20
    max_open_files: int = 256
    tmpfs_bytes: int = 64 << 20
    cpu_grace_s: int = 1
    output_bytes: int = 4096
    uid_range: tuple[int, int] | None = None
    site_packages: bool = False


_config = SandboxConfig()
_config_lock = threading.Lock()


def get_config() -> SandboxConfig:
    return _config


def configure(**changes) -> SandboxConfig:
    """Change the process-wide defaults (e.g. ``configure(sandbox="process")``)."""
    global _config
    with _config_lock:
        new = dataclasses.replace(_config, **changes)
        _validate(new)
        _config = new
    return new


def _validate(cfg: SandboxConfig) -> None:
    if cfg.sandbox not in SANDBOX_MODES:
        raise ValueError(f"sandbox must be one of {SANDBOX_MODES}, got {cfg.sandbox!r}")


# --------------------------------------------------------------------------
# the launcher: runs inside the sandbox, first thing in a fresh interpreter
# --------------------------------------------------------------------------

# Passed with ``python -I -S -B -c``. Reads a marshalled job from stdin, drops to the
# sandbox uid (when started as root), applies rlimits, then runs program and
# test in one namespace and writes a token-stamped verdict to a private fd.
# Module references are bound before untrusted code runs, so monkeypatching
# os from the program does not change the verdict record. Only cheap imports
# (marshal, resource, ctypes): interpreter start-up dominates a check's cost.
_LAUNCHER = r"""
import os, sys
def _cf_launch():
    import marshal, resource
    _write, _exit = os.write, os._exit
    raw = []
    while True:
        b = os.read(0, 1 << 16)
        if not b:
            break
        raw.append(b)
    job = marshal.loads(b"".join(raw))
    del raw
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    sfd, token = job["status_fd"], job["token"]
    os.set_inheritable(sfd, False)

    def report(passed, reason):
        rec = "%s %d %s\n" % (token, 1 if passed else 0, reason[:500].encode("utf-8", "replace").hex())
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        _write(sfd, rec.encode())
        _exit(0 if passed else 1)

    libc = None
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except BaseException:
        pass
    uid = job["uid"]
    if uid is not None and os.getuid() == 0:
        try:  # clear the inheritable capability set bwrap leaves behind
            hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
            data = (ctypes.c_uint32 * 6)()
            if libc.capget(hdr, data) == 0:
                data[2] = data[5] = 0
                libc.capset(hdr, data)
        except BaseException:
            pass
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        try:  # changing uid made us non-dumpable: /proc/self would stay root's
            libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
        except BaseException:
            pass
    if job["require_unprivileged"] and (os.getuid() == 0 or os.geteuid() == 0):
        report(False, "sandbox error: still root after dropping privileges")
    try:
        nnp = libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    except BaseException:
        nnp = -1
    if nnp != 0 and job["require_unprivileged"]:
        report(False, "sandbox error: cannot set no_new_privs")
    for name, soft, hard in job["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    sources = {"<program>": job["program"], "<test>": job["test"]}

    def describe(e, where):
        try:
            at, tb = "", e.__traceback__
            while tb is not None:
                name = tb.tb_frame.f_code.co_filename
                if name in sources:
                    lines = sources[name].splitlines()
                    n = tb.tb_lineno or 0
                    line = lines[n - 1].strip() if 0 < n <= len(lines) else ""
                    at = " at %s line %d: %s" % (name[1:-1], n, line[:200])
                tb = tb.tb_next
            if isinstance(e, SystemExit):
                msg = "exit(%r)" % (e.code,)
            else:
                msg = str(e)
            return "%s%s%s%s" % (where, type(e).__name__, ": " + msg[:200] if msg else "", at)
        except BaseException:
            return where + "exception (undescribable)"

    g = {"__name__": "__cf_sandbox__", "__builtins__": __builtins__}
    for label in ("program", "test"):
        try:
            code = compile(sources["<%s>" % label], "<%s>" % label, "exec")
        except SyntaxError as e:
            report(False, "%s in %s: %s (line %s)" % (type(e).__name__, label, e.msg, e.lineno))
        except BaseException as e:
            report(False, describe(e, "cannot compile %s: " % label))
        try:
            exec(code, g)
        except BaseException as e:
            report(False, describe(e, "%s raised " % label))
    entry = job["entry_point"]
    if entry not in g:
        report(False, "entry point %r is not defined by the program" % entry)
    if "check" not in g:
        report(False, "the test does not define check(candidate)")
    try:
        g["check"](g[entry])
    except BaseException as e:
        report(False, describe(e, ""))
    report(True, "passed")
_cf_launch()
"""


# --------------------------------------------------------------------------
# sandbox construction
# --------------------------------------------------------------------------

_MIN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp"}
_SANDBOX_CWD = "/tmp"

_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


def _python_for(cfg: SandboxConfig) -> str:
    if cfg.python:
        return cfg.python
    base = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(base)


@functools.lru_cache(maxsize=16)
def _python_dirs(python: str) -> list[str]:
    """Host directories the interpreter needs (besides /usr)."""
    python = os.path.realpath(python)
    if os.path.realpath(_python_for(SandboxConfig())) == python:
        prefixes = {sys.base_prefix, sys.base_exec_prefix}
    else:
        out = subprocess.run(
            [python, "-I", "-c", "import sys; print(sys.base_prefix); print(sys.base_exec_prefix)"],
            capture_output=True, text=True, timeout=30, env=_MIN_ENV, check=True,
        ).stdout.split("\n")
        prefixes = {p for p in out[:2] if p}
    prefixes.add(os.path.dirname(python))
    dirs = []
    for p in sorted({os.path.realpath(p) for p in prefixes}):
        if p in ("/", "") or p == "/usr" or p.startswith("/usr/"):
            continue
        if any(p == d or p.startswith(d + "/") for d in dirs):
            continue
        dirs.append(p)
    return dirs


def _uid_range(cfg: SandboxConfig) -> tuple[int, int]:
    if cfg.uid_range is not None:
        return cfg.uid_range
    want_first, want_count = 1_000_000, 1 << 16
    ranges = []
    try:
        for line in Path("/proc/self/uid_map").read_text().splitlines():
            inside, _outside, count = (int(x) for x in line.split())
            ranges.append((inside, count))
    except (OSError, ValueError):
        ranges = [(0, 1 << 32)]
    for inside, count in ranges:
        if inside <= want_first and want_first + want_count <= inside + count:
            return want_first, want_count
    # a small mapped range (rootless containers): its top, below 65534
    inside, count = max(ranges, key=lambda r: r[1])
    top = min(inside + count, 65534)
    n = min(4096, max(1, (top - inside) // 4))
    return top - n, n


def _alloc_uid(cfg: SandboxConfig) -> int:
    first, count = _uid_range(cfg)
    with _uid_lock:
        for _ in range(64):
            uid = first + secrets.randbelow(count)
            if uid not in _uids_in_use and uid not in (65534, 65535):
                _uids_in_use.add(uid)
                return uid
        raise RuntimeError("no free sandbox uid")


def _free_uid(uid: int | None) -> None:
    if uid is not None:
        with _uid_lock:
            _uids_in_use.discard(uid)


def _bwrap_argv(bwrap: str, python: str, cfg: SandboxConfig, *, userns: bool, privileged: bool) -> list[str]:
    a = [bwrap]
    if userns:
        a += ["--unshare-user", "--disable-userns"]
    a += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    a += ["--die-with-parent", "--new-session", "--hostname", "sandbox"]
    # filesystem: an empty tmpfs root with read-only system directories only
    a += ["--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            a += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            a += ["--ro-bind", d, d]
    for f in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives"):
        a += ["--ro-bind-try", f, f]
    made: set[str] = set()
    for d in _python_dirs(python):
        # bwrap would copy restrictive host modes (e.g. /root 0700) onto the
        # parents it creates; make them traversable for the sandbox uid
        parts = Path(d).parts[1:-1]
        for i in range(1, len(parts) + 1):
            anc = "/" + "/".join(parts[:i])
            if anc not in made:
                made.add(anc)
                a += ["--perms", "0755", "--dir", anc]
        a += ["--ro-bind", d, d]
    a += ["--proc", "/proc", "--dev", "/dev"]
    a += ["--perms", "1777", "--size", str(cfg.tmpfs_bytes), "--tmpfs", "/tmp"]
    a += ["--perms", "1777", "--size", str(cfg.tmpfs_bytes), "--tmpfs", "/dev/shm"]
    a += ["--chdir", _SANDBOX_CWD, "--clearenv"]
    for k, v in _MIN_ENV.items():
        a += ["--setenv", k, v]
    if privileged:
        # only the launcher uses these, to switch to the sandbox uid; they are
        # gone (with every other capability) once it is no longer root
        a += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    return a


def _rlimits(cfg: SandboxConfig, timeout_s: float) -> list[tuple[str, int, int]]:
    cpu = int(-(-timeout_s // 1)) + max(0, int(cfg.cpu_grace_s))
    return [
        ("RLIMIT_CPU", cpu, cpu + 1),
        ("RLIMIT_AS", cfg.memory_bytes, cfg.memory_bytes),
        ("RLIMIT_NPROC", cfg.max_processes, cfg.max_processes),
        ("RLIMIT_FSIZE", cfg.max_file_bytes, cfg.max_file_bytes),
        ("RLIMIT_NOFILE", cfg.max_open_files, cfg.max_open_files),
        ("RLIMIT_CORE", 0, 0),
    ]


# --------------------------------------------------------------------------
# availability probe (cached per configuration)
# --------------------------------------------------------------------------

_probe_lock = threading.Lock()
_probe_cache: dict[tuple, tuple[str | None, str]] = {}


def _bwrap_strategies(is_root: bool) -> list[str]:
    # privileged: bwrap runs as root without a user namespace; the launcher
    #   drops to a per-check uid (RLIMIT_NPROC does not bind root).
    # userns-as-uid (root only): drop to the per-check uid first, then an
    #   unprivileged bwrap with a user namespace.
    # userns (non-root): unprivileged bwrap with a user namespace.
    return ["privileged", "userns-as-uid"] if is_root else ["userns"]


def _probe(cfg: SandboxConfig) -> tuple[str | None, str]:
    """Find a working bwrap strategy: (strategy or None, diagnostic)."""
    bwrap = cfg.bwrap_path or shutil.which("bwrap")
    python = _python_for(cfg)
    key = (bwrap, python, os.geteuid(), cfg.uid_range)
    with _probe_lock:
        if key in _probe_cache:
            return _probe_cache[key]
        if not bwrap or not os.path.isfile(bwrap) or not os.access(bwrap, os.X_OK):
            res = (None, f"bubblewrap executable not found ({bwrap or 'bwrap not on PATH'})")
            _probe_cache[key] = res
            return res
        errors = []
        for strategy in _bwrap_strategies(os.geteuid() == 0):
            try:  # a trivial check that must see its own PID namespace
                r = _run(
                    "def f():\n    return 1\n",
                    "def check(c):\n    import os\n    assert c() == 1\n    assert os.getpid() < 10\n",
                    "f", 20.0, cfg, "bwrap", bwrap=bwrap, strategy=strategy,
                )
            except (OSError, subprocess.SubprocessError, RuntimeError) as e:
                r = CheckResult(False, f"{type(e).__name__}: {e}")
            if r.passed:
                res = (strategy, f"bwrap ({strategy})")
                break
            errors.append(f"{strategy}: {r.reason}; {r.output.strip()[-300:]}")
        else:
            res = (None, f"{bwrap} cannot create a sandbox here: " + " | ".join(errors))
        _probe_cache[key] = res
        return res


def sandbox_status(sandbox: str | None = None) -> tuple[bool, str]:
    """(usable, description) for the given or configured sandbox mode."""
    cfg = get_config()
    mode = sandbox or cfg.sandbox
    if mode == "process":
        return True, "process (weaker: plain subprocess with rlimits, no namespaces)"
    strategy, msg = _probe(cfg)
    return strategy is not None, msg


# --------------------------------------------------------------------------
# running one check
# --------------------------------------------------------------------------


def _proc_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        return True
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state in ("Z", "X")


def _wait_gone(pids: Iterable[int], deadline: float) -> None:
    pending = [p for p in pids if p]
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if not _proc_gone(p)]
        if pending:
            time.sleep(0.01)


def _proc_uid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _has_env(pid: int, entry: str) -> bool:
    try:
        return entry.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _kill_matching(pred, deadline: float) -> None:
    """SIGKILL every live host process matching ``pred`` until none is left
    (process mode's clean-up; bwrap mode kills the PID namespace instead)."""
    me = os.getpid()
    while time.monotonic() < deadline:
        pids = []
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != me and pred(int(d)) and not _proc_gone(int(d)):
                pids.append(int(d))
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def _readable_by_others(python: str) -> bool:
    """Whether an unprivileged uid can run ``python`` and read its stdlib."""
    try:
        paths = [os.path.realpath(python)] + [os.path.realpath(d) for d in _python_dirs(python)]
        if python == _python_for(SandboxConfig()):
            import sysconfig
            paths.append(sysconfig.get_paths()["stdlib"])
        for p in paths:
            cur = "/"
            for part in Path(p).parts[1:]:
                cur = os.path.join(cur, part)
                st = os.stat(cur)
                need = 0o005 if os.path.isdir(cur) else 0o004
                if st.st_mode & need != need:
                    return False
        return True
    except (OSError, subprocess.SubprocessError):
        return False


def _info_child_pid(fd: int) -> int | None:
    """bwrap's --info-fd record: ``{"child-pid": N, ...}``."""
    try:
        info = os.read(fd, 1 << 16)
        pid = json.loads(info.decode() or "{}").get("child-pid")
        return int(pid) if pid else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[-1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _read_tail(f, nbytes: int) -> bytes:
    f.flush()
    size = os.fstat(f.fileno()).st_size
    f.seek(max(0, size - nbytes))
    return f.read(nbytes)


def _verdict(status: bytes, token: str) -> tuple[bool, str] | None:
    """The launcher's record: ``<token> <1|0> <hex of utf-8 reason>``."""
    for line in status.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == token.encode() and parts[1] in (b"0", b"1"):
            try:
                reason = bytes.fromhex(parts[2].decode()).decode("utf-8", "replace")
            except ValueError:
                continue
            return parts[1] == b"1", reason
        if len(parts) == 2 and parts[0] == token.encode() and parts[1] in (b"0", b"1"):
            return parts[1] == b"1", ""
    return None


_SIGNAL_REASONS = {
    signal.SIGXCPU: "CPU time limit exceeded",
    signal.SIGXFSZ: "file size limit exceeded",
    signal.SIGKILL: "killed (SIGKILL)",
    signal.SIGSEGV: "crashed (SIGSEGV)",
    signal.SIGABRT: "aborted (SIGABRT)",
}


def _exit_reason(rc: int) -> str:
    sig = -rc if rc < 0 else rc - 128 if 128 < rc < 128 + 65 else None
    if sig is not None:
        try:
            name = _SIGNAL_REASONS.get(sig) or f"killed by {signal.Signals(sig).name}"
        except ValueError:
            name = f"killed by signal {sig}"
        return f"{name} (exit status {rc}) before a verdict"
    return f"exited with status {rc} before a verdict"


def _run(
    program: str,
    test: str,
    entry_point: str,
    timeout_s: float,
    cfg: SandboxConfig,
    mode: str,
    *,
    bwrap: str | None = None,
    strategy: str | None = None,
) -> CheckResult:
    python = _python_for(cfg)
    is_root = os.geteuid() == 0
    uid = _alloc_uid(cfg) if is_root else None
    token = secrets.token_hex(16)
    tmpdir = None
    info_r = info_w = None
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as status:
            popen_kw: dict = {}
            job = {
                "token": token,
                "status_fd": status.fileno(),
                "program": program,
                "test": test,
                "entry_point": entry_point,
                "rlimits": _rlimits(cfg, timeout_s),
                "uid": None,
                "require_unprivileged": is_root,
            }
            pass_fds = [status.fileno()]
            flags = ["-I", "-B"] if cfg.site_packages else ["-I", "-S", "-B"]
            launcher = [python, *flags, "-c", _LAUNCHER]
            if mode == "bwrap":
                info_r, info_w = os.pipe()
                os.set_blocking(info_r, False)
                pass_fds.append(info_w)
                argv = _bwrap_argv(
                    bwrap, python, cfg,
                    userns=strategy != "privileged", privileged=strategy == "privileged",
                )
                argv += ["--info-fd", str(info_w), "--"] + launcher
                if strategy == "privileged":
                    job["uid"] = uid
                elif strategy == "userns-as-uid":
                    popen_kw.update(user=uid, group=uid, extra_groups=[])
                cwd = "/"
            else:  # process: plain subprocess, weaker
                tmpdir = tempfile.mkdtemp(prefix="cf-sandbox-")
                if uid is not None and _readable_by_others(python):
                    os.chown(tmpdir, uid, uid)
                    job["uid"] = uid
                else:  # stays root: RLIMIT_NPROC cannot bind (docs/sandbox.md)
                    job["require_unprivileged"] = False
                argv = launcher
                cwd = tmpdir
            env = dict(_MIN_ENV)
            if tmpdir:
                env.update(HOME=tmpdir, TMPDIR=tmpdir, CF_SANDBOX_RUN=token[:16])
            payload = marshal.dumps(job)
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                close_fds=True,
                pass_fds=tuple(pass_fds),
                start_new_session=True,
                **popen_kw,
            )
            if info_w is not None:
                os.close(info_w)
                info_w = None
            timed_out = False
            child = None  # host pid of bwrap's pid 1 in the sandbox's PID namespace
            try:
                proc.communicate(input=payload, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            except BrokenPipeError:
                pass
            finally:
                if info_r is not None:
                    child = _info_child_pid(info_r)
                if proc.poll() is None:
                    # Kill the sandbox's pid 1: the kernel then kills everything
                    # in its PID namespace, and the outer bwrap reaps it and exits.
                    if child and _ppid(child) == proc.pid:
                        _kill(child)
                        try:
                            proc.wait(timeout=5)
                        except subprocess.TimeoutExpired:
                            pass
                    # The outer bwrap (or the launcher, in process mode) leads its
                    # own process group; killing it also kills bwrap's pid 1
                    # (--die-with-parent), and with it the namespace.
                    if proc.poll() is None:
                        _killpg(proc.pid)
                proc.wait()
            deadline = time.monotonic() + 10.0
            if mode == "bwrap":
                if child:
                    _wait_gone([child], deadline)
            else:
                _killpg(proc.pid)
                if job["uid"] is not None:
                    _kill_matching(lambda pid: _proc_uid(pid) == uid, deadline)
                # best effort for what escaped the process group without
                # scrubbing its environment
                _kill_matching(lambda pid: _has_env(pid, f"CF_SANDBOX_RUN={token[:16]}"), deadline)
            duration = time.monotonic() - t0
            tail = _read_tail(out, cfg.output_bytes).decode("utf-8", "replace")
            verdict = _verdict(_read_tail(status, 1 << 16), token)
            if timed_out:
                return CheckResult(False, f"timed out after {timeout_s:g}s (wall clock)", duration, tail)
            if verdict is None:
                return CheckResult(False, _exit_reason(proc.returncode), duration, tail)
            passed, reason = verdict
            if passed and proc.returncode != 0:
                return CheckResult(False, _exit_reason(proc.returncode), duration, tail)
            return CheckResult(passed, reason, duration, tail)
    finally:
        for fd in (info_r, info_w):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
        _free_uid(uid)


def _resolve(sandbox: str | None) -> tuple[SandboxConfig, str, str | None, str | None]:
    cfg = get_config()
    mode = sandbox or cfg.sandbox
    if mode not in SANDBOX_MODES:
        raise ValueError(f"sandbox must be one of {SANDBOX_MODES}, got {mode!r}")
    if mode == "process":
        return cfg, mode, None, None
    strategy, msg = _probe(cfg)
    if strategy is None:
        raise SandboxUnavailableError(f"refusing to run untrusted code: {msg}. {INSTALL_HINT}")
    return cfg, mode, cfg.bwrap_path or shutil.which("bwrap"), strategy


def check(
    program: str,
    test: str,
    entry_point: str,
    timeout_s: float = 10.0,
    *,
    sandbox: str | None = None,
) -> CheckResult:
    """Run ``program``, then ``test``, then ``check(<entry_point>)`` in a sandbox.

    ``sandbox``: ``"bwrap"`` (default via ``configure``) or ``"process"``
    (weaker, explicit opt-in). Raises ``SandboxUnavailableError`` when the
    bwrap sandbox cannot be built; every other failure (syntax error, wrong
    answer, timeout, crash, limit hit) is a ``CheckResult(passed=False)``.
    Every process the code started is gone when this returns (bwrap mode;
    in process mode only when the host runs as root -- see docs/sandbox.md).
    """
    if timeout_s is None or not timeout_s > 0:
        raise ValueError("timeout_s must be > 0")
    cfg, mode, bwrap, strategy = _resolve(sandbox)
    return _run(str(program), str(test), str(entry_point), float(timeout_s), cfg, mode,
                bwrap=bwrap, strategy=strategy)


def _item(x) -> tuple[str, str, str]:
    if isinstance(x, Mapping):
        return x["program"], x["test"], x["entry_point"]
    program, test, entry_point = x
    return program, test, entry_point


def check_many(
    items: Iterable[Sequence[str] | Mapping[str, str]],
    timeout_s: float = 10.0,
    max_workers: int | None = None,
    *,
    sandbox: str | None = None,
) -> list[CheckResult]:
    """``check`` over many ``(program, test, entry_point)`` tuples (or dicts with
    those keys) in parallel -- a thread pool, one sandboxed subprocess per item.
    Results are in input order. ``max_workers`` defaults to the CPU count."""
    jobs = [_item(x) for x in items]
    if not jobs:
        return []
    if timeout_s is None or not timeout_s > 0:
        raise ValueError("timeout_s must be > 0")
    cfg, mode, bwrap, strategy = _resolve(sandbox)  # refuse before running anything
    workers = max(1, min(max_workers or os.cpu_count() or 1, len(jobs)))

    def one(job):
        p, t, e = job
        return _run(str(p), str(t), str(e), float(timeout_s), cfg, mode, bwrap=bwrap, strategy=strategy)

    if workers == 1:
        return [one(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cf-check") as pool:
        return list(pool.map(one, jobs))

