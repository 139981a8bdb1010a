"""Tensor and expert parallelism on torch.distributed: rank 0 runs levante, every rank runs its shard of the model.

Launch (`launch`): `LLM(path, tensor_parallel_size=N)` starts N - 1 worker processes on this machine (fresh
interpreters running `worker_main`: unlike multiprocessing's spawn they do not re-import the caller's main
script, so a script without an `if __name__ == "__main__"` guard works), joined to rank 0 by a TCPStore. In a
process started by torchrun (WORLD_SIZE set) each process joins torchrun's group instead (so several machines
work through its rendezvous): rank 0 returns from `LLM(...)`, the others serve it there and exit when it closes.
Backend: NCCL for CUDA, gloo for CPU.

Each rank loads only its slices of the weights (levante.shard) and `parallelize` adds an all-reduce (sum) after
every attention and feed-forward module, with the one-call fused layer kernel off (the sum must come between).

Rank 0's `ParallelLM` has the CausalLM interface (call, `new_cache`, `cfg`, `.model`). Each call first broadcasts a
command (a header of 8 int64, then the token ids), then runs the same computation locally; the workers
(`serve_rank`) run it in lockstep. On GPUs, generation runs `ParallelLM.decoder()` instead: a levante.cuda
CudaDecoder on every rank (static cache, Triton attention, fused MoE), driven by the same commands. KV caches
exist on every rank, each holding its own kv heads, and change only through rank-0 commands (`ParallelCache`).
Only rank 0 computes the lm_head (replicated: see levante.shard).

Failures: a thread on rank 0 watches the worker processes; when one dies, the pending call (gloo raises as soon as
the peer's socket closes) or the next one raises `WorkerError` naming the rank and exit code, and `on_lost`
callbacks run (the server answers 503 and exits). Workers exit when rank 0 goes away: their sockets close, and a
watchdog notices their parent is gone.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import LevanteError, WorkerError
from .loader import LoadedModel, eager_attention, load, resolve_device, resolve_dtype
from .model import KVCache
from .shard import Shard
from .transfer import to_device

log = logging.getLogger("levante.parallel")

_HEADER = 8
_FORWARD, _NEW_CACHE, _CACHE, _FREE, _STOP, _STATUS, _DECODER = 1, 2, 3, 4, 5, 6, 7
_POSITIONS, _LAST_ONLY = 1, 2  # a forward command's flags
_RESET, _TRUNCATE, _COPY, _SWAP, _SELECT, _HOLD = 1, 2, 3, 4, 5, 6
_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_TIMEOUT = datetime.timedelta(hours=2)  # a collective may wait this long for a slow peer (a long prefill)
_JOIN_TIMEOUT = datetime.timedelta(minutes=5)  # for every rank to start and connect


class Group:
    """The process group of one parallel model and this process's place in it."""

    def __init__(self, pg: Any, rank: int, size: int, device: torch.device, registered: bool = False) -> None:
        self.pg, self.rank, self.size, self.device = pg, rank, size, device
        self.registered = registered  # torch.distributed's default group (torchrun) vs a standalone backend

    def broadcast(self, t: Tensor) -> None:
        """rank 0's `t` to every rank (in place)."""
        if self.registered:
            dist.broadcast(t, 0)
        else:
            self.pg.broadcast(t, 0).wait()

    def all_reduce(self, t: Tensor) -> None:
        """The sum over ranks, in place."""
        if self.registered:
            dist.all_reduce(t)
        else:
            self.pg.allreduce([t]).wait()


