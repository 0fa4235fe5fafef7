r"""Super-resolution by Flow Matching (Lipman et al. 2023, section 6.3; SR3's conditioning).

    python -m experiments.superres --config=experiments/configs/superres.py[:tiny] \
        --workdir=out/superres [--config.data.data_dir=...] [--config.mode=eval]

The flow ``v(t, x, cond)`` is the image experiments' UNet with the low-resolution image,
upsampled to the output size, as extra input channels (``cond``). The run is
:mod:`experiments.images`' (config check, :class:`~experiments.images.Setup`, step,
trainer with checkpoints and exact resume, flags and one-line errors), with:

* :mod:`.setup`: the ``superres`` config check and the conditioned setup (its
  ``condition`` makes the low-resolution input from each high-resolution batch, so any
  image source at resolution ``R`` gives pairs ``R / factor -> R``);
* :mod:`.evaluation`: PSNR, SSIM (dm-pix), the baseline of the upsampled input (bicubic),
  NFE, FID with Inception weights, and the low-res | sample | high-res grid, in
  ``eval_metrics.json``;
* :mod:`.run`: :func:`train_and_evaluate` and :func:`evaluate` for a config.
"""

from experiments.superres.run import evaluate, train_and_evaluate
from experiments.superres.setup import build

__all__ = ["build", "evaluate", "train_and_evaluate"]
