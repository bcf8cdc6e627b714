#!/usr/bin/env python3
"""Lists a wasm module's imports and exports (with function signatures),
its sections and its memory limits. Standard library only.

    python3 plugins/allergy-check/tests/wasm_imports.py FILE.wasm
"""
import sys

VALTYPES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64"}
KINDS = {0: "func", 1: "table", 2: "memory", 3: "global"}
SECTIONS = {0: "custom", 1: "type", 2: "import", 3: "function", 4: "table", 5: "memory",
            6: "global", 7: "export", 8: "start", 9: "element", 10: "code", 11: "data",
            12: "datacount"}


def uleb(b, i):
    v = shift = 0
    while True:
        x = b[i]
        i += 1
        v |= (x & 0x7F) << shift
        shift += 7
        if x < 0x80:
            return v, i


def name(b, i):
    n, i = uleb(b, i)
    return b[i:i + n].decode(), i + n


def limits(b, i):
    flag, i = uleb(b, i)
    lo, i = uleb(b, i)
    hi = None
    if flag & 1:
        hi, i = uleb(b, i)
    return (lo, hi), i


def main(path):
    b = open(path, "rb").read()
    assert b[:8] == b"\0asm\1\0\0\0", "not a wasm 1.0 module"
    i = 8
    types, funcs, imports, exports = [], [], [], []
    while i < len(b):
        sid = b[i]
        size, j = uleb(b, i + 1)
        end = j + size
        label = SECTIONS.get(sid, str(sid))
        if sid == 0:
            label += " " + name(b, j)[0]
        print(f"section {label}: {size} bytes")
        if sid == 1:
            n, j = uleb(b, j)
            for _ in range(n):
                assert b[j] == 0x60
                j += 1
                np, j = uleb(b, j)
                ps = [VALTYPES[b[j + k]] for k in range(np)]
                j += np
                nr, j = uleb(b, j)
                rs = [VALTYPES[b[j + k]] for k in range(nr)]
                j += nr
                types.append((ps, rs))
        elif sid == 2:
            n, j = uleb(b, j)
            for _ in range(n):
                mod, j = name(b, j)
                nm, j = name(b, j)
                kind = b[j]
                j += 1
                if kind == 0:
                    t, j = uleb(b, j)
                    imports.append((mod, nm, "func", types[t]))
                    funcs.append(t)
                elif kind == 2:
                    lim, j = limits(b, j)
                    imports.append((mod, nm, "memory", lim))
                else:
                    imports.append((mod, nm, KINDS.get(kind, kind), None))
                    break
        elif sid == 3:
            n, j = uleb(b, j)
            for _ in range(n):
                t, j = uleb(b, j)
                funcs.append(t)
        elif sid == 5:
            n, j = uleb(b, j)
            for _ in range(n):
                lim, j = limits(b, j)
                print(f"  memory pages: min {lim[0]}, max {lim[1]}")
        elif sid == 7:
            n, j = uleb(b, j)
            for _ in range(n):
                nm, j = name(b, j)
                kind = b[j]
                idx, j = uleb(b, j + 1)
                sig = types[funcs[idx]] if kind == 0 else None
                exports.append((nm, KINDS.get(kind, kind), sig))
        i = end

    def fmt(sig):
        return f"({', '.join(sig[0])}) -> ({', '.join(sig[1])})" if sig else ""

    for mod, nm, kind, sig in imports:
        print(f"import {mod}::{nm} {kind} {fmt(sig) if kind == 'func' else sig}")
    for nm, kind, sig in exports:
        print(f"export {nm} {kind} {fmt(sig)}")


if __name__ == "__main__":
    main(sys.argv[1])
