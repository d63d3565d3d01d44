"""One rank of a multi-process run, started with torchrun's environment (RANK, WORLD_SIZE, MASTER_*).

    python run_distributed.py CONFIG.toml [CONFIG.toml ...]

Joins one gloo process group and trains each config in turn inside it (``train`` uses a group it
finds initialised and leaves it open), so several runs cost one start-up.
"""

import sys

import torch
import torch.distributed as dist

from kandinsky5.train import main_train

if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for path in sys.argv[1:]:
            main_train(path, log=lambda line: None)
    finally:
        dist.destroy_process_group()
