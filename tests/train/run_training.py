"""Run ``main_train`` on a config file in a fresh process (used by the kill-and-resume test).

    python run_training.py CONFIG.toml [SECONDS_PER_STEP]

The optional delay after every optimizer step keeps a tiny run alive long enough to be killed midway.
"""

import sys
import time

import torch

from kandinsky5.train import main_train

if __name__ == "__main__":
    delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    if delay:
        step = torch.optim.AdamW.step

        def slow_step(self, *args, **kwargs):
            out = step(self, *args, **kwargs)
            time.sleep(delay)
            return out

        torch.optim.AdamW.step = slow_step
    sys.exit(main_train(sys.argv[1]))
