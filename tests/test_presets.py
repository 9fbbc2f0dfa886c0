"""The flagfile presets under configs/."""

from __future__ import annotations

import pathlib
import re

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def flag_names(path: pathlib.Path) -> set[str]:
    return set(re.findall(r"^--(\w+)=", path.read_text(), flags=re.MULTILINE))


def test_classic_overrides_every_quick_flag():
    # scripts/train.sh passes quick.flags first, so a later preset must set
    # every flag quick.flags sets, or quick's value leaks into it.
    missing = flag_names(CONFIGS / "quick.flags") - flag_names(CONFIGS / "classic.flags")

    assert not missing, f"classic.flags does not set {sorted(missing)}"
