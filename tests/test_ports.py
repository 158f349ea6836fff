"""Port reservation: unique within a process and across processes, clear errors."""

import errno
import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from askap_flows import ports

pytestmark = [pytest.mark.unit, pytest.mark.once]  # port allocation: no Prefect

# Every range here lies in 32000-32767: below Linux's ephemeral range (32768-60999), where any
# outgoing connection may take a port for a moment (CI once saw 41501 taken), and above the
# library's default range, which sub-flows running at the same time use.


def test_reserved_ports_are_distinct_and_held(tmp_path):
    alloc = ports.PortAllocator(32000, 32299, lock_dir=tmp_path)
    held = [alloc.reserve(2, "127.0.0.1") for _ in range(100)]
    got = [p for r in held for p in r.ports]
    assert len(got) == len(set(got)) == 200
    for r in held:
        r.release()


def test_a_process_does_not_reuse_ports_until_the_range_is_used_up(tmp_path):
    alloc = ports.PortAllocator(32300, 32399, lock_dir=tmp_path)
    seen = []
    for _ in range(50):
        with alloc.reserve(1, "127.0.0.1") as r:
            seen += r.ports
    assert len(set(seen)) == 50


def test_exhausted_range_says_how_to_widen_it(tmp_path):
    alloc = ports.PortAllocator(32400, 32402, lock_dir=tmp_path)
    r = alloc.reserve(3, "127.0.0.1")
    with pytest.raises(ports.PortError, match="no 1 free port.*ASKAP_FLOWS_PORTS=LOW-HIGH"):
        alloc.reserve(1, "127.0.0.1")
    r.release()
    assert len(alloc.reserve(3, "127.0.0.1").ports) == 3


def test_a_port_another_program_listens_on_is_skipped(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 32410))
        s.listen()
        alloc = ports.PortAllocator(32410, 32411, lock_dir=tmp_path)
        assert alloc.reserve(1, "127.0.0.1").ports == [32411]


@pytest.mark.parametrize("text", ["abc", "30000", "10-5", "80-90"])
def test_malformed_range_is_refused(text):
    with pytest.raises(ports.PortError, match="ASKAP_FLOWS_PORTS"):
        ports.port_range(text)


def test_zero_means_the_os_chooses():
    assert ports.port_range("0") is None


HOLDER = """
import json, sys, time
from askap_flows.ports import PortAllocator, PortError
lock_dir, low, high, count, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
a = PortAllocator(low, high, lock_dir=lock_dir)
while not __import__("os").path.exists(go):  # start together
    time.sleep(0.001)
try:
    print(json.dumps({"ports": a.reserve(count, "127.0.0.1").ports}), flush=True)
except PortError as exc:
    print(json.dumps({"error": str(exc)}), flush=True)
sys.stdin.read()  # hold the reservation until the test has heard from every process
"""
LOW, HIGH = 32500, 32503  # 4 ports: below Linux's ephemeral range, outside the default range


def _holders(tmp_path, n, count):
    """Start ``n`` processes that each reserve ``count`` ports of LOW-HIGH at the same moment and
    hold them; return what each got ({"ports": [...]} or {"error": ...})."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "locks"), str(LOW),
                               str(HIGH), str(count), str(go)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(n)]
    go.touch()
    try:
        return [json.loads(p.stdout.readline()) for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=30)


def test_processes_holding_ports_at_once_never_share_one(tmp_path):
    """Four processes want 2 ports each from a range of 4, all at once, and hold them: without the
    locks every one of them gets 2 (8 from 4, so some port is given twice); with them, the ports
    held are all different and whoever finds none left gets the PortError that says so."""
    results = _holders(tmp_path, 4, 2)
    held = [p for r in results for p in r.get("ports", [])]
    assert len(held) == len(set(held)) <= HIGH - LOW + 1, results
    for r in results:
        assert "ports" in r or "free port(s) left in 32500-32503" in r["error"], r


def test_a_second_process_finds_the_range_held(tmp_path):
    """One process holds the whole range; another one started while it does gets none."""
    go = tmp_path / "go"
    go.touch()
    first = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "locks"), str(LOW),
                              str(HIGH), "4", str(go)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert len(json.loads(first.stdout.readline())["ports"]) == 4
        second = _holders(tmp_path, 1, 1)[0]
        assert "error" in second and "no 1 free port(s) left" in second["error"], second
    finally:
        first.stdin.close()
        first.wait(timeout=30)


def test_a_lock_directory_open_to_others_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o700)
    shared.chmod(0o777)
    with pytest.raises(ports.PortError, match=r"owned by uid \d+ with mode 0777; it must be yours"
                       r".*chmod 700 .*TMPDIR.*ASKAP_FLOWS_PORTS=0"):
        ports.PortAllocator(LOW, HIGH, lock_dir=shared)


def test_a_lock_directory_of_another_user_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    if os.getuid() != 0:
        pytest.skip("only root can give a directory to another user")
    os.chown(theirs, 65534, 65534)
    with pytest.raises(ports.PortError, match="owned by uid 65534 with mode 0700"):
        ports.PortAllocator(LOW, HIGH, lock_dir=theirs)


def test_a_symlink_for_the_lock_directory_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ports.PortError, match="is not a directory"):
        ports.PortAllocator(LOW, HIGH, lock_dir=tmp_path / "link")


def test_a_new_lock_directory_is_private(tmp_path):
    alloc = ports.PortAllocator(LOW, HIGH, lock_dir=tmp_path / "new")
    assert stat.S_IMODE(os.stat(alloc.lock_dir).st_mode) == 0o700


def test_a_filesystem_without_flock_gives_the_fix(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    alloc = ports.PortAllocator(LOW, HIGH, lock_dir=tmp_path / "locks")
    monkeypatch.setattr(ports.fcntl, "flock", no_locks)
    with pytest.raises(ports.PortError, match="does not support flock .*No locks available.*"
                       "TMPDIR.*ASKAP_FLOWS_PORTS=0"):
        alloc.reserve(1, "127.0.0.1")
