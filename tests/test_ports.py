"""Port reservation: unique within a process and across processes, clear errors."""

import json
import socket
import subprocess
import sys

import pytest

from askap_flows import ports

pytestmark = pytest.mark.unit


def test_reserved_ports_are_distinct_and_held(tmp_path):
    alloc = ports.PortAllocator(41000, 41299, lock_dir=tmp_path)
    held = [alloc.reserve(2, "127.0.0.1") for _ in range(100)]
    got = [p for r in held for p in r.ports]
    assert len(got) == len(set(got)) == 200
    for r in held:
        r.release()


def test_a_process_does_not_reuse_ports_until_the_range_is_used_up(tmp_path):
    alloc = ports.PortAllocator(41300, 41399, lock_dir=tmp_path)
    seen = []
    for _ in range(50):
        with alloc.reserve(1, "127.0.0.1") as r:
            seen += r.ports
    assert len(set(seen)) == 50


def test_exhausted_range_says_how_to_widen_it(tmp_path):
    alloc = ports.PortAllocator(41400, 41402, lock_dir=tmp_path)
    r = alloc.reserve(3, "127.0.0.1")
    with pytest.raises(ports.PortError, match="no 1 free port.*ASKAP_FLOWS_PORTS=LOW-HIGH"):
        alloc.reserve(1, "127.0.0.1")
    r.release()
    assert len(alloc.reserve(3, "127.0.0.1").ports) == 3


def test_a_port_another_program_listens_on_is_skipped(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 41500))
        s.listen()
        alloc = ports.PortAllocator(41500, 41501, lock_dir=tmp_path)
        assert alloc.reserve(1, "127.0.0.1").ports == [41501]


@pytest.mark.parametrize("text", ["abc", "30000", "10-5", "80-90"])
def test_malformed_range_is_refused(text):
    with pytest.raises(ports.PortError, match="ASKAP_FLOWS_PORTS"):
        ports.port_range(text)


def test_zero_means_the_os_chooses():
    assert ports.port_range("0") is None


CHILD = """
import json, sys, time
from askap_flows.ports import PortAllocator
a = PortAllocator(41600, 41700, lock_dir=sys.argv[1])
held = [a.reserve(1, "127.0.0.1") for _ in range(20)]
print(json.dumps([p for r in held for p in r.ports]), flush=True)
time.sleep(2)
"""


def test_two_processes_started_together_never_share_a_port(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [json.loads(p.stdout.readline()) for p in procs]
    for p in procs:
        p.wait(timeout=30)
    a, b = (set(r) for r in results)
    assert len(a) == len(b) == 20 and not a & b
