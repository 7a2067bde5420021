"""The demo and what it is built from: generated tasks, the offline base models (SmolLM2-135M and its LLaVA build)
and tiny models built in code for examples and tests."""

from .run import DemoSettings, format_table, run_demo

__all__ = ["DemoSettings", "format_table", "run_demo"]
