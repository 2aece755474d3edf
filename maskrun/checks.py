"""The checks a setting's value is put through, each refusing bad input in one line (maskrun.errors).

Shared by the config checks (maskrun.validate) and the plugins that check their own settings (methods,
masks, tasks). It imports nothing else of maskrun, so that a plugin's code, and the cache keys that
fingerprint it (maskrun.stages), never take in the config checks.
"""

from maskrun.errors import ConfigError


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def in_range(value, key: str, example: str, low: float, high: float, lower_open=False, upper_open=False) -> None:
    above = is_number(value) and (value > low if lower_open else value >= low)
    below = is_number(value) and (value < high if upper_open else value <= high)
    if not (above and below):
        interval = f"{'(' if lower_open else '['}{low:g}, {high:g}{')' if upper_open else ']'}"
        raise ConfigError(f"{key}={value!r} is not a number in {interval}", f"e.g. {key}={example}")


def positive_int(value, key: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a whole number >= 1", f"e.g. {key}=32")


def non_negative_int(value, key: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{key}={value!r} must be a whole number >= 0", f"e.g. {key}=100")


def one_of(value, options, key: str) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not supported", f"choose one of: {', '.join(options)}")
