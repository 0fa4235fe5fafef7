"""The command-line conventions of every experiment: a bad flag or config value is one
``error: bad config: ...`` line on stderr and exit status 2 (the shell's usage error), never
a traceback."""

from __future__ import annotations

import re
import sys

from absl import flags

__all__ = ["BAD_CONFIG", "FAILED", "fail", "parse"]

BAD_CONFIG = 2  # exit status of a bad config or flag
FAILED = 1


def fail(status: int, message: str):
    """Print ``error: message`` on stderr and exit with ``status``."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def _unknown_field(argv: list[str], err: Exception) -> str | None:
    """For ml_collections' error on a ``--config.<field>`` the config lacks: that field,
    with the one it suggests, or None."""
    if not isinstance(err, (AttributeError, KeyError)):
        return None
    named = str(err).split("Did you mean")[0]  # the field itself, not the suggestion
    for arg in argv[1:]:
        name = arg.lstrip("-").split("=", 1)[0]
        *parents, field = name.split(".")
        if parents[:1] == ["config"] and re.search(rf"\b{re.escape(field)}\b", named):
            close = re.search(r'Did you mean \\?"(\w+)\\?"', str(err))
            hint = f" (did you mean --{'.'.join(parents)}.{close[1]}?)" if close else ""
            return f"unknown config field --{name}{hint}"
    return None


def _describe(err: Exception) -> str:
    """The flag error as one line (a failing config file's traceback cut to its last line)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if any(ln.startswith("Traceback") for ln in lines):
        lines = [lines[0], lines[-1]]
    return " ".join(lines)


def parse(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """Parse ``argv`` into ``flag_values`` (defined by :func:`define_flags`); a bad flag or
    config value exits with status 2 after one ``error: bad config: ...`` line."""
    try:
        return flag_values(argv)
    except (flags.Error, AttributeError, KeyError) as err:
        message = _unknown_field(argv, err) or _describe(err)
        kind = "bad config" if "config" in message.split(":")[0] else "bad flag"
        fail(BAD_CONFIG, f"{kind}: {message}")
