"""Timing one whole process: wall time around fork-to-reap, peak RSS from ``/usr/bin/time -f %M``.

Why ``/usr/bin/time`` and not ``os.wait4`` or ``getrusage(RUSAGE_CHILDREN)``: Linux records the high-water
RSS of the memory image a process had *before* ``exec`` into that process's ``ru_maxrss``. Python's
subprocess forks (or vforks) the benchmark process itself, so every child reported at least the RSS of this
runner (tested: 319 MiB for ``/bin/true`` forked from a 300 MiB Python). ``/usr/bin/time`` is a small C
program: the command it forks inherits ~1 MiB, less than any command measured here, and ``%M`` is that
one command's ``ru_maxrss`` from ``wait4`` (for a command that runs children, like ``snapfw create``
running ``qemu-img``, it is the largest of them, not a sum). ``RUSAGE_CHILDREN`` is worse still: a running
maximum over every child ever reaped.

The wall time is measured here, around the whole ``/usr/bin/time CMD`` run, so it includes about a
millisecond for starting ``/usr/bin/time`` itself, the same on both sides of every comparison.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

TIME = "/usr/bin/time"


class CommandFailed(RuntimeError):
    pass


def rss_available() -> bool:
    return os.access(TIME, os.X_OK)


@dataclass
class Sample:
    seconds: float
    peak_kib: int | None


@dataclass
class Series:
    """Repeated runs of one command."""

    argv: list[str]
    samples: list[Sample] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return statistics.median(s.seconds for s in self.samples)

    @property
    def peak_mib(self) -> float | None:
        kib = [s.peak_kib for s in self.samples if s.peak_kib is not None]
        return statistics.median(kib) / 1024 if kib else None

    def as_dict(self) -> dict:
        peak = self.peak_mib
        return {"argv": self.argv, "median_s": round(self.seconds, 5),
                "min_s": round(min(s.seconds for s in self.samples), 5),
                "max_s": round(max(s.seconds for s in self.samples), 5),
                "peak_rss_mib": None if peak is None else round(peak, 2),
                "samples_s": [round(s.seconds, 5) for s in self.samples],
                "samples_peak_rss_kib": [s.peak_kib for s in self.samples]}


def run(argv: list[str], env: dict | None = None, capture: bool = False) -> tuple[Sample, str]:
    """Run ``argv`` once; return its Sample and (with ``capture``) its stdout. Raises CommandFailed."""
    if not shutil.which(argv[0]) and not os.path.exists(argv[0]):
        raise CommandFailed(f"{argv[0]}: not found")
    fd, rss_file = tempfile.mkstemp(prefix="bench-rss-")
    os.close(fd)
    full = [TIME, "-f", "%M", "-o", rss_file, "--", *argv] if rss_available() else list(argv)
    out_target = subprocess.PIPE if capture else subprocess.DEVNULL
    try:
        start = time.perf_counter()
        p = subprocess.run(full, stdout=out_target, stderr=subprocess.PIPE, env=env, stdin=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        with open(rss_file) as f:
            text = f.read().strip()
    finally:
        os.unlink(rss_file)
    if p.returncode != 0:
        err = p.stderr.decode(errors="replace").strip()
        raise CommandFailed(f"{' '.join(argv)} exited with {p.returncode}: {err[-2000:]}")
    peak = None
    if text:
        # the last line: /usr/bin/time writes "Command exited with non-zero status" lines before it
        peak = int(text.splitlines()[-1])
    return Sample(seconds, peak), (p.stdout.decode(errors="replace") if capture else "")
