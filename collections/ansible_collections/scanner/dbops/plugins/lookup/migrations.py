# -*- coding: utf-8 -*-
"""Lookup: the ordered SQL of a phase (versioned, preconditions, repeatable), read on the controller."""
from __future__ import annotations

DOCUMENTATION = r"""
name: migrations
short_description: Read a phase's SQL files (versioned, repeatable) and their rollbacks
description:
  - Returns one list of dicts (kind, version, name, path, sql, rollback_sql) for a phase, in the
    order they are applied.
  - C(kind=versioned) are C(<sql_dir>/<phase>_MM_name.sql), by file name. They hold state (schemas, tables,
    indexes, constraints, columns) and are applied once.
  - C(kind=precondition) is C(<sql_dir>/rollback/<phase>_preconditions.sql) when it exists. It runs
    before anything of the phase is rolled back (it refuses by raising). Its text is in C(rollback_sql).
  - C(kind=repeatable) are C(<sql_dir>/repeatable/<phase>/NN_name.sql), by file name. They hold code (functions,
    procedures, views) and are re-applied whenever the file changes. Their version is C(<phase>/NN_name).
  - C(rollback_sql) comes from the same file name under C(<sql_dir>/rollback/) (for repeatable files,
    C(<sql_dir>/rollback/repeatable/<phase>/)) when it exists.
options:
  _terms: {description: phase prefix(es), e.g. "001", required: true}
  sql_dir: {description: folder with the migration files, type: str, required: true}
"""

import os
import re

from ansible.errors import AnsibleError
from ansible.plugins.lookup import LookupBase

_VERSIONED = re.compile(r"^(?P<version>\d{3}_\d{2})_(?P<name>[a-z0-9_]+)\.sql$")
_REPEATABLE = re.compile(r"^(?P<order>\d{2})_(?P<name>[a-z0-9_]+)\.sql$")


def _read(path):
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return fh.read()


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
            out.extend(self._phase(sql_dir, phase))
        return [out]

    @staticmethod
    def _phase(sql_dir, phase):
        names = sorted(f for f in os.listdir(sql_dir) if f.startswith(phase + "_") and f.endswith(".sql"))
        if not names:
            raise AnsibleError("no migration files %s/%s_*.sql" % (sql_dir, phase))
        out = []
        for fname in names:
            m = _VERSIONED.match(fname)
            if not m:
                raise AnsibleError("bad migration file name %s (expected NNN_MM_lower_snake.sql)" % fname)
            out.append(dict(kind="versioned", version=m.group("version"), name=m.group("name"),
                            path="files/sql/" + fname, sql=_read(os.path.join(sql_dir, fname)),
                            rollback_sql=_read(os.path.join(sql_dir, "rollback", fname))))
        guard = _read(os.path.join(sql_dir, "rollback", phase + "_preconditions.sql"))
        if guard is not None:
            out.append(dict(kind="precondition", version=phase + "/preconditions", name="preconditions",
                            path="files/sql/rollback/%s_preconditions.sql" % phase, sql="", rollback_sql=guard))
        rep_dir = os.path.join(sql_dir, "repeatable", phase)
        for fname in sorted(os.listdir(rep_dir)) if os.path.isdir(rep_dir) else []:
            if not fname.endswith(".sql"):
                continue
            m = _REPEATABLE.match(fname)
            if not m:
                raise AnsibleError("bad repeatable file name %s/%s (expected NN_lower_snake.sql)" % (rep_dir, fname))
            out.append(dict(kind="repeatable", version="%s/%s" % (phase, fname[:-4]), name=m.group("name"),
                            path="files/sql/repeatable/%s/%s" % (phase, fname),
                            sql=_read(os.path.join(rep_dir, fname)),
                            rollback_sql=_read(os.path.join(sql_dir, "rollback", "repeatable", phase, fname))))
        return out
