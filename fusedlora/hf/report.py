"""What `fusedlora.patch` did: per module kind, how many were patched and why the others kept HF's path."""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

KINDS = ("rms_norm", "attention", "mlp", "loss")


@dataclass
class KindCount:
    patched: int = 0
    original: Counter = field(default_factory=Counter)  # reason -> modules kept on the original path
    # reason -> patched modules whose training calls take the original path as the model stands now (base
    # weights that train: no LoRA adapter yet, or full fine-tuning), each such call a run-time fallback
    trains_on_original: Counter = field(default_factory=Counter)

    @property
    def kept(self) -> int:
        return sum(self.original.values())


class Fallbacks:
    """Calls of patched modules that went to the original forward at run time (an adapter changed after
    patching, full fine-tuning, CPU tensors without the interpreter...): counted, and warned once each."""

    def __init__(self):
        self.counts: Counter = Counter()

    def note(self, kind: str, reason: str):
        key = (kind, reason)
        if key not in self.counts:
            warnings.warn(f"fusedlora: a patched {kind} module ran HF's original forward: {reason}", stacklevel=3)
        self.counts[key] += 1

    def __str__(self) -> str:
        if not self.counts:
            return "no run-time fallbacks"
        return "\n".join(f"{n}x {kind}: {reason}" for (kind, reason), n in self.counts.items())

    def __repr__(self) -> str:
        return f"Fallbacks({dict(self.counts)!r})"


@dataclass
class PatchReport:
    model_type: str | None
    family_known: bool
    kinds: dict = field(default_factory=lambda: {k: KindCount() for k in KINDS})
    notes: list = field(default_factory=list)
    fallbacks: Fallbacks = field(default_factory=Fallbacks)

    def patched(self, kind: str, trains_on_original: str | None = None):
        self.kinds[kind].patched += 1
        if trains_on_original:
            self.kinds[kind].trains_on_original[trains_on_original] += 1

    def kept(self, kind: str, reason: str):
        self.kinds[kind].original[reason] += 1

    @property
    def n_patched(self) -> int:
        return sum(c.patched for c in self.kinds.values())

    def as_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "family_known": self.family_known,
            "notes": list(self.notes),
            "kinds": {
                k: {
                    "patched": c.patched,
                    "original": dict(c.original),
                    "trains_on_original": dict(c.trains_on_original),
                }
                for k, c in self.kinds.items()
            },
            "fallbacks": {f"{k}: {r}": n for (k, r), n in self.fallbacks.counts.items()},
        }

    def __str__(self) -> str:
        head = f"fusedlora.patch: model_type={self.model_type!r}" + (
            "" if self.family_known else " (not in the family table)"
        )
        rows = [("module kind", "patched", "original", "why original")]
        for kind, c in self.kinds.items():
            why = (
                "; ".join(
                    [f"{n}x {r}" for r, n in c.original.most_common()]
                    + [f"{n} patched, but {r}" for r, n in c.trains_on_original.most_common()]
                )
                or "-"
            )
            rows.append((kind, str(c.patched), str(c.kept), why))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [head] + ["  " + "  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  run-time fallback: {line}" for line in str(self.fallbacks).splitlines() if self.fallbacks.counts]
        return "\n".join(lines)

    __repr__ = __str__
