"""moto's S3 server (`moto_server`) with atomic conditional writes, for cairn's tests.

moto checks `If-None-Match: *` / `If-Match` and then stores the object in two steps, and its
server handles requests on threads, so two concurrent conditional creates of one key can both
succeed (seen in this project's CI: "round 8: 2 conditional creates succeeded"). Amazon S3 lets
exactly one win, and cairn's lease claims and create-only commits rely on that, so the test
server must too: every PutObject and CopyObject runs under one lock. Reads, listings and deletes
stay concurrent. Same arguments as `moto_server`.
"""

import functools
import sys
import threading

from moto.s3.responses import S3Response
from moto.server import main

_writes = threading.Lock()


def _one_at_a_time(method):
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with _writes:
            return method(self, *args, **kwargs)

    return run


S3Response.put_object = _one_at_a_time(S3Response.put_object)
S3Response.copy_object = _one_at_a_time(S3Response.copy_object)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