def _standalone_group(store: dist.Store, rank: int, size: int, device: torch.device) -> Group:
    """A group of its own (not torch.distributed's default one), so one process can hold several parallel models."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        pg = dist.ProcessGroupNCCL(store, rank, size)
    else:
        pg = dist.ProcessGroupGloo(store, rank, size, _TIMEOUT)
    return Group(pg, rank, size, device)


# ---------------------------------------------------------------------------------------------- every rank
def parallelize(net: torch.nn.Module, group: Group) -> None:
    """Complete each block's partial attention and feed-forward outputs with an all-reduce (in the module's
    forward hook), and keep the blocks on the module path (the fused one-call layer kernel has no place for it)."""

    def reduce(_module: torch.nn.Module, _inputs: Any, out: Tensor) -> Tensor:
        out = out.contiguous()
        group.all_reduce(out)
        return out

    for block in net.model.layers:
        block.fusable = False
        block.attn.register_forward_hook(reduce)
        block.ffn.register_forward_hook(reduce)


def serve_rank(group: Group, net: torch.nn.Module) -> None:
    """A worker's loop: run rank 0's commands until it stops (returns) or goes away (raises)."""
    caches: dict[int, Any] = {}  # levante.model.KVCache, or a decoder's StaticCache
    decoders: dict[int, torch.nn.Module] = {}
    header = torch.zeros(_HEADER, dtype=torch.long, device=group.device)
    body = net.model
    with torch.inference_mode(), eager_attention(group.device):
        while True:
            group.broadcast(header)
            op, a, b, c, d, e, f, g = header.tolist()
            if op == _FORWARD:  # a: cache id or -1, b x c tokens, rows d:e (d = -1: all), f: flags, g: decoder + 1
                tokens = torch.empty(b, c, dtype=torch.long, device=group.device)
                group.broadcast(tokens)
                positions = None
                if f & _POSITIONS:
                    positions = torch.empty_like(tokens)
                    group.broadcast(positions)
                cache, rows = caches[a] if a >= 0 else None, slice(d, e) if d >= 0 else None
                if g:
                    decoders[g - 1](tokens, positions, cache, bool(f & _LAST_ONLY), rows)
                else:
                    body(tokens, positions, cache, rows)
            elif op == _NEW_CACHE:  # a: id, b rows of c steps, dtype d, slack e, g: decoder + 1 (0: the model's)
                caches[a] = (decoders[g - 1] if g else net).new_cache(b, c, _DTYPES[d], e)
            elif op == _CACHE:
                _cache_op(group, caches[a], b, c, d)
            elif op == _DECODER:  # a: its id
                decoders[a] = _rank_decoder(net)
            elif op == _FREE:  # a: the id of a cache (b = 0) or a decoder (b = 1)
                (decoders if b else caches).pop(a, None)
            elif op == _STOP:
                return


def _rank_decoder(net: torch.nn.Module) -> torch.nn.Module:
    """levante.cuda's decoder (static cache, Triton attention, fused MoE) over this rank's shard; it runs the
    all-reduce hooks of `parallelize` on the outputs it computes, and eagerly (no CUDA graph: a collective inside
    a captured graph is not verified). The weights are packed and the MoE fused first: `load` did that on a GPU;
    elsewhere (the tests, under TRITON_INTERPRET=1) it happens here."""
    from .cuda import CudaDecoder, to_device

    to_device(net, net.model.device)
    return CudaDecoder(net)


def _cache_op(group: Group, cache: KVCache, method: int, x: int, y: int) -> None:
    if method == _RESET:
        cache.reset(None if x < 0 else x)
    elif method == _TRUNCATE:
        cache.truncate(x, y)
    elif method == _COPY:
        cache.copy_row(x, y)
    elif method == _SWAP:
        cache.swap_rows(x, y)
    elif method == _HOLD:
        cache.hold(x, y)
    elif method == _SELECT:
        keep = torch.empty(x, dtype=torch.long, device=group.device)
        group.broadcast(keep)
        cache.select_rows(keep)


# ---------------------------------------------------------------------------------------------- rank 0
class ParallelLM:
    """Rank 0's view of a model split over a group: the CausalLM interface, every call run on all ranks."""

    def __init__(self, local: torch.nn.Module, group: Group, workers: _Workers | None = None) -> None:
        self.local, self.group, self._workers = local, group, workers
        self.model = _Body(self)
        self.lost: WorkerError | None = None
        self.on_lost: list[Callable[[WorkerError], None]] = []  # called (from a watcher thread) when a rank dies
        self._lock = threading.RLock()  # one command (and its collectives) at a time, whichever thread sends it
        self._ids = itertools.count()
        self._freed: list[int] = []  # caches garbage-collected since the last command
        self._header = torch.zeros(_HEADER, dtype=torch.long, device=group.device)
        self._closer = weakref.finalize(self, _close, group, workers)
        if workers is not None:
            for rank, p in enumerate(workers.procs, start=1):
                threading.Thread(target=self._watch, args=(p,), name=f"levante-rank{rank}-watch", daemon=True).start()

    @property
    def cfg(self):
        return self.local.cfg

    @property
    def lm_head(self):
        return self.local.lm_head

    @property
    def tensor_parallel_size(self) -> int:
        return self.group.size

    def __call__(self, tokens: Tensor, positions: Tensor | None = None, cache: ParallelCache | None = None,
                 last_only: bool = False, rows: slice | None = None) -> Tensor:
        """Next-token logits [B, T, vocab] (float32), or [B, 1, vocab] with last_only (CausalLM.forward)."""
        with self._lock:
            h = self.model(tokens, positions, cache, rows)
            if last_only:
                h = h[:, -1:]
            return self.local.lm_head(h).float()

    forward = __call__

    def new_cache(self, batch_size: int, max_tokens: int, dtype: torch.dtype | None = None,
                  slack: int = 0) -> ParallelCache:
        return self._new_cache(batch_size, max_tokens, dtype, slack, None)

    def decoder(self) -> ParallelDecoder:
        """A GPU decoder on every rank (levante.cuda.CudaDecoder over its shard), driven from here."""
        return ParallelDecoder(self)

    def _new_cache(self, batch_size: int, max_tokens: int, dtype: torch.dtype | None, slack: int,
                   decoder: ParallelDecoder | None) -> ParallelCache:
        """A cache on every rank, made by the model (a KVCache) or by `decoder` (a StaticCache)."""
        dtype = dtype or self.local.model.dtype
        with self._lock, self._step():
            cid = next(self._ids)
            self._send(_NEW_CACHE, cid, batch_size, max_tokens, _DTYPES.index(dtype), slack,
                       0, 0 if decoder is None else decoder.id + 1)
            local = (self.local if decoder is None else decoder.local).new_cache(batch_size, max_tokens, dtype, slack)
        cache = ParallelCache(self, cid, local)
        weakref.finalize(cache, self._freed.append, (cid, 0))
        return cache

    def _forward(self, tokens: Tensor, positions: Tensor | None, cache: ParallelCache | None, rows: slice | None,
                 decoder: ParallelDecoder | None = None, last_only: bool = False) -> Tensor:
        """Send a forward command and its tokens to every rank, then run it here: the model's hidden states, or
        `decoder`'s logits."""
        if tokens.ndim == 1:
            tokens = tokens[None]
        if cache is not None and not isinstance(cache, ParallelCache):
            raise TypeError("a parallel model needs a cache from its own new_cache()")
        dev = self.group.device
        with self._lock, self._step():
            r0, r1 = (-1, -1) if rows is None else (rows.start or 0, rows.stop)
            flags = (_POSITIONS if positions is not None else 0) | (_LAST_ONLY if last_only else 0)
            self._send(_FORWARD, cache.id if cache is not None else -1, tokens.shape[0], tokens.shape[1], r0, r1,
                       flags, 0 if decoder is None else decoder.id + 1)
            tokens = tokens.to(dev, torch.long).contiguous()
            self.group.broadcast(tokens)
            host = positions if positions is not None and positions.device.type == "cpu" else None
            if positions is not None:
                positions = to_device(positions.long(), dev).contiguous()
                self.group.broadcast(positions)
            local = cache.local if cache is not None else None
            if decoder is not None:  # given the host's positions, it finds a padded prefill's real tokens there
                return decoder.local(tokens, positions if host is None else host.long(), local, last_only, rows)
            with eager_attention(dev):
                return self.local.model(tokens, positions, local, rows)

    def close(self) -> None:
        """Stop the workers (also done when this object is collected, and at exit)."""
        with self._lock:
            self._closer()

    # ------------------------------------------------------------------ commands
    def _send(self, op: int, *args: int) -> None:
        """Broadcast a command header (with the lock held, inside `_step`)."""
        while self._freed:
            self._broadcast_header(_FREE, *self._freed.pop())
        self._broadcast_header(op, *args)

    def _broadcast_header(self, op: int, *args: int) -> None:
        vals = [op, *args] + [0] * (_HEADER - 1 - len(args))
        self._header.copy_(torch.tensor(vals, dtype=torch.long))
        self.group.broadcast(self._header)

    @contextmanager
    def _step(self) -> Iterator[None]:
        """Around a command and its local work: a group that lost a rank (or fell out of step) raises WorkerError,
        now and for every later call."""
        if self.lost is not None:
            raise self.lost
        if not self._closer.alive:
            raise WorkerError("the parallel model was closed")
        try:
            yield
        except WorkerError:
            raise
        except Exception as e:  # after a header went out, any failure leaves the ranks out of step
            err = self._which_died(e)
            self._lose(err)
            raise err from e

    def _which_died(self, e: BaseException) -> WorkerError:
        deadline = time.monotonic() + 2.0  # the watcher may be about to see the process go
        while time.monotonic() < deadline:
            if self.lost is not None:
                return self.lost
            if self._workers is None:
                break
            dead = self._workers.dead()
            if dead is not None:
                return dead
            time.sleep(0.05)
        return WorkerError(f"a parallel step failed on rank 0 ({type(e).__name__}: {e}); the {self.group.size} "
                           "ranks are out of step: restart levante")

    def _lose(self, err: WorkerError) -> None:
        if self.lost is not None:
            return
        self.lost = err
        log.error("%s", err)
        for cb in list(self.on_lost):
            try:
                cb(err)
            except Exception:  # noqa: BLE001 - a callback's failure must not hide the loss
                log.exception("on_lost callback failed")

    def _watch(self, proc: subprocess.Popen) -> None:
        workers = self._workers
        proc.wait()
        if workers.stopping:
            return
        err = workers.dead() or WorkerError("a parallel worker exited")
        self._lose(err)
        abort = getattr(self.group.pg, "abort", None)  # NCCL waits forever on a dead peer; gloo raises by itself
        if self.group.device.type == "cuda" and abort is not None:
            abort()


