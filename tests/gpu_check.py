"""``make gpu-check``: the GPU paths (tests/test_gpu.py) on a machine with a CUDA device, one PASS/FAIL line each and
a summary, in a few minutes. On a machine without one it says so and exits 0 having run nothing else.

Not yet run on a GPU: this project has had none. Its first run's output belongs in bench/results/gpu_check.md.
"""

from __future__ import annotations

import sys
import time


class _Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float]] = []

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            word = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}[report.outcome]
            name = report.nodeid.split("::", 1)[1]
            self.rows.append((word, name, report.duration))
            print(f"\ngpu-check: {word} {name} ({report.duration:.1f} s)", flush=True)


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(
            f"gpu-check: needs a CUDA device; this machine has none (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}). Nothing was run."
        )
        return 0
    import pytest

    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print(
        f"gpu-check: torch {torch.__version__}, CUDA {torch.version.cuda}, devices: {', '.join(names)}",
        flush=True,
    )
    report = _Report()
    t0 = time.time()
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu.py"], plugins=[report])
    passed = sum(1 for w, *_ in report.rows if w == "PASS")
    print("\ngpu-check summary:")
    for word, name, secs in report.rows:
        print(f"  {word} {name} ({secs:.1f} s)")
    print(f"gpu-check: {passed} of {len(report.rows)} passed in {time.time() - t0:.0f} s")
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
