"""A Flame application for the end-to-end tests of the Unix-socket shim, built on
shims/python/flame_service.py.

Each output is `<executor id> <socket path> <input upper-cased>`, so a test can tell which
executor ran a task and over which socket. Each task also prints a line `logged <input>` on
stdout: over the socket shim stdout is free, and the node keeps it in the executor's log.
"""

import os
import sys

# The helper is one file of the repository, not an installed package.
sys.path.insert(
    0,
    os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "shims", "python"),
)

import flame_service  # noqa: E402


class Tagged(flame_service.Service):
    def invoke(self, session_id, task_id, input):
        print("logged %s" % input.decode("utf-8", "replace"), flush=True)
        executor = os.environ.get("FLAME_EXECUTOR_ID", "unset")
        socket_path = os.environ.get(flame_service.ENV_SHIM_SOCKET, "unset")
        return ("%s %s " % (executor, socket_path)).encode() + input.upper()


if __name__ == "__main__":
    flame_service.run(Tagged())
