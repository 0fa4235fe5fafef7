r"""Flow Matching on ImageNet 32x32 (:mod:`experiments.images`).

    python -m experiments.imagenet32 --config=experiments/configs/imagenet32.py[:tiny] \
        --workdir=out/imagenet32 [--config.data.data_dir=/path/to/data] \
        [--config.mode=train|eval|train_and_eval] [--config.train.num_steps=...]

Multi-host: run one process per host; the JAX cluster is detected (SLURM, Open MPI, Cloud
TPU, ``JAX_COORDINATOR_ADDRESS``) or given with --coordinator_address, --num_processes and
--process_id. Rerunning with the same --workdir resumes from the latest checkpoint.
"""

from experiments.images import main

if __name__ == "__main__":
    main.main("imagenet32")
