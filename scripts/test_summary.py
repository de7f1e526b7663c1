#!/usr/bin/env python3
"""Print the closing line of `make test` from pytest's JUnit XML: 'tests: N passed, N failed, N skipped'.
(Lint and Molecule stop `make test` on failure before this runs, so reaching it means they passed.)"""
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
total = sum(int(s.get("tests", 0)) for s in suites)
failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print("lint: passed; molecule: passed")
print(f"tests: {total - failed - skipped} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed or total == 0 else 0)
