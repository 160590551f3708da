"""Tests of pi_service.py: python3 -m unittest discover -s examples/pi/python

The conformance test runs flame-shim-check (`cargo build -p flame-shims`) when it is found:
FLAME_SHIM_CHECK, else target/debug or target/release of this repository, else PATH.
"""

import io
import math
import os
import shutil
import struct
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import pi_service  # noqa: E402  (first: it puts flame_service's folder on sys.path)
import flame_service  # noqa: E402

U64 = struct.Struct("<Q")
REPO = os.path.normpath(os.path.join(HERE, os.pardir, os.pardir, os.pardir))


def frame(frame_type, body=b""):
    return struct.pack("<IB", len(body) + 1, frame_type) + body


def byte_string(data):
    return struct.pack("<I", len(data)) + data


def enter(session_id, common_data):
    return frame(flame_service.SESSION_ENTER, U64.pack(session_id) + byte_string(common_data))


def invoke(task_id, data):
    return frame(flame_service.TASK_INVOKE, U64.pack(task_id) + byte_string(data))


def converse(*frames):
    """[(status, payload)] of each TaskResult, after checking every other reply is Ready."""
    out = io.BytesIO()
    flame_service.run(pi_service.PiService(), stdin=io.BytesIO(b"".join(frames)), stdout=out)
    data, results = out.getvalue(), []
    while data:
        (length,) = struct.unpack_from("<I", data)
        frame_type, body = data[4], data[5:4 + length]
        data = data[4 + length:]
        if frame_type == flame_service.READY:
            continue
        assert frame_type == flame_service.TASK_RESULT, hex(frame_type)
        (status,) = struct.unpack_from("<B", body, 8)
        (size,) = struct.unpack_from("<I", body, 9)
        results.append((status, body[13:13 + size]))
    return results


class PiServiceTest(unittest.TestCase):
    def test_counts_are_deterministic_and_near_pi(self):
        samples = U64.pack(100_000)
        results = converse(enter(1, U64.pack(3)), invoke(1, samples), invoke(1, samples),
                           invoke(2, samples))
        counts = [U64.unpack(payload)[0] for status, payload in results]
        self.assertEqual([status for status, _ in results], [0, 0, 0])
        self.assertEqual(counts[0], counts[1])
        self.assertNotEqual(counts[0], counts[2])
        for count in counts:
            self.assertLess(abs(4 * count / 100_000 - math.pi), 0.03)

    def test_empty_common_data_is_seed_zero(self):
        self.assertEqual(converse(enter(1, b""), invoke(1, U64.pack(0))), [(0, U64.pack(0))])

    def test_bad_input_fails_the_task_with_the_format(self):
        results = converse(enter(1, b""), invoke(1, b"1000"),
                           invoke(2, U64.pack(pi_service.SAMPLES_PER_TASK_MAX + 1)),
                           invoke(3, U64.pack(10)))
        self.assertEqual(results[0], (1, b"task input must be the sample count as 8 bytes "
                                         b"(a little-endian u64), got 4 bytes"))
        self.assertEqual(results[1][0], 1)
        self.assertIn(b"over the limit of 1000000000 per task", results[1][1])
        self.assertEqual(results[2][0], 0)

    def test_bad_seed_fails_the_tasks_of_its_session(self):
        results = converse(enter(1, b"seed"), invoke(1, U64.pack(10)))
        self.assertEqual(results, [(1, b"session common data must be empty or the seed as 8 "
                                       b"bytes (a little-endian u64), got 4 bytes")])


def find_shim_check():
    env = os.environ.get("FLAME_SHIM_CHECK")
    if env:
        return env
    for profile in ("debug", "release"):
        path = os.path.join(REPO, "target", profile, "flame-shim-check")
        if os.access(path, os.X_OK):
            return path
    return shutil.which("flame-shim-check")


class ConformanceTest(unittest.TestCase):
    def test_flame_shim_check_passes(self):
        check = find_shim_check()
        if check is None:
            self.skipTest("flame-shim-check not built (cargo build -p flame-shims)")
        script = os.path.join(HERE, "pi_service.py")
        done = subprocess.run([check, "--", sys.executable, script], capture_output=True,
                              text=True, timeout=120)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)


if __name__ == "__main__":
    unittest.main()
