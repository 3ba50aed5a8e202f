"""A data file shipped inside an installed registry package (a GGUF model, a text database), found through the
package's metadata: importing such a package would import runtime dependencies we never use."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Optional

from .errors import LongctxError


def package_file(package: str, name: str, explicit: Optional[str | Path], *, what: str, install_hint: str) -> Path:
    """`explicit` if given (the file copied anywhere, e.g. to a machine without the package), else the file called
    `name` inside the installed `package`. `what` prefixes the errors; `install_hint` says how to install it."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise LongctxError(f"{what} {explicit}: no such file")
        return p
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise LongctxError(f"{what}: the {package} package is not installed ({install_hint})") from None
    for f in files:
        if f.name == name and Path(f.locate()).is_file():
            return Path(f.locate())
    raise LongctxError(f"{what}: {package} is installed but {name} is not in it")
