#!/usr/bin/env python3
"""Check the inputs of the AWX execution environment before building it.

    scripts/check_ee.py [--file execution-environment.yml] [--requirements requirements.txt]
                        [--min-pg-major 15]

Exit 0 when every rule holds, 1 with one line per problem otherwise:
  - execution-environment.yml is ansible-builder version 3 with a base image and python/system/galaxy
    files that exist;
  - the EE's Python requirements are exact pins equal to the runtime pins of requirements.txt
    (ansible-core, psycopg2-binary), and dependencies.ansible_core is the same ansible-core pin;
  - bindep installs a PostgreSQL client (postgresql-client-NN [platform:dpkg]: the base image is
    Debian, scripts/build_ee_base.sh) whose major version is at least --min-pg-major and at least
    the PG_CLIENT_MIN_MAJOR the build checks; an RPM line (postgresqlNN), if any, is held to the same;
  - every collection in the galaxy file has an exact version;
  - a build step runs `pg_dump --version` (the build fails on a wrong client, not the first backup).
"""
import argparse
import pathlib
import re
import sys

import yaml

RUNTIME = ("ansible-core", "psycopg2-binary")
PIN = re.compile(r"^([A-Za-z0-9_.\[\]-]+)==([A-Za-z0-9_.+-]+)$")
RPM_CLIENT = re.compile(r"^postgresql(\d+)$")
DEB_CLIENT = re.compile(r"^postgresql-client-(\d+)$")


def pins(path):
    """name -> version of the `name==version` lines; other non-comment lines are returned as bad."""
    found, bad = {}, []
    for raw in pathlib.Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = PIN.match(line)
        if m:
            found[m.group(1).lower()] = m.group(2)
        else:
            bad.append(line)
    return found, bad


def bindep_clients(path):
    """(platform, package, major) of the PostgreSQL client lines of a bindep file."""
    out = []
    for raw in pathlib.Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        pkg, _, selectors = line.partition(" ")
        for platform, rx in (("rpm", RPM_CLIENT), ("dpkg", DEB_CLIENT)):
            m = rx.match(pkg)
            if m and (f"platform:{platform}" in selectors or not selectors.strip()):
                out.append((platform, pkg, int(m.group(1))))
    return out


def check(ee_file, requirements, min_major):
    problems = []
    ee_file = pathlib.Path(ee_file)
    base = ee_file.parent
    try:
        ee = yaml.safe_load(ee_file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        return [f"{ee_file}: cannot read: {exc}"]
    if str(ee.get("version")) != "3":
        problems.append(f"{ee_file}: version must be 3 (ansible-builder v3), found {ee.get('version')!r}")
    if not (ee.get("images", {}).get("base_image", {}) or {}).get("name"):
        problems.append(f"{ee_file}: images.base_image.name is missing (the default of EE_BASE_IMAGE)")
    deps = ee.get("dependencies") or {}
    files = {}
    for key in ("python", "system", "galaxy"):
        ref = deps.get(key)
        if not isinstance(ref, str):
            problems.append(f"{ee_file}: dependencies.{key} must name a file")
            continue
        files[key] = base / ref
        if not files[key].is_file():
            problems.append(f"{ee_file}: dependencies.{key}: {files[key]} does not exist")
    if problems:
        return problems

    want, _ = pins(requirements)
    have, bad = pins(files["python"])
    for line in bad:
        problems.append(f"{files['python']}: not an exact pin: {line!r}")
    for name in RUNTIME:
        if name not in want:
            problems.append(f"{requirements}: no exact pin for {name}")
        elif have.get(name) != want[name]:
            problems.append(f"{files['python']}: {name}=={have.get(name)} but {requirements} pins {name}=={want[name]}")
    for name in sorted(set(have) - set(RUNTIME)):
        problems.append(f"{files['python']}: {name} is not a runtime dependency (test tools stay out of the EE)")
    core = ((deps.get("ansible_core") or {}).get("package_pip") or "").strip()
    if "ansible-core" in want and core != f"ansible-core=={want['ansible-core']}":
        problems.append(f"{ee_file}: dependencies.ansible_core.package_pip is {core!r}, "
                        f"expected 'ansible-core=={want['ansible-core']}'")

    steps = ee.get("additional_build_steps") or {}
    text = "\n".join(s if isinstance(s, str) else "\n".join(s) for s in steps.values())
    m = re.search(r"ARG PG_CLIENT_MIN_MAJOR=(\d+)", text)
    build_min = int(m.group(1)) if m else None
    if build_min is None:
        problems.append(f"{ee_file}: no `ARG PG_CLIENT_MIN_MAJOR=<major>` build step (the build's pg_dump check)")
    need = max(min_major, build_min or 0)
    clients = bindep_clients(files["system"])
    for platform, example, required in (("dpkg", f"postgresql-client-{need} [platform:dpkg]", True),
                                        ("rpm", f"postgresql{need} [platform:rpm]", False)):
        majors = [major for plat, _, major in clients if plat == platform]
        if not majors:
            if required:
                problems.append(f"{files['system']}: no PostgreSQL client for platform:{platform} "
                                f"(pg_dump must be >= {need}): add '{example}'")
        elif max(majors) < min_major:
            problems.append(f"{files['system']}: PostgreSQL client {max(majors)} for platform:{platform} is older "
                            f"than the server ({min_major}); pg_dump refuses a newer server: use '{example}'")
        elif build_min and max(majors) < build_min:
            problems.append(f"{files['system']}: PostgreSQL client {max(majors)} for platform:{platform} is older "
                            f"than PG_CLIENT_MIN_MAJOR={build_min} of {ee_file.name}: the build would fail; "
                            f"use '{example}'")

    try:
        galaxy = yaml.safe_load(files["galaxy"].read_text()) or {}
    except yaml.YAMLError as exc:
        galaxy = {}
        problems.append(f"{files['galaxy']}: {exc}")
    for coll in galaxy.get("collections") or []:
        if not isinstance(coll, dict) or not re.fullmatch(r"\d+\.\d+\.\d+", str(coll.get("version", ""))):
            problems.append(f"{files['galaxy']}: collection {coll!r} has no exact version")

    if "pg_dump --version" not in text:
        problems.append(f"{ee_file}: no additional_build_step runs `pg_dump --version`")
    return problems


def main(argv=None):
    repo = pathlib.Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--file", default=str(repo / "execution-environment.yml"))
    ap.add_argument("--requirements", default=str(repo / "requirements.txt"))
    ap.add_argument("--min-pg-major", type=int, default=15, help="the server's major version")
    args = ap.parse_args(argv)
    problems = check(args.file, args.requirements, args.min_pg_major)
    for p in problems:
        print(f"check_ee: {p}", file=sys.stderr)
    if not problems:
        print(f"check_ee: OK: {args.file}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
