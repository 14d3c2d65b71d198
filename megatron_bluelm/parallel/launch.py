"""``bluelm-launch`` = torchrun, with a one-line failure summary instead of torchrun's own report.

    bluelm-launch --nproc-per-node 4 -m megatron_bluelm.stages.pretrain --config examples/pretrain_tiny.yaml

Arguments are torchrun's, unchanged (``torch.distributed.run``'s parser and launcher). Why: when a worker
fails, our stages print one line (rank 0) and exit 2, and torchrun then adds its ChildFailedError
report — a Python traceback plus a ~20-line box per failed rank — which buries that line. Here the
launcher's ChildFailedError is caught and summed up in one line naming the failed ranks and exit
codes; the exit status is the first failed rank's (2 for a configuration error). Plain torchrun keeps
working; only its report differs.
"""
from __future__ import annotations

import sys


def _summary(err) -> tuple[str, int]:
    failures = sorted(err.failures.items())
    ranks = ", ".join(f"rank {rank}: {_cause(f)}" for rank, f in failures)
    code = next((f.exitcode for _, f in failures if f.exitcode and f.exitcode > 0), 1)
    return f"bluelm-launch: {len(failures)} worker(s) failed ({ranks}); the workers' own error is above", code


def _cause(failure) -> str:
    if failure.exitcode is not None and failure.exitcode < 0:
        return f"signal {failure.signal_name()}"
    return f"exit code {failure.exitcode}"


def main(argv=None) -> int:
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The agent's per-failure log line ("failed (exitcode: 2) local_rank: 0 ...") says what the summary
    # says; its warnings and info (rendezvous, SIGTERM to the other workers) stay.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as err:
        line, code = _summary(err)
        print(line, file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
