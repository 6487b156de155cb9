"""``python -m stepdistill <command> [flags]``; commands: ``evaluate``, ``bench``, ``throughput``, ``cache``,
``bench-data``."""

from __future__ import annotations

import sys

COMMANDS = {"evaluate": "stepdistill.evaluate", "bench": "stepdistill.bench",
            "throughput": "stepdistill.throughput", "cache": "stepdistill.precompute", "bench-data": "stepdistill.bench_data"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m stepdistill {{{','.join(COMMANDS)}}} [flags]  (add --help after a command)")
    import importlib

    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
