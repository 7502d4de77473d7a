"""The code sandbox: HumanEval verdicts, and hostile programs contained with the host unaffected.

The hostile cases need a working bubblewrap (``.ci/install-system-deps.sh``); without one they
skip, and the refusal / opt-in tests still run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from factory.errors import FactoryError

from factory.tasks import code
from factory.tasks.code import CheckResult, SandboxUnavailableError, check, check_many

REPO = Path(__file__).resolve().parents[2]

ADD = "def add(a, b):\n    return a + b\n"
ADD_TEST = (
    "\n\nMETADATA = {}\n\n\n"
    "def check(candidate):\n"
    "    assert candidate(1, 2) == 3\n"
    "    assert candidate(-1, 1) == 0\n"
    "    assert candidate(20, 22) == 42\n"
)

_ok, _why = code.sandbox_status("bwrap")
needs_bwrap = pytest.mark.skipif(not _ok, reason=f"bubblewrap sandbox unavailable: {_why}")


@pytest.fixture(autouse=True)
def _restore_config():
    saved = code.get_config()
    yield
    code.configure(**{f: getattr(saved, f) for f in saved.__dataclass_fields__})


def marker() -> str:
    """A unique 15-char tag (fits /proc/<pid>/comm) for finding stray processes."""
    return "cf" + uuid.uuid4().hex[:13]


def host_procs_with(tag: str) -> list[str]:
    """Host processes whose command line or comm contains `tag` (a /proc scan, no psutil)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            comm = Path(f"/proc/{d}/comm").read_text().strip()
            state = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != "Z" and (tag in cmd or tag == comm):
            found.append(f"{d}: {comm}: {cmd[:120]}")
    return found


def host_process_count() -> int:
    return sum(1 for d in os.listdir("/proc") if d.isdigit())


# --------------------------------------------------------------------------
# verdicts
# --------------------------------------------------------------------------


@pytest.mark.unit
@needs_bwrap
def test_correct_function_passes():
    r = check(ADD, ADD_TEST, "add", timeout_s=10)
    assert isinstance(r, CheckResult)
    assert r.passed, r
    assert r.reason == "passed"


@pytest.mark.unit
@needs_bwrap
def test_wrong_function_fails_with_reason():
    r = check("def add(a, b):\n    return a - b\n", ADD_TEST, "add", timeout_s=10)
    assert not r.passed
    assert "AssertionError" in r.reason and "test line" in r.reason, r.reason
    assert "candidate(1, 2) == 3" in r.reason


@pytest.mark.unit
@needs_bwrap
def test_syntax_error_fails():
    r = check("def add(a, b):\n    return a +\n", ADD_TEST, "add", timeout_s=10)
    assert not r.passed
    assert r.reason.startswith("SyntaxError in program"), r.reason


@pytest.mark.unit
@needs_bwrap
def test_exception_missing_entry_point_and_cheap_exits_fail():
    r = check("def add(a, b):\n    return a + undefined_name\n", ADD_TEST, "add", timeout_s=10)
    assert not r.passed and "NameError" in r.reason, r.reason
    r = check("def plus(a, b):\n    return a + b\n", ADD_TEST, "add", timeout_s=10)
    assert not r.passed and "entry point" in r.reason, r.reason
    # leaving early must not count as a pass
    r = check("import sys\nsys.exit(0)\n" + ADD, ADD_TEST, "add", timeout_s=10)
    assert not r.passed and "SystemExit" in r.reason, r.reason
    r = check("import os\nos._exit(0)\n" + ADD, ADD_TEST, "add", timeout_s=10)
    assert not r.passed and "before a verdict" in r.reason, r.reason
    r = check(ADD + "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", ADD_TEST, "add", timeout_s=10)
    assert not r.passed and "SIGKILL" in r.reason, r.reason


@pytest.mark.unit
@needs_bwrap
def test_stdin_is_empty_and_output_is_captured():
    prog = "def add(a, b):\n    print('hello from the sandbox')\n    return a + b\n"
    r = check(prog, ADD_TEST + "    import sys\n    assert sys.stdin.read() == ''\n", "add", timeout_s=10)
    assert r.passed, r
    assert "hello from the sandbox" in r.output


@pytest.mark.unit
@needs_bwrap
def test_check_many_keeps_order():
    items = [
        (ADD, ADD_TEST, "add"),
        ("def add(a, b):\n    return 0\n", ADD_TEST, "add"),
        {"program": ADD, "test": ADD_TEST, "entry_point": "add"},
    ]
    rs = check_many(items, timeout_s=10, max_workers=2)
    assert [r.passed for r in rs] == [True, False, True]
    assert check_many([], timeout_s=1) == []


# --------------------------------------------------------------------------
# hostile programs
# --------------------------------------------------------------------------


@pytest.mark.integration
@needs_bwrap
def test_infinite_loop_times_out():
    t0 = time.monotonic()
    r = check("def add(a, b):\n    while True:\n        pass\n", ADD_TEST, "add", timeout_s=1.5)
    dt = time.monotonic() - t0
    assert not r.passed
    assert "timed out" in r.reason or "CPU time" in r.reason, r.reason
    assert dt < 15, dt


