"""Keep third-party warnings, log lines and progress bars out of the CLI's output unless `--debug`.

The CLI's output is the product's face: a user should read medtune's own messages, not a
transformers FutureWarning, bitsandbytes regretting that it could not fetch an optional kernel from
the hub (it never can: medtune is offline), or a tqdm bar from a library's inner loop. `--debug`
shows all of it, in every torchrun rank too (the choice travels in `MEDTUNE_DEBUG`).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

DEBUG_ENV = "MEDTUNE_DEBUG"
THIRD_PARTY_LOGGERS = (
    "accelerate",
    "bitsandbytes",
    "datasets",
    "huggingface_hub",
    "matplotlib",
    "peft",
    "torch",
    "transformers",
)


def is_debug() -> bool:
    return os.environ.get(DEBUG_ENV) == "1"


def configure_library_output(debug: bool) -> None:
    """Route medtune's log records to stderr; silence libraries unless debugging.

    Environment variables, not only in-process filters, so that torchrun ranks and other child
    processes (which re-enter `medtune.cli.main`) behave the same way before their first import.
    """
    if debug:
        os.environ[DEBUG_ENV] = "1"
    ours = logging.getLogger("medtune")
    if is_debug():
        logging.basicConfig(
            level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
        )
        ours.setLevel(logging.DEBUG)
        warnings.simplefilter("default")  # each warning once per place, whatever a parent set
        os.environ["PYTHONWARNINGS"] = "default"
        os.environ.pop("TQDM_DISABLE", None)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours.handlers = [handler]
    ours.setLevel(logging.WARNING)
    warnings.simplefilter("ignore")
    os.environ["PYTHONWARNINGS"] = "ignore"
    os.environ["TQDM_DISABLE"] = "1"  # libraries' own bars (GGUF conversion); medtune draws with rich
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
