"""`clip-accel train` on 2 processes where only process 1 fails at start-up (its training stream does not open):
run by test_streaming.py to show that both stop, each with process 1's message (a bug), or that the main process
prints it once (a user error, with FAIL_AS=UserError).

Usage: ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 tests/startup_failure.py TRAIN_OPTIONS...
"""

import os
import sys

import clip_accel.data as data
from clip_accel.cli import train_main
from clip_accel.config import UserError

if os.environ.get("RANK") == "1":
    error = UserError if os.environ.get("FAIL_AS") == "UserError" else ValueError

    def fail(*args, **kwargs):
        raise error("this node cannot read the shard index (a test's failure on process 1 only)")

    data.load_stream_split = fail

train_main(sys.argv[1:])
