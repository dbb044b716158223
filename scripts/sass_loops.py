"""The main loop of each tensor-core kernel in SASS, and the instructions one iteration issues.

Used by scripts/kernel_report.py (`--sass DIR`). Input: `cuobjdump -sass` of a cubin. Standard
library only. Run alone (`python3 scripts/sass_loops.py`) it checks itself on a small loop.

Why it matters: a streaming multiprocessor's four schedulers each issue at most one warp
instruction per clock, and a warp's tensor-core instruction (HMMA.16816, one mma.sync.m16n8k16)
keeps its partition's tensor core busy for a fixed number of clocks (4096 FLOP over the
partition's share of the card's FLOP per clock). An iteration of I instructions holding H HMMAs
can keep the tensor cores busy at most H × (clocks per HMMA) / I of the time, however many warps
are resident: every other instruction (address arithmetic, loads, the NF4 decode, softmax) takes
an issue slot an HMMA could have had.

The main loop is the loop (a backward branch and its target) with the most HMMAs; among loops with
as many, the innermost. An iteration is a path through the loop body from its first instruction
to the backward branch: forward branches are taken or not, inner loops' backward branches are not
taken (their body counted once), and branches out of the loop end the path (not an iteration).
Every instruction on the path counts, predicated or not (a predicated-off instruction still takes
its issue slot). Of the paths with the most HMMAs (the iterations that do the full tile of work:
not a skipped or empty tile), the shortest and the longest instruction counts are kept, and the
steady state: of those doing the most work, the shortest. Work is counted in order: global loads
(LDG, LDGSTS: the iterations that also fetch the next tile, and for NF4 its double-quantized
scales), then shared-memory reads and writes (LDS, LDSM, STS), then PRMT and MUFU (the NF4
decode's lookups, the softmax's exponentials); the shortest such path skips the edge work (a
partial K tile, a boundary mask, a zero-filled row, the adapter's phase). Branches that depend on
one another (a value tested twice) are not correlated, so a path may combine cases no iteration
does; the steady path is chosen to be the common one.

The steady iteration's MUFUs are counted too (ex2, the reciprocal): the special-function unit
returns 16 results per clock per SM on sm_80 to sm_90, 4 per partition, so a warp's MUFU holds it
for 8 clocks, and an iteration with U of them and H HMMAs reaches at most
H × (clocks per HMMA) / (8·U) of the tensor peak (scripts/kernel_report.py takes the lower of the
two bounds).
"""
import re

_FUNC = re.compile(r"Function : (\S+)")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"^(?:@(!?U?P\w+)\s+)?(BRA|CALL\.REL\.NOINC|EXIT|RET\.\S+|RET)\b[^;]*?(0x[0-9a-f]+)?$")


def parse(text):
    """{kernel: [(address, instruction text)]} from `cuobjdump -sass` output."""
    funcs, cur = {}, None
    for line in text.splitlines():
        if m := _FUNC.search(line):
            cur = funcs.setdefault(m[1], [])
        elif cur is not None and (m := _INSTR.search(line)):
            cur.append((int(m[1], 16), m[2].strip()))
    return funcs


def _control(text):
    """(kind, target, conditional) of a control-flow instruction, or None."""
    m = _BRANCH.match(text)
    if not m:
        return None
    pred, op, target = m[1], m[2], m[3]
    conditional = pred is not None and pred != "PT"
    if op == "BRA":
        return ("bra", int(target, 16) if target else None, conditional)
    return ("leave", None, conditional)  # EXIT, RET, CALL.REL.NOINC: not part of an iteration


def _op(text):
    return re.sub(r"^@!?U?P\w+\s+", "", text).split(" ", 1)[0].split(".", 1)[0]


def _is_hmma(text):
    return _op(text) == "HMMA"


_WORK = (("LDG", "LDGSTS"), ("LDS", "LDSM", "STS"), ("PRMT", "MUFU"))


def _work(text):
    """The instruction's place in the work count (a tuple, one entry per _WORK class), then
    whether it is a MUFU (counted apart for the SFU's bound; it breaks only ties of the rest)."""
    op = _op(text)
    return tuple(int(op in cls) for cls in _WORK) + (int(op == "MUFU"),)


