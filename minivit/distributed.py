"""Data parallelism across processes, the way ChainerMN and PyTorch DDP do it.

    python examples/train_cifar.py --processes 2                 # the cores of one machine
    mpiexec -n 2 python examples/train_cifar.py                  # MPI: pip install -e ".[mpi]"

Every process (rank) holds the whole model.  Each global batch of B images is cut into
N disjoint shards, one per rank; each rank runs forward and backward on its shard only,
then one allreduce adds the ranks' gradients, in the flat buffer every parameter's
gradient already lives in (minivit.nn.ParameterBuffer), and every rank takes the same
optimiser step.  Why that is the gradient of the whole batch: with the loss the mean
over the batch, L = (1/B) sum_i l_i = sum_r (B_r / B) L_r, where L_r is the mean over
shard r of B_r images, so dL/dw = sum_r (B_r / B) dL_r/dw: each rank seeds its backward
with B_r / B and the allreduce sums.  (Equal shards make it the plain average.)

Ranks start identical (rank 0's parameters are broadcast) and stay identical: the
same summed gradient, the same update.  Only rank 0 writes files.  NumPy buffers go
straight to MPI; CuPy buffers are staged through the host (one read and one copy per
step).  A single process without MPI is world size 1 and needs none of this.

Without MPI, `start` runs the ranks of one machine itself (class Local): it starts
ranks 1..N-1 as new processes joined to rank 0 by pipes, and each collective is a star:
every rank sends its array to rank 0, which combines them in rank order and sends the
result back.  For a few processes and a model of a few MB, a pipe's copy costs little
next to a training step.
"""
import hashlib
import json
import multiprocessing
import operator
import os
import pickle
import sys
import time
import traceback

from minivit import backend

_LAUNCHERS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


class DistributedError(RuntimeError):
    """MPI is missing where it is needed, or the ranks disagree.  `everywhere` is True
    when every rank raises it at the same point (then no rank is left waiting, and the
    ranks can simply stop, each with its message)."""

    def __init__(self, message, everywhere=False):
        super().__init__(message)
        self.everywhere = everywhere


def _launched_size():
    """How many processes an MPI launcher says it started (1 when none did)."""
    for name in _LAUNCHERS:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


class World:
    """The processes of one run: `size` of them, this one is `rank`; `comm` is MPI's
    COMM_WORLD, or None for a single process."""

    def __init__(self, comm=None):
        self.comm = comm
        self.size = 1 if comm is None else comm.Get_size()
        self.rank = 0 if comm is None else comm.Get_rank()

    @property
    def local_rank(self):
        """This process's place among the ranks on its own machine, from a shared-memory
        split of the communicator (MPI's notion of a node): with CuPy, rank r of a machine
        takes GPU r % (its GPUs).  0 for a single process."""
        if self.comm is None:
            return 0
        from mpi4py import MPI
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            return node.Get_rank()
        finally:
            node.Free()

    @property
    def is_main(self):
        """Rank 0: the one that prints and writes files."""
        return self.rank == 0

    def shard(self, n):
        """(start, end) of this rank's part of n items: N near-equal contiguous parts."""
        return self.rank * n // self.size, (self.rank + 1) * n // self.size

    # --- collectives -----------------------------------------------------------------

    def broadcast_(self, array):
        """Overwrite `array` (NumPy or CuPy) with rank 0's values, in place."""
        if self.comm is None:
            return array
        host = backend.to_numpy(array).copy()
        self.comm.Bcast(host, root=0)
        array[...] = backend.asarray(host, device=backend.device_of(array))
        return array

    def sum_(self, array):
        """Replace `array` (NumPy or CuPy) by its sum over all ranks, in place: the
        gradient allreduce.  NumPy arrays are reduced where they lie; CuPy arrays are
        staged through the host."""
        if self.comm is None:
            return array
        from mpi4py import MPI
        if backend.device_of(array) == "cpu" and array.flags.c_contiguous:
            self.comm.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM)
            return array
        host = backend.to_numpy(array).copy()
        self.comm.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
        array[...] = backend.asarray(host, device=backend.device_of(array))
        return array

    def reduce_host(self, values, op="sum"):
        """A small host (NumPy) array reduced over the ranks ("sum" or "max"); a new array."""
        if self.comm is None:
            return values
        from mpi4py import MPI
        out = values.copy()
        self.comm.Allreduce(MPI.IN_PLACE, out, op={"sum": MPI.SUM, "max": MPI.MAX}[op])
        return out

    def check_agree(self, what, value):
        """Raise DistributedError on every rank unless all ranks pass an equal `value`
        (anything JSON can write: the settings, the model config, the data's shape)."""
        if self.size == 1:
            return
        digests = self.allgather(_digest(value))
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise DistributedError(f"the ranks disagree on {what}: rank(s) "
                                   f"{', '.join(map(str, differ))} differ from rank 0 (every "
                                   "rank must run the same command on the same data)",
                                   everywhere=True)

    def allgather(self, value):
        """The list of every rank's `value` (a small Python object), in rank order."""
        return self.comm.allgather(value)

    def abort(self, code=1):
        """End every rank at once (a rank that fails alone would leave the others waiting).
        First a moment for the launcher to pass on what this rank printed: MPI_Abort kills
        every process, and MPICH drops output it has not forwarded yet."""
        if self.comm is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            time.sleep(0.5)
            self.comm.Abort(code)


