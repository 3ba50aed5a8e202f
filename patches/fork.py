#!/usr/bin/env python3
"""Build and maintain transformers-fork/ from the pinned upstream sdist and the patch series.

    python patches/fork.py apply    # fetch + verify the sdist, git am the series, stamp the fork version
    python patches/fork.py export   # regenerate patches/*.patch and patches/series from the fork's commits
    python patches/fork.py check    # apply from clean, re-export, fail on any diff; lint the series and headers

The series is never edited by hand: edit and commit inside transformers-fork/, then export (see patches/README.md).
Only the standard library and git are used, so this runs before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

PATCHES_DIR = Path(__file__).resolve().parent
ROOT = PATCHES_DIR.parent
FORK_README = "README-FORK.md"  # the one tracked file inside transformers-fork/
STAMP_TRAILER = "Longctx-Fork-Stamp: yes"
REBASE_DOC = "patches/README.md, section 'Moving to a new upstream'"
FORMAT_PATCH_FLAGS = ["--zero-commit", "--no-signature", "--full-index", "--no-stat", "--keep-subject"]
HEADER_FIELDS = ("Why:", "Upstream-Status:", "Last-Update:")
# Fixed identity and dates make every run produce the same commits, hence the same tree and hashes.
GIT_ENV = {
    "GIT_AUTHOR_NAME": "longctx fork",
    "GIT_AUTHOR_EMAIL": "fork@longctx.invalid",
    "GIT_COMMITTER_NAME": "longctx fork",
    "GIT_COMMITTER_EMAIL": "fork@longctx.invalid",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00+0000",
    "GIT_COMMITTER_DATE": "2000-01-01T00:00:00+0000",
    "GIT_CONFIG_NOSYSTEM": "1",
    "HOME": os.environ.get("HOME", "/tmp"),
}
# Build outputs of `pip install` inside the fork are not local edits.
FORK_EXCLUDES = ["build/", "dist/", "*.egg-info/", "__pycache__/", "*.pyc", FORK_README]


class ForkError(Exception):
    """A failure with a message meant for the user; exits with status 2."""


@dataclass(frozen=True)
class Upstream:
    package: str
    version: str
    sha256: str

    @property
    def sdist_name(self) -> str:
        return f"{self.package}-{self.version}.tar.gz"

    @property
    def tag(self) -> str:
        return f"upstream-{self.version}"


@dataclass(frozen=True)
class Series:
    revision: int
    patches: tuple[str, ...]

    def fork_version(self, upstream: Upstream) -> str:
        return f"{upstream.version}+longctx.{self.revision}"

    def digest(self, patches_dir: Path) -> str:
        h = hashlib.sha256((patches_dir / "series").read_bytes())
        for name in self.patches:
            h.update((patches_dir / name).read_bytes())
        return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# reading the pin and the series
# ---------------------------------------------------------------------------------------------------------------------


def read_upstream(path: Path) -> Upstream:
    fields = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            fields[key.strip()] = value.strip()
    missing = {"package", "version", "sha256"} - fields.keys()
    if missing:
        raise ForkError(f"{path}: missing {', '.join(sorted(missing))}")
    if not re.fullmatch(r"[0-9a-f]{64}", fields["sha256"]):
        raise ForkError(f"{path}: sha256 must be 64 lowercase hex digits, got {fields['sha256']!r}")
    return Upstream(fields["package"], fields["version"], fields["sha256"])


def read_series(patches_dir: Path) -> Series:
    path = patches_dir / "series"
    revision, names = None, []
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"#\s*revision:\s*(\d+)\s*", line)
        if m:
            revision = int(m.group(1))
        elif line.strip() and not line.lstrip().startswith("#"):
            names.append(line.strip())
    if revision is None:
        raise ForkError(f"{path}: needs a '# revision: N' line (bump it whenever the series changes)")
    return Series(revision, tuple(names))


def validate_series(patches_dir: Path, series: Series) -> list[str]:
    """Missing, unused and duplicate patches (the ungoogled-chromium validator's checks)."""
    problems = []
    seen = set()
    for name in series.patches:
        if name in seen:
            problems.append(f"duplicate in series: {name}")
        seen.add(name)
        if not (patches_dir / name).is_file():
            problems.append(f"listed in series but missing: {name}")
    for path in sorted(patches_dir.glob("*.patch")):
        if path.name not in seen:
            problems.append(f"not listed in series (unused): {path.name}")
    return problems


def lint_header(path: Path) -> list[str]:
    """Each patch says what it does, why, its upstream status and when it was last updated."""
    text = path.read_text()
    head = text.split("\n---\n", 1)[0]
    problems = []
    if not re.search(r"^Subject: \S", head, re.M):
        problems.append(f"{path.name}: no Subject")
    for field in HEADER_FIELDS:
        if not re.search(rf"^{re.escape(field)}\s*\S", head, re.M):
            problems.append(f"{path.name}: header lacks '{field}'")
    status = re.search(r"^Upstream-Status:\s*(.*)$", head, re.M)
    if status and not re.fullmatch(r"fork-only|pending https?://\S+", status.group(1).strip()):
        problems.append(f"{path.name}: Upstream-Status must be 'fork-only' or 'pending <url>'")
    date = re.search(r"^Last-Update:\s*(.*)$", head, re.M)
    if date and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date.group(1).strip()):
        problems.append(f"{path.name}: Last-Update must be YYYY-MM-DD")
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# git helpers
# ---------------------------------------------------------------------------------------------------------------------


