"""Run the workload's command line: `python tools/workload run|check ...` (this folder, by a relative
path from the repository root or an absolute one from anywhere), or `python -m tools.workload ...`
from the repository root. See cli.py."""
import sys

if __package__:                         # python -m tools.workload
    from .cli import main
else:                                   # python path/to/workload: sys.path[0] is this folder
    import importlib
    import os

    _here = os.path.dirname(os.path.abspath(__file__))
    # import the package under its folder's name (its modules are not top-level modules)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))
    main = importlib.import_module(os.path.basename(_here) + ".cli").main

sys.exit(main())
