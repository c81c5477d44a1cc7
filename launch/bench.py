"""Run a benchmark: `python launch/bench.py bench=serve [bench.requests=64 ...]`"""

from framework.bench import BENCH
from framework.bench.common import BenchRun
from framework.cli import entry


@entry(BENCH)
def main(bench: BenchRun) -> None:
    bench()


if __name__ == "__main__":
    main()
