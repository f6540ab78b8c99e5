"""Start N local ranks with torchrun when a command is asked for more than one process.

`llama-dist train CONFIG --nproc 2` and `llama-dist generate CKPT` (on an mp=2
checkpoint) re-run their own module under `torch.distributed.run --standalone`
(through quiet_torchrun, `python -m llama_dist.launcher`),
so a workstation user never has to type torchrun; under torchrun (WORLD_SIZE
set) or for one process nothing is relaunched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def torchrun_command(module: str, argv: list[str], nproc: int, max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "llama_dist.launcher", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "-m", module, *argv]


def quiet_torchrun(argv: list[str]) -> int:
    """torchrun (`torch.distributed.run`) without the tracebacks it ends with when it is signalled
    or a rank fails: some 30 lines after every Ctrl-C, preemption or expected mistake, where the
    ranks have already said what happened (a saved step, their own error or traceback) and the
    command's last line says the rest. One line says how torchrun ended instead; its exit code
    stays 1, as torchrun's."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except SignalException as err:
        print(f"torchrun: stopped its ranks on {signal.Signals(err.sigval).name}", file=sys.stderr, flush=True)
        return 1
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        print(f"torchrun: rank {rank} ended with {how} (its output is above)", file=sys.stderr, flush=True)
        return 1
    return 0


SHUTDOWN_TIMEOUT_S = 600  # how long torchrun lets its ranks finish a step and save after SIGTERM


def restart_environment(env: dict) -> dict:
    """What torchrun needs for its ranks to restart at all (--max-restarts): by default its
    ranks share the rendezvous store, where a restarted rank can read the addresses of the
    ranks it replaced and fail to connect (pytorch/pytorch#135712, #167288)."""
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return env


def relaunch(module: str, argv: list[str], nproc: int, max_restarts: int = 0) -> int:
    """Run `python -m module argv` on nproc local ranks; returns torchrun's exit code.

    SIGTERM, SIGUSR1, SIGINT and SIGHUP sent to this process reach the ranks as
    SIGTERM (torchrun forwards only that one), so `kill` of the launcher, Ctrl-C or a
    closed terminal means "save and stop" exactly as it does for a single process; a
    signal this process ignores (SIGHUP under nohup) stays ignored. torchrun runs in
    its own session for that: in ours, Ctrl-C would reach it too, and it would hand
    its ranks a SIGINT, which stops them without a save. Only the first signal is
    passed on: torchrun takes a second SIGTERM as "stop waiting" and would exit while
    the ranks still save. It waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds for them
    (default here 600 s, not its 30 s, which a large model's save outlasts; torch 2.13's
    torchrun reads the variable, an older one may not) before it kills them. OMP_NUM_THREADS
    defaults to cores / nproc so the ranks do not oversubscribe the CPU. With max_restarts,
    torchrun starts every rank again after one fails, and training resumes from its latest
    checkpoint, up to that many times.
    """
    env = restart_environment(dict(os.environ))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    child = subprocess.Popen(torchrun_command(module, argv, nproc, max_restarts), env=env, start_new_session=True)
    forwarded = []

    def forward(signum, _frame):
        if child.poll() is not None:
            return
        if forwarded:
            print(f"{signal.Signals(signum).name}: still waiting for the ranks to save "
                  f"(up to {env['TORCH_ELASTIC_SHUTDOWN_TIMEOUT']} s)", file=sys.stderr, flush=True)
            return
        forwarded.append(signum)
        child.send_signal(signal.SIGTERM)

    signals = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in signals if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        return child.wait()
    except BaseException:
        # this process is going away: stop torchrun as a signal would (its ranks, each in a
        # session of its own, would outlive a SIGKILL of torchrun)
        if not forwarded:
            child.terminate()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(quiet_torchrun(sys.argv[1:]))
