"""Leaf helpers any wing may use and that use no other wing: atomic writes, the Hub, the cache root."""

from .atomic import staged_path, write_json_atomic
from .cache import cache_root
from .hub import fetch_file, push_folder_to_hub, resolve_expert_folder

__all__ = ["cache_root", "fetch_file", "push_folder_to_hub", "resolve_expert_folder", "staged_path",
           "write_json_atomic"]
