"""GPU benchmark of NABLA attention vs cuDNN dense SDPA (issue 3). Same as ``nabla bench``.

    PYTHONPATH=src python benchmarks/bench_attention.py --variants --check --json benchmarks/results/attention_<card>.json
    PYTHONPATH=src python benchmarks/bench_attention.py --quick            # Wan 14B 720p at 10 % only
    python benchmarks/bench_attention.py --plot benchmarks/results/attention_<card>.json docs/img/speedup_vs_density.png
"""

from __future__ import annotations

import argparse
import sys

from nabla_attn import bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=bench.__doc__.splitlines()[0])
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