class _Body:
    """`ParallelLM.model`: the decoder body (hidden states), as `CausalLM.model` is."""

    def __init__(self, lm: ParallelLM) -> None:
        self._lm = lm

    @property
    def device(self) -> torch.device:
        return self._lm.local.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self._lm.local.model.dtype

    @property
    def cfg(self):
        return self._lm.local.cfg

    def __call__(self, tokens: Tensor, positions: Tensor | None = None, cache: ParallelCache | None = None,
                 rows: slice | None = None) -> Tensor:
        return self._lm._forward(tokens, positions, cache, rows)


class ParallelDecoder:
    """Rank 0's side of a GPU decoder on every rank (`ParallelLM.decoder()`): CudaDecoder's generation interface
    (`new_cache`, a call returning logits, `warm_up`, `pipelined`), each call run on all ranks, each over its
    shard with its static cache, all-reducing the attention and feed-forward outputs."""

    def __init__(self, lm: ParallelLM) -> None:
        self._lm = lm
        with lm._lock, lm._step():
            self.id = next(lm._ids)
            lm._send(_DECODER, self.id)
            self.local = _rank_decoder(lm.local)
        self.model = lm.model  # device, dtype, cfg
        self.pipelined = self.local.pipelined
        self.batched_prefill = self.local.batched_prefill  # the ranks' static caches: `hold` reaches each
        weakref.finalize(self, lm._freed.append, (self.id, 1))

    @property
    def cfg(self):
        return self._lm.cfg

    def new_cache(self, batch_size: int, max_tokens: int, dtype: torch.dtype | None = None,
                  slack: int = 0) -> ParallelCache:
        return self._lm._new_cache(batch_size, max_tokens, dtype, slack, self)

    def warm_up(self, max_rows: int, max_tokens: int, dtype: torch.dtype | None = None, precompile: bool = True,
                verify: Sequence[int] = (), slack: int = 0) -> ParallelCache:
        """The cache for up to `max_rows` rows of `max_tokens`, allocated now on every rank (the steps run
        eagerly: there are no graphs to capture). On a GPU (`precompile`), rank 0 compiles the kernels of its
        shard's steps ahead, as CudaDecoder.warm_up does; the ranks of this machine, whose shards have its shapes,
        find them in Triton's cache there (a rank of another machine compiles its own at first use)."""
        cache = self.new_cache(max_rows, max_tokens, dtype, slack)
        self.local.warm_up(max_rows, max_tokens, dtype, precompile, verify, slack)  # keeps the cache just made
        return cache

    def __call__(self, tokens: Tensor, positions: Tensor | None = None, cache: ParallelCache | None = None,
                 last_only: bool = False, rows: slice | None = None) -> Tensor:
        """Logits [B, T or 1, vocab] (float32), as CudaDecoder's; without a cache of its own, the model's path."""
        if cache is None or isinstance(cache.local, KVCache):
            return self._lm(tokens, positions, cache, last_only, rows)
        return self._lm._forward(tokens, positions, cache, rows, self, last_only)

    forward = __call__


