"""The command line of ``python -m experiments.imagenet32``, ``imagenet64`` and ``cifar10``.

Flags: ``--config`` (file[:preset], fields overridden with ``--config.section.field=...``),
``--workdir`` and the multi-host ones. A bad flag or config value, a missing dataset or
Inception weights file, an image file that cannot be decoded and a non-finite loss end the
run with one ``error: ...`` line on stderr (exit status 2 for a bad config or flag, 1
otherwise), never a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
from absl import flags

import fmjax
from experiments.cli import BAD_CONFIG, FAILED, fail, parse
from experiments.images.config import ConfigError
from experiments.images.run import train_and_evaluate
from fmjax.data.folder import ImageFileError
from fmjax.data.images import DatasetNotFoundError
from fmjax.metrics.fid import FIDWeightsNotFoundError
from fmjax.train import NonFiniteLossError
from fmjax.train import sharding as sharding_lib

__all__ = ["config_path", "define_flags", "main", "parse", "run"]


def config_path(name: str) -> str:
    """The file of ``experiments/configs/<name>.py``."""
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", f"{name}.py")


def define_flags(
    default_config: str,
    flag_values: flags.FlagValues = flags.FLAGS,
    argv: list[str] | None = None,
) -> None:
    """--config (file[:preset]), --workdir, the multi-host flags, --tune_cpu_allocator.

    ``argv``: the command line to be parsed (default ``sys.argv``), whose
    ``--config.<field>`` overrides become flags."""
    from ml_collections import config_flags

    fv = flag_values
    config_flags.DEFINE_config_file(
        "config",
        default_config,
        "Config file (path[:preset]).",
        fv,
        lock_config=True,
        sys_argv=argv,
    )
    flags.DEFINE_string("workdir", None, "Where checkpoints, logs and metrics go.", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "Multi-host: host:port of process 0 (else auto-detected, or none).",
        flag_values=fv,
    )
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.", flag_values=fv)
    flags.DEFINE_boolean(
        "tune_cpu_allocator",
        True,
        "Keep XLA's per-step scratch memory mapped (fmjax.tune_cpu_allocator).",
        flag_values=fv,
    )


def run(flag_values: flags.FlagValues = flags.FLAGS, entry: Callable | None = None) -> dict:
    """Start the multi-host runtime if any, run the config with ``entry(config, workdir)``
    (default :func:`experiments.images.train_and_evaluate`), print the summary."""
    f = flag_values
    entry = entry or train_and_evaluate
    if f.tune_cpu_allocator:
        fmjax.tune_cpu_allocator(warn_if_late=False)
    if "verbosity" in f and not f["verbosity"].present:  # orbax logs every save at INFO
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    sharding_lib.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
    try:
        out = entry(f.config, f.workdir)
    except ConfigError as e:
        fail(BAD_CONFIG, f"bad config: {e}")
    except FIDWeightsNotFoundError as e:
        fail(BAD_CONFIG, f"bad config: {e}")
    except DatasetNotFoundError as e:
        fail(FAILED, f"dataset not found: {e}")
    except ImageFileError as e:
        fail(FAILED, f"bad image data: {e}")
    except NonFiniteLossError as e:
        fail(FAILED, str(e))
    if jax.process_index() == 0:
        print(json.dumps(out, indent=2, default=str))
        print(f"wrote results to {out['workdir']}")
    return out


def main(name: str, entry: Callable | None = None) -> None:
    """``python -m experiments.<name>``: the config ``experiments/configs/<name>.py``, run
    by ``entry`` (see :func:`run`)."""
    from absl import app

    def app_main(argv):
        del argv
        run(entry=entry)

    define_flags(config_path(name))
    app.run(app_main, flags_parser=parse)
