"""Prints the table of bench/race.sh from its runs.jsonl: aligned text, then Markdown.

One row per (upstream, method). Errors are what the client saw: non-2xx responses plus
requests without a complete response. Race lines are the log lines of a lost race
(EOF, reset or broken pipe on an upstream connection); for nginx and for kaguard they count
both re-sent requests and failed ones.
"""

import json
import sys

UPSTREAMS = {
    "a": "a: idle close 500 ms",
    "b": "b: node (idle 5 s, hint)",
    "c": "c: silent close after 100",
}

HEADER = [
    "upstream",
    "method",
    "requests",
    "kaguard errors",
    "nginx errors",
    "race lines, nginx log",
    "race lines, kaguard log",
    "req/upstream conn, kaguard",
    "req/upstream conn, nginx",
]


def errors(race):
    """Total errors, and what they were when there are any."""
    statuses = race["statuses"]
    transport = race["transport_errors"]
    total = sum(statuses.values()) + transport
    if total == 0:
        return "0"
    parts = [f"{n} x {code}" for code, n in sorted(statuses.items())]
    if transport:
        kinds = ", ".join(
            f"{n} {kind}" for kind, n in race["transport_error_kinds"].items() if n
        )
        parts.append(f"{transport} transport ({kinds})")
    return f"{total} ({'; '.join(parts)})"


def per_connection(run):
    conns, reqs = run["upstream_connections"], run["upstream_requests"]
    if not conns or reqs is None:
        return "-"
    return f"{reqs / conns:.1f}"


def rows(runs):
    by_key = {}
    for run in runs:
        by_key.setdefault((run["case"], run["method"]), {})[run["proxy"]] = run
    for (case, method), pair in sorted(by_key.items()):
        kg, ng = pair.get("kaguard"), pair.get("nginx")
        counts = {r["race"]["requests"] for r in (kg, ng) if r}
        requests = " / ".join(
            str(r["race"]["requests"]) if r else "-" for r in (kg, ng)
        )
        yield [
            UPSTREAMS.get(case, case),
            method.upper(),
            str(counts.pop()) if len(counts) == 1 else requests,
            errors(kg["race"]) if kg else "-",
            errors(ng["race"]) if ng else "-",
            str(ng["log"]["race_lines"]) if ng else "-",
            str(kg["log"]["race_lines"]) if kg else "-",
            per_connection(kg) if kg else "-",
            per_connection(ng) if ng else "-",
        ]


def main():
    with open(sys.argv[1]) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    table = list(rows(runs))

    widths = [max(len(row[i]) for row in [HEADER, *table]) for i in range(len(HEADER))]
    for row in [HEADER, *table]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())

    print()
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "|".join("---" for _ in HEADER) + "|")
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
