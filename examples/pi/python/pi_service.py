#!/usr/bin/env python3
"""The pi application in Python: the same service as `pi-service`, on flame_service.py.

Wire format (see examples/pi/src/wire.rs, which this follows byte for byte and message for
message):

- session common data: empty (seed 0) or the seed as 8 bytes, a little-endian u64;
- task input: the sample count as 8 bytes, a little-endian u64, at most SAMPLES_PER_TASK_MAX;
- task output: the count of samples inside the quarter circle, 8 bytes little-endian.

The generator differs from the Rust service's (Python's Mersenne Twister, seeded from the
seed, the session id and the task id), so the counts differ too; both are deterministic.

flame_service.py is found in <repo>/shims/python, relative to this file, unless the
FLAME_SHIM_PY environment variable names the folder that holds it (for installed layouts).
"""

import os
import random
import struct
import sys

_SHIM_DIR = os.environ.get("FLAME_SHIM_PY") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, os.pardir, "shims", "python")
sys.path.insert(0, os.path.normpath(_SHIM_DIR))

import flame_service  # noqa: E402  (found through the path set up above)

# Most samples one task may draw; the same limit as the Rust service. In Python that is
# minutes of work: use more tasks rather than more samples per task.
SAMPLES_PER_TASK_MAX = 1_000_000_000

_U64 = struct.Struct("<Q")


def decode_samples(data):
    """The sample count in a task input, or ValueError with the format's message."""
    if len(data) != _U64.size:
        raise ValueError(
            "task input must be the sample count as 8 bytes (a little-endian u64), got %d bytes"
            % len(data))
    (samples,) = _U64.unpack(data)
    if samples > SAMPLES_PER_TASK_MAX:
        raise ValueError(
            "%d samples is over the limit of %d per task; use more tasks with fewer samples each"
            % (samples, SAMPLES_PER_TASK_MAX))
    return samples


def decode_seed(common_data):
    """The seed in a session's common data (empty is 0), or ValueError."""
    if not common_data:
        return 0
    if len(common_data) != _U64.size:
        raise ValueError(
            "session common data must be empty or the seed as 8 bytes (a little-endian u64), "
            "got %d bytes" % len(common_data))
    return _U64.unpack(common_data)[0]


def count_inside(seed, session_id, task_id, samples):
    """Points of `samples` drawn in the unit square that fall inside the quarter circle."""
    # An int seed is used whole and identically on every platform and Python 3 version.
    draw = random.Random((seed << 128) | (session_id << 64) | task_id).random
    inside = 0
    for _ in range(samples):
        x = draw()
        y = draw()
        if x * x + y * y < 1.0:
            inside += 1
    return inside


class PiService(flame_service.Service):
    def __init__(self):
        self.seed = None  # the bound session's seed
        self.seed_error = None  # or why its common data is not one

    def enter_session(self, session_id, common_data):
        # A bad seed fails each task with the reason instead of refusing the session: a
        # refused enter stops the executor, and the node would only start another one to be
        # refused again, while a failed task reaches the client with the message.
        self.seed, self.seed_error = None, None
        try:
            self.seed = decode_seed(common_data)
        except ValueError as exc:
            self.seed_error = str(exc)

    def invoke(self, session_id, task_id, input):
        if self.seed_error is not None:
            raise ValueError(self.seed_error)
        samples = decode_samples(input)
        return _U64.pack(count_inside(self.seed, session_id, task_id, samples))

    def leave_session(self):
        self.seed, self.seed_error = None, None


if __name__ == "__main__":
    try:
        flame_service.run(PiService())
    except (flame_service.ProtocolError, OSError) as exc:
        sys.stderr.write("error: pi_service.py: %s\n" % exc)
        sys.exit(1)
