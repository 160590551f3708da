"""Flame shim protocol, application side, in one file of standard-library Python 3.

Write a service by subclassing Service and passing an instance to run():

    import flame_service

    class Upper(flame_service.Service):
        def invoke(self, session_id, task_id, input):
            return input.upper()

    if __name__ == "__main__":
        flame_service.run(Upper())

run() speaks the protocol until the node ends the stream, then returns, so the script exits
0. The node picks the transport: when FLAME_SHIM_SOCKET names a socket, run() listens there
and serves the one connection the node makes, and stdout and stderr are free for logs;
otherwise it serves over stdin and stdout, and stdout is reserved for frames. The byte layout
is described in docs/shim-protocol.md. Run as a script, this file is itself a conformant echo
application:

    flame-shim-check -- python3 flame_service.py
    flame-shim-check --shim unix -- python3 flame_service.py
"""

import os
import socket
import struct
import sys

__all__ = ["Service", "ProtocolError", "run", "executor_info", "FRAME_BYTES_MAX",
           "ENV_SHIM_SOCKET", "ACCEPT_TIMEOUT_SECS", "run_unix"]

# Largest frame (type byte + body) accepted or sent; equal to the Rust side's default.
FRAME_BYTES_MAX = 64 * 1024 * 1024
# Bytes a TaskResult frame adds to its payload: type, task_id, status, payload length.
_TASK_RESULT_OVERHEAD = 1 + 8 + 1 + 4
# Longest error message sent to the node; longer ones are cut.
ERROR_MESSAGE_BYTES_MAX = 64 * 1024
# Names the Unix socket to listen on; unset or empty means stdio.
ENV_SHIM_SOCKET = "FLAME_SHIM_SOCKET"
# How long to wait for the node to connect to the socket. The node connects as soon as the
# socket appears, so this only runs out when the node is gone.
ACCEPT_TIMEOUT_SECS = 30

# Node -> app frame types.
SESSION_ENTER = 0x01
TASK_INVOKE = 0x02
SESSION_LEAVE = 0x03
# App -> node frame types.
READY = 0x81
TASK_RESULT = 0x82
ERROR = 0x83

_NAMES = {SESSION_ENTER: "SessionEnter", TASK_INVOKE: "TaskInvoke", SESSION_LEAVE: "SessionLeave"}


class ProtocolError(Exception):
    """The node sent something the protocol does not allow; the process should exit non-zero."""


class Service:
    """An application. One instance serves every session the executor is bound to, one after
    another, so state kept on self (a loaded model, say) outlives a session on purpose."""

    def enter_session(self, session_id, common_data):
        """Called when the executor is bound to a session. Raise to refuse it; the node then
        stops this executor."""

    def invoke(self, session_id, task_id, input):
        """Runs one task and returns its output as bytes. Raise to fail the task with the
        exception's message; the executor is kept."""
        raise NotImplementedError("Service.invoke must be overridden")

    def leave_session(self):
        """Called when the executor is unbound from its session. Raise to report an error;
        the node then stops this executor."""


def executor_info():
    """The variables the node sets for every executor (None outside Flame)."""
    return {
        "executor_id": os.environ.get("FLAME_EXECUTOR_ID"),
        "node": os.environ.get("FLAME_NODE"),
        "application": os.environ.get("FLAME_APPLICATION"),
    }


def _read_exact(stream, n):
    """n bytes, or fewer only if the stream ended."""
    chunks = []
    while n > 0:
        chunk = stream.read(n)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read_frame(stream):
    """(type, body) of the next frame, or None at end of input between frames."""
    prefix = _read_exact(stream, 4)
    if not prefix:
        return None
    if len(prefix) < 4:
        raise ProtocolError("the stream ended in the middle of a frame length")
    (length,) = struct.unpack("<I", prefix)
    if length == 0:
        raise ProtocolError("frame with a length of zero has no type byte")
    if length > FRAME_BYTES_MAX:
        raise ProtocolError("frame of %d bytes exceeds the limit of %d" % (length, FRAME_BYTES_MAX))
    frame = _read_exact(stream, length)
    if len(frame) < length:
        raise ProtocolError("the stream ended in the middle of a frame")
    return frame[0], memoryview(frame)[1:]


class _Body:
    """Bounds-checked reads from one frame body."""

    def __init__(self, frame_type, body):
        self.frame_type = frame_type
        self.body = body
        self.at = 0

    def take(self, n, field):
        if self.at + n > len(self.body):
            raise ProtocolError("frame 0x%02x is truncated at %s" % (self.frame_type, field))
        out = self.body[self.at:self.at + n]
        self.at += n
        return out

    def u64(self, field):
        return struct.unpack("<Q", self.take(8, field))[0]

    def byte_string(self, field):
        (length,) = struct.unpack("<I", self.take(4, field))
        return bytes(self.take(length, field))

    def finish(self):
        if self.at != len(self.body):
            raise ProtocolError(
                "frame 0x%02x has %d trailing bytes" % (self.frame_type, len(self.body) - self.at))


