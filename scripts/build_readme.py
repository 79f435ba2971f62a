"""Assemble README.md from its head (README.head.md) and the per-callback sections in docs/sections/.

Run after editing a section: ``python scripts/build_readme.py``.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["clipping.md", "guard.md", "quantization.md", "examples.md", "benchmarks.md"]


def main() -> None:
    parts = [(ROOT / "docs" / "README.head.md").read_text().rstrip()]
    for name in ORDER:
        path = ROOT / "docs" / "sections" / name
        if path.exists():
            parts.append(path.read_text().rstrip())
    (ROOT / "README.md").write_text("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
