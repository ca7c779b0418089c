"""`python -m verl.trainer.main algorithm=eopd [overrides]`: the command users were promised, without writing
into verl's installed package.

verl 0.9.1 ships no `verl.trainer.main`. `import verl` loads this plugin (its `verl.plugins` entry point)
before Python looks for the submodule, so the plugin appends `VerlTrainerMainFinder` to `sys.meta_path`: it
answers only for the name `verl.trainer.main`, and only after every earlier finder (verl's own files
included) has found nothing, so if a verl release ships its own `verl.trainer.main`, verl's wins. The module
it serves is `verl_eopd/cli.py`: the same run as `python -m verl_eopd.main`.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

ALIAS = "verl.trainer.main"


class VerlTrainerMainFinder:
    """A meta-path finder for `verl.trainer.main` alone, placed last."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        if fullname != ALIAS:
            return None
        source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cli.py")
        return importlib.util.spec_from_file_location(ALIAS, source,
                                                      loader=importlib.machinery.SourceFileLoader(ALIAS, source))


def install() -> None:
    """Append the finder to sys.meta_path (once)."""
    if not any(isinstance(f, VerlTrainerMainFinder) for f in sys.meta_path):
        sys.meta_path.append(VerlTrainerMainFinder())
