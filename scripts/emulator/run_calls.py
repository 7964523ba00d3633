"""Runs x86-64 functions from a Linux process's memory dump on an emulated AVX-512 CPU.

Why: the AVX-512 kernels (F/BW/VL/VNNI) must be tested bit for bit on machines without AVX-512.
src/engine/cpu/emulator.rs dumps its own memory and calls this through the launcher that
scripts/emulator/setup.sh writes, which also fixes two faults of the bochscpu-python 0.4.0 wheel
(Bochs's CPU core): it is patched to emulate Tiger Lake (unpatched it is Cannon Lake, no VNNI),
and shim.c is preloaded for the two glibc 2.38 symbols it needs.

Usage: run SPEC.json DUMP OUT | run --self-test
  SPEC  {"fs_base": int, "regions": [[start, size, writable], ...],
         "calls": [[function, arg], ...], "outputs": [[address, size], ...]}
  DUMP  records (u64 address, u64 length, bytes), little-endian: the non-zero contents of the
        regions (the rest reads as zero).
  OUT   written after all calls: the bytes of each output range, one after another.
Each call is `function(arg)` (System V ABI) from a fresh stack, in the same memory as the calls
before it. A call must return: any exception (#UD, #PF on an unmapped address, a syscall...) is
an error, and so is a run that stops otherwise. Exit status 0 on success, 1 with a message on
stderr otherwise.
"""

import bisect
import ctypes
import json
import mmap
import struct
import sys

import bochscpu
import bochscpu.cpu
import bochscpu.memory

PAGE = 0x1000
PML4_PA = 0x10_0000  # the page tables go from here up
DATA_PA = 0x100_0000  # guest-physical home of the regions, then the stack
STACK_VA, STACK_SIZE = 0x10_0000_0000, 1 << 20
RETURN_VA = 0x20_0000_0000  # unmapped: returning there faults, which ends a call
CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE = 1 << 9, 1 << 10, 1 << 18
XCR0 = 0xE7  # x87, SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM
EXCEPTIONS = {0: "#DE", 6: "#UD", 7: "#NM", 13: "#GP", 14: "#PF", 17: "#AC", 19: "#XM"}


class EmulationError(Exception):
    """A run that could not be set up or did not end by returning."""


def segment(selector, attr, base=0):
    """A flat 64-bit segment."""
    s = bochscpu.Segment()
    s.present, s.selector, s.base, s.limit, s.attr = True, selector, base, 0xFFFF_FFFF, attr
    return s


