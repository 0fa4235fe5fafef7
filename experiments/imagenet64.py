r"""Flow Matching on ImageNet 64x64 (:mod:`experiments.images`; flags as in ``imagenet32``).

    python -m experiments.imagenet64 --config=experiments/configs/imagenet64.py[:tiny] \
        --workdir=out/imagenet64 --config.data.source=imagenet64_npz \
        --config.data.data_dir=/path/to/Imagenet64_npz [--config.mode=eval]
"""

from experiments.images import main

if __name__ == "__main__":
    main.main("imagenet64")
