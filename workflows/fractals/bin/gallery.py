#!/usr/bin/env python3
"""Gather stage: check every rendered PNG and write an HTML gallery with their sizes."""

import glob
import os
import sys

files = sorted(glob.glob("out/*.png"))
expected = int(sys.argv[1]) if len(sys.argv) > 1 else len(files)
bad = [f for f in files if open(f, "rb").read(8) != b"\x89PNG\r\n\x1a\n"]
if len(files) != expected or bad:
    sys.exit("expected %d PNGs, found %d (%d broken)" % (expected, len(files), len(bad)))
with open("out/index.html", "w") as f:
    f.write("<!doctype html><title>fractals</title><h1>%d views</h1>\n" % len(files))
    for name in files:
        f.write('<figure style="display:inline-block"><img src="%s"><figcaption>%s (%d bytes)</figcaption></figure>\n'
                % (os.path.basename(name), os.path.basename(name), os.path.getsize(name)))
print("gallery of %d images in out/index.html" % len(files))
