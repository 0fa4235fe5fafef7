"""``python -m experiments.superres``: see :mod:`experiments.superres`."""

from experiments.images import main
from experiments.superres.run import train_and_evaluate

if __name__ == "__main__":
    main.main("superres", train_and_evaluate)
