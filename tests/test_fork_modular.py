"""The series keeps upstream's modular-consistency check passing, proven without upstream's scripts.

Upstream regenerates every `modeling_<model>.py` that has a `modular_<model>.py` from that source, copying the classes
and functions it imports from other models (`LlamaPreTrainedModel`, `LlamaDecoderLayer`, ...). A patch that changes one
of those copied definitions, or edits a generated file directly, makes the regenerated files differ from the
committed ones: series revision 1 put a mixin into `LlamaPreTrainedModel` and the check failed on about 35 families.

So, for every file under `models/` that the series touches, each top-level class or function that differs from the
verified upstream sdist must be neither in a generated file nor in a module that a modular file imports from, and
must be listed in the header of the patch that changes it (`Changed-Definitions: models/x/modeling_x.py::Name`).
`make upstream-checks` runs upstream's own check (patches/upstream_checks.py).
"""

import ast
import re
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "patches"))
import fork  # noqa: E402

SERIES = fork.read_series(ROOT / "patches")
UPSTREAM = fork.read_upstream(ROOT / "patches" / "UPSTREAM")
GENERATED = "This file was automatically generated from"
PACKAGE = "src/transformers/"


@pytest.fixture(scope="module")
def upstream_sources() -> dict[str, str]:
    """`models/**.py` of the verified sdist (the cache that `make apply-patches` filled), by path under transformers/."""
    prefix = f"{UPSTREAM.package}-{UPSTREAM.version}/{PACKAGE}"
    sources = {}
    with tarfile.open(fork.fetch_sdist(UPSTREAM)) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith(prefix + "models/") and member.name.endswith(".py"):
                sources[member.name[len(prefix):]] = tar.extractfile(member).read().decode()
    return sources


@pytest.fixture(scope="module")
def importers(upstream_sources) -> dict[str, set[str]]:
    return copied_from(upstream_sources)


def touched_files(patches: dict[str, str]) -> set[str]:
    """Paths under transformers/ that the patches change."""
    paths = set()
    for text in patches.values():
        for path in re.findall(r"^(?:---|\+\+\+) [ab]/(\S+)$", text, re.M):
            if path.startswith(PACKAGE):
                paths.add(path[len(PACKAGE):])
    return paths


def declared_changes(patches: dict[str, str]) -> set[str]:
    """`models/x/modeling_x.py::Name` entries of the patch headers' `Changed-Definitions:` lines."""
    declared = set()
    for text in patches.values():
        head = text.split("\n---\n", 1)[0]
        for line in re.findall(r"^Changed-Definitions:(.*)$", head, re.M):
            declared.update(item.strip() for item in line.split(",") if item.strip())
    return declared


def copied_from(sources: dict[str, str]) -> dict[str, set[str]]:
    """Module file -> the modular files that import from it: the converter copies definitions from these modules."""
    users: dict[str, set[str]] = {}
    for path, text in sources.items():
        if not Path(path).name.startswith("modular_"):
            continue
        package = Path(path).parent  # models/<model>
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.ImportFrom) or node.module is None:
                continue
            if node.level == 2:  # from ..llama.modeling_llama import ...
                module = f"models/{node.module.replace('.', '/')}.py"
            elif node.level == 1:  # from .modeling_x import ...
                module = f"{package}/{node.module.replace('.', '/')}.py"
            elif node.level == 0 and node.module.startswith("transformers.models."):
                module = node.module[len("transformers."):].replace(".", "/") + ".py"
            else:
                continue
            if module in sources and module != path:
                users.setdefault(module, set()).add(path)
    return users


def definitions(text: str) -> dict[str, str]:
    """Top-level classes and functions, each as its exact source lines (decorators and inner comments included)."""
    lines = text.splitlines()
    out = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno, *[d.lineno for d in node.decorator_list]])
            out[node.name] = "\n".join(lines[start - 1:node.end_lineno])
    return out


