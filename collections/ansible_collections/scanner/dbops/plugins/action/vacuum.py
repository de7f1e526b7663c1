# -*- coding: utf-8 -*-
"""scanner.dbops.vacuum with the run lock's fencing token (see plugin_utils/fenced.py)."""
from __future__ import annotations

from ansible_collections.scanner.dbops.plugins.plugin_utils.fenced import FencedAction


class ActionModule(FencedAction):
    MODULE = "scanner.dbops.vacuum"
