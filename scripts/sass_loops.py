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
not a skipped or empty tile), the shortest and the longest instruction counts are kept.
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


def _is_hmma(text):
    return re.sub(r"^@!?U?P\w+\s+", "", text).startswith("HMMA")


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
    """{'hmma', 'min', 'max', 'body'}: HMMAs of a full iteration and the fewest and most
    instructions such an iteration issues; body = instructions in the loop's address range."""
    index = {a: j for j, (a, _) in enumerate(ins)}
    # paths[j] = {hmma count: (fewest, most) instructions} over paths from head to just before j.
    paths = [dict() for _ in range(back + 2)]
    paths[head] = {0: (0, 0)}

    def merge(into, hmma, lo, hi):
        old = into.get(hmma)
        into[hmma] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

    done = {}
    for j in range(head, back + 1):
        here = paths[j]
        if not here:
            continue
        text = ins[j][1]
        h = 1 if _is_hmma(text) else 0
        after = {k + h: (lo + 1, hi + 1) for k, (lo, hi) in here.items()}
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
    hmma = max(done)
    lo, hi = done[hmma]
    return dict(hmma=hmma, min=lo, max=hi, body=back - head + 1)


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
    """A loop at 0x10..0x70 with an optional two-instruction block and a path that skips an HMMA
    (not a full iteration), an inner loop at 0x30, and a branch out: full iterations issue 6-8."""
    text = """
        Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32.BF16 R0, R2, R4, R0 ;
        /*0020*/              @P0 BRA 0x50 ;
        /*0030*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0040*/              @P3 BRA 0x30 ;
        /*0050*/              @P2 BRA 0x70 ;
        /*0060*/                   HMMA.16816.F32.BF16 R8, R2, R4, R8 ;
        /*0070*/              @P4 BRA 0x90 ;
        /*0080*/              @P1 BRA 0x10 ;
        /*0090*/                   EXIT ;
    """
    funcs = parse(text)
    assert list(funcs) == ["k"] and len(funcs["k"]) == 10, funcs
    ins = funcs["k"]
    assert main_loop(ins) == (1, 8), main_loop(ins)
    got = iteration(ins, 1, 8)
    assert got == dict(hmma=2, min=6, max=8, body=8), got
    print("sass_loops: self-test passed")


if __name__ == "__main__":
    _selftest()