def git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **GIT_ENV}
    proc = subprocess.run(["git", "-C", str(repo), *args], env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ForkError(f"git {' '.join(args)} failed in {repo}:\n{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def patch_id(diff_text: str) -> str:
    proc = subprocess.run(["git", "patch-id", "--stable"], input=diff_text, capture_output=True, text=True)
    return proc.stdout.split(" ")[0]


def series_patch_ids(patches_dir: Path) -> list[str]:
    return [patch_id((patches_dir / n).read_text()) for n in read_series(patches_dir).patches]


def local_edits(fork_dir: Path, upstream: Upstream, patches_dir: Path) -> str | None:
    """Describe uncommitted changes or unexported commits in an existing fork, or None if it is pristine."""
    if not (fork_dir / ".git").is_dir():
        extra = [p.name for p in fork_dir.iterdir() if p.name != FORK_README]
        return f"{fork_dir} is not a fork made by this tool (it holds {', '.join(sorted(extra)[:5])})" if extra else None
    status = git(fork_dir, "status", "--porcelain", "--untracked-files=all").stdout.strip()
    if status:
        lines = status.splitlines()
        more = f"\n  ... and {len(lines) - 10} more" if len(lines) > 10 else ""
        return "uncommitted changes:\n  " + "\n  ".join(lines[:10]) + more
    # Commits count as exported when they carry exactly the series' changes (same patch-ids, same order).
    commits = [c for c in git(fork_dir, "rev-list", "--reverse", f"{upstream.tag}..HEAD").stdout.split()
               if STAMP_TRAILER not in git(fork_dir, "log", "-1", "--format=%B", c).stdout]
    if [patch_id(git(fork_dir, "show", c).stdout) for c in commits] != series_patch_ids(patches_dir):
        listed = git(fork_dir, "log", "--format=%h %s", f"{upstream.tag}..HEAD").stdout.strip()
        return "commits that differ from patches/series:\n  " + "\n  ".join(listed.splitlines()[:10])
    return None


# ---------------------------------------------------------------------------------------------------------------------
# fetching the sdist
# ---------------------------------------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    base = os.environ.get("LONGCTX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "longctx"
    )
    return Path(base) / "sdist"


def fetch_sdist(upstream: Upstream) -> Path:
    """The verified sdist: TRANSFORMERS_SDIST if set, else the cache, else `pip download` into the cache."""
    override = os.environ.get("TRANSFORMERS_SDIST")
    if override:
        path = Path(override)
        if not path.is_file():
            raise ForkError(f"TRANSFORMERS_SDIST={override} does not exist")
        verify(path, upstream)
        return path
    cached = cache_dir() / upstream.sdist_name
    if cached.is_file():
        try:
            verify(cached, upstream)
            return cached
        except ForkError:
            cached.unlink()  # a corrupt cache entry is refetched, never used
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        spec = f"{upstream.package}=={upstream.version}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp, spec]
        print(f"fork: downloading the {spec} sdist with pip", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / upstream.sdist_name
        if proc.returncode != 0 or not got.is_file():
            tail = "\n    ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise ForkError(
                f"could not download the {spec} sdist (no network, or no package index?).\n"
                f"  pip said:\n    {tail}\n"
                f"  Offline: put {upstream.sdist_name} at {cached} or point TRANSFORMERS_SDIST at it."
            )
        verify(got, upstream)
        os.replace(got, cached)
    return cached


def verify(path: Path, upstream: Upstream) -> None:
    actual = sha256_of(path)
    if actual != upstream.sha256:
        raise ForkError(
            f"sha256 mismatch for {path}:\n  expected {upstream.sha256} (patches/UPSTREAM)\n  got      {actual}\n"
            "Nothing was built. If you meant to move to another upstream, see " + REBASE_DOC + "."
        )


# ---------------------------------------------------------------------------------------------------------------------
# apply
# ---------------------------------------------------------------------------------------------------------------------


def unpack(sdist: Path, dest: Path, upstream: Upstream) -> None:
    top = f"{upstream.package}-{upstream.version}/"
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(top):
                continue
            m.name = m.name[len(top):]
            if m.name:
                members.append(m)
        tar.extractall(dest, members=members, filter="data")


def am_failure_message(patch: str, output: str) -> str:
    files = re.findall(r"error: patch failed: ([^:\s]+):(\d+)", output)
    files += [(f, "") for f in re.findall(r"error: ([^:\s]+): does not exist in index", output)]
    where = ", ".join(f"{f}:{line}" if line else f for f, line in files) or "(see git's output below)"
    return (
        f"patch {patch} does not apply cleanly (no fuzz is allowed) to {where}.\n"
        f"Rebase it on the new upstream and re-export; the procedure is in {REBASE_DOC}.\n"
        "git am said:\n  " + "\n  ".join([ln for ln in output.splitlines() if ln.startswith("error:")][:8])
    )


def build_fork(dest: Path, sdist: Path, upstream: Upstream, series: Series, patches_dir: Path) -> None:
    unpack(sdist, dest, upstream)
    git(dest, "init", "-q", "-b", "main")
    (dest / ".git" / "info").mkdir(parents=True, exist_ok=True)
    (dest / ".git" / "info" / "exclude").write_text("\n".join(FORK_EXCLUDES) + "\n")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "--no-verify", "-m", f"upstream: {upstream.package} {upstream.version} sdist\n\n"
        f"sha256 {upstream.sha256}")
    git(dest, "tag", upstream.tag)
    for name in series.patches:
        proc = git(dest, "am", "-q", "--keep-cr", "--committer-date-is-author-date", str(patches_dir / name),
                   check=False)
        if proc.returncode != 0:
            git(dest, "am", "--abort", check=False)
            raise ForkError(am_failure_message(name, proc.stdout + proc.stderr))
    stamp(dest, upstream, series, patches_dir)


