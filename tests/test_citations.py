"""Citations in the project point to docs/methods.md or to papers, never to a file users do not have."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_file_cites_a_missing_reference_document():
    missing = "reference" + ".md"
    offenders = [str(p.relative_to(ROOT)) for folder in ("attribution", "unlearning", "pipelines", "benchmarks",
                                                         "examples", "tests", "docs")
                 for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".yaml")
                 and missing in p.read_text(encoding="utf-8")]
    offenders += [name for name in ("README.md",) if missing in (ROOT / name).read_text(encoding="utf-8")]
    assert offenders == []
    sections = {int(line.split()[1][1:]) for line in (ROOT / "docs" / "methods.md").read_text().splitlines()
                if line.startswith("## §")}
    cited = {int(m) for folder in ("attribution", "unlearning", "pipelines", "benchmarks", "tests")
             for p in (ROOT / folder).rglob("*.py")
             for m in re.findall(r"methods\.md §(\d+)", p.read_text(encoding="utf-8"))}
    assert cited and cited <= sections, cited - sections
