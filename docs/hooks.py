"""Build hooks of the documentation site (mkdocs).

* The benchmark plots under ``benchmarks/results/`` are served as ``results/plots/<path>``, so
  the results pages show them without a copy in ``docs/``.
* Docstrings use reST roles (``:class:`Name```); mkdocstrings renders them as literal text, so
  they are reduced to plain code here.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|obj|exc):(<code>)")


def on_files(files: Files, config) -> Files:
    for path in sorted(RESULTS.rglob("*.png")):
        uri = "results/plots/" + path.relative_to(RESULTS).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_content(html: str, page, config, files) -> str:
    return ROLE.sub(r"\1", html)
