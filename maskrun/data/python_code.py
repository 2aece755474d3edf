"""The Python standard library's own source files: real code found on every Python install.

One document per file, read in sorted path order from the running interpreter's stdlib folder.
Installed packages and the standard library's test suites are left out: the former differ from one
environment to the next, the latter are mostly generated test data and fixtures rather than library code.
"""

import os
import sysconfig
from pathlib import Path

# Folders skipped wherever they sit: installed packages, test suites (test/, tests/, idlelib/idle_test), and
# generated data (encodings/: codec tables from one template, near copies of each other across the split;
# pydoc_data/: the documentation's text).
SKIPPED_FOLDERS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "pydoc_data"})


def stdlib_folder() -> Path:
    return Path(sysconfig.get_path("stdlib"))


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The .py files under the stdlib folder, outside SKIPPED_FOLDERS, in sorted path order."""
    root = root or stdlib_folder()
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in SKIPPED_FOLDERS]  # not walked into
        files += [Path(folder, name) for name in names if name.endswith(".py")]
    return sorted((path for path in files if path.is_file()), key=lambda path: path.relative_to(root).as_posix())


def python_code_documents(root: Path | None = None) -> list[str]:
    """Each stdlib file's text; a file that is not valid UTF-8 (a few declare other encodings) is skipped."""
    documents = []
    for path in stdlib_files(root):
        try:
            documents.append(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return documents
