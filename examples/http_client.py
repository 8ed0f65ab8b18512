"""The classic ``http_client`` example from the asyncore documentation, in
Python 3 bytes, running on fastasyncore.

The only change a legacy program needs is the import line::

    from fastasyncore import asyncore      # was: import asyncore

Usage::

    python examples/http_client.py [HOST [PORT [PATH]]]

It sends a minimal HTTP/1.0 GET, then prints the raw response (status line,
headers and body) as it arrives.  ``main()`` returns the bytes received, so
tests can check them.
"""

import socket
import sys

from fastasyncore import asyncore


class HTTPClient(asyncore.dispatcher):

    def __init__(self, host, path, port=80, map=None):
        asyncore.dispatcher.__init__(self, map=map)
        self.create_socket(socket.AF_INET, socket.SOCK_STREAM)
        self.connect((host, port))
        self.buffer = bytes('GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' % (path, host),
                            'ascii')
        self.received = []

    def handle_connect(self):
        pass

    def handle_close(self):
        self.close()

    def handle_read(self):
        data = self.recv(8192)
        self.received.append(data)

    def writable(self):
        return (len(self.buffer) > 0)

    def handle_write(self):
        sent = self.send(self.buffer)
        self.buffer = self.buffer[sent:]


def main(host="www.python.org", port=80, path="/", timeout=30.0, out=None):
    """Fetch ``path`` from ``host:port``; return the raw response bytes.

    The loop is bounded: it stops when the server closes the connection (the
    map empties) or after about ``timeout`` seconds.  ``out``, if given, is a
    binary stream that receives the response (e.g. ``sys.stdout.buffer``).
    """
    channels = {}
    client = HTTPClient(host, path, port=port, map=channels)
    step = 0.05
    for _ in range(max(1, int(timeout / step))):
        if not channels:
            break
        asyncore.loop(timeout=step, map=channels, count=1)
    else:
        client.close()
    response = b"".join(client.received)
    if out is not None:
        out.write(response)
        out.flush()
    return response


if __name__ == "__main__":
    args = sys.argv[1:]
    host = args[0] if len(args) > 0 else "www.python.org"
    port = int(args[1]) if len(args) > 1 else 80
    path = args[2] if len(args) > 2 else "/"
    main(host, port, path, out=sys.stdout.buffer)
