"""Offline by construction: medtune never opens a network connection at run time.

Hospitals run medtune next to patient data; a library that phones home (model hub look-ups,
telemetry) is a liability. We set the Hugging Face libraries' offline switches before they are
imported, and turn off their telemetry. A test runs the quick-start with sockets blocked.
"""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # medtune draws its own progress bars; transformers' per-shard "Loading weights" bars are noise.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def enforce_offline() -> None:
    """Put the Hugging Face stack in offline mode (idempotent; call before importing it)."""
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value
