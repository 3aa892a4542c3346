"""PEFT methods. Each module registers its config (jpeft.config) and its Method (jpeft.core) on import."""

from jpeft.methods import lora  # noqa: F401
