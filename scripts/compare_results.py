"""Compare two results folders file by file, timing and provenance aside: the check that a refactoring left
every result unchanged (issue #36: a smoke ``reproduce`` before and after gives identical result files).

    python scripts/compare_results.py BEFORE AFTER
    python scripts/compare_results.py --digest RESULTS > tests/smoke_digest.json

The second form records a digest of each JSON result (timing and provenance aside) with the environment that
made it; ``tests/test_experiments.py`` checks the smoke reproduction against it.

JSON and JSON-lines files are compared as data without the timing fields (``train.TIMING_KEYS``, CurveBall's
``time_to_target``, a number of seconds quoted in a note) and the provenance (code hash, commit); tuning
caches are matched by name without their code hash; other files byte for byte. Prints the files that differ
(figures that plot wall time differ with the machine's speed: read them, do not count them) and exits 1 if a
JSON result differs.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

from backproplab.train import TIMING_KEYS

IGNORED = set(TIMING_KEYS) | {"time_to_target", "code", "commit"}


def _comparable(value):
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items() if k not in IGNORED}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    if isinstance(value, str):  # a note that quotes a wall time ("1.2 s") changes with the machine's speed
        return re.sub(r"\b\d+(\.\d+)? s\b", "<seconds> s", value)
    return value


def load(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix == ".lock":
            continue
        name = re.sub(r"-[0-9a-f]{16}\.json$", ".json", str(path.relative_to(root)))  # tuning cache: code hash
        if path.suffix == ".json":
            out[name] = _comparable(json.loads(path.read_text()))
        elif path.suffix == ".jsonl":
            out[name] = [_comparable(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
        else:
            out[name] = hashlib.sha1(path.read_bytes()).hexdigest()
    return out


def environment() -> dict[str, str]:
    """What a result's last bits depend on besides the code: the torch build, numpy, and the CPU's vector kind."""
    import numpy
    import torch

    return {"torch": torch.__version__, "numpy": numpy.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def digest(root: Path) -> dict[str, str]:
    """{relative path: SHA-256 prefix of the JSON result as compared (timing and provenance aside)}."""
    def without_provenance(value):
        if isinstance(value, dict):
            return {k: without_provenance(v) for k, v in value.items() if k != "provenance"}
        if isinstance(value, list):
            return [without_provenance(v) for v in value]
        return value

    return {name: hashlib.sha256(json.dumps(without_provenance(value), sort_keys=True).encode()).hexdigest()[:16]
            for name, value in load(root).items() if name.endswith((".json", ".jsonl"))}


def main(before: str, after: str) -> int:
    a, b = load(Path(before)), load(Path(after))
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    differ = [k for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    results = [k for k in differ if k.endswith((".json", ".jsonl"))]
    print(f"{len(a)} files before, {len(b)} after; only before: {missing or 'none'}; only after: {extra or 'none'}")
    print(f"{len(differ)} differ, {len(results)} of them results (JSON):")
    for k in differ:
        print(f"  {k}")
    return 1 if missing or extra or results else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--digest"]:
        print(json.dumps({"environment": environment(), "files": digest(Path(sys.argv[2]))}, indent=1,
                         sort_keys=True))
        sys.exit(0)
    sys.exit(main(*sys.argv[1:3]))
