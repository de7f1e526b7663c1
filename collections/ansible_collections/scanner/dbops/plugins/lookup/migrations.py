# -*- coding: utf-8 -*-
"""Lookup: the ordered migrations of a phase, read from files/sql on the controller."""
from __future__ import annotations

DOCUMENTATION = r"""
name: migrations
short_description: Read a phase's migration files (files/sql/NNN_MM_*.sql) and their rollbacks
description:
  - Returns one list of dicts (version, name, path, sql, rollback_sql) for the
    files C(<sql_dir>/<phase>_*.sql), ordered by file name; C(rollback_sql) comes from
    C(<sql_dir>/rollback/<same file name>) when it exists.
options:
  _terms: {description: phase prefix(es), e.g. "001", required: true}
  sql_dir: {description: folder with the migration files, type: str, required: true}
"""

import os
import re

from ansible.errors import AnsibleError
from ansible.plugins.lookup import LookupBase

_NAME = re.compile(r"^(?P<version>\d{3}_\d{2})_(?P<name>[a-z0-9_]+)\.sql$")


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        self.set_options(var_options=variables, direct=kwargs)
        sql_dir = self.get_option("sql_dir")
        if not os.path.isdir(sql_dir):
            raise AnsibleError("migration folder not found: %s" % sql_dir)
        out = []
        for phase in terms:
            phase = str(phase)
            if not re.fullmatch(r"\d{3}", phase):
                raise AnsibleError("phase must be three digits like '001', got %r" % phase)
            names = sorted(f for f in os.listdir(sql_dir) if f.startswith(phase + "_") and f.endswith(".sql"))
            if not names:
                raise AnsibleError("no migration files %s/%s_*.sql" % (sql_dir, phase))
            for fname in names:
                m = _NAME.match(fname)
                if not m:
                    raise AnsibleError("bad migration file name %s (expected NNN_MM_lower_snake.sql)" % fname)
                path = os.path.join(sql_dir, fname)
                rb_path = os.path.join(sql_dir, "rollback", fname)
                with open(path, encoding="utf-8") as fh:
                    sql = fh.read()
                rollback = None
                if os.path.exists(rb_path):
                    with open(rb_path, encoding="utf-8") as fh:
                        rollback = fh.read()
                out.append(dict(version=m.group("version"), name=m.group("name"),
                                path="files/sql/" + fname, sql=sql, rollback_sql=rollback))
        return [out]
