"""Build hooks of the documentation site (mkdocs).

* The benchmark plots under ``benchmarks/results/`` are served as ``results/plots/<path>``, so
  the results pages show them without a copy in ``docs/``.
* ``<!-- include: PATH -->`` on a line of its own is replaced by the file PATH (relative to the
  repository root) with its headings moved one level down, so a benchmark's own summary appears
  inside a results page, never copied (its relative plot links pointed at the served plots); a
  missing file fails the build.
* Docstrings use reST roles (``:class:`Name```); mkdocstrings renders them as literal text, so
  they are reduced to plain code here.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
INCLUDE = re.compile(r"^<!-- include: (\S+) -->$", re.MULTILINE)
#: A relative PNG link in an included benchmark summary (written beside its plots' folder).
PLOT_LINK = re.compile(r"\]\((?!https?:|/)([^)\s]+\.png)\)")
ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|obj|exc):(<code>)")


def on_files(files: Files, config) -> Files:
    for path in sorted(RESULTS.rglob("*.png")):
        uri = "results/plots/" + path.relative_to(RESULTS).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def _included(match: re.Match) -> str:
    path = ROOT / match.group(1)
    if not path.is_file():
        raise FileNotFoundError(f"include: {match.group(1)} does not exist")
    text = path.read_text(encoding="utf-8")
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        lines.append("#" + line if not fenced and line.startswith("#") else line)
    # a summary links its plots relative to benchmarks/results/; the site serves them under
    # results/plots/ (see on_files), and every results page lives in results/
    return PLOT_LINK.sub(r"](plots/\1)", "\n".join(lines))


def on_page_markdown(markdown: str, page, config, files) -> str:
    return INCLUDE.sub(_included, markdown)


def on_page_content(html: str, page, config, files) -> str:
    return ROLE.sub(r"\1", html)