def _digest(value):
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class _Failed:
    """What a rank started by `start` sends rank 0 when it stops with an error."""

    def __init__(self, text):
        self.text = text


class Local(World):
    """`size` processes of this machine started by `start`, without MPI: rank 0 holds a
    pipe (a multiprocessing Connection) to each other rank, each other rank one to rank 0.
    NumPy arrays only (the ranks share the CPU cores, not a GPU)."""

    def __init__(self, rank, size, links, processes=()):
        super().__init__()
        self.rank, self.size = rank, size
        self.links = links                 # rank 0: to ranks 1..size-1; else: [to rank 0]
        self.processes = list(processes)   # rank 0: the processes of ranks 1..size-1

    def _receive(self, link, rank):
        try:
            message = link.recv()
        except (EOFError, OSError):
            message = None
        if isinstance(message, _Failed) or message is None:
            raise self._stopped(rank, message)
        return message

    def _send(self, link, rank, value, raw=False):
        try:
            if raw:
                link.send_bytes(memoryview(value).cast("B"))
            else:
                link.send(value)
        except OSError:                    # the other end is gone: say why, if it did
            message = link.recv() if link.poll(0) else None
            raise self._stopped(rank, message) from None

    def _stopped(self, rank, message):
        if isinstance(message, _Failed):
            return DistributedError(f"process {rank} of {self.size} stopped: {message.text}")
        exitcode = self.processes[rank - 1].exitcode if self.rank == 0 else None
        return DistributedError(f"process {rank} of {self.size} stopped"
                                + (f" (exit code {exitcode})" if exitcode is not None else ""))

    def _combine(self, value, op):
        """op folded over every rank's `value` in rank order (0, 1, ...), on every rank:
        rank 0 gathers, combines and sends the result back."""
        if self.rank != 0:
            self._send(self.links[0], 0, value)
            return self._receive(self.links[0], 0)
        total = value
        for rank, link in enumerate(self.links, 1):
            total = op(total, self._receive(link, rank))
        for rank, link in enumerate(self.links, 1):
            self._send(link, rank, total)
        return total

    def broadcast_(self, array):
        if self.rank == 0:
            for rank, link in enumerate(self.links, 1):
                self._send(link, rank, array)
        else:
            array[...] = self._receive(self.links[0], 0)
        return array

    def sum_(self, array):
        """As World.sum_: rank 0 adds the ranks' arrays in rank order and sends the sum
        back.  A C-contiguous array travels as its raw bytes (no pickling)."""
        if not array.flags.c_contiguous:
            array[...] = self._combine(array, operator.add)
            return array
        if self.rank != 0:
            self._send(self.links[0], 0, array, raw=True)
            self._receive_into(self.links[0], 0, array)
            return array
        other = array.copy()
        for rank, link in enumerate(self.links, 1):
            self._receive_into(link, rank, other)
            array += other
        for rank, link in enumerate(self.links, 1):
            self._send(link, rank, array, raw=True)
        return array

    def _receive_into(self, link, rank, array):
        """Fill `array` with the raw bytes `rank` sent; raise what it failed with instead."""
        into = memoryview(array).cast("B")
        try:
            n = link.recv_bytes_into(into)
        except multiprocessing.BufferTooShort as e:
            raise self._stopped(rank, pickle.loads(e.args[0])) from None
        except (EOFError, OSError):
            raise self._stopped(rank, None) from None
        if n != array.nbytes:              # a shorter message: a rank's error
            raise self._stopped(rank, pickle.loads(into[:n]))

    def reduce_host(self, values, op="sum"):
        maximum = backend.module_for("cpu").maximum
        return self._combine(values, {"sum": operator.add, "max": maximum}[op])

    def allgather(self, value):
        return self._combine([value], operator.add)

    def abort(self, code=1):
        self.close()
        sys.exit(code)

    def close(self, wait=True):
        """Rank 0: end the other ranks (they stop when their pipe closes) and wait for them
        (up to 10 s each); wait=False: stop them now (rank 0 is stopping on an error)."""
        for link in self.links:
            link.close()
        for process in self.processes:
            if wait:
                process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()


