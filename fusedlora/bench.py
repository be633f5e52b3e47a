"""`python -m fusedlora.bench` has moved out of the installed package: the benchmarks are the repository's
benchmarks/ folder, run from a checkout (the installed wheel first on PYTHONPATH to measure its prebuilt path):
`python -m benchmarks.e2e` (was `fusedlora.bench e2e`), `python -m benchmarks.context` (was `fusedlora.bench
context`) and `python -m benchmarks.peers` (the kernel-level peer benchmark). The installed package keeps the
training demo, `python -m fusedlora.demo`.
"""

from __future__ import annotations

import sys

MOVED = {"e2e": "benchmarks.e2e", "context": "benchmarks.context"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = MOVED.get(argv[0] if argv else "", "benchmarks.peers")
    rest = " ".join(argv[1:] if argv[:1] and argv[0] in MOVED else argv)
    print(
        f"fusedlora.bench has moved to the repository's benchmarks/ (not installed): from a checkout, run "
        f"`python -m {command}{' ' + rest if rest else ''}`; the demo is `python -m fusedlora.demo`",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
