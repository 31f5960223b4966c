"""Processes: the launcher's environment, the process group and its ordered exit, all-reduce
helpers, the stop signal, and `--num-gpus N` (N local workers running a worker function).

One code path serves 1 process, `--num-gpus N`, torchrun and a PyTorchJob pod: each worker
learns (rank, world size, local rank) from the environment and joins an env:// group when the
world size is above 1.
"""
import contextlib
import datetime
import os
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist

from utils import UserError

_GROUP = {}  # the store of this process's group; leave_group() waits on it
# Exit codes 128-255 are those a retry may fix: Kubeflow's restartPolicy ExitCode restarts the pods
# for them and fails the job at once for 1-127 (a bad config or bad data fails the same way again).
EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped by a signal in a k8s pod, resumable
EXIT_LOST_PEER = 200  # another rank died or stopped answering
EXIT_RUN_BUSY = 201   # another process holds the run folder (a restarted pod may meet its old self's lock)


def dist_env(local_rank_flag=None):
    """(rank, world_size, local_rank) from torchrun's / the PyTorchJob operator's variables.
    A PyTorchJob pod sets no LOCAL_RANK: one process per pod, so it is 0 (or --local-rank)."""
    def number(name, default):
        value = os.environ.get(name, default)
        try:
            return int(value)
        except ValueError:
            raise UserError(f"environment variable {name}={value!r} is not an integer; a launcher (torchrun, "
                            f"the PyTorchJob operator) sets it, unset it to run one process") from None
    rank, world = number("RANK", "0"), number("WORLD_SIZE", "1")
    local = number("LOCAL_RANK", "0") if "LOCAL_RANK" in os.environ or local_rank_flag is None else local_rank_flag
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank} and WORLD_SIZE={world} do not fit (need 0 <= RANK < WORLD_SIZE); a launcher "
                        f"sets both, unset them to run one process")
    if world > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise UserError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set; a launcher (torchrun, the "
                            f"PyTorchJob operator) sets them, or use --num-gpus N for local workers")
    return rank, world, local


def pick_backend(choice, device):
    if choice != "auto":
        return choice
    return "nccl" if device.type == "cuda" and sys.platform.startswith("linux") else "gloo"


def init_distributed(cfg, device, rank, world):
    if world == 1:
        return
    if device.type == "mps":
        raise UserError("MPS cannot run more than one process; use one process, or train.device=cpu with --num-gpus N")
    if sys.platform == "win32":
        os.environ.setdefault("USE_LIBUV", "0")  # torch >= 2.4 defaults to libuv, which Windows builds lack
    backend = pick_backend(cfg.distributed.backend, device)
    if backend == "nccl" and device.type != "cuda":
        raise UserError("distributed.backend=nccl needs CUDA; use distributed.backend=gloo for CPU workers")
    if backend == "nccl":
        check_one_gpu_per_process()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=cfg.distributed.timeout_s)
    _GROUP["store"] = group_store(rank, world, timeout)
    bound = {"device_id": device} if backend == "nccl" else {}  # NCCL's communicator on this rank's GPU, made now
    dist.init_process_group(backend, store=_GROUP["store"], rank=rank, world_size=world, timeout=timeout, **bound)


