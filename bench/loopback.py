"""What every benchmark needs to run its servers on loopback: a port nothing listens on, and
waiting until a server answers (or stopping at once when its process died)."""

import socket
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, process):
    """Until `url` answers 200, for at most a minute; raises if `process` exits first."""
    for _ in range(600):
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} never answered")
