#!/usr/bin/env python3
"""File I/O with checked content through a lego mount, for the hostile-client suite.

usage: file_check.py DIR SECONDS

Until SECONDS have passed (at least one round): writes a file of 8 MiB of seeded
pseudo-random bytes in 1 MiB writes, fsyncs it, drops it from the page cache (so the
read goes to the storage node, not to this host's cache), reads it back and compares,
renames it and lists DIR. Leaves the last round's file as DIR/check.bin and prints
"files ok ROUNDS rounds sha256 HEX" (HEX: that file's digest, for the caller to compare
with what landed on the storage node). A mismatch exits 1 naming the offset; an OSError
(EIO when the storage node is lost) exits 2.
"""
import hashlib
import os
import random
import sys
import time

CHUNK = 1 << 20
CHUNKS = 8


def content(seed, i):
    return random.Random(seed * 1000 + i).randbytes(CHUNK)


def one_round(d, seed):
    path = os.path.join(d, "round-%d.tmp" % seed)
    digest = hashlib.sha256()
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
        for i in range(CHUNKS):
            data = content(seed, i)
            digest.update(data)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for i in range(CHUNKS):
            want = content(seed, i)
            got = b""
            while len(got) < CHUNK:
                part = os.read(fd, CHUNK - len(got))
                if not part:
                    break
                got += part
            if got != want:
                bad = next((j for j in range(min(len(got), CHUNK)) if got[j] != want[j]), len(got))
                print("file_check: round %d: %s differs at offset %d" % (seed, path, i * CHUNK + bad),
                      file=sys.stderr)
                sys.exit(1)
        if os.read(fd, 1):
            print("file_check: round %d: %s is longer than written" % (seed, path), file=sys.stderr)
            sys.exit(1)
    finally:
        os.close(fd)
    final = os.path.join(d, "check.bin")
    os.rename(path, final)
    if "check.bin" not in os.listdir(d):
        print("file_check: round %d: check.bin missing from the listing" % seed, file=sys.stderr)
        sys.exit(1)
    return digest.hexdigest()


def main():
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        sys.exit(2)
    d, seconds = sys.argv[1], float(sys.argv[2])
    end = time.monotonic() + seconds
    rounds = 0
    try:
        while True:
            digest = one_round(d, rounds)
            rounds += 1
            if time.monotonic() >= end:
                break
    except OSError as e:
        print("file_check: round %d: %s" % (rounds, e), file=sys.stderr)
        sys.exit(2)
    print("files ok %d rounds sha256 %s" % (rounds, digest))


if __name__ == "__main__":
    main()
