"""Runs train.py with a fault injected into one rank, for tests/test_distributed.py:

    python tests/fault_driver.py raise|term|kill RANK CALL [train.py arguments]

On rank RANK, at the CALL-th training batch of the first attempt (not after a torchrun restart),
it raises an error, sends itself SIGTERM (a preemption) or SIGKILL (a dead worker).
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402  (after the path: the driver runs as a script from tests/)


def fault_driver(argv):
    action, target, at, rest = argv[0], int(argv[1]), int(argv[2]), argv[3:]
    real, calls = train.augment, [0]

    def augment(*a, **kw):
        calls[0] += 1
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if int(os.environ.get("RANK", "0")) == target and calls[0] == at and first_attempt:
            if action == "raise":
                raise RuntimeError("injected failure")
            os.kill(os.getpid(), signal.SIGTERM if action == "term" else signal.SIGKILL)
        return real(*a, **kw)
    train.augment = augment
    return train.main(rest)


if __name__ == "__main__":
    sys.exit(fault_driver(sys.argv[1:]))
