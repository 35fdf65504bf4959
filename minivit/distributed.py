"""Data parallelism across processes with MPI, the way ChainerMN and PyTorch DDP do it.

    mpiexec -n 2 python examples/train_cifar.py --preset cpu     # pip install -e ".[mpi]"

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
"""
import hashlib
import json
import os
import sys
import time

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
        if self.comm is None:
            return
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
        digests = self.comm.allgather(digest)
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise DistributedError(f"the ranks disagree on {what}: rank(s) "
                                   f"{', '.join(map(str, differ))} differ from rank 0 (every "
                                   "rank must run the same command on the same data)",
                                   everywhere=True)

    def abort(self, code=1):
        """End every rank at once (a rank that fails alone would leave the others waiting).
        First a moment for the launcher to pass on what this rank printed: MPI_Abort kills
        every process, and MPICH drops output it has not forwarded yet."""
        if self.comm is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            time.sleep(0.5)
            self.comm.Abort(code)


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
