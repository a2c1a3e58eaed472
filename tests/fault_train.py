"""The trainer's command line with a fault injected (tests/faults.py), for runs in a child process:

    DINO_FAST_TEST_FAULT=loader@3:1 deepspeed --num_gpus 2 tests/fault_train.py key=value ...
"""

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from faults import inject_from_env  # noqa: E402

if __name__ == "__main__":
    inject_from_env()
    from dino_fast.train import main

    main()
