"""Shared benchmark plumbing: what machine and commit ran, warm-up + median timing with device sync, peak memory."""

import dataclasses
import os
import platform
import statistics
import subprocess
import threading
import time

import torch


def machine_description(device: torch.device) -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__)
    ).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=os.path.dirname(__file__)).stdout.strip()
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        hardware = f"{cpu}, {torch.get_num_threads()} threads"
    return (f"machine: {hardware} | torch {torch.__version__} | python {platform.python_version()} | "
            f"commit {commit}{' (dirty)' if dirty else ''}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory while the block runs: CUDA's allocator peak, or on CPU the resident set sampled every ms
    (minus the resident set at entry)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._rss() - self._start)
            time.sleep(0.001)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()
        return False


def median_seconds(step, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclasses.dataclass
class Timings:
    """Seconds of every repeat of each named step (`runs[name][i]`: repeat i), and each step's peak memory."""

    runs: dict
    peak: dict

    @property
    def median(self) -> dict:
        return {name: statistics.median(t) for name, t in self.runs.items()}

    @property
    def best(self) -> dict:
        """The fastest repeat: on shared cores, the one least disturbed by other processes."""
        return {name: min(t) for name, t in self.runs.items()}

    def ratios(self, name: str, reference: str) -> tuple[float, float, float]:
        """`name`'s time / `reference`'s three ways: of the medians, of the best runs, and paired."""
        return (self.median[name] / self.median[reference], self.best[name] / self.best[reference],
                self.paired_ratio(name, reference))

    def paired_ratio(self, name: str, reference: str) -> float:
        """The median over repeats of `name`'s time / `reference`'s time in the same repeat. The two ran next to each
        other, so a slow spell of the machine hits both: steadier than the ratio of two medians."""
        return statistics.median(a / b for a, b in zip(self.runs[name], self.runs[reference]))


def interleaved_timings(steps: dict, device: torch.device, warmup: int, repeats: int) -> Timings:
    """Times every named step `repeats` times after `warmup` runs, the steps interleaved inside every repeat and their
    order reversed every other repeat (a, b, c, c, b, a, ...), so that background load and the position in the
    sequence hit all of them alike. The first warm-up run of each step also measures its peak memory."""
    peaks = {}
    for name, step in steps.items():
        with PeakMemory(device) as memory:
            step()
            synchronize(device)
        peaks[name] = memory.peak_bytes
        for _ in range(warmup - 1):
            step()
    times = {name: [] for name in steps}
    names = list(steps)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return Timings(times, peaks)


def load_line() -> str:
    """The 1-minute load average, printed next to CPU timings (other processes share the cores)."""
    try:
        return f"load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} cpus)"
    except OSError:
        return "load average unknown"
