"""The pseudonymisation key: created once per site in conf/local/credentials.yml, never committed.

``python -m mvl_pipeline.commands.secrets ensure-key conf/local/credentials.yml`` adds a random key when the
file has none (``make train`` runs it) and leaves an existing key untouched. Losing the key changes
every pseudonym (new case ids, a new holdout), so back it up like any other site secret.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from pathlib import Path

import yaml

from mvl_pipeline.core.pseudonyms import KEY_BYTES, PseudonymKeyError, require_key

logger = logging.getLogger(__name__)

KEY_ENTRY = "pseudonymisation"
KEY_FIELD = "key"


def ensure_key(credentials_file: Path) -> bool:
    """Add a random 256-bit key under ``pseudonymisation.key`` if absent. True if one was created."""
    data = {}
    if credentials_file.exists():
        data = yaml.safe_load(credentials_file.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{credentials_file} must hold a YAML mapping")
    entry = data.get(KEY_ENTRY) or {}
    if isinstance(entry, dict) and entry.get(KEY_FIELD):
        # A key is there: keep it if usable, refuse if not (replacing it would silently give
        # every case and patient a new pseudonym).
        require_key(str(entry[KEY_FIELD]))
        return False
    data[KEY_ENTRY] = {**(entry if isinstance(entry, dict) else {}), KEY_FIELD: secrets.token_hex(KEY_BYTES)}
    credentials_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = credentials_file.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        yaml.safe_dump(data, handle, sort_keys=True)
    os.replace(tmp, credentials_file)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvl_pipeline.commands.secrets")
    sub = parser.add_subparsers(dest="command", required=True)
    ensure = sub.add_parser("ensure-key", help="create the pseudonymisation key if missing")
    ensure.add_argument("credentials_file", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        created = ensure_key(args.credentials_file)
    except PseudonymKeyError as exc:
        logger.error("%s: %s (fix or remove it by hand)", args.credentials_file, exc)
        return 2
    except (yaml.YAMLError, ValueError, OSError) as exc:
        # a hand-edited credentials file (the README adds S3 keys to it) with a YAML slip, or a
        # path that is a folder: one line saying so, not a traceback out of `make train`; never the
        # file's text (it holds secrets), only where the parser stopped
        where = getattr(exc, "problem_mark", None)
        what = f"not valid YAML (line {where.line + 1})" if where else f"{type(exc).__name__}: {exc}"
        logger.error("%s: %s; no key was written (fix it by hand)", args.credentials_file, what)
        return 2
    if created:
        logger.info(
            "created a new random pseudonymisation key in %s (mode 600). Keep it and back it up: "
            "with another key every case gets another pseudonym.",
            args.credentials_file,
        )
    else:
        logger.info("pseudonymisation key present in %s", args.credentials_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
