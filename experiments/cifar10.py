r"""Flow Matching on CIFAR-10: a thin entry point over ``experiments.image_flow``.

    python -m experiments.cifar10 --config=experiments/configs/cifar10.py[:tiny] \
        --workdir=out/cifar10 [--config.data.data_dir=/path/to/data] \
        [--config.mode=train|eval|train_and_eval] [--config.train.num_steps=...]

Multi-host: run one process per host; the JAX cluster is detected (SLURM, Open MPI, Cloud
TPU, ``JAX_COORDINATOR_ADDRESS``) or given with --coordinator_address, --num_processes and
--process_id. Rerunning with the same --workdir resumes from the latest checkpoint.
"""

import os

from absl import app

from experiments import image_flow

if __name__ == "__main__":
    image_flow.define_flags(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "cifar10.py")
    )
    app.run(image_flow.main)
