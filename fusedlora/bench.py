"""`python -m fusedlora.bench e2e ...`: the end-to-end training step (fusedlora/bench_e2e.py, installed);
`python -m fusedlora.bench context ...`: the longest trainable sequence per variant (fusedlora/bench_context.py).

`python -m fusedlora.bench [...]` without `e2e`: the kernel-level peer benchmark, which lives outside the installed
package in the repository's benchmarks/peers.py; from a checkout (or with it on PYTHONPATH) it runs from here.
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["e2e"]:
        from .bench_e2e import main as e2e_main
        return e2e_main(argv[1:])
    if argv[:1] == ["context"]:
        from .bench_context import main as context_main
        return context_main(argv[1:])
    try:
        from benchmarks.peers import main as peers_main
    except ImportError:
        print("fusedlora.bench: the kernel-level peer benchmark is the repository's benchmarks/peers.py (not "
              "installed): run `python -m benchmarks.peers` from a checkout; the end-to-end training step is "
              "`python -m fusedlora.bench e2e`", file=sys.stderr)
        return 2
    return peers_main(argv)


if __name__ == "__main__":
    sys.exit(main())
