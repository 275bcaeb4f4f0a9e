"""Reading a file's bytes at an offset, for readers that share one open file between threads."""

from __future__ import annotations

import os


def read_at(fd: int, count: int, offset: int) -> bytes:
    """`count` bytes of the open file `fd` from `offset`, fewer only where the file ends.

    pread keeps no file position, so threads can share `fd` without a lock; one
    call may return part of what it is asked on a network file system, so this
    reads on until it has the bytes or the file ends.
    """
    data = os.pread(fd, count, offset)
    while 0 < len(data) < count:
        more = os.pread(fd, count - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data
