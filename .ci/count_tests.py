#!/usr/bin/env python3
"""Counts test cases after `bazel test --test_summary=short`.

Each test target's result line comes from Bazel's summary; the cases inside it from its test.xml
(GoogleTest writes one testcase per TEST; an sh_test counts as one case). A target that failed to
build, timed out or left no XML counts as one failed case. Prints "N passed, N failed[, N skipped]".
Exits 1 when anything failed or nothing ran.
"""
import os
import re
import sys
import xml.etree.ElementTree as ET

log_path, testlogs = sys.argv[1], sys.argv[2]
result_re = re.compile(r"^(//\S+)\s+(?:\(cached\)\s+)?(PASSED|FAILED TO BUILD|FAILED|TIMEOUT|NO STATUS|FLAKY|INCOMPLETE|SKIPPED)\b")
targets = {}
for line in open(log_path, errors="replace"):
    m = result_re.match(line.strip())
    if m:
        targets[m.group(1)] = m.group(2)

passed = failed = skipped = 0
for target, status in sorted(targets.items()):
    pkg, name = target[2:].split(":")
    xml_path = os.path.join(testlogs, pkg, name, "test.xml")
    cases = None
    if status in ("PASSED", "FAILED", "FLAKY") and os.path.exists(xml_path):
        try:
            root = ET.parse(xml_path).getroot()
            cases = root.iter("testcase")
            p = f = s = 0
            for c in cases:
                if c.find("failure") is not None or c.find("error") is not None:
                    f += 1
                elif c.find("skipped") is not None or c.get("result") == "skipped" or c.get("status") == "notrun":
                    s += 1
                else:
                    p += 1
            if p + f + s == 0:
                f = 0 if status == "PASSED" else 1
                p = 1 if status == "PASSED" else 0
            if status != "PASSED" and f == 0:
                f = 1  # the target failed outside any test case (crash, exit code)
            cases = (p, f, s)
        except ET.ParseError:
            cases = None
    if cases is None:
        cases = (1, 0, 0) if status == "PASSED" else (0, 1, 0)
    passed += cases[0]
    failed += cases[1]
    skipped += cases[2]
    print(f"{target}: {status} ({cases[0]} passed, {cases[1]} failed, {cases[2]} skipped)")

if not targets:
    print("no test results found in the Bazel output")
    failed += 1
line = f"{passed} passed, {failed} failed"
if skipped:
    line += f", {skipped} skipped"
print(line)
sys.exit(1 if failed else 0)
