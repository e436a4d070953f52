"""An LRU of LoRA adapters loaded side by side on one base model, for peft's mixed-adapter batches.

The first adapter wraps the base model in a `PeftModelForCausalLM` (peft injects LoRA layers into the base
model's modules in place); later ones are added with `load_adapter` and removed with `delete_adapter`. When
the last one goes, `unload()` restores the plain base modules. Rows of one forward pick their adapter with
`adapter_names=[...]` ("__base__" for none), so every loaded adapter is usable at once and the "active
adapter" of peft never matters here.

Rows are told their adapter by forward pre-hooks that this cache registers once per adapter change on every
LoRA layer (`forward(adapter_names, **inputs)` sets the list the hooks inject). Passing `adapter_names` to
the PeftModel instead would make peft walk every module of the model two or three times per forward, to check
the names and to register and remove the same hooks: milliseconds per decode step on a 7B model.

Not thread-safe for model changes: the engine calls `ensure`/`unload` only from its loop thread, between
steps. `loaded()` is safe from any thread (stats).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModelForCausalLM
from peft.tuners.lora import LoraLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from safetensors import safe_open
from torch import nn
from torch.utils.hooks import RemovableHandle

from workers.inference.request import BASE_ADAPTER

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_NAME = re.compile(r"^[A-Za-z0-9_\-:@]+$")  # no dots: peft uses adapter names as module-dict keys
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
)


class AdapterError(ValueError):
    """An adapter cannot be loaded, used or unloaded."""


class AdapterMismatch(AdapterError):
    """The adapter was not trained for this base model (or is not a LoRA adapter this engine can batch)."""


class AdapterNotLoaded(AdapterError):
    """A request names an adapter that is not loaded and gave no path to load it from."""


class AdapterInUse(AdapterError):
    """The adapter is used by a running request."""


class AdapterCapacityFull(AdapterError):
    """Every slot holds an adapter in use; the caller should retry once a request finishes."""


class AdapterCache:
    """At most `capacity` LoRA adapters on `base_model`, evicting the least recently used idle one."""

    def __init__(
        self,
        base_model: nn.Module,
        capacity: int,
        *,
        device: torch.device,
        validate: Callable[[nn.Module, str], None] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"adapter capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._base = base_model
        self._device = device
        self._peft: PeftModelForCausalLM | None = None
        self._paths: OrderedDict[str, Path] = OrderedDict()  # LRU order: oldest first
        self._lock = threading.Lock()  # guards `_paths` for readers on other threads
        self._hooks: list[RemovableHandle] = []
        self._rows: list[str] | None = None  # adapter per batch row during `forward`, read by the hooks
        # Extra checks of a loaded adapter (the static decode path's); a failure unloads it again.
        self._validate = validate
        self.version = 0  # bumped on every load and unload: lets mirrors of the loaded set (LoRA stacks) resync

    @property
    def model(self) -> nn.Module:
        """The module to run: the PeftModel while any adapter is loaded, else the plain base model."""
        return self._peft if self._peft is not None else self._base

    @property
    def is_peft(self) -> bool:
        return self._peft is not None

    def loaded(self) -> list[str]:
        """Adapter names, least recently used first."""
        with self._lock:
            return list(self._paths)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._paths

    def touch(self, name: str) -> None:
        """Mark `name` as just used."""
        with self._lock:
            if name in self._paths:
                self._paths.move_to_end(name)

    def forward(self, adapter_names: list[str], **inputs: Any) -> Any:
        """Run the model on `inputs`, row i with adapter `adapter_names[i]` (BASE_ADAPTER: the base model)."""
        if self._peft is None:
            if any(a != BASE_ADAPTER for a in adapter_names):
                raise AdapterNotLoaded(f"adapters {sorted(set(adapter_names) - {BASE_ADAPTER})} are not loaded")
            return self._base(**inputs)
        unknown = set(adapter_names) - self._paths.keys() - {BASE_ADAPTER}
        if unknown:
            raise AdapterNotLoaded(f"adapters {sorted(unknown)} are not loaded")
        self._rows = adapter_names
        try:
            return self._peft(**inputs)
        finally:
            self._rows = None

    def ensure(self, name: str, path: str | Path, in_use: Collection[str] = ()) -> list[str]:
        """Make adapter `name` (from directory `path`) loaded; return the names evicted to make room.

        Raises `AdapterMismatch` for an adapter of another base model, `AdapterCapacityFull` when every slot
        is held by an adapter in `in_use`, `AdapterError` for anything else wrong with the adapter.
        """
        directory = Path(path).expanduser().resolve()
        with self._lock:
            known = self._paths.get(name)
        if known is not None:
            if known != directory:
                raise AdapterError(f"adapter {name!r} is already loaded from {known}, not {directory}")
            self.touch(name)
            return []
        if not _NAME.match(name):
            raise AdapterError(f"invalid adapter name {name!r} (letters, digits, '_', '-', ':', '@' only)")
        # Checked before any file is read: the engine retries a deferred request every step.
        loaded = self.loaded()
        idle = [n for n in loaded if n not in in_use]  # least recently used first
        to_evict = max(0, len(loaded) + 1 - self.capacity)
        if to_evict > len(idle):
            raise AdapterCapacityFull(f"all {self.capacity} adapter slots are in use by running requests")
        config = self._check_compatible(name, directory)
        evicted = idle[:to_evict]
        for victim in evicted:
            self._remove(victim)
        self._load(name, directory, config)
        with self._lock:
            self._paths[name] = directory
        if self._validate is not None:
            try:
                self._validate(self.model, name)
            except Exception:
                self._remove(name)
                raise
        self.version += 1
        log.info("loaded adapter %s from %s (evicted: %s)", name, directory, evicted or "none")
        return evicted

    def check_available(self, name: str | None, path: str | Path | None) -> None:
        """At submit time (any thread): `AdapterNotLoaded` if `name` is neither loaded nor loadable from a path."""
        if name is not None and path is None and name not in self:
            raise AdapterNotLoaded(f"adapter {name!r} is not loaded and no adapter_path was given")

    def acquire(self, name: str, path: str | Path | None, *, in_use: Collection[str], user: str) -> bool:
        """Make adapter `name` ready for work that is about to run (generation rows or a score call).

        Loads it from `path` when given (evicting idle adapters), else marks the loaded one as just used.
        Returns False when every slot holds an adapter in `in_use`: the caller keeps the work and retries.
        Raises `AdapterNotLoaded` when it was unloaded since `user` (what is waiting for it, for the message)
        was queued without a path, and the errors of `ensure` for a bad adapter.
        """
        if name == BASE_ADAPTER:
            return True
        try:
            if path is not None:
                self.ensure(name, path, in_use=in_use)
            elif name in self:
                self.touch(name)
            else:
                raise AdapterNotLoaded(f"adapter {name!r} was unloaded before {user} started")
        except AdapterCapacityFull:
            return False
        return True

    def unload(self, name: str, in_use: Collection[str] = ()) -> None:
        if name not in self:
            raise AdapterNotLoaded(f"adapter {name!r} is not loaded")
        if name in in_use:
            raise AdapterInUse(f"adapter {name!r} is used by a running request")
        self._remove(name)

    # --- internals ---------------------------------------------------------------------------------------

    def _load(self, name: str, directory: Path, config: LoraConfig) -> None:
        try:
            self._inject(name, directory, config)
        finally:
            self._install_hooks()  # new LoRA layers may have appeared (or gone, after a failure)

    def _inject(self, name: str, directory: Path, config: LoraConfig) -> None:
        kwargs: dict[str, Any] = {
            "is_trainable": False,
            # Keep adapter weights in the base model's dtype (bf16 on GPU): inference needs no fp32 upcast.
            "autocast_adapter_dtype": False,
            "low_cpu_mem_usage": True,
            "torch_device": str(self._device),
        }
        if self._peft is not None:
            try:
                self._peft.load_adapter(str(directory), adapter_name=name, **kwargs)
            except Exception:
                if name in self._peft.peft_config:
                    self._peft.delete_adapter(name)
                raise
        else:
            # What `PeftModel.from_pretrained` does, in two steps so a failed weight load can be rolled back:
            # the injection already changed the base model's modules in place.
            peft = PeftModelForCausalLM(
                self._base, config, adapter_name=name, autocast_adapter_dtype=False, low_cpu_mem_usage=True
            )
            try:
                peft.load_adapter(str(directory), adapter_name=name, **kwargs)
            except Exception:
                self._base = peft.unload()
                raise
            self._peft = peft
        self.model.eval()  # peft refuses `adapter_names` in training mode

    def _remove(self, name: str) -> None:
        with self._lock:
            del self._paths[name]
        assert self._peft is not None
        if self._paths:
            with warnings.catch_warnings():
                # "Adapter X was active which is now deleted": expected, the active adapter is unused here.
                warnings.filterwarnings("ignore", message=r"Adapter .* was active", category=UserWarning)
                self._peft.delete_adapter(name)
        else:
            # peft cannot run without an adapter config; drop the wrapper and its LoRA layers altogether.
            self._base = self._peft.unload()
            self._peft = None
        self._install_hooks()
        self.version += 1
        log.info("unloaded adapter %s", name)

    def _install_hooks(self) -> None:
        """(Re)register the pre-hook that hands each LoRA layer the rows' adapter names (see the module doc)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self._peft is None:
            return
        for module in self._peft.modules():
            # The modules peft itself would hook for `adapter_names` (`LoraModel._enable_peft_forward_hooks`).
            if isinstance(module, LoraLayer | AuxiliaryTrainingWrapper):
                self._hooks.append(module.register_forward_pre_hook(self._inject_rows, with_kwargs=True))

    def _inject_rows(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self._rows is not None:
            kwargs["adapter_names"] = self._rows
        return args, kwargs

    def _check_compatible(self, name: str, directory: Path) -> LoraConfig:
        """Validate the adapter against the base model before touching the model."""
        weights, config_file = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
        if not config_file.is_file():
            raise AdapterError(f"adapter {name!r}: {config_file} not found")
        if not weights.is_file():
            # Pickled adapter_model.bin files are refused: loading them can run arbitrary code.
            raise AdapterError(f"adapter {name!r}: {weights} not found (only safetensors adapters are loaded)")
        raw = json.loads(config_file.read_text())
        if raw.get("peft_type") != "LORA":
            raise AdapterMismatch(f"adapter {name!r} is {raw.get('peft_type')!r}, only LoRA adapters are supported")
        config = LoraConfig.from_pretrained(str(directory))
        if config.use_dora:
            raise AdapterMismatch(f"adapter {name!r} uses DoRA, which peft cannot mix in one batch")
        base = self._base_module_tree()
        problems: list[str] = []
        with safe_open(str(weights), framework="pt") as tensors:
            for key in tensors.keys():  # noqa: SIM118 - safe_open has no __iter__
                match = _LORA_KEY.match(key)
                if match is None:
                    continue  # modules_to_save and the like: peft reports those itself
                problem = _check_lora_tensor(base, match["module"], match["kind"], tensors.get_slice(key).get_shape())
                if problem:
                    problems.append(problem)
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise AdapterMismatch(
                f"adapter {name!r} (trained on {raw.get('base_model_name_or_path')!r}) does not fit this base "
                f"model: {shown}"
            )
        return config

    def _base_module_tree(self) -> nn.Module:
        """The transformers model whose module names adapter keys refer to (inside the PeftModel if wrapped)."""
        if self._peft is not None:
            inner = self._peft.base_model.model
            assert isinstance(inner, nn.Module)
            return inner
        return self._base


def _check_lora_tensor(model: nn.Module, module_name: str, kind: str, shape: list[int]) -> str | None:
    """None if a LoRA tensor of `shape` fits the base module, else why not."""
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return f"no module {module_name}"
    module = getattr(module, "base_layer", module)  # already wrapped by an earlier adapter
    if isinstance(module, nn.Linear):
        expected = {"lora_A": (1, module.in_features), "lora_B": (0, module.out_features)}.get(kind)
    elif isinstance(module, nn.Embedding):
        expected = {"lora_embedding_A": (1, module.num_embeddings), "lora_embedding_B": (0, module.embedding_dim)}.get(
            kind
        )
    else:
        return None  # other layer types (conv, Conv1D): peft's own loading checks them
    if expected is None or len(shape) < 2:
        return f"{module_name}.{kind} has unexpected shape {shape}"
    axis, size = expected
    if shape[axis] != size:
        return f"{module_name}.{kind} has shape {shape}, the base layer needs {size} on axis {axis}"
    return None
