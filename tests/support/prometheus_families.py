#!/usr/bin/python3
"""Checks Prometheus text exposition (0.0.4) read from stdin and prints its families as JSON.

The text is parsed with prometheus_client's parser (python3-prometheus-client), which raises on malformed text.
Every family must have a non-empty # HELP and a # TYPE line. Output: {"<family>": {"type", "help", "samples":
[{"name", "labels", "value"}]}}; exit status 1 with the problems on stderr when a check fails.
"""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families


def main():
    text = sys.stdin.read()
    declared_help = set()
    declared_type = set()
    for line in text.splitlines():
        parts = line.split(None, 3)
        if len(parts) >= 3 and parts[0] == "#" and parts[1] == "HELP":
            declared_help.add(parts[2])
        if len(parts) >= 4 and parts[0] == "#" and parts[1] == "TYPE":
            declared_type.add(parts[2])
    problems = []
    families = {}
    for family in text_string_to_metric_families(text):
        # The parser names a counter family without its _total suffix; the text declares it with the suffix.
        names = {family.name, family.name + "_total"}
        if not family.documentation or not names & declared_help:
            problems.append(f"{family.name}: no # HELP")
        if family.type == "unknown" or not names & declared_type:
            problems.append(f"{family.name}: no # TYPE")
        families[family.name] = {
            "type": family.type,
            "help": family.documentation,
            "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in family.samples],
        }
    if not families:
        problems.append("no metric families")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    json.dump(families, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
