"""One real decode, run by `edgellm doctor` in a child process: `python -m edgellm.smoke MODEL`.

EDGELLM_SMOKE_SIGNAL=SIGILL (or another signal name) makes the child die that way before decoding:
the fault a build for the wrong CPU causes, so the doctor's crash report can be tested for real.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from edgellm.runtime.engine import Engine, LoadOptions
from edgellm.runtime.sampling import SamplingParams


def main() -> int:
    fault = os.environ.get("EDGELLM_SMOKE_SIGNAL")
    if fault:
        signal.signal(getattr(signal, fault), signal.SIG_DFL)
        os.kill(os.getpid(), getattr(signal, fault))
    t0 = time.perf_counter()
    with Engine(sys.argv[1], LoadOptions(n_ctx=256)) as engine:
        tokens = engine.tokenize("The capital of France is")
        records = list(engine.generate(tokens, SamplingParams.greedy_params(), max_tokens=8,
                                       ignore_eog=True))
    stats = records[-1].stats
    print(f"{stats.generated_tokens} tokens decoded in {time.perf_counter() - t0:.1f} s "
          f"({stats.decode_tps:.0f} t/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
