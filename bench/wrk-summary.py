#!/usr/bin/env python3
"""Turns wrk --latency output into rows, and rows into the side-by-side table with ratios.

  wrk-summary.py row WRK_OUTPUT NAME WORKERS CONNS SIZE ROUND USER_TICKS SYSTEM_TICKS CLK_TCK
                                                                          (one TSV row)
  wrk-summary.py table RESULTS_TSV                                        (the table)
"""
import re
import statistics
import sys


def ms(text):
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def row(path, name, workers, conns, size, rnd, user_ticks, system_ticks, clk_tck):
    text = open(path).read()
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: (.*)", text)
    if not (rps and total and p50 and p99):
        print(f"{name}\t{workers}\t{conns}\t{size}\t{rnd}\tnan\tnan\tnan\tnan\tnan\tbad-output", flush=True)
        return
    requests = int(total.group(1))
    per_100k = lambda ticks: (int(ticks) / int(clk_tck) / requests * 100_000
                              if requests else float("nan"))
    notes = []
    if errors:
        notes.append(f"non2xx={errors.group(1)}")
    if socket_errors:
        notes.append("socket:" + socket_errors.group(1).replace(" ", ""))
    print(
        f"{name}\t{workers}\t{conns}\t{size}\t{rnd}\t{float(rps.group(1)):.0f}\t{ms(p50.group(1)):.3f}"
        f"\t{ms(p99.group(1)):.3f}\t{per_100k(user_ticks):.3f}\t{per_100k(system_ticks):.3f}"
        f"\t{';'.join(notes) or '-'}"
    )


def table(path):
    runs = {}
    notes = {}
    for line in open(path):
        name, workers, conns, size, _rnd, rps, p50, p99, user, system, note = line.rstrip("\n").split("\t")
        key = (workers, conns, size)
        cpu = float(user) + float(system)
        runs.setdefault(key, {}).setdefault(name, []).append(
            (float(rps), float(p50), float(p99), cpu, float(user), float(system)))
        if note != "-":
            notes.setdefault((name,) + key, []).append(note)

    def med(values, i):
        return statistics.median(v[i] for v in values)

    header = ("| workers | conns | size | proxy | req/s | p50 ms | p99 ms | CPU s/100k req (user + system) "
              "| req/s vs nginx | vs HAProxy | p99 vs HAProxy |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for key in sorted(runs, key=lambda k: (int(k[0]), int(k[1]), k[2])):
        by = runs[key]
        for name in ["upstream", "kaguard", "nginx", "haproxy"]:
            if name not in by:
                continue
            rps, p50, p99, cpu, user, system = (med(by[name], i) for i in range(6))
            ratio = lambda other, i: (f"{(med(by[name], i) / med(by[other], i)):.2f}"
                                      if other in by and name == "kaguard" else "")
            print(f"| {key[0]} | {key[1]} | {key[2]} | {name} | {rps:.0f} | {p50:.2f} | {p99:.2f} "
                  f"| {cpu:.2f} ({user:.2f} + {system:.2f}) "
                  f"| {ratio('nginx', 0)} | {ratio('haproxy', 0)} | {ratio('haproxy', 2)} |")
    if notes:
        print()
        for key, ns in sorted(notes.items()):
            print(f"note {key}: {', '.join(ns)}")
    print()
    print("Medians over the rounds. The CPU total, its user part and its system part each have their own")
    print("median, so the parts need not add up to the total. Ratios are kaguard / peer (req/s: higher is")
    print("better; p99: lower is better).")


if __name__ == "__main__":
    if sys.argv[1] == "row":
        row(*sys.argv[2:])
    else:
        table(sys.argv[2])