class ParallelCache:
    """A KV cache spread over the ranks (each holds its kv heads): reads come from rank 0's part, changes go to
    every rank."""

    def __init__(self, lm: ParallelLM, cid: int, local: KVCache) -> None:
        self._lm, self.id, self.local = lm, cid, local

    def __getattr__(self, name: str) -> Any:  # lengths, pos, capacity, rolling, k, v, batch_size, ...
        return getattr(self.__dict__["local"], name)

    def _do(self, method: int, x: int = 0, y: int = 0, payload: Tensor | None = None) -> None:
        lm = self._lm
        with lm._lock, lm._step():
            lm._send(_CACHE, self.id, method, x, y)
            if payload is not None:
                lm.group.broadcast(payload)

    def reset(self, row: int | None = None) -> None:
        self._do(_RESET, -1 if row is None else row)
        self.local.reset(row)

    def truncate(self, row: int, n_steps: int) -> None:
        self.local.truncate(row, n_steps)  # first: it raises for a step the rolling buffer cannot give back
        self._do(_TRUNCATE, row, n_steps)

    def copy_row(self, src: int, dst: int) -> None:
        self._do(_COPY, src, dst)
        self.local.copy_row(src, dst)

    def swap_rows(self, a: int, b: int) -> None:
        self._do(_SWAP, a, b)
        self.local.swap_rows(a, b)

    def hold(self, row: int, n_steps: int) -> None:  # a GPU decoder's static cache
        self._do(_HOLD, row, n_steps)
        self.local.hold(row, n_steps)

    def select_rows(self, keep: Tensor) -> None:
        keep = keep.to(self._lm.group.device, torch.long).contiguous()
        self._do(_SELECT, keep.numel(), payload=keep)
        self.local.select_rows(keep)