def stamp(dest: Path, upstream: Upstream, series: Series, patches_dir: Path) -> None:
    """Make `transformers.__version__`, `pip show` and transformers.fork_info say this is the fork."""
    version = series.fork_version(upstream)
    stamps = (("setup.py", r'(version=)"[^"]+"'), ("src/transformers/__init__.py", r'(__version__ = )"[^"]+"'))
    for rel, pattern in stamps:
        path = dest / rel
        text, n = re.subn(pattern, rf'\g<1>"{version}"', path.read_text(), count=1)
        if n != 1:
            raise ForkError(f"cannot stamp the version into {rel}: its version line changed upstream ({REBASE_DOC})")
        path.write_text(text)
    subjects = git(dest, "log", "--reverse", "--format=%s", f"{upstream.tag}..HEAD").stdout.splitlines()
    lines = [
        '"""Marker written by `make apply-patches`: this transformers is the longctx fork."""',
        "",
        f'FORK_VERSION = "{version}"',
        f'UPSTREAM_VERSION = "{upstream.version}"',
        f'UPSTREAM_SHA256 = "{upstream.sha256}"',
        f'SERIES_REVISION = {series.revision}',
        f'SERIES_SHA256 = "{series.digest(patches_dir)}"',
        "PATCHES = (",
        *[f"    ({name!r}, {subject!r})," for name, subject in zip(series.patches, subjects)],
        ")",
        "",
    ]
    (dest / "src" / "transformers" / "fork_info.py").write_text("\n".join(lines))
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "--no-verify", "-m", f"fork: stamp version {version}\n\n{STAMP_TRAILER}")
    git(dest, "tag", f"fork-{version}")


