"""Reads an Autobahn|Testsuite report (index.json of `wstest -m fuzzingclient`)
and exits non-zero when a case failed.

A case fails when its `behavior` is FAILED, or its `behaviorClose` is FAILED or
UNCLEAN. OK, NON-STRICT, INFORMATIONAL and UNIMPLEMENTED pass (the last one is
what compression cases report for a server without permessage-deflate; they are
not run here anyway). For every failed case the reason from its own report file
is printed: what the suite expected and what it observed.

    python3 check_report.py target/autobahn/index.json

Works on Python 2.7 and 3.
"""

from __future__ import print_function

import json
import os
import sys


def case_key(case_id):
    return [int(p) if p.isdigit() else p for p in case_id.split(".")]


def short(value, limit=300):
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "..."


def main(path):
    with open(path) as f:
        index = json.load(f)
    outdir = os.path.dirname(os.path.abspath(path))
    passed, failed, counts = 0, [], {}
    for agent in sorted(index):
        for case_id in sorted(index[agent], key=case_key):
            entry = index[agent][case_id]
            behavior = entry.get("behavior")
            close = entry.get("behaviorClose")
            counts[behavior] = counts.get(behavior, 0) + 1
            if behavior == "FAILED" or close in ("FAILED", "UNCLEAN"):
                failed.append((agent, case_id, entry))
            else:
                passed += 1
    for agent, case_id, entry in failed:
        print("FAILED %s %s: behavior=%s behaviorClose=%s remoteCloseCode=%s"
              % (agent, case_id, entry.get("behavior"), entry.get("behaviorClose"),
                 entry.get("remoteCloseCode")))
        report_file = os.path.join(outdir, entry.get("reportfile", ""))
        try:
            with open(report_file) as f:
                report = json.load(f)
        except (IOError, OSError, ValueError):
            continue
        print("    description: %s" % report.get("description", "").strip())
        print("    expected:    %s" % short(report.get("expected")))
        print("    observed:    %s" % short(report.get("received")))
        print("    result:      %s" % report.get("result"))
        print("    close:       %s (local %s/%s, remote %s/%s, wasClean=%s, droppedByMe=%s)"
              % (report.get("resultClose"), report.get("localCloseCode"),
                 report.get("localCloseReason"), report.get("remoteCloseCode"),
                 report.get("remoteCloseReason"), report.get("wasClean"),
                 report.get("droppedByMe")))
        print("    report:      %s" % report_file)
    total = passed + len(failed)
    print("autobahn: behaviors " + ", ".join(
        "%s=%d" % (k, counts[k]) for k in sorted(counts, key=str)))
    if total == 0:
        print("autobahn: the report has no cases")
        return 1
    print("autobahn: %d passed, %d failed" % (passed, len(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: check_report.py INDEX_JSON", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