# ---------------------------------------------------------------------------------------------- processes
@dataclass
class _WorkerSpec:
    """What a spawned worker needs to load its shard and join."""

    model: str
    size: int
    expert_parallel: bool
    dtype: str | None
    device: str
    n_threads: int
    store_port: int
    parent: int


class _Workers:
    """The spawned worker processes of one parallel model."""

    def __init__(self, procs: list, store: dist.Store) -> None:
        self.procs, self.store = procs, store
        self.stopping = False

    def dead(self) -> WorkerError | None:
        for rank, p in enumerate(self.procs, start=1):
            code = p.poll()
            if code is not None:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                why = ""
                try:
                    if self.store.check([f"error{rank}"]):
                        why = f" after {self.store.get(f'error{rank}').decode()}"
                except Exception:  # noqa: BLE001 - the message is a nicety
                    pass
                return WorkerError(f"parallel worker rank {rank} (pid {p.pid}) {how}{why}; the model is gone: "
                                   "restart levante")
        return None


def _close(group: Group, workers: _Workers | None) -> None:
    """Tell the workers to stop and wait for them (a finalizer: holds no reference to the ParallelLM)."""
    if workers is not None:
        workers.stopping = True
        if all(p.poll() is None for p in workers.procs):
            try:
                header = torch.zeros(_HEADER, dtype=torch.long, device=group.device)
                header[0] = _STOP
                group.broadcast(header)
            except Exception:  # noqa: BLE001 - a group that already failed: the processes are ended below
                pass
        for p in workers.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
    elif group.registered and dist.is_initialized():
        header = torch.zeros(_HEADER, dtype=torch.long, device=group.device)
        header[0] = _STOP
        try:
            group.broadcast(header)
            # every rank tears the group down after the same barrier: a peer closing its sockets while this
            # process still has them open can abort it at exit
            dist.barrier()
        except Exception:  # noqa: BLE001
            pass


def _status(group: Group, store: dist.Store | None, error: BaseException | None) -> None:
    """After loading: every rank learns whether all loaded; a failure is raised on rank 0 with its message."""
    flag = torch.tensor([1 if error is not None else 0], dtype=torch.long, device=group.device)
    if error is not None and store is not None:
        store.set(f"error{group.rank}", f"{type(error).__name__}: {error}")
    group.all_reduce(flag)
    if int(flag) == 0:
        return
    if error is not None:
        raise error
    msgs = []
    if store is not None:
        for r in range(group.size):
            if r != group.rank and store.check([f"error{r}"]):
                msgs.append(f"rank {r}: {store.get(f'error{r}').decode()}")
    raise WorkerError("loading the parallel model failed on another rank: " + ("; ".join(msgs) or "see its log"))


