# -*- coding: utf-8 -*-
"""Shared by the step and migrate action plugins: pass the run lock's fencing token to the module.

While this run holds the migration run lock (the fact run_lock_held, set by roles/run_lock acquire and
cleared by release), every scanner.dbops.step and scanner.dbops.migrate call gets run_lock_id =
run_lock_run_id, unless the task sets run_lock_id itself. The module then renews the lease before and
during the step and refuses to run once another run holds the lock."""
from __future__ import annotations

from ansible.module_utils.parsing.convert_bool import boolean
from ansible.plugins.action import ActionBase


class FencedAction(ActionBase):
    MODULE = ""

    def run(self, tmp=None, task_vars=None):
        task_vars = task_vars or {}
        result = super().run(tmp, task_vars)
        args = dict(self._task.args)
        if "run_lock_id" not in args:
            held = self._templar.template(task_vars.get("run_lock_held", False))
            run_id = self._templar.template(task_vars.get("run_lock_run_id", ""))
            if boolean(held, strict=False) and run_id:
                args["run_lock_id"] = str(run_id)
        result.update(self._execute_module(module_name=self.MODULE, module_args=args, task_vars=task_vars))
        return result