@pytest.mark.unit
@needs_bwrap
def test_sleeping_program_times_out():
    r = check("import time\ndef add(a, b):\n    time.sleep(60)\n", ADD_TEST, "add", timeout_s=1)
    assert not r.passed and "timed out" in r.reason, r.reason


@pytest.mark.unit
@needs_bwrap
def test_fork_bomb_hits_process_limit_and_leaves_nothing():
    tag = marker()
    prog = f"""
import os
def add(a, b):
    with open('/proc/self/comm', 'w') as f:
        f.write({tag!r})
    n = 0
    for _ in range(5000):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            try:
                os.execv('/bin/sh', ['sh', '-c', 'sleep 300; : {tag}'])
            finally:
                os._exit(1)
        n += 1
    return n
"""
    test = "def check(candidate):\n    n = candidate(1, 2)\n    assert n >= 1000, f'only {n} forks'\n"
    before = host_process_count()
    r = check(prog, test, "add", timeout_s=20)
    assert not r.passed
    assert "only" in r.reason and "forks" in r.reason, r
    forks = int(r.reason.split("only ", 1)[1].split()[0])
    assert forks < code.get_config().max_processes, forks
    assert host_procs_with(tag) == []
    assert host_process_count() <= before + 30  # other users' processes come and go


@pytest.mark.integration
@needs_bwrap
def test_unbounded_fork_bomb_is_contained():
    tag = marker()
    prog = f"""
import os
def add(a, b):
    with open('/proc/self/comm', 'w') as f:
        f.write({tag!r})
    while True:
        try:
            os.fork()
        except OSError:
            pass
"""
    before = host_process_count()
    r = check(prog, ADD_TEST, "add", timeout_s=2)
    assert not r.passed, r
    assert host_procs_with(tag) == []
    assert host_process_count() <= before + 30
    # and the host can still start processes
    assert subprocess.run(["true"]).returncode == 0


@pytest.mark.unit
@needs_bwrap
def test_huge_allocation_is_a_memory_error():
    prog = "def add(a, b):\n    x = bytearray(60 * 1024 ** 3)\n    return a + b\n"
    r = check(prog, ADD_TEST, "add", timeout_s=10)
    assert not r.passed
    assert "MemoryError" in r.reason, r
    assert check(ADD, ADD_TEST, "add", timeout_s=10).passed  # host fine, next check fine


@pytest.mark.unit
@needs_bwrap
def test_writes_outside_the_sandbox_do_not_reach_the_host(tmp_path):
    name = "cf-escape-" + uuid.uuid4().hex
    targets = {
        "host tmp dir": tmp_path / name,  # exists on the host only
        "repo": REPO / name,
        "host /tmp": Path("/tmp") / name,  # lands in the sandbox's private /tmp
    }
    try:
        for label, path in targets.items():
            prog = (
                "def add(a, b):\n"
                f"    with open({str(path)!r}, 'w') as f:\n"
                "        f.write('pwned')\n"
                "    return a + b\n"
            )
            test = ADD_TEST + f"    assert open({str(path)!r}).read() == 'pwned'\n"
            r = check(prog, test, "add", timeout_s=10)
            if label != "host /tmp":
                assert not r.passed, (label, r)
                assert "Error" in r.reason, (label, r)
            assert not path.exists(), label
    finally:
        for path in targets.values():
            if path.exists():
                path.unlink()


@pytest.mark.unit
@needs_bwrap
def test_host_files_are_not_visible():
    this = str(Path(__file__).resolve())
    prog = f"def add(a, b):\n    open({this!r}).read()\n    return a + b\n"
    r = check(prog, ADD_TEST, "add", timeout_s=10)
    assert not r.passed and ("FileNotFoundError" in r.reason or "PermissionError" in r.reason), r
    r = check("def add(a, b):\n    open('/etc/shadow').read()\n    return a + b\n", ADD_TEST, "add", timeout_s=10)
    assert not r.passed, r
    # only the system and interpreter directories are mounted: no /work, /home, /root files, /var...
    prog = (
        "import os\n"
        "def add(a, b):\n"
        f"    assert os.path.exists({str(REPO)!r}) or os.path.exists('/home') or os.path.exists('/var')\n"
        "    return a + b\n"
    )
    r = check(prog, ADD_TEST, "add", timeout_s=10)
    assert not r.passed and "AssertionError" in r.reason, r


@pytest.mark.unit
@needs_bwrap
def test_no_network_to_host_loopback():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    try:
        prog = (
            "import socket\n"
            "def add(a, b):\n"
            f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
            "    s.sendall(b'exfiltrated')\n"
            "    return a + b\n"
        )
        r = check(prog, ADD_TEST, "add", timeout_s=10)
        assert not r.passed
        assert "Error" in r.reason, r
        srv.settimeout(0.3)
        with pytest.raises(socket.timeout):
            conn, _ = srv.accept()
            conn.close()
    finally:
        srv.close()