def emulate(fs_base, regions, contents, calls, outputs):
    """Maps `regions`, fills them from `contents` ((address, bytes) pairs or a DUMP file), runs
    `calls` in order and returns the bytes of each output range."""
    # Guest-physical memory is one host mapping: region after region, then the stack.
    total = sum(size for _, size, _ in regions) + STACK_SIZE
    memory = mmap.mmap(-1, total)
    host = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    view = memoryview(memory)
    pt = bochscpu.memory.PageMapLevel4Table()
    placed, at = [], 0  # (start, size, offset in memory)
    for start, size, writable in list(regions) + [(STACK_VA, STACK_SIZE, True)]:
        if start % PAGE or size % PAGE or size <= 0:
            raise EmulationError(f"region {start:#x}+{size:#x} is not whole pages")
        placed.append((start, size, at))
        for page in range(at, at + size, PAGE):
            pt.insert(start + page - at, DATA_PA + page, 1 if writable else 0)
            bochscpu.memory.page_insert(DATA_PA + page, host + page)
        at += size
    for hva, gpa in pt.commit(PML4_PA):
        bochscpu.memory.page_insert(gpa, hva)
    placed.sort()
    starts = [start for start, _, _ in placed]
    for (start, size, _), after in zip(placed, starts[1:]):
        if start + size > after:
            raise EmulationError(
                f"regions at {start:#x} and {after:#x} overlap (the stack is at {STACK_VA:#x})"
            )

    def offset(va, size):
        """Where `size` bytes at `va` lie in `memory`, or None unless inside one region."""
        i = bisect.bisect_right(starts, va) - 1
        if i < 0 or va + size > placed[i][0] + placed[i][1]:
            return None
        return placed[i][2] + va - placed[i][0]

    def locate(va, size):
        """`offset`, failing when the bytes are not all inside one region."""
        if (found := offset(va, size)) is None:
            raise EmulationError(f"{va:#x}+{size:#x} is not inside one mapped region")
        return found

    if offset(RETURN_VA, 1) is not None:
        raise EmulationError(f"a region covers the return address {RETURN_VA:#x}")
    if isinstance(contents, str):
        with open(contents, "rb") as f:
            while head := f.read(16):
                va, size = struct.unpack("<QQ", head)
                at = locate(va, size)
                if f.readinto(view[at : at + size]) != size:
                    raise EmulationError(f"{contents}: truncated at {va:#x}")
    else:
        for va, data in contents:
            at = locate(va, len(data))
            view[at : at + len(data)] = data

    session = bochscpu.Session()
    stop = {}

    def on_missing_page(gpa):
        raise EmulationError(f"guest-physical page {gpa:#x} is not mapped")

    def on_exception(sess, cpu_id, vector, error_code):
        stop.update(vector=vector, error_code=error_code, rip=sess.cpu.rip, cr2=sess.cpu.cr2)
        sess.stop()

    hook = bochscpu.Hook()
    hook.exception = on_exception
    session.missing_page_handler = on_missing_page
    rsp = STACK_VA + STACK_SIZE - 64 - 8  # as after a `call`: rsp + 8 is 16-byte aligned
    for n, (function, arg) in enumerate(calls):
        struct.pack_into("<Q", memory, locate(rsp, 8), RETURN_VA)
        state = bochscpu.State()
        bochscpu.cpu.set_long_mode(state)
        state.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE
        state.xcr0, state.cr3, state.rflags = XCR0, PML4_PA, 0x2
        state.mxcsr, state.fpcw = 0x1F80, 0x37F  # the defaults a Linux thread starts with
        state.rip, state.rsp, state.rdi = function, rsp, arg
        state.cs = segment(0x33, 0x22FB)
        state.ds, state.es, state.ss, state.gs = (segment(0x2B, 0xCF3) for _ in range(4))
        state.fs = segment(0x2B, 0xCF3, fs_base)
        session.cpu.state = state
        stop.clear()
        session.run([hook])
        if stop.get("vector") == 14 and stop["rip"] == RETURN_VA:
            continue
        where = f"call {n} ({function:#x}({arg:#x}))"
        if not stop:
            raise EmulationError(f"{where} stopped without returning")
        vector, rip, cr2 = stop["vector"], stop["rip"], stop["cr2"]
        if vector == 14 and rip == cr2:
            hint = " (a system call? entries must make none)" if rip == 0 else ""
            raise EmulationError(f"{where} jumped to unmapped {rip:#x}{hint}")
        # Bochs reports rip as already advanced past the faulting instruction.
        raise EmulationError(
            f"{where} raised {EXCEPTIONS.get(vector, 'exception')} (vector {vector}, error code "
            f"{stop['error_code']:#x}) in the instruction just before rip {rip:#x}"
            + (f", accessing {cr2:#x}" if vector == 14 else "")
        )
    return [bytes(view[locate(va, size) : locate(va, size) + size]) for va, size in outputs]


def self_test():
    """VNNI on made-up memory: dpbusd of 64 bytes, checked against Python."""
    code_va, data_va = 0x1000_0000, 0x1001_0000
    # vmovdqu64 zmm1,[rdi]; vmovdqu64 zmm2,[rdi+64]; vpxord zmm0,zmm0,zmm0;
    # vpdpbusd zmm0,zmm1,zmm2; vmovdqu64 [rdi+128],zmm0; vzeroupper; ret
    code = bytes.fromhex(
        "62f1fe486f0f62f1fe486f570162f17d48efc062f2754850c262f1fe487f4702c5f877c3"
    )
    a = bytes(i * 7 % 256 for i in range(64))
    b = bytes(i * 13 % 256 for i in range(64))
    [out] = emulate(
        0, [(code_va, PAGE, False), (data_va, PAGE, True)], [(code_va, code), (data_va, a + b)],
        [(code_va, data_va)], [(data_va + 128, 64)],
    )
    got = struct.unpack("<16i", out)
    signed = struct.unpack("<64b", b)
    want = tuple(sum(a[4 * l + j] * signed[4 * l + j] for j in range(4)) for l in range(16))
    if got != want:
        raise EmulationError(f"self-test: vpdpbusd gave {got}, expected {want}")
    print("self-test passed: AVX-512 VNNI works")


def main(args):
    """Runs a spec (see the module doc) or the self-test."""
    if args == ["--self-test"]:
        return self_test()
    if len(args) != 3:
        raise EmulationError("usage: run SPEC.json DUMP OUT | run --self-test")
    spec_path, dump_path, out_path = args
    with open(spec_path) as f:
        spec = json.load(f)
    outputs = emulate(spec["fs_base"], spec["regions"], dump_path, spec["calls"], spec["outputs"])
    with open(out_path, "wb") as f:
        f.write(b"".join(outputs))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (EmulationError, OSError, KeyError, ValueError) as e:
        sys.exit(f"run_calls.py: {e}")