def _byte_string(data):
    return struct.pack("<I", len(data)) + data


def _send(out, frame_type, body=b""):
    out.write(struct.pack("<IB", len(body) + 1, frame_type))
    out.write(body)
    out.flush()


def _message(exc):
    text = str(exc) or type(exc).__name__
    return text.encode("utf-8", "replace")[:ERROR_MESSAGE_BYTES_MAX]


def _serve(service, inp, out):
    _send(out, READY)
    session = None  # the bound session's id, or None
    while True:
        frame = _read_frame(inp)
        if frame is None:
            return
        frame_type, body = frame
        reader = _Body(frame_type, body)
        if frame_type == SESSION_ENTER and session is None:
            session_id = reader.u64("session_id")
            common_data = reader.byte_string("common_data")
            reader.finish()
            try:
                service.enter_session(session_id, common_data)
            except Exception as exc:  # the app's failure is reported, not fatal here
                _send(out, ERROR, _byte_string(_message(exc)))
            else:
                session = session_id
                _send(out, READY)
        elif frame_type == TASK_INVOKE and session is not None:
            task_id = reader.u64("task_id")
            data = reader.byte_string("input")
            reader.finish()
            status, payload = 0, b""
            try:
                payload = service.invoke(session, task_id, data)
                if not isinstance(payload, (bytes, bytearray, memoryview)):
                    raise TypeError("invoke returned %s, not bytes" % type(payload).__name__)
                payload = bytes(payload)
                # An output the node would refuse fails the task, not the executor.
                if len(payload) + _TASK_RESULT_OVERHEAD > FRAME_BYTES_MAX:
                    raise ValueError("task output of %d bytes does not fit the frame limit"
                                     % len(payload))
            except Exception as exc:
                status, payload = 1, _message(exc)
            _send(out, TASK_RESULT, struct.pack("<QB", task_id, status) + _byte_string(payload))
        elif frame_type == SESSION_LEAVE and session is not None:
            reader.finish()
            # Unbound whatever the service says: after a failed leave the node stops us.
            session = None
            try:
                service.leave_session()
            except Exception as exc:
                _send(out, ERROR, _byte_string(_message(exc)))
            else:
                _send(out, READY)
        elif frame_type in _NAMES:
            expected = "TaskInvoke or SessionLeave" if session is not None else "SessionEnter"
            raise ProtocolError("expected %s, got %s" % (expected, _NAMES[frame_type]))
        else:
            raise ProtocolError("unknown frame type 0x%02x" % frame_type)


def run(service, stdin=None, stdout=None):
    """Serves the node until it ends the stream, then returns (exit 0 afterwards).

    Raises ProtocolError if the node breaks the protocol, or if FLAME_SHIM_SOCKET is set and
    the node does not connect within ACCEPT_TIMEOUT_SECS; OSError if the socket cannot be
    bound. Pass stdin and stdout file objects to test a service in memory; the environment
    is then ignored.

    With FLAME_SHIM_SOCKET set (and no streams passed), this is run_unix(): stdout and
    stderr are left alone. Otherwise stdout must carry nothing but frames, so run() moves
    file descriptor 1 to a private duplicate and points fd 1 and sys.stdout at stderr:
    print(), C extensions and child processes then write to the log instead of corrupting
    the stream.
    """
    path = os.environ.get(ENV_SHIM_SOCKET)
    if stdin is None and stdout is None and path:
        run_unix(service, path)
        return
    if stdout is None:
        sys.stdout.flush()
        frames = os.fdopen(os.dup(1), "wb")  # os.dup makes it non-inheritable
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        stdout = frames
    if stdin is None:
        stdin = sys.stdin.buffer
    _serve(service, stdin, stdout)


def run_unix(service, path, accept_timeout=ACCEPT_TIMEOUT_SECS):
    """Listens on the Unix socket `path`, accepts one connection from the node, and serves
    it until the node ends it. The socket file is made private to its owner (mode 0600) and
    left in place for the node, which removes the executor's directory."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # not inheritable
    try:
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(1)
        listener.settimeout(accept_timeout)
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            raise ProtocolError("the node did not connect to %s within %s s"
                                % (path, accept_timeout)) from None
    finally:
        listener.close()
    with conn:
        conn.setblocking(True)
        with conn.makefile("rb") as inp, conn.makefile("wb") as out:
            _serve(service, inp, out)


class _Echo(Service):
    """Echoes each input: the demo, and a reference for flame-shim-check."""

    def invoke(self, session_id, task_id, input):
        return input


if __name__ == "__main__":
    run(_Echo())
