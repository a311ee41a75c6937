"""A fake of the part of pynvml the pod uses (inference/capacity.py's NVML protocol): cards
with a total memory whose free memory drops by what is loaded onto them, as a real card's
does when llama.cpp offloads the weights."""

from __future__ import annotations

from types import SimpleNamespace

from llamafleet.common.capacity import MiB


class FakeNVML:
    def __init__(self, total_mib: list[int], name: str = "NVIDIA H100 80GB HBM3"):
        self.total = [t * MiB for t in total_mib]
        self.used = [0] * len(total_mib)
        self.name = name
        self.shut = False

    def load(self, nbytes: float) -> None:
        """Weights offloaded: split over the cards, as llama.cpp splits layers."""
        for i in range(len(self.used)):
            self.used[i] += int(nbytes / len(self.used))

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.total)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetMemoryInfo(self, h: int):
        return SimpleNamespace(free=self.total[h] - self.used[h], total=self.total[h],
                               used=self.used[h])

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return self.name.encode()