def main_loop(ins):
    """(head, back) indices into `ins` of the kernel's main loop, or None without HMMA loops."""
    best = None
    for i, (addr, text) in enumerate(ins):
        c = _control(text)
        if not c or c[0] != "bra" or c[1] is None or c[1] > addr:
            continue
        head = next((j for j, (a, _) in enumerate(ins) if a == c[1]), None)
        if head is None:
            continue
        hmma = sum(_is_hmma(t) for _, t in ins[head:i + 1])
        if hmma == 0:
            continue
        key = (hmma, -(i - head))  # most HMMAs, then the innermost (shortest span)
        if best is None or key > best[0]:
            best = (key, head, i)
    return None if best is None else (best[1], best[2])


def iteration(ins, head, back):
    """{'hmma', 'steady', 'min', 'max'}: HMMAs of a full iteration, the instructions of the
    steady one and the fewest and most of any."""
    index = {a: j for j, (a, _) in enumerate(ins)}
    # paths[j] = {(HMMAs, work...): (fewest, most) instructions} over paths from head to just
    # before j.
    paths = [dict() for _ in range(back + 2)]
    paths[head] = {(0,) * (2 + len(_WORK)): (0, 0)}

    def merge(into, hmma, lo, hi):
        old = into.get(hmma)
        into[hmma] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

    done = {}
    for j in range(head, back + 1):
        here = paths[j]
        if not here:
            continue
        text = ins[j][1]
        add = (int(_is_hmma(text)),) + _work(text)
        after = {tuple(a + b for a, b in zip(k, add)): (lo + 1, hi + 1) for k, (lo, hi) in here.items()}
        c = _control(text)
        if j == back:
            done = after
            break
        falls = True
        if c:
            kind, target, conditional = c
            if kind == "leave":
                falls = conditional
            else:  # bra
                falls = conditional
                t = index.get(target) if target is not None else None
                if t is not None and j < t <= back:
                    for k, (lo, hi) in after.items():
                        merge(paths[t], k, lo, hi)
                # a backward target (an inner loop) or a target outside the loop: not followed
        if falls:
            for k, (lo, hi) in after.items():
                merge(paths[j + 1], k, lo, hi)
    if not done:
        return None
    hmma = max(k[0] for k in done)
    full = {k: v for k, v in done.items() if k[0] == hmma}
    most = max(full)  # the most work, then the fewest instructions
    return dict(hmma=hmma, steady=full[most][0], mufu=most[-1],
                min=min(lo for lo, _ in full.values()),
                max=max(hi for _, hi in full.values()))


def analyse(text):
    """{kernel: iteration figures} for every kernel of one arch's SASS that has an HMMA loop."""
    out = {}
    for name, ins in parse(text).items():
        loop = main_loop(ins)
        if loop is None:
            continue
        it = iteration(ins, *loop)
        if it is not None:
            out[name] = it
    return out


def _selftest():
    """A loop at 0x10..0x80 with an optional block holding a load (the steady iteration takes it),
    a path that skips an HMMA (not a full iteration), an inner loop at 0x30, an optional
    instruction at 0x80 and a branch out: full iterations issue 7-10, the steady one 9."""
    text = """
        Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32.BF16 R0, R2, R4, R0 ;
        /*0020*/              @P0 BRA 0x50 ;
        /*0030*/                   LDGSTS.E.BYPASS.128 [R1], [R2.64], P1 ;
        /*0040*/              @P3 BRA 0x30 ;
        /*0050*/              @P2 BRA 0x80 ;
        /*0060*/                   HMMA.16816.F32.BF16 R8, R2, R4, R8 ;
        /*0070*/              @P5 BRA 0x90 ;
        /*0080*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0090*/              @P4 BRA 0xb0 ;
        /*00a0*/              @P1 BRA 0x10 ;
        /*00b0*/                   EXIT ;
    """
    funcs = parse(text)
    assert list(funcs) == ["k"] and len(funcs["k"]) == 12, funcs
    ins = funcs["k"]
    assert main_loop(ins) == (1, 10), main_loop(ins)
    got = iteration(ins, 1, 10)
    assert got == dict(hmma=2, steady=9, mufu=0, min=7, max=10), got
    # A MUFU on an optional block: the steady iteration takes it (more work) and counts both.
    text = """
        Function : m
        /*0000*/                   HMMA.16816.F32.BF16 R0, R2, R4, R0 ;
        /*0010*/                   MUFU.EX2 R1, R1 ;
        /*0020*/              @P0 BRA 0x40 ;
        /*0030*/                   MUFU.RCP R2, R2 ;
        /*0040*/              @P1 BRA 0x0 ;
        /*0050*/                   EXIT ;
    """
    got = analyse(text)
    assert got == {"m": dict(hmma=1, steady=5, mufu=2, min=4, max=5)}, got
    print("sass_loops: self-test passed")


if __name__ == "__main__":
    _selftest()
