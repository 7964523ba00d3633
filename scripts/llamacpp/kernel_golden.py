#!/usr/bin/env python3
"""Reads the kernel golden-vector files of tests/fixtures/kernels/ (format: its README.md).

    python3 scripts/llamacpp/kernel_golden.py tests/fixtures/kernels/*.bin     # summaries
    python3 scripts/llamacpp/kernel_golden.py --same-as DIR FILE...            # byte-compare, ignoring
                                                                               # the threads field
"""

import argparse
import os
import struct
import sys

import numpy as np

MM_HEADER = struct.Struct("<4s8IQ")
QZ_HEADER = struct.Struct("<4s5I")
TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
              10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K"}


def read_matmul(buf):
    """{wtype, n, k, threads, repacked, w (bytes), x (m_max x k), cases: {m: y (m x n)}}."""
    magic, version, wtype, n, k, m_max, n_cases, threads, repacked, w_bytes = MM_HEADER.unpack_from(buf, 0)
    assert magic == b"SDMM" and version == 1, "not an SDMM v1 file"
    pos = MM_HEADER.size
    w = buf[pos : pos + w_bytes]
    pos += w_bytes
    x = np.frombuffer(buf, "<f4", m_max * k, pos).reshape(m_max, k)
    pos += m_max * k * 4
    cases = {}
    for _ in range(n_cases):
        (m,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        cases[m] = np.frombuffer(buf, "<f4", m * n, pos).reshape(m, n)
        pos += m * n * 4
    assert pos == len(buf), "trailing bytes"
    return dict(wtype=wtype, n=n, k=k, threads=threads, repacked=repacked, w=w, x=x, cases=cases)


def read_quantizer(buf):
    """{qtype, x (rows x k), q (rows x row_bytes uint8)}."""
    magic, version, qtype, rows, k, row_bytes = QZ_HEADER.unpack_from(buf, 0)
    assert magic == b"SDQZ" and version == 1, "not an SDQZ v1 file"
    pos = QZ_HEADER.size
    x = np.frombuffer(buf, "<f4", rows * k, pos).reshape(rows, k)
    pos += rows * k * 4
    q = np.frombuffer(buf, np.uint8, rows * row_bytes, pos).reshape(rows, row_bytes)
    assert pos + rows * row_bytes == len(buf), "trailing bytes"
    return dict(qtype=qtype, x=x, q=q)


def summary(path, buf):
    if buf[:4] == b"SDMM":
        d = read_matmul(buf)
        first = d["cases"][1][0]
        changed = [m for m, y in d["cases"].items() if not np.array_equal(y[0], first)]
        return (f"{os.path.basename(path)}: W {TYPE_NAMES[d['wtype']]} {d['n']}x{d['k']}"
                f"{' repacked' if d['repacked'] else ''}, m in {sorted(d['cases'])}, threads {d['threads']}; "
                f"token 0's output differs from m=1 at m in {changed}")
    d = read_quantizer(buf)
    return f"{os.path.basename(path)}: {TYPE_NAMES[d['qtype']]} of {d['x'].shape[0]} rows x {d['x'].shape[1]}"


def without_threads(buf):
    return buf[:28] + buf[32:] if buf[:4] == b"SDMM" else buf


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--same-as", help="directory with files of the same names to compare against")
    args = p.parse_args()
    failed = False
    for path in args.files:
        buf = open(path, "rb").read()
        if args.same_as:
            other = open(os.path.join(args.same_as, os.path.basename(path)), "rb").read()
            same = without_threads(buf) == without_threads(other)
            failed |= not same
            print(f"{os.path.basename(path)}: {'same' if same else 'DIFFERENT'}")
        else:
            print(summary(path, buf))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
