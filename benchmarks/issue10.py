"""Issue 10's rows of one ``python -m fastasyncore bench --json FILE`` run,
with their targets and verdicts, as a markdown table; given several runs,
also each row's ratio in every run, their median, and in how many runs
the target was met.

    python benchmarks/issue10.py bench.json
    python benchmarks/issue10.py run1.json run2.json run3.json

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
from statistics import median

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


def measures(doc):
    """Issue 10's rows of one run: per row a dict of its texts (the table's
    cells) and numbers: ``c`` the compiled ratio (W4: requests/s, higher is
    better), ``p`` the pure ratio (CPU), ``ahead`` pure's CPU over
    compiled's, and ``ok(c, ahead)`` the compiled target's test."""
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
            want = "≤ %.1f×" % target + (", ≥ %.1f× pure" % ahead_min if ahead_min > 1 else "")

            def ok(cr, ahead, target=target, ahead_min=ahead_min):
                return cr <= target and (ahead >= ahead_min if ahead_min > 1 else ahead > 1)
            out.append(dict(row="%s (%s)" % (wid, mode),
                            unit="CPU µs/%s" % ("iteration" if wid == "spin" else "message"),
                            base=num(base), ct=ct, pt=pt, want=want, c=cr, p=pr,
                            ahead=p["cpu_per_unit"] / c["cpu_per_unit"], ok=ok))
    for wid, var in TCP:
        std = [cells[(wid, s, var)]["cpu_per_unit"] for s in STD if (wid, s, var) in cells]
        c = cells.get((wid, "fastasyncore-cffi", var))
        p = cells.get((wid, "fastasyncore-pure", var))
        if not std or c is None or p is None:
            continue
        base = min(std)
        ct, cr = cell_text(c, base)
        pt, pr = cell_text(p, base)
        out.append(dict(row=wid, unit="CPU s/100k req", base=num(base), ct=ct, pt=pt,
                        want="≤ 0.9×", c=cr, p=pr,
                        ahead=p["cpu_per_unit"] / c["cpu_per_unit"],
                        ok=lambda cr, ahead: cr <= 0.9 and ahead > 1))
    wid = "W4_client"
    std = [cells[(wid, s, "")] for s in STD if (wid, s, "") in cells]
    c = cells.get((wid, "fastasyncore-cffi", ""))
    p = cells.get((wid, "fastasyncore-pure", ""))
    if std and c is not None and p is not None:
        ref = max(std, key=lambda s: s["throughput"])
        ct, cr = cell_text(c, ref["throughput"], "req")
        pt, _ = cell_text(p, ref["throughput"], "req")
        pcpu = p["cpu_per_unit"] / ref["cpu_per_unit"]
        out.append(dict(row=wid, unit="req/s (CPU s/100k req)",
                        base="%s req/s (%s)" % (num(ref["throughput"]), num(ref["cpu_per_unit"])),
                        ct=ct + " req/s, CPU %.2f×" % (c["cpu_per_unit"] / ref["cpu_per_unit"]),
                        pt=pt + " req/s, CPU %.2f×" % pcpu, want="≥ 1.1× stdlib req/s",
                        c=cr, p=pcpu, ahead=p["cpu_per_unit"] / c["cpu_per_unit"],
                        ok=lambda cr, ahead: cr >= 1.1 and ahead > 1))
    return out


def rows(doc):
    """The table's rows of one run, as tuples of cell texts."""
    return [(m["row"], m["unit"], m["base"], m["ct"], m["pt"], "%.2f×" % m["ahead"],
             m["want"], verdict(m["ok"](m["c"], m["ahead"])), verdict(m["p"] <= PURE_MAX))
            for m in measures(doc)]


def run_text(m):
    """One run's compiled ratio; in bold where the target was missed, with
    the lead over pure where that is what missed."""
    if m["ok"](m["c"], m["ahead"]):
        return "%.2f×" % m["c"]
    if m["ok"](m["c"], float("inf")):
        return "**%.2f× (ahead %.3f×)**" % (m["c"], m["ahead"])
    return "**%.2f×**" % m["c"]


def runs_rows(docs):
    """Several runs side by side: per row each run's compiled and pure ratio
    and compiled-over-pure lead, their medians over the runs, the verdicts
    on those medians, and in how many runs each target was met.  Rows
    missing from a run are left out of its count (k of the runs that have
    the row)."""
    per = [{m["row"]: m for m in measures(d)} for d in docs]
    order = []
    for run in per:
        for r in run:
            if r not in order:
                order.append(r)
    out = []
    for r in order:
        ms = [run[r] for run in per if r in run]
        ok = ms[0]["ok"]
        cs = [m["c"] for m in ms]
        ps = [m["p"] for m in ms]
        ahs = [m["ahead"] for m in ms]
        runs_c = [run_text(m) for m in ms]
        runs_p = ["%.2f×" % x if x <= PURE_MAX else "**%.2f×**" % x for x in ps]
        out.append((r, ms[0]["want"], " / ".join(runs_c),
                    "%.2f×, ahead %.2f×" % (median(cs), median(ahs)),
                    verdict(ok(median(cs), median(ahs))),
                    "%d of %d" % (sum(1 for m in ms if m["ok"](m["c"], m["ahead"])), len(ms)),
                    " / ".join(runs_p), "%.2f×" % median(ps), verdict(median(ps) <= PURE_MAX),
                    "%d of %d" % (sum(1 for x in ps if x <= PURE_MAX), len(ms))))
    return out


def markdown(head, body):
    """A markdown table: the header cells, then one line per tuple of cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def runs_table(docs):
    return markdown(("row", "target (compiled)", "compiled × stdlib, each run",
                     "compiled: median of runs", "met on the median?", "met in runs",
                     "pure × stdlib, each run", "pure: median",
                     "pure ≤ 1.10× on the median?", "pure met in runs"), runs_rows(docs))


def table(doc):
    return markdown(("row", "unit", "stdlib (cheaper mode)",
                     "compiled: CPU (min–max), × stdlib (min–max)",
                     "pure: CPU (min–max), × stdlib (min–max)", "compiled ahead of pure",
                     "target (compiled; pure ≤ 1.10×)", "compiled met?", "pure met?"), rows(doc))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="bench --json files (several: also a summary)")
    args = p.parse_args(argv)
    docs = []
    for path in args.json:
        with open(path) as f:
            doc = json.load(f)
        if not rows(doc):
            raise SystemExit("%s: none of issue 10's rows (run bench with the busy rows, "
                             "W1_c100, W1_c1000, W4_client, chat_lines)" % path)
        docs.append((path, doc))
    for path, doc in docs:
        m = doc.get("meta", {})
        print("%s%s, %s, %s (%s), %s run(s) per cell\n" % (
            path + ": " if len(docs) > 1 else "",
            m.get("python", "?"), m.get("cpu", "?"), m.get("fastasyncore", "?"),
            m.get("commit", "?"), m.get("runs_per_cell", "?")))
        print(table(doc))
        print()
    if len(docs) > 1:
        print("%d runs: each row's ratio per run (misses in bold), the median of the "
              "runs, and the verdicts on the medians\n" % len(docs))
        print(runs_table([d for _, d in docs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
