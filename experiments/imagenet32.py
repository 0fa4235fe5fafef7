r"""Flow Matching on ImageNet 32x32: a thin entry point over ``experiments.image_flow``.

    python -m experiments.imagenet32 --config=experiments/configs/imagenet32.py[:tiny] \
        --workdir=out/imagenet32 [--config.data.data_dir=/path/to/data] \
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
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "imagenet32.py")
    )
    app.run(image_flow.main)
