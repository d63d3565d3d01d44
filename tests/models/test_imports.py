"""``kandinsky5.models`` depends on torch and einops only: importing it must not pull in the heavy
edge libraries (checked in a fresh interpreter, since this test process may have them loaded)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("transformers", "diffusers")


def test_models_import_loads_neither_transformers_nor_diffusers():
    script = (
        "import json, sys\n"
        "import kandinsky5.models\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing kandinsky5.models loaded {loaded}"