def apply(fork_dir: Path, upstream_file: Path, patches_dir: Path) -> None:
    upstream = read_upstream(upstream_file)
    series = read_series(patches_dir)
    problems = validate_series(patches_dir, series)
    if problems:
        raise ForkError("patches/series is inconsistent:\n  " + "\n  ".join(problems))
    if fork_dir.exists():
        edits = local_edits(fork_dir, upstream, patches_dir)
        if edits:
            raise ForkError(
                f"{fork_dir} has local edits, refusing to overwrite them: {edits}\n"
                "To keep them: commit inside the fork and run `make export-patches` (patches/README.md).\n"
                "To drop them: `make clean-fork`, then `make apply-patches`."
            )
    sdist = fetch_sdist(upstream)
    fork_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{fork_dir.name}.", dir=fork_dir.parent))
    try:
        build_fork(tmp, sdist, upstream, series, patches_dir)
        readme = fork_dir / FORK_README
        if readme.exists():
            shutil.copy2(readme, tmp / FORK_README)
        # Swap the finished tree in; a failure above leaves the old fork (or nothing) in place.
        if fork_dir.exists():
            old = fork_dir.with_name(f".{fork_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(fork_dir, old)
            os.replace(tmp, fork_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, fork_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    head = git(fork_dir, "rev-parse", "--short", "HEAD").stdout.strip()
    print(f"fork: {fork_dir.name} is transformers {series.fork_version(upstream)} "
          f"({len(series.patches)} patches on {upstream.tag}, HEAD {head})")


# ---------------------------------------------------------------------------------------------------------------------
# export and check
# ---------------------------------------------------------------------------------------------------------------------


def export(fork_dir: Path, upstream_file: Path, patches_dir: Path) -> list[str]:
    """Write one patch per fork commit (the stamp excluded) and rewrite the series' list, keeping its revision."""
    upstream = read_upstream(upstream_file)
    if not (fork_dir / ".git").is_dir():
        raise ForkError(f"{fork_dir} is not a generated fork; run `make apply-patches` first")
    status = git(fork_dir, "status", "--porcelain", "--untracked-files=all").stdout.strip()
    if status:
        raise ForkError(f"{fork_dir} has uncommitted changes; commit them first:\n  " + status.replace("\n", "\n  "))
    commits = git(fork_dir, "rev-list", "--reverse", f"{upstream.tag}..HEAD").stdout.split()
    commits = [c for c in commits if STAMP_TRAILER not in git(fork_dir, "log", "-1", "--format=%B", c).stdout]
    old = read_series(patches_dir) if (patches_dir / "series").exists() else Series(1, ())
    with tempfile.TemporaryDirectory() as tmp:
        names = []
        for i, commit in enumerate(commits, start=1):
            out = git(fork_dir, "format-patch", *FORMAT_PATCH_FLAGS, f"--start-number={i}", "-o", tmp, "-1",
                      commit).stdout.strip()
            names.append(Path(out).name)
        for name in old.patches:
            (patches_dir / name).unlink(missing_ok=True)
        for name in names:
            shutil.copyfile(Path(tmp) / name, patches_dir / name)
    write_series(patches_dir, old.revision, names)
    return names


def write_series(patches_dir: Path, revision: int, names: list[str]) -> None:
    text = (
        "# The patch series, applied in this order by `make apply-patches` (git am, no fuzz).\n"
        "# Regenerated by `make export-patches`; bump the revision whenever the series changes.\n"
        f"# revision: {revision}\n" + "".join(f"{n}\n" for n in names)
    )
    (patches_dir / "series").write_text(text)


def check(upstream_file: Path, patches_dir: Path) -> None:
    series = read_series(patches_dir)
    problems = validate_series(patches_dir, series)
    for name in series.patches:
        if (patches_dir / name).is_file():
            problems += lint_header(patches_dir / name)
    if problems:
        raise ForkError("patch series lint failed:\n  " + "\n  ".join(problems))
    with tempfile.TemporaryDirectory() as tmp:
        fork = Path(tmp) / "fork"
        apply(fork, upstream_file, patches_dir)
        reexport = Path(tmp) / "patches"
        reexport.mkdir()
        shutil.copyfile(patches_dir / "series", reexport / "series")
        export(fork, upstream_file, reexport)
        diff = subprocess.run(["diff", "-ru", "-x", "*.py", "-x", "UPSTREAM", "-x", "README.md", "-x", "__pycache__",
                               str(patches_dir), str(reexport)], capture_output=True, text=True)
        if diff.returncode != 0:
            raise ForkError("re-exporting the series changes it (patches must come from `make export-patches`):\n"
                            + diff.stdout[-4000:])
    print(f"fork: series ok ({len(series.patches)} patches, revision {series.revision}): applies from clean, "
          "re-exports identically, headers complete")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["apply", "export", "check"])
    parser.add_argument("--fork-dir", type=Path, default=ROOT / "transformers-fork")
    parser.add_argument("--upstream-file", type=Path, default=PATCHES_DIR / "UPSTREAM")
    parser.add_argument("--patches-dir", type=Path, default=PATCHES_DIR)
    args = parser.parse_args(argv)
    try:
        if args.command == "apply":
            apply(args.fork_dir.resolve(), args.upstream_file, args.patches_dir)
        elif args.command == "export":
            names = export(args.fork_dir.resolve(), args.upstream_file, args.patches_dir)
            print(f"fork: exported {len(names)} patches to {args.patches_dir}")
        else:
            check(args.upstream_file, args.patches_dir)
    except ForkError as e:
        print(f"fork: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
