"""``python -m triton_losses`` / ``triton-losses``: ``bench`` (benchmarks) and ``check`` (self-check)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from triton_losses.bench.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