def check_one_gpu_per_process():
    """NCCL needs a GPU of its own for every process on a machine; with more processes than GPUs two
    ranks share one and NCCL fails later with "Duplicate GPU detected", which the other ranks see as a
    lost peer. Raises UserError before the group starts."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    gpus = torch.cuda.device_count()
    if max(local_world, local_rank + 1) > gpus:
        raise UserError(f"{max(local_world, local_rank + 1)} processes on this machine but {gpus} CUDA GPU(s) "
                        f"visible, and NCCL needs one GPU per process; start at most {gpus} (torchrun "
                        f"--nproc_per_node {gpus}, --num-gpus {gpus}), or add train.device=cpu for CPU workers on gloo")


def group_store(rank, world, timeout):
    """The env:// store (MASTER_ADDR/MASTER_PORT; rank 0 hosts it unless torchrun's agent does).
    torchrun keeps one store for all restarts (torch 2.14; pytorch/pytorch#135712): a restarted
    group would read the dead workers' addresses and fail or hang in its first connect. A prefix
    per restart keeps each attempt's keys apart."""
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return dist.PrefixStore(f"restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    return store


def leave_group(rank, world, timeout_s):
    """After a normal end, leave in order. gloo resets a peer's connection when a process exits with
    messages unread, and that fails a peer still inside the last collective ("Connection reset by
    peer" at the end of a finished run). So each rank waits on the store until every rank is past
    its last collective, and rank 0, which may host the store, leaves last."""
    if world == 1 or "store" not in _GROUP:
        return
    store = dist.PrefixStore("leave", _GROUP["store"])
    deadline = time.monotonic() + timeout_s

    def wait_for(key, count):
        while store.add(key, 0) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s} s waiting for the other ranks to finish")
            time.sleep(0.01)
    store.add("done", 1)
    wait_for("done", world)
    if rank == 0:
        wait_for("left", world - 1)
    else:
        with contextlib.suppress(Exception):  # rank 0 may already be gone with the store: all is done
            store.add("left", 1)


def close_group():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _GROUP.clear()


LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "timed out",
             "Watchdog caught collective operation timeout", "unhandled system error", "remote process exited",
             "NCCL communicator was aborted")
# NCCL errors of this rank's own making (its GPU, its set-up): the cause itself, never another rank's
OWN_FAULT = ("Duplicate GPU detected", "invalid usage", "unhandled cuda error", "out of memory")


def lost_peer(e, world):
    """A collective that failed because another rank died or hung: not a bug of this rank."""
    text = str(e)
    if world == 1 or any(m in text for m in OWN_FAULT):
        return False
    return isinstance(e, getattr(dist, "DistError", ())) or any(m in text for m in LOST_PEER)


def from_rank0(value, world):
    """Rank 0's `value` (any picklable object) on every rank."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_(tensor, world):
    if world > 1:
        dist.all_reduce(tensor)
    return tensor


def cpu_threads(device, threads):
    """train.threads, or by default: N workers on one machine's CPU share its cores instead of each
    taking all of them."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # unset in a PyTorchJob pod: one process per pod
    if threads:
        torch.set_num_threads(threads)
    elif device.type == "cpu" and local_world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop stops at the next step boundary that all ranks agree on,
    saves a resumable checkpoint and exits. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self):
        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, handler)

    def uninstall(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def agreed(self, device, world):
        if world == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ----------------------------------------------------------------------------------- --num-gpus N

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_local_launch(n, device, device_choice):
    """--num-gpus N against what this machine has; raises UserError before any worker starts."""
    if n < 0:
        raise UserError(f"--num-gpus {n} must be >= 1")
    if device.type == "cuda" and torch.cuda.device_count() < n:
        raise UserError(f"--num-gpus {n} but only {torch.cuda.device_count()} CUDA GPU(s) are visible; use "
                        f"--num-gpus {torch.cuda.device_count()}, or add train.device=cpu for {n} CPU workers on gloo")
    if device.type == "mps" and n > 1:
        raise UserError("MPS cannot run more than one process; drop --num-gpus, or add train.device=cpu")
    if device.type == "cpu" and device_choice != "cpu":
        raise UserError(f"--num-gpus {n} but no GPU is visible; add train.device=cpu to run {n} CPU workers on gloo")


def _spawned(local_rank, worker, world, port, args):
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    code = worker(args, local_rank, world, local_rank)
    if code:
        sys.exit(code)


def launch_local(worker, args, n, port=0):
    """Run worker(args, rank, world, local_rank) in n spawned processes on 127.0.0.1 and wait for
    them; a SIGTERM/SIGINT to the launcher reaches every worker. Returns the exit code."""
    import torch.multiprocessing as mp

    procs = mp.start_processes(_spawned, args=(worker, n, port or free_port(), args), nprocs=n, join=False,
                               start_method="spawn")

    def forward(signum, frame):
        for p in procs.processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not procs.join():
            pass
    except mp.ProcessExitedException as e:
        print(f"error: worker {e.error_index} exited with code {e.exit_code}; the other workers were stopped",
              file=sys.stderr)
        return e.exit_code if e.exit_code and e.exit_code > 0 else 1
    except mp.ProcessRaisedException as e:
        print(f"error: a worker failed; the other workers were stopped:\n{e}", file=sys.stderr)
        return 1
    finally:  # the launcher may run in-process (tests): give Ctrl-C back
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
