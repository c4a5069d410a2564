"""`medtune train`: the loop a user reads top to bottom (`loop.py`) and the parts it is built from.

- `loop.py`       run_train: setup -> resume -> train -> save
- `data.py`       the token store's examples and which rows each optimiser step takes
- `optim.py`      the optimiser and the learning-rate schedule
- `metrics.py`    metrics.jsonl (and TensorBoard)
- `checkpoint.py` atomic, resumable checkpoints; owns trainer_state.json
- `distributed.py` process groups, FSDP2 sharding, agreeing on a stop signal

The loss lives in `medtune.loss`: evaluation's held-out NLL shares it.
"""

from medtune.train.checkpoint import check_fresh_start
from medtune.train.loop import run_train

__all__ = ["check_fresh_start", "run_train"]
