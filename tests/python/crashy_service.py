"""A Flame application for the fault tests, built on shims/python/flame_service.py.

Each output is the input reversed. Inputs that start with a command do something else:
- b"crash:<text>" prints <text> to stderr and kills the process with exit status 3, so the
  node sees its executor die in the middle of a task;
- b"sleep:<seconds>" sleeps that long first (for cancellation tests).
"""

import os
import sys
import time

# The helper is one file of the repository, not an installed package.
sys.path.insert(
    0,
    os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "shims", "python"),
)

import flame_service  # noqa: E402

CRASH = b"crash:"
SLEEP = b"sleep:"


class Crashy(flame_service.Service):
    def invoke(self, session_id, task_id, input):
        if input.startswith(CRASH):
            sys.stderr.write(input[len(CRASH):].decode("utf-8", "replace") + "\n")
            sys.stderr.flush()
            os._exit(3)
        if input.startswith(SLEEP):
            time.sleep(float(input[len(SLEEP):]))
        return bytes(reversed(input))


if __name__ == "__main__":
    flame_service.run(Crashy())