@pytest.mark.unit
@needs_bwrap
def test_host_environment_is_scrubbed(monkeypatch):
    secret = "s3cret-" + uuid.uuid4().hex
    monkeypatch.setenv("CF_SECRET", secret)
    prog = (
        "import os, glob\n"
        "def add(a, b):\n"
        f"    assert os.environ.get('CF_SECRET') == {secret!r}\n"
        "    return a + b\n"
    )
    r = check(prog, ADD_TEST, "add", timeout_s=10)
    assert not r.passed and "AssertionError" in r.reason, r
    # nor anywhere in the environ of processes it can see
    prog2 = (
        "import glob\n"
        "def add(a, b):\n"
        "    seen = b''.join(open(p, 'rb').read() for p in glob.glob('/proc/[0-9]*/environ'))\n"
        f"    assert {secret!r}.encode() in seen\n"
        "    return a + b\n"
    )
    r = check(prog2, ADD_TEST, "add", timeout_s=10)
    assert not r.passed, r


@pytest.mark.unit
@needs_bwrap
def test_new_session_children_do_not_outlive_the_check():
    tag = marker()
    prog = f"""
import os, subprocess
def add(a, b):
    subprocess.Popen(['/bin/sh', '-c', 'sleep 300; : {tag}'], start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if os.fork() == 0:  # double fork + setsid: a classic daemon
        os.setsid()
        if os.fork() == 0:
            with open('/proc/self/comm', 'w') as f:
                f.write({tag!r})
            with open('/tmp/{tag}', 'w') as f:
                f.write('still here')
            import time
            time.sleep(300)
        os._exit(0)
    return a + b
"""
    r = check(prog, ADD_TEST, "add", timeout_s=10)
    assert r.passed, r  # the function itself is right; what matters is what is left behind
    assert host_procs_with(tag) == []
    assert not Path(f"/tmp/{tag}").exists()


# --------------------------------------------------------------------------
# refusal without bubblewrap, and the opt-in weaker mode
# --------------------------------------------------------------------------


@pytest.mark.unit
def test_refuses_without_bubblewrap():
    code.configure(bwrap_path="/nonexistent/bin/bwrap")
    with pytest.raises(SandboxUnavailableError) as e:
        check(ADD, ADD_TEST, "add", timeout_s=10)
    assert isinstance(e.value, FactoryError)  # the CLI prints its message alone
    msg = str(e.value)
    assert "bubblewrap" in msg and "apt-get install bubblewrap" in msg
    assert 'sandbox="process"' in msg
    with pytest.raises(SandboxUnavailableError):
        check_many([(ADD, ADD_TEST, "add")], timeout_s=10)
    ok, why = code.sandbox_status()
    assert not ok and "/nonexistent/bin/bwrap" in why


@pytest.mark.unit
def test_opt_in_process_mode_runs_without_bubblewrap():
    code.configure(bwrap_path="/nonexistent/bin/bwrap")
    assert check(ADD, ADD_TEST, "add", timeout_s=10, sandbox="process").passed
    r = check("def add(a, b):\n    return a * b\n", ADD_TEST, "add", timeout_s=10, sandbox="process")
    assert not r.passed and "AssertionError" in r.reason
    r = check("import time\ndef add(a, b):\n    time.sleep(60)\n", ADD_TEST, "add", timeout_s=1, sandbox="process")
    assert not r.passed and "timed out" in r.reason
    # process-wide opt-in
    code.configure(sandbox="process")
    assert [r.passed for r in check_many([(ADD, ADD_TEST, "add")] * 2, timeout_s=10, max_workers=2)] == [True, True]
    with pytest.raises(ValueError):
        code.configure(sandbox="none")
    with pytest.raises(ValueError):
        check(ADD, ADD_TEST, "add", timeout_s=10, sandbox="yolo")


@pytest.mark.unit
def test_process_mode_still_has_rlimits_and_clean_env(monkeypatch):
    monkeypatch.setenv("CF_SECRET", "visible?")
    prog = "import os\ndef add(a, b):\n    assert 'CF_SECRET' not in os.environ\n    return a + b\n"
    assert check(prog, ADD_TEST, "add", timeout_s=10, sandbox="process").passed
    r = check("def add(a, b):\n    x = bytearray(60 * 1024 ** 3)\n", ADD_TEST, "add", timeout_s=10, sandbox="process")
    assert not r.passed and "MemoryError" in r.reason, r


@pytest.mark.unit
def test_process_mode_reaps_new_session_children_best_effort():
    tag = marker()
    prog = f"""
import subprocess
def add(a, b):
    subprocess.Popen(['/bin/sh', '-c', 'sleep 300; : {tag}'], start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return a + b
"""
    r = check(prog, ADD_TEST, "add", timeout_s=10, sandbox="process")
    assert r.passed, r
    assert host_procs_with(tag) == []
