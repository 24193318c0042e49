"""What every host's evaluation shares: the CLI (methods by name, protocol presets), the run loop (run
settings, resume, sharding and merge, progress, ``--on-error skip``), accounting from the session's
records, and table writing. A host's driver supplies only its data, prompt, model call and metric."""
from .cli import add_method_args, apply_preset, describe, method_label, method_settings, methods_from_args, parse_kv
from .runner import Accounting, Benchmark, Job, JobOutput, KEY, Run, fmt, load_summaries, mean_of, write_table

__all__ = [
    "Accounting",
    "Benchmark",
    "Job",
    "JobOutput",
    "KEY",
    "Run",
    "add_method_args",
    "apply_preset",
    "describe",
    "fmt",
    "load_summaries",
    "mean_of",
    "method_label",
    "method_settings",
    "methods_from_args",
    "parse_kv",
    "write_table",
]
