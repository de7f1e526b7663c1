"""Role interfaces: defaults/main.yml and meta/argument_specs.yml say the same thing, and task
names in sub-task files carry their file's stem ("dump | Run pg_dump") so a job log shows
where a task lives.

For every role (found by globbing roles/*, so a new role is covered without editing this file):
  - the variables in defaults/main.yml are exactly the options of the `main` entry point of
    meta/argument_specs.yml, minus the documented inventory inputs (scanner_db_*), which
    come from the inventory and have no role default;
  - where both give a default, they are equal (compared as loaded YAML values);
  - every other entry point declares only options that exist in the defaults or main;
  - every task (including those nested in block/rescue/always) of roles/*/tasks/<stem>.yml,
    other than main.yml, is named "<stem> | ...".
"""
from __future__ import annotations

import pathlib

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
ROLES = sorted(p for p in (REPO / "roles").iterdir() if (p / "tasks").is_dir())
INVENTORY_INPUT_PREFIX = "scanner_db_"


def load(path: pathlib.Path):
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def defaults_of(role: pathlib.Path) -> dict:
    path = role / "defaults" / "main.yml"
    return (load(path) or {}) if path.exists() else {}


def specs_of(role: pathlib.Path) -> dict:
    path = role / "meta" / "argument_specs.yml"
    assert path.exists(), "%s has no meta/argument_specs.yml" % role.name
    data = load(path) or {}
    assert "argument_specs" in data, "%s: meta/argument_specs.yml has no argument_specs key" % role.name
    return data["argument_specs"]


def walk_tasks(tasks):
    for task in tasks or []:
        yield task
        for key in ("block", "rescue", "always"):
            if key in task:
                yield from walk_tasks(task[key])


def test_roles_found():
    names = {r.name for r in ROLES}
    assert {"preflight", "backup", "migrate", "verify", "report", "run_lock"} <= names, names


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_defaults_match_argument_spec(role):
    defaults = defaults_of(role)
    specs = specs_of(role)
    assert "main" in specs, "%s: argument_specs has no `main` entry point" % role.name
    options = specs["main"].get("options") or {}
    spec_keys = {k for k in options if not k.startswith(INVENTORY_INPUT_PREFIX)}
    only_defaults = sorted(set(defaults) - spec_keys)
    only_spec = sorted(spec_keys - set(defaults))
    assert not only_defaults and not only_spec, (
        "%s: defaults/main.yml and meta/argument_specs.yml (main) disagree. "
        "In defaults only: %s. In argument_specs only: %s." % (role.name, only_defaults, only_spec))
    mismatched = {k: {"argument_specs": options[k]["default"], "defaults": defaults[k]}
                  for k in sorted(spec_keys) if "default" in (options[k] or {})
                  and options[k]["default"] != defaults[k]}
    assert not mismatched, "%s: defaults differ between the two files: %s" % (role.name, mismatched)


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_inventory_inputs_are_not_role_defaults(role):
    # scanner_db_* come from the inventory (or AWX); a role default would silently mask a missing one.
    leaked = sorted(k for k in defaults_of(role) if k.startswith(INVENTORY_INPUT_PREFIX))
    assert not leaked, "%s/defaults/main.yml defines inventory inputs: %s" % (role.name, leaked)


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_other_entry_points_declare_known_options(role):
    defaults = defaults_of(role)
    specs = specs_of(role)
    main_opts = set((specs.get("main") or {}).get("options") or {})
    problems = {}
    for entry, spec in specs.items():
        opts = set((spec or {}).get("options") or {})
        unknown = sorted(o for o in opts - main_opts - set(defaults) if not o.startswith(INVENTORY_INPUT_PREFIX))
        if unknown:
            problems[entry] = unknown
        tasks_file = role / "tasks" / ("%s.yml" % entry)
        if entry != "main" and not tasks_file.exists():
            problems.setdefault(entry, []).append("no tasks/%s.yml for this entry point" % entry)
    assert not problems, "%s: %s" % (role.name, problems)


TASK_FILES = sorted(p for r in ROLES for p in (r / "tasks").glob("*.yml") if p.name != "main.yml")


@pytest.mark.parametrize("path", TASK_FILES, ids=[str(p.relative_to(REPO / "roles")) for p in TASK_FILES])
def test_task_names_carry_the_file_stem(path):
    stem = path.stem
    bad = []
    for task in walk_tasks(load(path)):
        name = task.get("name")
        if not isinstance(name, str) or not name.startswith(stem + " | "):
            bad.append(name or "<unnamed task: %s>" % sorted(k for k in task if k != "name")[:3])
    assert not bad, "%s: task names must start with %r: %s" % (path.relative_to(REPO), stem + " | ", bad)