def worker_main() -> None:
    """A started worker (argv: the JSON `_WorkerSpec`, the rank): join, load the shard, serve rank 0, exit."""
    spec, rank = _WorkerSpec(**json.loads(sys.argv[1])), int(sys.argv[2])
    threading.Thread(target=_watchdog, args=(spec.parent,), daemon=True).start()
    torch.set_num_threads(spec.n_threads)
    torch.set_grad_enabled(False)
    device = _rank_device(spec.device, rank)
    store = dist.TCPStore("127.0.0.1", spec.store_port, spec.size, False, timeout=_JOIN_TIMEOUT)
    group = _standalone_group(store, rank, spec.size, device)
    error = None
    try:
        loaded = load(spec.model, dtype=spec.dtype, device=device, shard=Shard(rank, spec.size, spec.expert_parallel))
        net = loaded.model
        parallelize(net, group)
        net.lm_head = None  # rank 0 alone computes the logits
    except Exception as e:  # noqa: BLE001 - reported to rank 0 through the store
        error = e
    try:
        _status(group, store, error)
        serve_rank(group, net)
    except Exception as e:  # noqa: BLE001 - rank 0 failed or went away: nothing left to serve
        try:
            store.set(f"error{rank}", f"{type(e).__name__}: {e}")
        except Exception:  # noqa: BLE001 - rank 0 (the store's host) is gone
            pass
        os._exit(1)
    os._exit(0)  # skip interpreter teardown: the group's threads may still hold sockets


def _watchdog(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:  # rank 0 is gone
            os._exit(1)


def _rank_device(device: str, rank: int) -> torch.device:
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.device("cuda", (dev.index or 0) + rank)
    return dev


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def launch(model: str | None, size: int, expert_parallel: bool = False, dtype: str | torch.dtype | None = None,
           device: str = "cpu", n_threads: int = 1, progress: bool = False) -> LoadedModel:
    """Load `model` split over `size` ranks; returns rank 0's LoadedModel, whose `.model` is a ParallelLM.

    Under torchrun (WORLD_SIZE set) the ranks are torchrun's processes: ranks other than 0 serve rank 0 here and
    exit the process when it closes."""
    if size < 2:
        raise ValueError(f"a parallel model needs at least 2 ranks, got {size}")
    dtype_name = dtype if dtype is None or isinstance(dtype, str) else str(dtype).replace("torch.", "")
    if launched_by_torchrun():
        return _join_torchrun(model, size, expert_parallel, dtype_name, device, n_threads, progress)
    store = dist.TCPStore("127.0.0.1", 0, size, True, timeout=_JOIN_TIMEOUT, wait_for_workers=False)
    spec = _WorkerSpec(str(model) if model is not None else None, size, expert_parallel, dtype_name, device,
                       n_threads, store.port, os.getpid())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # what this process imports from
    code = "from levante.parallel import worker_main; worker_main()"
    procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(dataclasses.asdict(spec)), str(r)], env=env)
             for r in range(1, size)]
    workers = _Workers(procs, store)
    device0 = _rank_device(device, 0)
    try:
        group = _standalone_group(store, 0, size, device0)
        loaded, error = None, None
        try:
            loaded = load(model, dtype=dtype, progress=progress, device=device0,
                          shard=Shard(0, size, expert_parallel))
            parallelize(loaded.model, group)
        except Exception as e:  # noqa: BLE001 - the workers must hear of it before it is raised
            error = e
        _status(group, store, error)
    except BaseException as e:
        for p in procs:
            p.kill()
        if isinstance(e, LevanteError | ValueError | FileNotFoundError):
            raise
        raise (workers.dead() or WorkerError(f"starting {size - 1} parallel workers failed: {e}")) from e
    loaded.model = ParallelLM(loaded.model, group, workers)
    return loaded


def _join_torchrun(model, size, expert_parallel, dtype, device, n_threads, progress) -> LoadedModel:
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world != size:
        raise ValueError(f"asked for {size} ranks, but torchrun started {world} processes (--nproc-per-node x nodes)")
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = resolve_device(device)
    dev = torch.device("cuda", local_rank) if dev.type == "cuda" else dev
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.set_num_threads(n_threads)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=_TIMEOUT)
    group = Group(dist.group.WORLD, rank, world, dev, registered=True)
    error, loaded = None, None
    try:
        resolve_dtype(dtype)
        loaded = load(model, dtype=dtype, progress=progress and rank == 0, device=dev,
                      shard=Shard(rank, world, expert_parallel))
        parallelize(loaded.model, group)
    except Exception as e:  # noqa: BLE001
        error = e
    _status(group, None, error)
    if rank == 0:
        loaded.model = ParallelLM(loaded.model, group)
        return loaded
    loaded.model.lm_head = None
    serve_rank(group, loaded.model)
    dist.barrier()  # see _close
    os._exit(0)  # no teardown of the group here: rank 0 tears it down
