"""Adapters on demand: which adapters are resident, loading the missing ones, evicting the least recently used.

``AdapterPool`` stands between the routes and ``ServedModel``:

* ``acquire(model, count)`` gives the routing name of a request's ``model`` and holds ``count`` leases
  on it (one per generation of the request; ``release`` gives each back when its generation ends).
  An adapter that is not resident is loaded first when it can be found: one the pool has served
  before (``--adapter``, ``load_lora_adapter``) is read again from its directory, any other name from
  ``<--adapter-root>/<name>`` (``DIR:ADAPTER``: one adapter of a multi-adapter directory) with the checks of ``load_lora_adapter`` (inside the root, no symlink
  out, safetensors only, validated against the base model). Concurrent requests for one cold adapter
  wait for one load (single flight) and all get their leases when it ends.
* Bounds: ``--max-adapters N`` resident adapters and / or ``--adapter-memory MiB`` of adapter tensors
  (every adapter's own tensors and modules_to_save copies, plus each task-shared tensor once). Before
  a load, the least recently used adapters that hold no lease and are not pinned are evicted until
  the new one fits; its size is estimated from its file (its tensors in the bank's dtype, less its
  task group's shared tensors when that group is resident) and measured once it is loaded. When
  every adapter that could go holds leases, the load waits up to ``ROOM_WAIT_S`` for one to be
  released, then answers 429.
* Eviction removes the adapter on the scheduler thread once no waiting or running request uses it
  (``Scheduler.call_when_unused``), so a running request never loses its adapter. A request for an
  adapter being evicted waits for the eviction, then loads it again.
* A task-shared basis is loaded once: ``ServedModel.add_adapter`` joins an adapter to its resident
  task group when its shared tensors equal the group's; the group's tensors leave with its last member.

The pool's bookkeeping lives on the event loop's thread (no locks); the model changes run on the
scheduler's thread, between two steps.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..method.errors import ShareLoraError
from ..method.plan import BASE_ADAPTER, check_adapter_name
from ..method.checkpoint import is_multi_adapter, read_json
from .errors import BadRequest, NotFound, Overloaded, ServeError
from .model import AdapterSource, ServedModel, resolve_adapter_dir

log = logging.getLogger("sharelora.serve")

ROOM_WAIT_S = 30.0  # how long a load waits for a resident adapter to become evictable before 429
MAX_NAME = 200  # longer model names are not looked up under the root
MAX_LISTED = 10_000  # directories of the root that GET /v1/models looks at
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class _Size:
    own: int  # bytes of the adapter's own tensors (and modules_to_save copies)
    shared: dict[str, int]  # task-shared tensor key -> bytes


@dataclass
class _Load:
    future: asyncio.Future
    waiters: int = 0  # leases handed out when the load succeeds
    estimate: int = 0
    infos: list = field(default_factory=list)  # the AdapterInfo of what it loaded


@dataclass
class _Source:
    path: Path
    name: str  # the adapter's name in that directory's file (a multi-adapter directory holds several)
    origin: str  # "startup", "load_lora_adapter" or "root"


@dataclass
class PoolStats:
    """What ``GET /health`` and the benchmark report: resident adapters, pinned ones, their tensor bytes
    (own + shared once), loads and evictions so far and each load's seconds (read, make room, add)."""

    resident: int
    pinned: int
    bytes: int
    loads: int = 0
    evictions: int = 0
    load_seconds: list[float] = field(default_factory=list)


