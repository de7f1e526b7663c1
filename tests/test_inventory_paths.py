"""Where the shipped inventories put backups and reports does not depend on which playbook file asks.

phase1.yml, phase3.yml and the rollbacks import playbooks/phases/*.yml, where playbook_dir is
playbooks/phases: an inventory path built from playbook_dir sent Phase 1's backups to
playbooks/backups (inside the repository, untracked) while Phase 2's went to backups/. Each shipped
inventory's report_dir (and the local one's backup_dir and password file) is evaluated here from
playbooks at two depths; both must give the same path, outside playbooks/. No database is needed.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PLAY = """- hosts: scanner_db
  gather_facts: false
  tasks:
    - ansible.builtin.copy:
        content: "{{ {'report_dir': report_dir, 'backup_dir': backup_dir} | to_json }}"
        dest: "%s/{{ inventory_hostname }}.json"
      delegate_to: localhost
"""


def evaluate(inventory: str, playbook: pathlib.Path) -> dict:
    out = playbook.parent / "out"
    out.mkdir(exist_ok=True)
    playbook.write_text(PLAY % out)
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "SCANNER_BACKUP_DIR": "/srv/scanner-backups",
           "PG_EMBED_DIR": str(playbook.parent)}
    (playbook.parent / "scan.password").write_text("x\n")
    # the shipped vault files are encrypted with the documented example password (README)
    vault_pw = playbook.parent / "vault-pass"
    vault_pw.write_text("example-vault-password-change-me\n")
    p = subprocess.run([str(REPO / ".venv/bin/ansible-playbook"), "-i", str(REPO / "inventory" / inventory),
                        "--vault-password-file", str(vault_pw), str(playbook)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    return {f.stem: json.loads(f.read_text()) for f in out.glob("*.json")}


@pytest.mark.parametrize("inventory", ["local", "prod", "staging", "fleet-example"])
def test_output_paths_do_not_depend_on_the_playbook_file(inventory, tmp_path):
    shallow = tmp_path / "a"
    deep = tmp_path / "b" / "phases"
    shallow.mkdir()
    deep.mkdir(parents=True)
    one = evaluate(inventory, shallow / "play.yml")
    two = evaluate(inventory, deep / "play.yml")
    assert one and one == two, (one, two)
    for host, paths in one.items():
        assert paths["report_dir"].startswith(str(REPO / "reports")), (host, paths)
        assert "/playbooks/" not in paths["backup_dir"] + paths["report_dir"], (host, paths)
        if inventory == "local":
            assert paths["backup_dir"] == str(REPO / "backups"), paths
        else:
            assert paths["backup_dir"] == "/srv/scanner-backups", paths
