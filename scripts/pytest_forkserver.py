"""Run pytest in processes forked from one that has imported the heavy packages once.

A mutation run (scripts/mutation.sh) starts pytest once per mutant; on a busy machine most of
each run is importing torch, transformers and the like, the same every time. The server
imports the modules it is given (third-party ones only: never the project's, whose module on
disk changes from one mutant to the next), then forks a child per request; the child runs
``pytest.main`` in the client's folder with the client's stdout and stderr, so it imports
the project's modules afresh, from the files as they are now.

    python scripts/pytest_forkserver.py serve SOCKET MODULE...   # until killed
    python scripts/pytest_forkserver.py run SOCKET LIMIT_S PYTEST_ARG...  # exits with pytest's status

A run past ``LIMIT_S`` seconds is killed (with the processes it started) and exits 1.
Only for mutation runs: the children share the server's module state as of the fork.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import sys
import time


def _recv_all(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def serve(path: str, modules: list[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # a missing optional package: its tests import it themselves
            print(f"pytest_forkserver: {name} not preloaded ({e})", file=sys.stderr)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    while True:
        conn, _ = server.accept()
        with conn:
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
            while not msg.endswith(b"\n"):
                more = conn.recv(65536)
                if not more:
                    break
                msg += more
            request = json.loads(msg)
            pid = os.fork()
            if pid == 0:  # the child: a fresh pytest run in the client's folder, on its stdout/stderr
                os.setpgid(0, 0)
                server.close()
                os.dup2(fds[0], 1)
                os.dup2(fds[1], 2)
                os.chdir(request["cwd"])
                sys.argv = ["pytest", *request["args"]]
                import pytest

                code = 1
                try:
                    code = int(pytest.main(request["args"]))
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            for fd in fds:
                os.close(fd)
            deadline = time.monotonic() + float(request["limit_s"])
            status = None
            while status is None:
                done, raw = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = os.waitstatus_to_exitcode(raw)
                elif time.monotonic() > deadline:
                    os.killpg(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    status = 1
                else:
                    time.sleep(0.02)
            try:
                os.killpg(pid, signal.SIGKILL)  # workers the run left behind
            except ProcessLookupError:
                pass
            try:
                conn.sendall(f"{status}\n".encode())
            except OSError:  # the client was stopped by its own time limit
                pass


def run(path: str, limit_s: str, args: list[str]) -> int:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    msg = json.dumps({"args": args, "cwd": os.getcwd(), "limit_s": float(limit_s)}).encode() + b"\n"
    socket.send_fds(client, [msg], [sys.stdout.fileno(), sys.stderr.fileno()])
    reply = _recv_all(client).strip()
    return int(reply) if reply else 1


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) >= 4 and sys.argv[1] == "run":
        sys.exit(run(sys.argv[2], sys.argv[3], sys.argv[4:]))
    else:
        sys.exit(__doc__)
