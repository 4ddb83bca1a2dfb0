"""Where the shared services are, and the repository's own paths."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AMQP_URL = os.environ.get("AUTOPAUSE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DATABASE_URL = os.environ.get("AUTOPAUSE_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
# the one key the emulator of the ``emulator`` fixture accepts
E2B_KEY = "e2b_test_key_0123456789"