def modular_problems(upstream: dict[str, str], patched: dict[str, str], touched: set[str], declared: set[str],
                     importers: dict[str, set[str]]) -> list[str]:
    problems = []
    for path in sorted(p for p in touched if p.startswith("models/")):
        before, after = upstream.get(path, ""), patched.get(path, "")
        old, new = definitions(before), definitions(after)
        changed = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
        if GENERATED in before[:2000]:
            problems.append(f"{path} is generated from its modular file; the check regenerates it, so editing it "
                            f"breaks the check (changed: {', '.join(changed) or 'imports or comments'})")
            continue
        for name in changed:
            if path in importers:
                users = sorted(Path(u).parent.name for u in importers[path])
                problems.append(f"{path}::{name} changed, but the modular converter copies definitions from "
                                f"{path}: the modular files of {len(users)} families import from it "
                                f"({', '.join(users[:8])}{', ...' if len(users) > 8 else ''})")
            elif f"{path}::{name}" not in declared:
                problems.append(f"{path}::{name} changed but no patch header declares it (Changed-Definitions:)")
    return problems


def series_patches() -> dict[str, str]:
    return {name: (ROOT / "patches" / name).read_text() for name in SERIES.patches}


def test_the_series_leaves_every_copied_or_generated_definition_as_upstream_has_it(upstream_sources, importers):
    import transformers

    fork_root = Path(transformers.__file__).parent  # the fork under test (conftest checked its version)
    patches = series_patches()
    touched = touched_files(patches)
    assert touched, "the series changes nothing?"
    patched = {p: (fork_root / p).read_text() for p in touched if p.startswith("models/") and (fork_root / p).exists()}
    problems = modular_problems(upstream_sources, patched, touched, declared_changes(patches), importers)
    assert problems == [], "\n".join(problems)


def test_the_check_knows_the_converter_and_catches_revision_1s_defect(upstream_sources, importers):
    llama = "models/llama/modeling_llama.py"
    # the converter copies Llama into many families; revision 1 of the series broke the check on about 35 of them
    assert len({Path(u).parent.name for u in importers[llama]}) >= 30
    assert sum(GENERATED in text[:2000] for text in upstream_sources.values()) > 200

    text = upstream_sources[llama]
    mixin = text.replace("class LlamaPreTrainedModel(PreTrainedModel):",
                         "class LlamaPreTrainedModel(OffloadedCheckpointingMixin, PreTrainedModel):")
    comment = text.replace('    base_model_prefix = "model"\n',
                           '    # longctx fork: a comment is copied too\n    base_model_prefix = "model"\n', 1)
    import_only = text.replace("from ...processing_utils import Unpack\n",
                               "from ...processing_utils import Unpack\nimport os\n")
    for patched in (mixin, comment):
        assert patched != text
        problems = modular_problems(upstream_sources, {llama: patched}, {llama}, set(), importers)
        assert len(problems) == 1 and "LlamaPreTrainedModel changed" in problems[0], problems
    assert modular_problems(upstream_sources, {llama: import_only}, {llama}, set(), importers) == []

    mistral = "models/mistral/modeling_mistral.py"  # generated from modular_mistral.py: any edit is reverted
    edited = upstream_sources[mistral].replace("class MistralPreTrainedModel(PreTrainedModel):",
                                               "class MistralPreTrainedModel(OffloadedCheckpointingMixin, PreTrainedModel):")
    problems = modular_problems(upstream_sources, {mistral: edited}, {mistral}, set(), importers)
    assert len(problems) == 1 and "is generated from its modular file" in problems[0]


def test_a_changed_definition_outside_the_converter_must_be_declared(upstream_sources, importers):
    generated = {p for p, t in upstream_sources.items() if GENERATED in t[:2000]}
    path = next(p for p in sorted(upstream_sources)
                if Path(p).name.startswith("modeling_") and p not in importers and p not in generated
                and "class " in upstream_sources[p])
    text = upstream_sources[path]
    name = next(iter(definitions(text)))
    head = re.search(rf"^(class|def) {name}\b.*$", text, re.M).group(0)
    patched = text.replace(head, head + "  # changed", 1)
    (problem,) = modular_problems(upstream_sources, {path: patched}, {path}, set(), importers)
    assert "no patch header declares it" in problem
    assert modular_problems(upstream_sources, {path: patched}, {path}, {f"{path}::{name}"}, importers) == []
    header = {"x.patch": f"Subject: x\n\nWhy: y\nChanged-Definitions: {path}::{name}\n---\n"}
    assert declared_changes(header) == {f"{path}::{name}"}
