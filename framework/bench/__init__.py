"""Every benchmark (`python launch/bench.py bench=<name>`): each module registers itself in `BENCHMARKS`.

Nothing in the framework imports this package; launch/bench.py and tests do. Each benchmark prints
ratios against a baseline measured in the same run and writes its figures with the machine they came from.
"""

from framework.bench import compress, data, evaluation, rl, rollout, serve, train, tune  # noqa: F401 - each registers its benchmark
from framework.bench.common import BENCH, BENCHMARKS  # noqa: F401
