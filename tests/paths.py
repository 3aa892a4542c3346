"""Where the tests find the project's shared material (``shared/`` beside the repository, or $JPEFT_SHARED)."""

import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_dir() -> pathlib.Path:
  for candidate in (os.environ.get("JPEFT_SHARED"), REPO.parent / "shared"):
    if candidate and pathlib.Path(candidate, "reference").is_dir():
      return pathlib.Path(candidate)
  raise FileNotFoundError(f"shared/ not found beside {REPO} (set JPEFT_SHARED to its path)")


LORA_EXPERIMENTS = shared_dir() / "reference" / "peft-method-comparison" / "experiments" / "lora"
GSM8K_TRAIN = shared_dir() / "data" / "gsm8k" / "train.jsonl"
