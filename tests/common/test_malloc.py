"""common.malloc: the thresholds reach glibc (this image's libc) and decide where a block
lives: its own mapping (returned to the OS when freed) or the heap. Each check runs in a
fresh interpreter: a heap grown by earlier tests would serve the block whatever the
threshold."""

import subprocess
import sys

CHECK = """
import ctypes, sys
from llamafleet.common import malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
args = [int(a) for a in sys.argv[1:]]
ok = malloc.set_thresholds(*args[:-1])
before = libc.mallinfo2().hblkhd
block = libc.malloc(args[-1])
print(ok, libc.mallinfo2().hblkhd - before)
"""


def mapped(*thresholds: int, block: int) -> tuple[bool, int]:
    """(set_thresholds' answer, bytes mmapped for one block of ``block`` bytes)."""
    out = subprocess.run([sys.executable, "-c", CHECK, *map(str, thresholds), str(block)],
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_the_pods_thresholds_keep_engine_temporaries_on_the_heap() -> None:
    assert mapped(32 << 20, 64 << 20, block=1 << 20) == (True, 0)
    ok, n = mapped(32 << 20, 64 << 20, block=48 << 20)  # beyond it: its own mapping
    assert ok and n >= 48 << 20


def test_the_routers_threshold_maps_every_body() -> None:
    ok, n = mapped(128 * 1024, block=1 << 20)
    assert ok and n >= 1 << 20
