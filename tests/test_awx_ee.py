"""AWX execution environment and configuration as code (execution-environment.yml, ee/, awx/).

No AWX and no network: `ansible-builder create` only writes the build context, and
awx/configure.yml renders its objects to JSON with -e awx_dry_run=true.
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
# Playbooks written in parallel with this test; once they exist they are checked like the others.
PENDING = {"phase3.yml", "rollback_phase3.yml", "site.yml", "validate.yml"}
# Playbooks that are not operator entry points (demo data for make demo only).
NOT_ENTRY_POINTS = {"demo_seed.yml"}


def _offline_env():
    env = dict(os.environ)
    # Any attempt to reach the network fails at once instead of hanging.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[var] = "http://127.0.0.1:9"
    env["PIP_NO_INDEX"] = "1"
    env["ANSIBLE_CONFIG"] = str(REPO / "ansible.cfg")
    return env


def _pins(path):
    out = {}
    for line in pathlib.Path(path).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


# ---------------------------------------------------------------- execution environment

def test_ee_inputs_pass_the_check_script():
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "check_ee.py")],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout


def test_ee_requirements_are_the_runtime_pins_of_requirements_txt():
    top, ee = _pins(REPO / "requirements.txt"), _pins(REPO / "ee" / "requirements.txt")
    assert set(ee) == {"ansible-core", "psycopg2-binary"}, ee
    for name, version in ee.items():
        assert top[name] == version, (name, version, top.get(name))
    assert "ansible-builder" in top, "ansible-builder must be pinned in requirements.txt"


def test_ansible_builder_create_works_offline(tmp_path):
    ctx = tmp_path / "context"
    res = subprocess.run(
        [str(VENV_BIN / "ansible-builder"), "create", "--file", str(REPO / "execution-environment.yml"),
         "--context", str(ctx)],
        cwd=tmp_path, env=_offline_env(), capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    containerfile = (ctx / "Containerfile").read_text()
    # base image is a build argument with a default: the local Debian image of scripts/build_ee_base.sh
    assert 'ARG EE_BASE_IMAGE="localhost/scanner-dbops-ee-base:current"' in containerfile
    assert "FROM $EE_BASE_IMAGE AS base" in containerfile
    # ansible-builder's scripts call apt through the base image's dnf-like front end; Python is its venv
    assert 'ARG PKGMGR="/usr/local/bin/ee-apt"' in containerfile
    assert 'ARG PYCMD="/opt/ee/bin/python3"' in containerfile
    # the three dependency steps: galaxy collections, pip (introspect + assemble), bindep
    assert "ansible-galaxy collection install" in containerfile and "-r requirements.yml" in containerfile
    assert "introspect.py introspect --user-pip=requirements.txt --user-bindep=bindep.txt" in containerfile
    assert "/output/scripts/assemble" in containerfile
    assert "/output/scripts/install-from-bindep" in containerfile
    # the pinned collections are in place before `ansible-galaxy collection install` (Galaxy never asked)
    copy = "COPY _build/collections/ /usr/share/ansible/collections/"
    assert copy in containerfile
    assert containerfile.index(copy) < containerfile.index("ansible-galaxy collection install")
    # ansible-core pinned exactly as in requirements.txt; the client version is checked at build time
    core = _pins(REPO / "requirements.txt")["ansible-core"]
    assert f'ANSIBLE_INSTALL_REFS="ansible-core=={core} ' in containerfile
    assert "pg_dump --version" in containerfile and "PG_CLIENT_MIN_MAJOR=17" in containerfile
    assert containerfile.index("pg_dump --version") > containerfile.index("install-from-bindep")
    # no unreachable repository; the RDS CA bundle only when asked for (build argument, empty default)
    assert "download.postgresql.org" not in containerfile and "pgdg" not in containerfile.lower()
    assert 'ARG RDS_CA_BUNDLE_URL=""' in containerfile
    # the pinned inputs made it into the build context unchanged
    build = ctx / "_build"
    assert _pins(build / "requirements.txt") == _pins(REPO / "ee" / "requirements.txt")
    bindep = (build / "bindep.txt").read_text()
    assert re.search(r"^postgresql-client-17 \[platform:dpkg\]$", bindep, re.M)
    for coll in ("community/postgresql", "containers/podman", "awx/awx", "scanner/dbops"):
        assert (build / "collections" / "ansible_collections" / coll / "plugins").is_dir(), coll
    galaxy = yaml.safe_load((build / "requirements.yml").read_text())
    assert galaxy == yaml.safe_load((REPO / "requirements.yml").read_text())
    versions = {c["name"]: c["version"] for c in galaxy["collections"]}
    assert versions["community.postgresql"] == "4.2.0" and versions["awx.awx"] == "24.6.1"


def _ee_copy(tmp_path):
    shutil.copy(REPO / "execution-environment.yml", tmp_path)
    shutil.copy(REPO / "requirements.yml", tmp_path)
    shutil.copytree(REPO / "ee", tmp_path / "ee")
    return tmp_path


@pytest.mark.parametrize("bindep, expect", [
    ("# no client at all\n", "no PostgreSQL client for platform:dpkg"),
    ("postgresql-17 [platform:dpkg]\n", "no PostgreSQL client for platform:dpkg"),
    ("postgresql-client-14 [platform:dpkg]\n", "client 14 for platform:dpkg is older"),
    ("postgresql-client-16 [platform:dpkg]\n", "older than PG_CLIENT_MIN_MAJOR=17"),
    ("postgresql-client-17 [platform:dpkg]\npostgresql13 [platform:rpm]\n", "client 13 for platform:rpm is older"),
])
def test_check_script_rejects_a_bindep_without_a_recent_client(tmp_path, bindep, expect):
    d = _ee_copy(tmp_path)
    (d / "ee" / "bindep.txt").write_text(bindep)
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "check_ee.py"), "--file",
                          str(d / "execution-environment.yml"), "--requirements", str(REPO / "requirements.txt")],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 1, res.stdout
    assert expect in res.stderr, res.stderr


def test_check_script_rejects_drifted_python_pins(tmp_path):
    d = _ee_copy(tmp_path)
    (d / "ee" / "requirements.txt").write_text("ansible-core==2.18.0\npsycopg2-binary==2.9.13\npytest==9.0.3\n")
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "check_ee.py"), "--file",
                          str(d / "execution-environment.yml"), "--requirements", str(REPO / "requirements.txt")],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 1
    assert "ansible-core==2.18.0 but" in res.stderr and "pytest is not a runtime dependency" in res.stderr


# ---------------------------------------------------------------- AWX configuration as code

@pytest.fixture(scope="module")
def awx_objects(tmp_path_factory):
    out = tmp_path_factory.mktemp("awx") / "objects.json"
    env = _offline_env()
    for var in ("CONTROLLER_HOST", "CONTROLLER_OAUTH_TOKEN", "SCANNER_DB_PASSWORD", "SCANNER_DBOPS_EE_IMAGE"):
        env.pop(var, None)
    res = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), str(REPO / "awx" / "configure.yml"),
         "-e", "awx_dry_run=true", "-e", f"awx_dry_run_file={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(out.read_text())


def test_configure_playbook_syntax():
    res = subprocess.run([str(VENV_BIN / "ansible-playbook"), "--syntax-check", str(REPO / "awx" / "configure.yml")],
                         cwd=REPO, env=_offline_env(), capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_operator_playbook_has_a_job_template(awx_objects):
    templated = {pathlib.PurePosixPath(jt["playbook"]).name for jt in awx_objects["job_templates"]}
    entry = {p.name for p in (REPO / "playbooks").glob("*.yml")} - NOT_ENTRY_POINTS
    assert entry - templated == set(), f"playbooks without an AWX job template: {sorted(entry - templated)}"
    assert {"phase1.yml", "phase2_prepare.yml", "phase2.yml", "phase3.yml", "site.yml", "validate.yml",
            "maintenance.yml", "finalize_phase2.yml", "rollback_phase1.yml", "rollback_phase2.yml",
            "rollback_phase3.yml"} <= templated


def test_every_job_template_points_at_an_existing_playbook(awx_objects):
    names = [jt["name"] for jt in awx_objects["job_templates"]]
    assert len(names) == len(set(names)), "job template names must be unique"
    missing = []
    for jt in awx_objects["job_templates"]:
        path = REPO / jt["playbook"]
        assert jt["playbook"].startswith("playbooks/"), jt
        if not path.is_file():
            missing.append(path.name)
    unexpected = sorted(set(missing) - PENDING)
    assert not unexpected, f"job templates point at missing playbooks: {unexpected}"
    if missing:
        pytest.skip(f"not written yet (other work in progress): {sorted(missing)}")


def test_job_templates_use_the_credential_ee_and_inventory(awx_objects):
    cred = awx_objects["credentials"][0]["name"]
    ee = awx_objects["execution_environments"][0]["name"]
    inv = awx_objects["inventories"][0]["name"]
    project = awx_objects["projects"][0]["name"]
    for jt in awx_objects["job_templates"]:
        assert jt["credentials"] == [cred] and jt["execution_environment"] == ee, jt["name"]
        assert jt["inventory"] == inv and jt["project"] == project, jt["name"]
        assert jt["allow_simultaneous"] is False, jt["name"]


def test_awx_objects_reference_the_image_make_ee_builds(awx_objects):
    """The EE object, the container group's pod and the project default all use the image `make ee`
    builds (same name and tag; only the registry differs: it is pushed there)."""
    res = subprocess.run([str(REPO / "scripts" / "build_ee.sh"), "--ref"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    built = res.stdout.strip()
    assert re.fullmatch(r"localhost/scanner-dbops-ee:\d+\.\d+\.\d+", built), built
    name_tag = built.split("/", 1)[1]
    (ee,) = awx_objects["execution_environments"]
    assert ee["image"].rsplit("/", 1)[1] == name_tag, (ee["image"], built)
    (group,) = awx_objects["instance_groups"]
    assert f"image: {ee['image']}" in group["pod_spec_override"]
    assert all(p["default_environment"] == ee["name"] for p in awx_objects["projects"])
    # make ee is the documented way to build it
    assert re.search(r"^ee:.*\n\tscripts/build_ee\.sh", (REPO / "Makefile").read_text(), re.M)
    assert f"SCANNER_DBOPS_EE_IMAGE=registry.example.com/ops/{name_tag}" in (REPO / "docs" / "AWX.md").read_text()


def _survey_question(jt, variable):
    for q in (jt.get("survey") or {}).get("spec", []):
        if q["variable"] == variable:
            return q
    return None


def test_finalize_requires_drop_in_a_survey(awx_objects):
    (jt,) = [j for j in awx_objects["job_templates"] if j["playbook"] == "playbooks/finalize_phase2.yml"]
    q = _survey_question(jt, "finalize_phase2_confirm")
    assert q is not None, jt
    assert q["required"] is True and q["type"] == "multiplechoice" and q["choices"] == ["DROP"]
    assert q["default"] in ("", None)
    # the playbook refuses without the same value (tests/test_phase2_playbook.py runs it)
    text = (REPO / "playbooks" / "finalize_phase2.yml").read_text()
    assert "preflight_confirm_var: finalize_phase2_confirm" in text and "preflight_confirm_word: DROP" in text


def test_rollbacks_require_a_confirmation(awx_objects):
    rollbacks = [j for j in awx_objects["job_templates"] if "/rollback_" in j["playbook"]]
    assert len(rollbacks) == 3
    for jt in rollbacks:
        q = _survey_question(jt, "rollback_confirm")
        assert q and q["required"] is True and q["choices"] == ["ROLLBACK"], jt["name"]
        # the playbook itself refuses without the same value (tests/test_playbooks.py runs it);
        # the rollbacks import their plays from playbooks/phases/rollback.yml
        path = REPO / jt["playbook"]
        text = path.read_text()
        text += "".join((path.parent / p).read_text() for p in re.findall(r"import_playbook: (\S+)", text))
        assert "preflight_confirm_var: rollback_confirm" in text and "preflight_confirm_word: ROLLBACK" in text
    plain = [j for j in awx_objects["job_templates"]
             if j["playbook"] in ("playbooks/phase1.yml", "playbooks/maintenance.yml")]
    assert all("survey" not in j for j in plain)


def test_maintenance_is_scheduled_daily(awx_objects):
    (jt,) = [j for j in awx_objects["job_templates"] if j["playbook"] == "playbooks/maintenance.yml"]
    (sched,) = [s for s in awx_objects["schedules"] if s["unified_job_template"] == jt["name"]]
    rrule = sched["rrule"]
    assert re.match(r"^DTSTART;TZID=UTC:\d{8}T\d{6} RRULE:", rrule), rrule
    rule = dict(kv.split("=", 1) for kv in rrule.split("RRULE:", 1)[1].split(";"))
    assert rule["FREQ"] == "DAILY" and rule.get("INTERVAL", "1") == "1", rule
    assert sched["enabled"] is True


def test_credential_type_injects_the_password_connection_yml_reads(awx_objects):
    (ct,) = awx_objects["credential_types"]
    assert ct["name"] == "Scanner PostgreSQL"
    (field,) = [f for f in ct["inputs"]["fields"] if f["id"] == "password"]
    assert field["secret"] is True and "password" in ct["inputs"]["required"]
    assert ct["injectors"] == {"extra_vars": {"scanner_db_password": "{{ password }}"}}
    connection = yaml.safe_load((REPO / "playbooks" / "vars" / "connection.yml").read_text())
    assert "scanner_db_password" in connection["scanner_db_login"]["login_password"]
    (cred,) = awx_objects["credentials"]
    assert cred["credential_type"] == ct["name"] and "inputs" not in cred
    # the AWX inventory never defines the password (the credential's extra var provides it)
    for inv in awx_objects["inventories"]:
        assert "scanner_db_password" not in json.dumps(inv)


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!unsafe", lambda loader, node: loader.construct_scalar(node))
_Loader.add_constructor("!vault", lambda loader, node: "<vault>")
SECRET_KEY = re.compile(r"pass(word)?|secret|token|pgpass", re.I)


def _secret_literals(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            here = f"{path}.{k}"
            if isinstance(v, str) and SECRET_KEY.search(str(k)) and v and "{{" not in v and v != "<vault>":
                yield here, v
            yield from _secret_literals(v, here)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _secret_literals(v, f"{path}[{i}]")


def test_no_password_literal_in_awx_folder(awx_objects):
    files = sorted((REPO / "awx").rglob("*"))
    assert files
    found = []
    for f in files:
        if f.suffix in (".yml", ".yaml"):
            found += [(f.name, p, v) for p, v in _secret_literals(yaml.load(f.read_text(), Loader=_Loader))]
    found += [("rendered", p, v) for p, v in _secret_literals(awx_objects)]
    # a key naming where the password comes from is not a password
    found = [x for x in found if not x[1].endswith(".password_env")]
    assert not found, found
    text = "\n".join(f.read_text() for f in files if f.is_file())
    for literal in ("molecule-scan-test-only", "example-vault-password", "PGPASSWORD="):
        assert literal not in text


# ---------------------------------------------------------------- fleet example inventory

def test_fleet_example_inventory_has_one_host_per_database_and_vaulted_passwords(tmp_path):
    vault_pw = tmp_path / "vault-pass"
    vault_pw.write_text("example-vault-password-change-me\n")
    env = _offline_env()
    res = subprocess.run(
        [str(VENV_BIN / "ansible"), "scanner_db", "-i", str(REPO / "inventory" / "fleet-example"),
         "--vault-password-file", str(vault_pw), "-m", "ansible.builtin.debug",
         "-a", "msg={{ [scanner_db_host, scanner_db_name, scanner_db_password | length > 0, report_dir] | to_json }}",
         "-o"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {}
    for line in res.stdout.splitlines():
        host, _, rest = line.partition(" | SUCCESS => ")
        rows[host.strip()] = json.loads(json.loads(rest)["msg"])
    assert set(rows) == {"scanner-east", "scanner-west", "scanner-eu"}, res.stdout
    assert len({r[0] for r in rows.values()}) == 3  # one endpoint per database
    assert all(r[2] for r in rows.values())          # every host has a (vaulted) password
    assert all(r[3].endswith("/reports/" + h) for h, r in rows.items())  # one report folder per host
    for f in (REPO / "inventory" / "fleet-example").rglob("*.yml"):
        text = f.read_text()
        assert "placeholder-" not in text, f  # the example passwords exist only encrypted
