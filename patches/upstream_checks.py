#!/usr/bin/env python3
"""Run upstream transformers' own checks on the fork and on stock upstream, side by side.

    python patches/upstream_checks.py --upstream-src ~/src/transformers   # a checkout of the pinned tag (v5.23.0)

Two trees are made under --work-dir: `stock` (the verified upstream sdist, as `make apply-patches` uses it) and
`fork` (the same plus the patch series). Both get the checkout's `utils/`, `tests/` and `conftest.py` (at the pinned
tag, its `src/` is the sdist's). In each tree it runs

  1. `utils/check_modular_conversion.py`, upstream's modular-consistency check (every `modular_*.py` regenerated and
     compared with its committed `modeling_*.py`; needs libcst and upstream's pinned ruff), and
  2. `pytest tests/models/<family>/test_modeling_<family>.py` for each family in --families (offline: nothing is
     downloaded, so tests that need the Hub fail alike on both trees),

then prints pass/fail counts, fork against stock, and writes them to <work-dir>/upstream-checks.json. It fails when the
fork mismatches a generated file that stock does not, or fails a test that passes on stock. Needs git and the packages
in requirements-upstream-checks.txt; `make upstream-checks UPSTREAM_SRC=...` installs them into the venv. Nothing of
upstream's is copied into this repository.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fork  # noqa: E402

PATCHES_DIR = Path(__file__).resolve().parent
DEFAULT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
TOOLING = ("utils", "tests", "conftest.py", "pyproject.toml", "setup.py", "setup.cfg")
MISMATCH = re.compile(r"Differences found between the generated code and (\S+?):")


def checkout_version(src: Path) -> str | None:
    init = src / "src" / "transformers" / "__init__.py"
    m = re.search(r'^__version__ = "([^"]+)"', init.read_text(), re.M) if init.is_file() else None
    return m.group(1) if m else None


def make_tree(dest: Path, upstream_src: Path, sdist: Path, upstream: fork.Upstream, patches: list[Path]) -> None:
    """The sdist's source, the checkout's tooling and tests, then the patches."""
    dest.mkdir(parents=True)
    for name in TOOLING:
        path = upstream_src / name
        if path.is_dir():
            shutil.copytree(path, dest / name, ignore=shutil.ignore_patterns("__pycache__", ".git"))
        elif path.is_file():
            shutil.copy2(path, dest / name)
    with tempfile.TemporaryDirectory() as tmp:
        fork.unpack(sdist, Path(tmp), upstream)
        shutil.copytree(Path(tmp) / "src", dest / "src")
    fork.git(dest, "init", "-q", "-b", "main")  # the check compares against `main`; on main it checks every file
    for patch in patches:
        proc = subprocess.run(["git", "apply", "--whitespace=nowarn", str(patch)], cwd=dest, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise fork.ForkError(f"{patch.name} does not apply to the sdist's source: {proc.stderr.strip()}")
    fork.git(dest, "add", "-A")
    fork.git(dest, "commit", "-q", "--no-verify", "-m", dest.name)


def tree_env(tree: Path, bin_dir: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(tree / "src"), "PATH": bin_dir + os.pathsep + os.environ["PATH"],
            "COLUMNS": "1000", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": "1"}


def modular_check(tree: Path, workers: int, files: list[str] | None, log: Path, bin_dir: str) -> dict:
    script = tree / "utils" / "check_modular_conversion.py"
    cmd = [sys.executable, str(script.relative_to(tree)), "--num_workers", str(workers)]
    if "--check_all" in script.read_text():
        cmd.append("--check_all")
    if files:
        cmd += ["--files", *files]
    all_files = files or sorted(str(p.relative_to(tree)) for p in (tree / "src/transformers/models").glob("*/modular_*.py"))
    start = time.time()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=tree, env=tree_env(tree, bin_dir), stdout=out, stderr=subprocess.STDOUT)
    text = log.read_text()
    mismatched = sorted(set(MISMATCH.findall(text)))
    modeling = [p for p in mismatched if "/modeling_" in p]
    families = sorted({p.split("/")[-2] for p in mismatched})
    return {"returncode": proc.returncode, "modular_files": len(all_files), "mismatched_files": mismatched,
            "mismatched_modeling_files": modeling, "families_with_mismatch": families,
            "families_matching": len(all_files) - len(families), "seconds": round(time.time() - start), "log": str(log)}


def model_tests(tree: Path, family: str, log_dir: Path, bin_dir: str, pytest_args: list[str]) -> dict:
    test_file = tree / "tests" / "models" / family / f"test_modeling_{family}.py"
    if not test_file.is_file():
        return {"missing": str(test_file.relative_to(tree))}
    junit = log_dir / f"{tree.name}-{family}.xml"
    cmd = [sys.executable, "-m", "pytest", str(test_file.relative_to(tree)), "-p", "no:cacheprovider", "-q",
           "--junitxml", str(junit), *pytest_args]
    start = time.time()
    with (log_dir / f"{tree.name}-{family}.log").open("w") as out:
        proc = subprocess.run(cmd, cwd=tree, env=tree_env(tree, bin_dir), stdout=out, stderr=subprocess.STDOUT)
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed = []
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                counts["failed"] += 1
                failed.append(name)
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    return {**counts, "returncode": proc.returncode, "failed_tests": sorted(failed),
            "seconds": round(time.time() - start)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream-src", type=Path, required=True,
                        help="a checkout of huggingface/transformers at the pinned tag (read only)")
    parser.add_argument("--work-dir", type=Path, help="where the two trees and logs go (default: a temp dir, kept)")
    parser.add_argument("--families", default=" ".join(DEFAULT_FAMILIES),
                        help="model families whose tests/models/<f>/test_modeling_<f>.py run (space separated)")
    parser.add_argument("--modular-files", default="",
                        help="only these modular_*.py paths (space separated; default: all, as upstream's CI)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-modular", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. \"-k 'not integration'\"")
    parser.add_argument("--allow-other-version", action="store_true",
                        help="accept a checkout of another version (its tooling and tests run on the pinned source)")
    args = parser.parse_args(argv)
    try:
        upstream = fork.read_upstream(PATCHES_DIR / "UPSTREAM")
        series = fork.read_series(PATCHES_DIR)
        src = args.upstream_src.expanduser().resolve()
        if not (src / "utils" / "check_modular_conversion.py").is_file() or not (src / "tests" / "models").is_dir():
            raise fork.ForkError(f"{src} is not a checkout of huggingface/transformers (no utils/"
                                 "check_modular_conversion.py or tests/models/)")
        version = checkout_version(src)
        if version != upstream.version and not args.allow_other_version:
            raise fork.ForkError(f"{src} is transformers {version}, the fork pins {upstream.version}: check out tag "
                                 f"v{upstream.version} (or pass --allow-other-version)")
        ruff_pin = re.search(r'"ruff==([^"]+)"', (src / "setup.py").read_text()) if (src / "setup.py").is_file() else None
        ruff = subprocess.run([str(Path(sys.executable).parent / "ruff"), "--version"], capture_output=True, text=True)
        if ruff_pin and ruff_pin.group(1) not in ruff.stdout:
            print(f"upstream-checks: warning: upstream pins ruff=={ruff_pin.group(1)}, this is {ruff.stdout.strip() or 'no ruff'}"
                  ": generated files may differ in formatting", file=sys.stderr)
        sdist = fork.fetch_sdist(upstream)
        work = (args.work_dir or Path(tempfile.mkdtemp(prefix="upstream-checks."))).resolve()
        if work.exists() and any(work.iterdir()):
            raise fork.ForkError(f"{work} is not empty")
        work.mkdir(parents=True, exist_ok=True)
        patches = [PATCHES_DIR / name for name in series.patches]
        trees = {"stock": work / "stock", "fork": work / "fork"}
        make_tree(trees["stock"], src, sdist, upstream, [])
        make_tree(trees["fork"], src, sdist, upstream, patches)
    except fork.ForkError as e:
        print(f"upstream-checks: error: {e}", file=sys.stderr)
        return 2

    bin_dir = str(Path(sys.executable).parent)
    for tree in trees.values():  # each tree's own transformers, not an installed one, must be what gets imported
        where = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__file__)"],
                               env=tree_env(tree, bin_dir), capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(tree / "src")):
            print(f"upstream-checks: error: in {tree.name}, transformers is imported from {where or '(nowhere)'}",
                  file=sys.stderr)
            return 2
    families = args.families.split()
    report = {"upstream": upstream.version, "checkout_version": version, "fork_version": series.fork_version(upstream),
              "patches": list(series.patches), "families": families, "work_dir": str(work)}
    report.update({name: {"tests": {}} for name in trees})
    save = lambda: (work / "upstream-checks.json").write_text(json.dumps(report, indent=2) + "\n")  # noqa: E731
    # stock then fork for each check, the report saved after each, so an interrupted run still pairs what it ran
    if not args.skip_modular:
        for name, tree in trees.items():
            print(f"upstream-checks: {name}: utils/check_modular_conversion.py ...", flush=True)
            report[name]["modular"] = modular_check(tree, args.workers, args.modular_files.split() or None,
                                                    work / f"{name}-modular.log", bin_dir)
            save()
    if not args.skip_tests:
        for family in families:
            for name, tree in trees.items():
                print(f"upstream-checks: {name}: tests/models/{family} ...", flush=True)
                report[name]["tests"][family] = model_tests(tree, family, work, bin_dir, args.pytest_args.split())
                save()
    save()

    regressions = []
    print(f"\nupstream checks: transformers {upstream.version} (tooling and per-model tests from a {version} checkout)"
          f", fork {report['fork_version']} against stock")
    if not args.skip_modular:
        s, f = report["stock"]["modular"], report["fork"]["modular"]
        print(f"  modular conversion ({s['modular_files']} modular files): families matching stock "
              f"{s['families_matching']}, fork {f['families_matching']}; generated files differing stock "
              f"{len(s['mismatched_files'])} ({len(s['mismatched_modeling_files'])} modeling_*), fork "
              f"{len(f['mismatched_files'])} ({len(f['mismatched_modeling_files'])} modeling_*)")
        new = sorted(set(f["mismatched_files"]) - set(s["mismatched_files"]))
        regressions += [f"modular: {p}" for p in new]
    if not args.skip_tests:
        for family in families:
            s, f = report["stock"]["tests"][family], report["fork"]["tests"][family]
            if "missing" in s:
                print(f"  tests/models/{family}: {s['missing']} is missing")
                continue
            print(f"  tests/models/{family}: stock {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped; "
                  f"fork {f['passed']} passed, {f['failed']} failed, {f['skipped']} skipped")
            regressions += [f"{family}: {t}" for t in sorted(set(f["failed_tests"]) - set(s["failed_tests"]))]
    print(f"  fork-only failures: {len(regressions)}" + "".join(f"\n    {r}" for r in regressions[:40]))
    print(f"  details: {work / 'upstream-checks.json'}")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