def start(size, target, *args):
    """Start `size` processes of this machine as one world: this process is rank 0, and
    ranks 1..size-1 are new processes that run target(world, *args) (target: a function
    of a module they can import).  Returns rank 0's Local world; close() it at the end.
    A rank that fails sends rank 0 its error, which rank 0 raises at its next collective;
    when rank 0 ends, the others find their pipe closed and end too."""
    context = multiprocessing.get_context("spawn")       # a fresh interpreter on any OS
    links, processes = [], []
    for rank in range(1, size):
        here, there = context.Pipe()
        process = context.Process(target=_run_rank, args=(target, rank, size, there, args),
                                  name=f"minivit rank {rank}", daemon=True)
        process.start()
        there.close()
        links.append(here)
        processes.append(process)
    return Local(0, size, links, processes)


def _run_rank(target, rank, size, link, args):
    """Rank `rank` (>0) of a Local world: run target; tell rank 0 if it fails."""
    world = Local(rank, size, [link])
    try:
        target(world, *args)
        return
    except KeyboardInterrupt:              # Ctrl-C reaches every rank: rank 0 reports it
        sys.exit(1)
    except SystemExit as e:
        if not e.code:
            return
        text = f"exit code {e.code}" if isinstance(e.code, int) else str(e.code)
    except DistributedError:               # rank 0 stopped first: it says why
        sys.exit(1)
    except BaseException as e:
        text = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    try:
        link.send(_Failed(text))
    except OSError:
        pass
    sys.exit(1)


def world():
    """The World of this process: MPI's, when an MPI launcher started several processes."""
    size = _launched_size()
    if size == 1:
        return World()
    try:
        from mpi4py import MPI
    except ImportError:
        raise DistributedError(f"started by mpiexec as one of {size} processes, but mpi4py is "
                               f"not installed: pip install -e \".[mpi]\"") from None
    return World(MPI.COMM_WORLD)


def sum_gradients(world, optimizer):
    """One allreduce per flat gradient buffer of the optimiser (one buffer per dtype)."""
    for buffer in optimizer.buffers:
        world.sum_(buffer.grad)


def broadcast_parameters(world, optimizer):
    """Every rank starts from rank 0's parameters."""
    for buffer in optimizer.buffers:
        world.broadcast_(buffer.data)


def bytes_per_step(optimizer, size):
    """Bytes each rank sends (and receives) per step in a ring allreduce of the gradient
    buffers: 2 (N - 1) / N times their size (a reduce-scatter, then an all-gather)."""
    total = sum(b.grad.nbytes for b in optimizer.buffers)
    return 2 * (size - 1) * total // size
