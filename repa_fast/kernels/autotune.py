"""Our own autotuner for the Triton kernels: tiles chosen once, saved on disk, shareable.

``@triton.autotune`` tunes again in every process and every rank at the first training step,
keeps nothing, and may choose other tiles in a resumed run (a bitwise resume then breaks).
:func:`autotune` replaces it (same ``configs``, ``key``, ``reset_to_zero`` arguments; kernels
launch as before with ``kernel[grid](...)``; ``kernel.fn`` is the ``@triton.jit`` function).
A launch looks its key up (kernel, key arguments, ``PRECISION`` when keyed, dtypes of the
pointer arguments); a known key costs one dict lookup. An unknown key takes, in this order:

1. the tiles given to :func:`install_tiles` (from a checkpoint, or from rank 0 by
   :func:`broadcast_tiles`): any valid config, even one no longer in the config list;
2. the disk cache ``$REPA_FAST_TUNE_CACHE/tiles-<card>-triton<version>.json`` (default
   directory ``$REPA_FAST_CACHE``, else ``~/.cache/repa_fast``; off under ``TRITON_INTERPRET`` unless the variable is set;
   ``REPA_FAST_TUNE_CACHE=off`` turns it off), read once, lazily; entries whose config is not in
   the kernel's current list are ignored (that key is tuned again); a corrupt file is warned
   about once, ignored, and rewritten at the next tuning;
3. the only config, when there is one (the interpreter's default);
4. tuning: every config is timed (``triton.testing.do_bench`` on a GPU, one
   ``time.perf_counter`` run under the interpreter) after zeroing the ``reset_to_zero``
   buffers, configs that run out of resources are skipped, the buffers are zeroed once more
   for the real launch (as ``triton.autotune`` does), and the winner is saved to the disk
   cache at once (atomically, merged with what the file holds).

:func:`warmup` runs a callable (one forward + backward at the training shapes) and says what
was tuned; :func:`export_tiles` / :func:`install_tiles` move choices between processes and
checkpoints. One process keeps one table: all GPUs a process drives are assumed to be the
same card (the file is named after the card of the first launch).
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
import warnings
from typing import Any, Callable, Optional

import triton

from ..machine_cache import cache_root
from .tuning import INTERPRET

FORMAT = "repa_fast-tiles/1"
ENV_CACHE = "REPA_FAST_TUNE_CACHE"
_OFF = ("", "0", "off", "none", "false", "no")
_LAUNCH_FIELDS = ("num_warps", "num_stages")

_REGISTRY: dict[str, "Autotuned"] = {}         # kernel name -> tuner
_INSTALLED: dict[str, dict[tuple, dict]] = {}  # kernel name -> key -> config (install_tiles)
_TUNED: dict[str, dict[tuple, dict]] = {}      # tuned in this process (what gets saved)
_DISK: dict[str, Any] = {"loaded": False, "path": None, "entries": {}}
_COUNTS = {"tuned": 0, "cache": 0, "installed": 0, "single": 0, "seconds": 0.0}
_WARNED: set = set()
_LOCK = threading.RLock()
_launch_hook: Optional[Callable[[str, str, dict], None]] = None


class StaleEntry(ValueError):
    """A well-formed entry this version cannot use (unknown kernel, other key fields, or on
    disk a config no longer listed): skipped in the disk cache, an error in install_tiles."""


# ----------------------------------------------------------------------------- the decorator

def autotune(configs: list, key: list[str], reset_to_zero: Optional[list[str]] = None):
    """Drop-in for ``@triton.autotune(configs=..., key=..., reset_to_zero=...)``."""
    def decorate(fn):
        return Autotuned(fn, configs, key, reset_to_zero or [])
    return decorate


class Autotuned:
    """A ``@triton.jit`` function with its configs; ``self[grid](*args, **kwargs)`` launches.

    ``cache`` maps a key tuple to the config dict in use (this process's table), ``configs``
    is the ``triton.Config`` list; ``do_bench(kernel_call, quantiles)`` times one config (an
    instance attribute of that name replaces it, as with ``triton.autotune``).
    """

    def __init__(self, fn, configs: list, key: list[str], reset_to_zero: list[str]):
        self.fn = fn
        self.name = fn.__name__
        self.arg_names = list(fn.arg_names)
        self.configs = list(configs)
        self.keys = list(key)
        missing = [k for k in self.keys + list(reset_to_zero) if k not in self.arg_names]
        if missing or not self.configs:
            raise ValueError(f"{self.name}: unknown key/reset_to_zero names {missing} "
                             f"or no configs")
        self._key_at = [(k, self.arg_names.index(k)) for k in self.keys]
        self.pointers = [a for a in self.arg_names if a.endswith("_ptr")]
        self._ptr_at = [(a, self.arg_names.index(a)) for a in self.pointers]
        self._reset_at = [(a, self.arg_names.index(a)) for a in reset_to_zero]
        self.reset_to_zero = list(reset_to_zero)
        self.cache: dict[tuple, dict] = {}
        _REGISTRY[self.name] = self

    # -------------------------------------------------------------- launch (every step)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, **kwargs)

    def run(self, *args, grid, **kwargs):
        n = len(args)
        key = (*[args[i] if i < n else kwargs[k] for k, i in self._key_at],
               *[(args[i] if i < n else kwargs[k]).dtype for k, i in self._ptr_at])
        config = self.cache.get(key)
        if config is None:
            config = self._resolve(key, args, kwargs, grid)
        if _launch_hook is not None:
            _launch_hook(self.name, self.key_string(key), dict(config))
        return self.fn.run(*args, grid=grid, warmup=False, **kwargs, **config)

    # -------------------------------------------------------------- first launch of a key

    def _resolve(self, key: tuple, args: tuple, kwargs: dict, grid) -> dict:
        with _LOCK:
            config = self.cache.get(key)
            if config is not None:
                return config
            config = _INSTALLED.get(self.name, {}).get(key)
            source = "installed"
            if config is None:
                config = _disk_entries().get(self.name, {}).get(key)
                source = "cache"
            if config is None and len(self.configs) == 1:
                config, source = config_dict(self.configs[0]), "single"
            if config is None:
                config, source = self._tune(key, args, kwargs, grid), "tuned"
                _TUNED.setdefault(self.name, {})[key] = config
            _COUNTS[source] += 1
            self.cache[key] = config
            if source == "tuned":
                save()
            return config

    def do_bench(self, kernel_call: Callable[[], None], quantiles=None):
        """Milliseconds of one config: triton's benchmarker on a GPU; under the interpreter
        one timed run on the CPU."""
        if INTERPRET:
            start = time.perf_counter()
            kernel_call()
            return (time.perf_counter() - start) * 1e3
        import triton.testing
        return triton.testing.do_bench(kernel_call, quantiles=quantiles)

    def _zero(self, args: tuple, kwargs: dict) -> None:
        n = len(args)
        for k, i in self._reset_at:
            (args[i] if i < n else kwargs[k]).zero_()

    def _tune(self, key: tuple, args: tuple, kwargs: dict, grid) -> dict:
        from triton.compiler.errors import CompileTimeAssertionFailure
        from triton.runtime import errors
        skip = tuple(getattr(errors, name) for name in ("OutOfResources", "PTXASError")
                     if hasattr(errors, name)) + (CompileTimeAssertionFailure,)
        if not INTERPRET:
            import torch
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    f"{self.name}: tiles for {self.key_string(key)} would be tuned during CUDA "
                    f"graph capture; run repa_fast.kernels.autotune.warmup (or "
                    f"install_tiles) at these shapes before capturing")
        start = time.perf_counter()
        timings = []
        for config in self.configs:
            launch = config_dict(config)
            clash = launch.keys() & kwargs.keys()
            if clash:
                raise ValueError(f"{self.name}: tuned meta-parameters {sorted(clash)} were "
                                 f"also passed by the caller")

            def kernel_call(launch=launch):
                self._zero(args, kwargs)
                self.fn.run(*args, grid=grid, warmup=False, **kwargs, **launch)
            try:
                ms = self.do_bench(kernel_call, quantiles=(0.5, 0.2, 0.8))
            except skip:
                ms = float("inf")
            timings.append((ms[0] if isinstance(ms, (list, tuple)) else ms, launch))
        self._zero(args, kwargs)  # what the trials wrote must not reach the real launch
        best_ms, best = min(timings, key=lambda t: t[0])
        if best_ms == float("inf"):
            raise RuntimeError(f"{self.name}: no config fits this card for key "
                               f"{self.key_string(key)}")
        _COUNTS["seconds"] += time.perf_counter() - start
        return best

    # -------------------------------------------------------------- keys and configs

    def key_string(self, key: tuple) -> str:
        """``name|M_BUCKET=1024|N=...|PRECISION=tf32|dtypes=bfloat16,bfloat16,...``."""
        n = len(self.keys)
        values = "|".join(f"{k}={v}" for k, v in zip(self.keys, key[:n]))
        dtypes = ",".join(str(d).replace("torch.", "") for d in key[n:])
        return f"{self.name}|{values}|dtypes={dtypes}"

    def parse_key(self, parts: list[str]) -> tuple:
        """The key tuple of ``parts`` (a key string split at ``|``, without the name)."""
        import torch
        names = [p.split("=", 1)[0] for p in parts]
        expected = self.keys + ["dtypes"]
        if names != expected or any("=" not in p for p in parts):
            raise StaleEntry(f"key fields {names} of {self.name} must be {expected}")
        values: list[Any] = []
        for part in parts[:-1]:
            text = part.split("=", 1)[1]
            if text in ("True", "False"):
                values.append(text == "True")
            elif re.fullmatch(r"-?\d+", text):
                values.append(int(text))
            elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text):
                values.append(text)
            else:
                raise ValueError(f"bad value {text!r} in key field {part!r}")
        dtypes = parts[-1].split("=", 1)[1].split(",")
        if len(dtypes) != len(self.pointers):
            raise ValueError(f"{self.name} needs {len(self.pointers)} dtypes "
                             f"({', '.join(self.pointers)}); got {len(dtypes)}")
        for name in dtypes:
            dtype = getattr(torch, name, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {name!r}")
            values.append(dtype)
        return tuple(values)

    def check_config(self, config: Any, *, listed: bool = False) -> dict:
        """``config`` as a launch dict, or ValueError saying what is wrong. Block sizes must be
        powers of two and no smaller than the smallest in the config list (host buffers of
        per-block partial sums are sized with it); ``listed``: must be in the list."""
        if not isinstance(config, dict):
            raise ValueError(f"config must be a dict; got {type(config).__name__}")
        fields = list(self.configs[0].kwargs) + list(_LAUNCH_FIELDS)
        if sorted(config) != sorted(fields):
            raise ValueError(f"config fields {sorted(config)} must be {sorted(fields)}")
        for name, value in config.items():
            if type(value) is not int or value < 1:
                raise ValueError(f"config field {name}={value!r} must be a positive int")
            if name.startswith("BLOCK_") or name == "num_warps":
                if value & (value - 1):
                    raise ValueError(f"config field {name}={value} must be a power of two")
            if name.startswith("BLOCK_"):
                smallest = min(c.kwargs[name] for c in self.configs)
                if value < smallest:
                    raise ValueError(f"config field {name}={value} is below {smallest}, the "
                                     f"smallest in {self.name}'s config list")
        if config["num_warps"] > 32:
            raise ValueError(f"num_warps={config['num_warps']} must be at most 32")
        result = {k: config[k] for k in fields}
        if listed and result not in [config_dict(c) for c in self.configs]:
            raise StaleEntry("config not in the current config list")
        return result


def config_dict(config: "triton.Config") -> dict:
    """The launch dict of a ``triton.Config``: its kwargs plus num_warps and num_stages."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


# ----------------------------------------------------------------------------- kernels

def _kernels() -> dict[str, Autotuned]:
    # complete: the package's __init__ imports every kernel module before this one is used
    return _REGISTRY


def _parse_entry(key_string: Any, config: Any, *, listed: bool) -> tuple[str, tuple, dict]:
    if not isinstance(key_string, str):
        raise ValueError(f"key {key_string!r} must be a string")
    name, *parts = key_string.split("|")
    kernel = _kernels().get(name)
    if kernel is None:
        raise StaleEntry(f"key {key_string!r}: unknown kernel {name!r} (known: "
                         f"{', '.join(sorted(_REGISTRY))})")
    try:
        return name, kernel.parse_key(parts), kernel.check_config(config, listed=listed)
    except ValueError as error:
        raise type(error)(f"key {key_string!r}: {error}") from None


# ----------------------------------------------------------------------------- disk cache

def _card() -> str:
    if INTERPRET:
        return "cpu-interpreter"
    import torch
    return torch.cuda.get_device_name(torch.cuda.current_device())


def cache_path() -> Optional[str]:
    """The tile cache file of this card and Triton version, or None when the cache is off."""
    folder = os.environ.get(ENV_CACHE)
    if folder is None:
        if INTERPRET:
            return None
        folder = cache_root()  # the package's per-machine cache (verified shards too)
    elif folder.strip().lower() in _OFF:
        return None
    card = re.sub(r"[^A-Za-z0-9.-]+", "_", _card()).strip("_")
    return os.path.join(os.path.expanduser(folder),
                        f"tiles-{card}-triton{triton.__version__}.json")


def _warn_once(path: str, message: str) -> None:
    if path not in _WARNED:
        _WARNED.add(path)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _read_file(path: str) -> Optional[dict]:
    """The file's ``tiles`` dict (None when absent); ValueError when it is not a tile cache."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"unreadable ({type(error).__name__}: {error})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    if not isinstance(data.get("tiles"), dict):
        raise ValueError("no 'tiles' dict")
    return data["tiles"]


def _disk_entries() -> dict[str, dict[tuple, dict]]:
    """The disk cache's entries, read at the first call (a corrupt file: warn, use none)."""
    if _DISK["loaded"]:
        return _DISK["entries"]
    with _LOCK:
        if _DISK["loaded"]:
            return _DISK["entries"]
        path = cache_path()
        entries: dict[str, dict[tuple, dict]] = {}
        try:
            tiles = _read_file(path) if path else None
            for key_string, config in (tiles or {}).items():
                try:
                    name, key, launch = _parse_entry(key_string, config, listed=True)
                except StaleEntry:
                    continue  # another version's kernels or configs: that key is tuned again
                entries.setdefault(name, {})[key] = launch
        except ValueError as error:
            _warn_once(path, f"repa_fast: ignoring the corrupt Triton tile cache {path} "
                             f"({error}); tiles are tuned again and the file rewritten")
            entries = {}
        _DISK.update(loaded=True, path=path, entries=entries)
        return entries


def save() -> Optional[str]:
    """Write the tiles tuned in this process to the disk cache (merged with the entries it
    holds; atomic, unique temporary name so ranks can write at once). Returns the path, or
    None when the cache is off or there is nothing to save."""
    from ..atomic_write import atomic_open
    with _LOCK:
        path = _DISK["path"] if _DISK["loaded"] else cache_path()
        if path is None or not any(_TUNED.values()):
            return None
        try:
            tiles = _read_file(path) or {}
        except ValueError:
            tiles = {}  # corrupt: replaced (the warning came when it was loaded)
        for name, table in _TUNED.items():
            kernel = _REGISTRY[name]
            tiles.update({kernel.key_string(k): dict(v) for k, v in table.items()})
        data = {"format": FORMAT, "card": _card(), "triton": triton.__version__,
                "tiles": dict(sorted(tiles.items()))}
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with atomic_open(path, "w", unique=True) as f:
                json.dump(data, f, indent=1)
                f.write("\n")
        except OSError as error:
            _warn_once(path, f"repa_fast: cannot write the Triton tile cache {path}: {error}")
            return None
        return path


# ----------------------------------------------------------------------------- the API

def export_tiles(used_only: bool = False) -> dict[str, dict[str, int]]:
    """Every known tile choice, ``{key string: {"BLOCK_M": ..., "num_warps": ...,
    "num_stages": ...}}`` (JSON-able): the disk cache's, the installed ones and the ones in
    use in this process (which win); ``used_only``: only those used in this process."""
    with _LOCK:
        merged: dict[str, dict[tuple, dict]] = {}
        sources = [] if used_only else [_disk_entries(), _INSTALLED]
        sources.append({name: k.cache for name, k in _kernels().items()})
        for source in sources:
            for name, table in source.items():
                merged.setdefault(name, {}).update(table)
        return {_REGISTRY[name].key_string(key): dict(config)
                for name, table in sorted(merged.items()) for key, config in table.items()}


def install_tiles(tiles: dict) -> None:
    """Use these tile choices (from :func:`export_tiles`, e.g. kept in a checkpoint or sent by
    rank 0): their keys are never tuned, and a key already in use switches to the given
    config. All entries are checked first; ValueError names the first bad one and nothing is
    installed then."""
    if not isinstance(tiles, dict):
        raise ValueError(f"tiles must be a dict {{key string: config dict}} as export_tiles() "
                         f"returns; got {type(tiles).__name__}")
    parsed = [_parse_entry(key_string, config, listed=False)
              for key_string, config in tiles.items()]
    with _LOCK:
        for name, key, config in parsed:
            _INSTALLED.setdefault(name, {})[key] = config
            kernel = _REGISTRY[name]
            if key in kernel.cache:
                kernel.cache[key] = config


def tuning_count() -> int:
    """How many keys this process has tuned (timed every config for)."""
    return _COUNTS["tuned"]


def counts() -> dict[str, float]:
    """How the keys first used in this process were resolved: ``tuned``, from the disk
    ``cache``, ``installed``, ``single`` (only one config); ``seconds`` spent tuning."""
    return dict(_COUNTS)


def set_launch_hook(hook: Optional[Callable[[str, str, dict], None]]) -> None:
    """Call ``hook(kernel name, key string, config)`` at every launch (tests, debugging);
    None removes it."""
    global _launch_hook
    _launch_hook = hook


def warmup(fn: Callable[[], None]) -> str:
    """Run ``fn`` (e.g. one forward + backward of the fused op at the training shapes) so that
    every tile it needs is tuned, loaded or installed before training; save the disk cache if
    anything was tuned. Returns a one-line summary."""
    before = counts()
    start = time.perf_counter()
    fn()
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    except ImportError:
        pass
    seconds = time.perf_counter() - start
    after = counts()
    delta = {k: after[k] - before[k] for k in ("tuned", "cache", "installed", "single")}
    path = save() if delta["tuned"] else None
    path = path or (_DISK["path"] if _DISK["loaded"] else cache_path())
    text = f"triton tiles: {delta['tuned']} tuned in {seconds:.1f} s, {delta['cache']} from cache"
    if delta["installed"]:
        text += f", {delta['installed']} installed"
    if delta["single"]:
        text += f", {delta['single']} with a single config"
    return text + (f" ({path})" if path else f" (disk cache off: {ENV_CACHE})")


def broadcast_tiles(src: int = 0, group=None) -> int:
    """Send rank ``src``'s :func:`export_tiles` to every rank of ``group`` (torch.distributed,
    ``broadcast_object_list``) and install it on the others, so all ranks launch the same
    tiles. A no-op returning 0 when torch.distributed is not initialised; else the number of
    entries."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    box = [export_tiles() if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    if dist.get_rank() != src:
        install_tiles(box[0])
    return len(box[0])
