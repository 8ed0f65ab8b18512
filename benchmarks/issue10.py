"""Issue 10's rows of one ``python -m fastasyncore bench --json FILE`` run,
with their targets and verdicts, as a markdown table.

    python benchmarks/issue10.py bench.json

The rows: the in-process busy maps (spin, pp_docs_1, pp_docs_100,
pp_dws_1, pp_dws_100) in both loop modes, the TCP servers W1_c100,
W1_c1000 and chat_lines, and the W4 client.  "compiled" is the cffi
backend (its C loop), "pure" the pure backend.  Each ratio is taken
against the cheaper stdlib mode of the same run (CPU per unit; for W4
requests/s against the stdlib mode with more), its range is the cell's
min and max over that same stdlib median.  Targets (issue 10): compiled
spin <= 0.5x, the one-socketpair ping-pongs <= 0.8x, the 100-socketpair
ones, W1 and chat_lines <= 0.9x, W4 >= 1.1x stdlib's requests/s; pure
<= 1.10x stdlib's CPU on every row; compiled ahead of pure by >= 1.3x on
spin and the one-socketpair rows, ahead on every other row.
"""

import argparse
import json
import sys

BUSY = [("spin", 0.5, 1.3), ("pp_docs_1", 0.8, 1.3), ("pp_docs_100", 0.9, 1.0),
        ("pp_dws_1", 0.8, 1.3), ("pp_dws_100", 0.9, 1.0)]
TCP = [("W1_c100", ""), ("W1_c1000", ""), ("chat_lines", "chat")]
PURE_MAX = 1.10
STD = ("asyncore-select", "asyncore-poll")


def num(v):
    if v is None:
        return "–"
    if v >= 1000:
        return "%.1fk" % (v / 1000)
    if v >= 100:
        return "%.0f" % v
    if v >= 10:
        return "%.1f" % v
    return "%.3g" % v


def cell_text(c, base, per="cpu"):
    """'median (min–max), **ratio×** (min–max)' against base (a number)."""
    if per == "cpu":
        v, lo, hi = c["cpu_per_unit"], c["cpu_min"], c["cpu_max"]
    else:
        v, lo, hi = c["throughput"], c["throughput_min"], c["throughput_max"]
    return "%s (%s–%s), **%.2f×** (%.2f–%.2f)" % (num(v), num(lo), num(hi), v / base,
                                                   lo / base, hi / base), v / base


def verdict(ok):
    return "met" if ok else "**missed**"


def rows(doc):
    busy = {(b["workload"], b["impl"]): b for b in doc.get("busy", []) if "cpu_per_unit" in b}
    cells = {(c["workload"], c["impl"], c.get("variant", "")): c
             for c in doc.get("cells", []) if c.get("cpu_per_unit") is not None}
    out = []
    for wid, target, ahead_min in BUSY:
        std = [busy[(wid, s)]["cpu_per_unit"] for s in STD if (wid, s) in busy]
        if not std:
            continue
        base = min(std)
        for mode, suffix in (("select", ""), ("poll", "-poll")):
            c = busy.get((wid, "fastasyncore-cffi" + suffix))
            p = busy.get((wid, "fastasyncore-pure" + suffix))
            if c is None or p is None:
                continue
            ct, cr = cell_text(c, base)
            pt, pr = cell_text(p, base)
            ahead = p["cpu_per_unit"] / c["cpu_per_unit"]
            want = "≤ %.1f×" % target + (", ≥ %.1f× pure" % ahead_min if ahead_min > 1 else "")
            ok = cr <= target and (ahead >= ahead_min if ahead_min > 1 else ahead > 1)
            out.append(("%s (%s)" % (wid, mode), "CPU µs/%s" % ("iteration" if wid == "spin"
                                                                else "message"),
                        num(base), ct, pt, "%.2f×" % ahead, want, verdict(ok),
                        verdict(pr <= PURE_MAX)))
    for wid, var in TCP:
        std = [cells[(wid, s, var)]["cpu_per_unit"] for s in STD if (wid, s, var) in cells]
        c = cells.get((wid, "fastasyncore-cffi", var))
        p = cells.get((wid, "fastasyncore-pure", var))
        if not std or c is None or p is None:
            continue
        base = min(std)
        ct, cr = cell_text(c, base)
        pt, pr = cell_text(p, base)
        ahead = p["cpu_per_unit"] / c["cpu_per_unit"]
        out.append((wid, "CPU s/100k req", num(base), ct, pt, "%.2f×" % ahead, "≤ 0.9×",
                    verdict(cr <= 0.9 and ahead > 1), verdict(pr <= PURE_MAX)))
    wid = "W4_client"
    std = [cells[(wid, s, "")] for s in STD if (wid, s, "") in cells]
    c = cells.get((wid, "fastasyncore-cffi", ""))
    p = cells.get((wid, "fastasyncore-pure", ""))
    if std and c is not None and p is not None:
        ref = max(std, key=lambda s: s["throughput"])
        ct, cr = cell_text(c, ref["throughput"], "req")
        pt, _ = cell_text(p, ref["throughput"], "req")
        pcpu = p["cpu_per_unit"] / ref["cpu_per_unit"]
        ahead = p["cpu_per_unit"] / c["cpu_per_unit"]
        out.append((wid, "req/s (CPU s/100k req)",
                    "%s req/s (%s)" % (num(ref["throughput"]), num(ref["cpu_per_unit"])),
                    ct + " req/s, CPU %.2f×" % (c["cpu_per_unit"] / ref["cpu_per_unit"]),
                    pt + " req/s, CPU %.2f×" % pcpu, "%.2f×" % ahead,
                    "≥ 1.1× stdlib req/s", verdict(cr >= 1.1 and ahead > 1),
                    verdict(pcpu <= PURE_MAX)))
    return out


def table(doc):
    head = ("| row | unit | stdlib (cheaper mode) | compiled: CPU (min–max), × stdlib "
            "(min–max) | pure: CPU (min–max), × stdlib (min–max) | compiled ahead of pure "
            "| target (compiled; pure ≤ 1.10×) | compiled met? | pure met? |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(doc)]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="a bench --json file")
    args = p.parse_args(argv)
    with open(args.json) as f:
        doc = json.load(f)
    body = rows(doc)
    if not body:
        raise SystemExit("%s: none of issue 10's rows (run bench with the busy rows, "
                         "W1_c100, W1_c1000, W4_client, chat_lines)" % args.json)
    m = doc.get("meta", {})
    print("%s, %s, %s (%s), %s run(s) per cell\n" % (
        m.get("python", "?"), m.get("cpu", "?"), m.get("fastasyncore", "?"),
        m.get("commit", "?"), m.get("runs_per_cell", "?")))
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
