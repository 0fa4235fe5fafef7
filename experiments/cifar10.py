r"""Flow Matching on CIFAR-10 (:mod:`experiments.images`; flags as ``experiments.imagenet32``).

    python -m experiments.cifar10 --config=experiments/configs/cifar10.py[:tiny] \
        --workdir=out/cifar10 [--config.data.data_dir=/path/to/tfds]
"""

from experiments.images import main

if __name__ == "__main__":
    main.main("cifar10")
