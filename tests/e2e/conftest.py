from __future__ import annotations

import sys
from pathlib import Path

# gpu_health_stack is repository tooling, not part of the installed distribution.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
