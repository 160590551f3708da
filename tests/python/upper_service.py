"""A Flame application for the end-to-end tests, built on shims/python/flame_service.py.

Each output is the session's common data followed by the input upper-cased. An input that
starts with b"raise:" fails its task: the rest of the input becomes the message of the
ValueError raised, which Flame must report as the task's error.
"""

import os
import sys

# The helper is one file of the repository, not an installed package.
sys.path.insert(
    0,
    os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "shims", "python"),
)

import flame_service  # noqa: E402

RAISE_PREFIX = b"raise:"


class Upper(flame_service.Service):
    def __init__(self):
        self.prefix = b""

    def enter_session(self, session_id, common_data):
        self.prefix = bytes(common_data)

    def invoke(self, session_id, task_id, input):
        if input.startswith(RAISE_PREFIX):
            raise ValueError(input[len(RAISE_PREFIX):].decode("utf-8", "replace"))
        return self.prefix + input.upper()


if __name__ == "__main__":
    flame_service.run(Upper())
