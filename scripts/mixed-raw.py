#!/usr/bin/env python3
"""Write a deterministic mixed-content raw disk file for compression benchmarks.

Usage: scripts/mixed-raw.py PATH [SIZE_MIB]   (default 1024 MiB)

The file is a run of blocks of 64 KiB to 1 MiB (sizes drawn from a fixed seed), each one of
three kinds in about equal thirds: random bytes (incompressible), a short random unit of
16..2048 bytes repeated (compressible by zlib's 4 KiB window and by zstd), and written zeros.
The same seed always gives the same bytes, so every run and machine converts the same data.
"""

import random
import sys

SEED = 12
SIZES = [64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20]


def block(rng, kind, n):
    """The bytes of one block of `kind` (0 random, 1 repeated unit, 2 zeros)."""
    if kind == 0:
        return rng.randbytes(n)
    if kind == 1:
        unit = rng.randbytes(rng.randint(16, 2048))
        return (unit * (n // len(unit) + 1))[:n]
    return bytes(n)


def main():
    path = sys.argv[1]
    total = (int(sys.argv[2]) if len(sys.argv) > 2 else 1024) << 20
    rng = random.Random(SEED)
    done = 0
    with open(path, "wb") as f:
        while done < total:
            n = min(rng.choice(SIZES), total - done)
            f.write(block(rng, rng.randrange(3), n))
            done += n


if __name__ == "__main__":
    main()