class AdapterPool:
    """The resident adapters of ``served`` (see the module docstring)."""

    def __init__(self, served: ServedModel, scheduler, root: str | Path | None = None,
                 max_adapters: int | None = None, max_bytes: int | None = None, pin_startup: bool = True):
        self.served = served
        self.scheduler = scheduler
        self.root = Path(root) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise ValueError(f"--adapter-root {root} is not a directory; create it or give another")
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self._lru: collections.OrderedDict[str, None] = collections.OrderedDict()  # least recent first
        self._sizes: dict[str, _Size] = {}
        self._leases: collections.Counter[str] = collections.Counter()
        self._pinned: set[str] = set()
        self._known: dict[str, _Source] = {}
        self._loading: dict[str, _Load] = {}
        self._evicting: dict[str, asyncio.Future] = {}
        self._changed: asyncio.Event | None = None
        self.loads = 0
        self.evictions = 0
        self.load_seconds: collections.deque[float] = collections.deque(maxlen=10_000)
        for name, info in served.adapters.items():
            if info.retired:
                continue
            self._lru[name] = None
            self._sizes[name] = _Size(*served.adapter_tensor_bytes(name))
            self._known[name] = _Source(Path(info.path), name, "startup")
            if pin_startup:
                self._pinned.add(name)
        self._check_bounds_at_start()

    # --- what a request sees ---------------------------------------------------------------------------
    def check(self, model: str) -> None:
        """NotFound unless ``model`` is the base model, a resident adapter or a loadable one (no loading)."""
        if model == self.served.name or model in self._lru or model in self._loading:
            return
        if self._source(model) is None:
            raise self._not_found(model)

    async def acquire(self, model: str, count: int = 1) -> str:
        """The routing name of ``model`` with ``count`` leases on it, loading it first if needed."""
        if model == self.served.name:
            return BASE_ADAPTER
        while True:
            if model in self._evicting:
                if self._source(model) is None:
                    raise self._not_found(model)  # being unloaded for good
                await asyncio.shield(self._evicting[model])
                continue
            if model in self._lru:
                self._leases[model] += count
                self._lru.move_to_end(model)
                return model
            load = self._loading.get(model)
            if load is None:
                source = self._source(model)
                if source is None:
                    raise self._not_found(model)
                load = self._start_load(model, source)
            load.waiters += count
            try:
                await asyncio.shield(load.future)
            except asyncio.CancelledError:
                if not load.future.done():
                    load.waiters -= count
                elif not load.future.cancelled() and load.future.exception() is None:
                    self.release(model, count)
                raise
            return model  # the load booked our leases

    def release(self, model: str, count: int = 1) -> None:
        """Give back ``count`` leases (a generation of the request ended)."""
        if model == BASE_ADAPTER or model not in self._leases:
            return
        self._leases[model] -= count
        if self._leases[model] <= 0:
            del self._leases[model]
            self._notify()

    # --- vLLM's load / unload --------------------------------------------------------------------------
    async def load(self, name: str, path: str) -> list:
        """``POST /v1/load_lora_adapter``: load ``path`` (under the root) as ``name``; it may be evicted and
        is then read again from ``path``."""
        if name == self.served.name or name in self._lru or name in self._loading or name in self._evicting:
            raise BadRequest(f"an adapter named {_short(name)} is loaded already; unload it first or choose another name",
                             param="lora_name")
        try:
            check_adapter_name(name)
        except ShareLoraError as e:
            raise BadRequest(str(e), param="lora_name") from None
        real = resolve_adapter_dir(self.root, path)
        load = self._start_load(name, _Source(real, name, "load_lora_adapter"))
        await asyncio.shield(load.future)
        return load.infos

    async def unload(self, name: str):
        """``POST /v1/unload_lora_adapter``: new requests for ``name`` wait (or get 404 if it cannot be loaded
        again from the root); it leaves once the requests using it have ended."""
        if name not in self._lru or name in self._evicting:
            raise NotFound(f"no adapter named {_short(name)} is loaded", param="lora_name", code="adapter_not_found")
        info = self.served.adapters[name]
        source = self._known.pop(name, None)
        self._pinned.discard(name)
        try:
            await asyncio.shield(self._evict(name))
        except BaseException:
            if source is not None and name in self._lru:
                self._known[name] = source
            raise
        return info

    # --- listing ------------------------------------------------------------------------------------------
    def resident(self) -> list[str]:
        return [n for n in self._lru if n not in self._evicting]

    def known_paths(self) -> dict[str, Path]:
        """{name: directory} of every adapter the pool has served (resident or evicted): they load again."""
        return {n: src.path for n, src in self._known.items()}

    def scan_root(self, skip: set[str]) -> list[tuple[str, Path]]:
        """[(name, directory)] of the root's adapter directories not in ``skip``: those a request may name
        (single-adapter sharelora or PEFT directories with safetensors weights; the first ``MAX_LISTED``
        entries). Reads only the file system, so it may run on any thread."""
        if self.root is None:
            return []
        try:
            entries = sorted(e.name for e in os.scandir(self.root))[:MAX_LISTED]
        except OSError:
            return []
        out = []
        for name in entries:
            if name in skip or not _valid_name(name):
                continue
            try:
                source = _root_source(self.root, name)
            except ServeError:  # a multi-adapter directory (listed by adapter below), or one the root refuses
                source = None
                try:
                    real = resolve_adapter_dir(self.root, name)
                except ServeError:
                    continue
                if is_multi_adapter(real):
                    out += [(f"{name}:{a}", real) for a in multi_adapter_names(real) if f"{name}:{a}" not in skip]
            if source is not None:
                out.append((name, source.path))
        return out

    def stats(self) -> PoolStats:
        return PoolStats(len(self.resident()), len(self._pinned), self._resident_bytes(self.resident()), self.loads,
                         self.evictions, list(self.load_seconds))

    # --- internals ------------------------------------------------------------------------------------------
    def _not_found(self, model: str) -> NotFound:
        where = " nor an adapter directory under --adapter-root" if self.root is not None else \
            " (start the server with --adapter-root DIR to load adapters on demand)"
        return NotFound(f"the model {_short(model)} does not exist: it is not loaded{where}; GET /v1/models lists "
                        "the models served", param="model")

    def _source(self, model: str) -> _Source | None:
        source = self._known.get(model)
        if source is not None:
            return source
        return self._root_source(model)

    def _root_source(self, model: str) -> _Source | None:
        return _root_source(self.root, model) if self.root is not None else None

    def _start_load(self, name: str, source: _Source) -> _Load:
        loop = asyncio.get_running_loop()
        load = _Load(loop.create_future())
        load.future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning
        self._loading[name] = load
        asyncio.ensure_future(self._load(name, source, load))
        return load

    async def _load(self, name: str, source: _Source, load: _Load) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            adapter = await asyncio.to_thread(self.served.read_adapter, source.path, source.name)
            if source.name != name:  # DIR:ADAPTER of a multi-adapter directory
                adapter = adapter.renamed(name)
            load.estimate = self._estimate(adapter)
            if self.max_bytes is not None and load.estimate > self.max_bytes:
                raise BadRequest(f"the adapter {name!r} needs {load.estimate / 2**20:.1f} MiB, more than "
                                 f"--adapter-memory {self.max_bytes / 2**20:.1f} MiB", param="model")
            await self._make_room(name, load)

            def add():
                infos = self.served.add_adapter(adapter)
                return infos, self.served.adapter_tensor_bytes(name)

            load.infos, (own, shared) = await asyncio.wrap_future(self.scheduler.call(add))
        except BaseException as e:
            del self._loading[name]
            load.future.set_exception(e)
            self._notify()
            if not isinstance(e, Exception):
                raise
            return
        del self._loading[name]
        self._lru[name] = None
        self._sizes[name] = _Size(own, shared)
        self._known[name] = source
        if load.waiters:
            self._leases[name] += load.waiters
        self.loads += 1
        self.load_seconds.append(round(loop.time() - t0, 4))
        log.info("adapter %s loaded on demand from %s in %.3f s (%d resident)", name, source.path, loop.time() - t0,
                 len(self._lru))
        load.future.set_result(None)
        self._notify()
        for victim in self._victims(0, 0) or ():  # the measured size may exceed the estimate
            self._evict(victim)

    def _estimate(self, source: AdapterSource) -> int:
        """Bytes the adapter will add: its tensors in the bank's dtype, less its group's if that is resident."""
        config = next(iter(source.configs.values()))
        size = _DTYPE_BYTES.get(config.adapter_dtype or "float32", 4)
        total = sum(t.numel() * size for t in source.tensors.values() if isinstance(t, torch.Tensor))
        if config.task_share != "none":
            for member in self.resident():
                cfg = self.served.lora.sharelora_configs.get(member) if self.served.lora else None
                if cfg is not None and (cfg.task_group, cfg.task_share) == (config.task_group, config.task_share):
                    total -= sum(self._sizes[member].shared.values())
                    break
        return max(total, 0)

    async def _make_room(self, name: str, load: _Load) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ROOM_WAIT_S
        while True:
            victims = self._victims(1, load.estimate, loading=name)
            if victims is not None:
                if victims:
                    await asyncio.gather(*[self._evict(v) for v in victims])
                    continue  # look again: others may have changed the picture meanwhile
                return
            left = deadline - loop.time()
            if left <= 0:
                held = sorted(self._leases)
                raise Overloaded(f"no room to load the adapter {name!r}: the {len(held)} resident adapters that could "
                                 f"be evicted are all in use by running requests (--max-adapters {self.max_adapters}, "
                                 f"--adapter-memory {_mib(self.max_bytes)}); retry later")
            changed = self._event()
            try:
                await asyncio.wait_for(changed.wait(), timeout=left)
            except asyncio.TimeoutError:
                pass

    def _victims(self, extra_count: int, extra_bytes: int, loading: str | None = None) -> list[str] | None:
        """Adapters to evict (least recently used first) so that the resident ones, the loads in flight and
        ``extra_*`` fit the bounds; None when that is impossible now."""
        staying = self.resident()
        others = [ld for n, ld in self._loading.items() if n != loading]
        count = len(staying) + len(others) + extra_count
        reserved = sum(ld.estimate for ld in others) + extra_bytes
        victims: list[str] = []

        def fits() -> bool:
            if self.max_adapters is not None and count > self.max_adapters:
                return False
            return self.max_bytes is None or self._resident_bytes(staying) + reserved <= self.max_bytes

        for candidate in list(staying):
            if fits():
                return victims
            if candidate in self._pinned or self._leases.get(candidate):
                continue
            staying.remove(candidate)
            victims.append(candidate)
            count -= 1
        return victims if fits() else None

    def _resident_bytes(self, names: list[str]) -> int:
        shared: dict[str, int] = {}
        own = 0
        for n in names:
            size = self._sizes.get(n)
            if size is not None:
                own += size.own
                shared.update(size.shared)
        return own + sum(shared.values())

    def _evict(self, name: str) -> asyncio.Future:
        """Mark ``name`` as leaving now (new requests wait) and remove it once no request uses it; the
        future ends when it is gone."""
        if name in self._evicting:
            return self._evicting[name]
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._evicting[name] = future

        async def remove() -> None:
            try:
                await asyncio.wrap_future(self.scheduler.call_when_unused(name, lambda: self.served.remove_adapter(name)))
            except BaseException as e:
                log.error("evicting adapter %s failed: %r", name, e)
                del self._evicting[name]
                future.set_exception(e)
                self._notify()
                return
            self._lru.pop(name, None)
            self._sizes.pop(name, None)
            self._leases.pop(name, None)
            del self._evicting[name]
            self.evictions += 1
            log.info("adapter %s evicted (%d resident)", name, len(self._lru))
            future.set_result(None)
            self._notify()

        asyncio.ensure_future(remove())
        return future

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        """Wake the loads that wait for room (a lease was released, an adapter left, a load ended)."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _check_bounds_at_start(self) -> None:
        pinned = [n for n in self._lru if n in self._pinned]
        on_demand = self.root is not None
        if self.max_adapters is not None and len(pinned) + (1 if on_demand else 0) > self.max_adapters:
            raise ValueError(f"--max-adapters {self.max_adapters} leaves no room: {len(pinned)} --adapter adapters are "
                             "pinned; raise --max-adapters or pass --no-pin-adapters")
        if self.max_adapters is not None and len(self._lru) > self.max_adapters:
            raise ValueError(f"--max-adapters {self.max_adapters} is less than the {len(self._lru)} --adapter adapters")
        used = self._resident_bytes(list(self._lru))
        if self.max_bytes is not None and used > self.max_bytes:
            raise ValueError(f"the --adapter adapters take {used / 2**20:.1f} MiB, more than --adapter-memory "
                             f"{self.max_bytes / 2**20:.1f} MiB")


def _root_source(root: Path, model: str) -> _Source | None:
    """Where ``model`` is under ``root``: ``<root>/<model>`` (a directory of one adapter) or, for
    ``DIR:ADAPTER``, the adapter ADAPTER of the multi-adapter directory ``<root>/DIR``. None when there
    is nothing by that name; 403 / 400 when there is something the root refuses (a symlink out, no
    safetensors weights, a multi-adapter directory named without its adapter)."""
    dir_name, sep, inner = model.partition(":")
    if not _valid_name(dir_name) or (sep and not _valid_name(inner)):
        return None
    candidate = root / dir_name
    if not candidate.exists() and not candidate.is_symlink():
        return None
    real = resolve_adapter_dir(root, dir_name)
    if not is_multi_adapter(real):
        return None if sep else _Source(real, model, "root")
    names = multi_adapter_names(real)
    if not sep:
        raise BadRequest(f"{_short(dir_name)} under --adapter-root holds several adapters ({', '.join(names[:20])}); "
                         f"name one as {dir_name}:ADAPTER", param="model")
    return _Source(real, inner, "root") if inner in names else None


def multi_adapter_names(directory: Path) -> list[str]:
    """The adapters a multi-adapter directory's config lists (for listing; loading reads the weights' manifest)."""
    try:
        config = read_json(directory / "adapter_config.json")
    except (OSError, ShareLoraError, ValueError):
        return []
    adapters = config.get("adapters") if isinstance(config, dict) else None
    if not isinstance(adapters, dict):
        return []
    order = [n for n in config.get("adapter_order", []) if n in adapters]
    return order + [n for n in adapters if n not in order]


def _valid_name(name: str) -> bool:
    if len(name) > MAX_NAME:
        return False
    try:
        check_adapter_name(name)
    except ShareLoraError:
        return False
    return True


def _short(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:80] + "...")


def _mib(n: int | None) -> str:
    return "unset" if n is None else f"{n / 2**20:.1f} MiB"
