"""The README's ablation section, generated from the ablation's summary.json, never typed by hand.

    python -m mvl_pipeline.commands.ablation_readme data/08_reporting/ablation/summary.json README.md

replaces what lies between the lines ``<!-- ablation:begin -->`` and ``<!-- ablation:end -->``
(kept) with the conclusion the numbers support (``evaluation.ablation_report.readme_section``).
The README must hold both markers once, in that order: otherwise nothing is written (exit 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from mvl_pipeline.evaluation.ablation_report import readme_section

logger = logging.getLogger(__name__)

BEGIN = "<!-- ablation:begin -->"
END = "<!-- ablation:end -->"


class MarkerError(ValueError):
    """The README does not hold the ablation markers exactly once, in order."""


def replace_section(text: str, section: str) -> str:
    """``text`` with everything between the markers replaced by ``section``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise MarkerError(f"the README must hold {BEGIN} and then {END}, once each")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{section.strip()}\n{END}{tail}"


def update_readme(summary_file: Path, readme: Path) -> bool:
    """Rewrite ``readme``'s ablation section from ``summary_file``; True when it changed."""
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    text = readme.read_text(encoding="utf-8")
    updated = replace_section(text, readme_section(summary, summary_path=summary_file.as_posix()))
    if updated == text:
        return False
    handle, tmp = tempfile.mkstemp(dir=readme.parent, prefix=f".{readme.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(updated)
        os.replace(tmp, readme)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvl_pipeline.commands.ablation_readme", description=__doc__.splitlines()[0])
    parser.add_argument("summary", type=Path, help="the ablation's summary.json")
    parser.add_argument("readme", type=Path, help="the Markdown file holding the markers (README.md)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        changed = update_readme(args.summary, args.readme)
    except KeyError as exc:  # another JSON file given ("KeyError: 'design'" said little)
        logger.error("%s not updated: %s is not an ablation's summary.json (it has no %s)", args.readme, args.summary, exc)
        return 2
    except (OSError, MarkerError, json.JSONDecodeError) as exc:
        logger.error("%s not updated: %s: %s", args.readme, type(exc).__name__, exc)
        return 2
    logger.info("%s: ablation section %s", args.readme, "rewritten" if changed else "already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
