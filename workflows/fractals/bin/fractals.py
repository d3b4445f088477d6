#!/usr/bin/env python3
"""Render one Mandelbrot view to a PNG (pure Python, standard library only).

fractals.py -o out/3_128.png -d 128 -v 3 [-s 160x120]
The view number picks a place on the set's boundary to zoom into; -d is the iteration depth.
"""

import argparse
import os
import struct
import zlib

VIEWS = [(-0.75, 0.0, 1.6), (-0.7453, 0.1127, 0.012), (-1.25066, 0.02012, 0.0017), (-0.16, 1.0405, 0.026),
         (0.285, 0.0105, 0.02), (-0.8, 0.156, 0.1), (-1.7687, 0.0017, 0.03), (0.3245, 0.0429, 0.009)]


def render(view, depth, width, height):
    cx, cy, r = VIEWS[(view - 1) % len(VIEWS)]
    rows = []
    for y in range(height):
        row = bytearray()
        ci = cy + (y / (height - 1) - 0.5) * 2 * r * height / width
        for x in range(width):
            cr = cx + (x / (width - 1) - 0.5) * 2 * r
            zr = zi = 0.0
            n = 0
            while n < depth and zr * zr + zi * zi <= 4.0:
                zr, zi = zr * zr - zi * zi + cr, 2 * zr * zi + ci
                n += 1
            t = n / depth
            row += bytes((int(9 * (1 - t) * t ** 3 * 255), int(15 * (1 - t) ** 2 * t ** 2 * 255),
                          int(8.5 * (1 - t) ** 3 * t * 255)))
        rows.append(bytes(row))
    return rows


def png(rows, width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + r for r in rows)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("-o", required=True)
    p.add_argument("-d", type=int, default=128)
    p.add_argument("-v", type=int, default=1)
    p.add_argument("-s", default="160x120")
    a = p.parse_args()
    w, h = (int(x) for x in a.s.split("x"))
    os.makedirs(os.path.dirname(a.o) or ".", exist_ok=True)
    data = png(render(a.v, a.d, w, h), w, h)
    tmp = a.o + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, a.o)
    print("wrote %s (%d bytes, view %d, depth %d)" % (a.o, len(data), a.v, a.d))


if __name__ == "__main__":
    main()
