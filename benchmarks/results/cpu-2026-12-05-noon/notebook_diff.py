"""Text outputs of two executions of the same notebooks, cell by cell, line by line.

    python notebook_diff.py OLD_DIR NEW_DIR 01_quantization 03_sft ...

For each notebook: the lines of its stream, text/plain and text/markdown outputs (images left out)
that differ between the two executions, prefixed with the code cell's index.
"""
import difflib
import json
import sys
from pathlib import Path


def lines(path: Path) -> list[str]:
    out = []
    for index, cell in enumerate(json.loads(path.read_text())["cells"]):
        for output in cell.get("outputs", []):
            texts = [output.get("text", "")] if output.get("output_type") == "stream" else [
                output.get("data", {}).get(kind, "") for kind in ("text/markdown", "text/plain")]
            for text in texts:
                text = "".join(text) if isinstance(text, list) else text
                out += [f"[{index}] {line}" for line in text.splitlines()]
    return out


def main() -> None:
    old, new = Path(sys.argv[1]), Path(sys.argv[2])
    for name in sys.argv[3:]:
        a, b = lines(old / f"{name}.ipynb"), lines(new / f"{name}.ipynb")
        changed = [d for d in difflib.unified_diff(a, b, lineterm="", n=0)
                   if d[:1] in "+-" and not d.startswith(("+++", "---"))]
        print(f"== {name}: {len(changed)} differing lines")
        for line in changed:
            print(f"    {line}")


if __name__ == "__main__":
    main()
