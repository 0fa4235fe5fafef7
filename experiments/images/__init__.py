"""Flow Matching on images (ImageNet 32x32 and 64x64, CIFAR-10, a folder of your own images)
at the resolution ``config.data.resolution``.

``python -m experiments.imagenet32``, ``imagenet64`` and ``cifar10`` run
:func:`train_and_evaluate` (:mod:`.main`: flags and errors), which notebooks call directly::

    from experiments import images
    from experiments.configs import imagenet32
    cfg = imagenet32.get_config("tiny")
    cfg.data.data_dir = "/data/tfds"
    images.train_and_evaluate(cfg, "out/imagenet32_tiny")

The modules, in the order a run uses them:

* :mod:`.config`: the config check (:class:`ConfigError`), once, before any work;
* :mod:`.setup`: :class:`Setup`, built once from the checked config: the ADM UNet of
  ``config.model`` (optionally class-conditional, labels dropped to the null class with
  probability ``class_dropout``; optional bfloat16 compute), Adam with the paper's schedule
  (linear warm-up from 0, then linear/polynomial decay to ``end_learning_rate`` at
  ``num_steps``), optional global-norm clipping, the configured path (CondOT by default;
  any of :mod:`experiments.path_config`'s) with the span ``train.prediction`` (velocity,
  x1, eps or score) is solved over, the path's source noise, the solver settings and the
  sampler;
* :mod:`.step`: one training step, ``train_step -> loss_fn -> UNet``;
* :mod:`.trainer`: :func:`fmjax.train.fit` on that step, with hooks for checkpoints
  (:mod:`.checkpoints`), logs, sample grids and periodic bits/dim;
* :mod:`.evaluators`: ``bpd``, ``nfe``, ``fid``, ``grid``, each ``run(setup, state, mesh,
  workdir) -> dict``; :mod:`.evaluation` writes ``eval_metrics.json``;
* :mod:`.run`: :func:`train`, :func:`evaluate` and :func:`train_and_evaluate` for a config.
"""

from experiments.images.config import ConfigError
from experiments.images.run import evaluate, train, train_and_evaluate
from experiments.images.setup import Setup, build

__all__ = [
    "ConfigError",
    "Setup",
    "build",
    "evaluate",
    "train",
    "train_and_evaluate",
]
