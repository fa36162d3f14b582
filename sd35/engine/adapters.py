"""LoRA adapters served as models: loaded once at start, switched per batch without reloading.

One pipeline call runs one adapter (or none) at one scale, so the worker
batches by (adapter, scale) and activates the batch's adapter before the call:

- without ``TORCH_COMPILE``, every adapter is loaded under its own name and a
  switch is diffusers' ``set_adapters`` / ``disable_lora``;
- with ``TORCH_COMPILE``, changing the active adapter set would recompile the
  transformer, so there is a single adapter slot (``enable_lora_hotswap``:
  ranks padded to the largest, scalings as tensors). Each adapter is hot-swapped
  into the slot once at start, which proves it fits, and its padded weights are
  kept; a switch copies them back in place and sets the scalings, and the base
  model is the slot at scale 0. No graph changes, so nothing recompiles.

Anything that makes an adapter unusable is an :class:`AdapterError` naming it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sd35.config import AdapterSpec, Settings
from sd35.engine.refusal import LoadRefusedError

logger = logging.getLogger(__name__)

# The adapter name of the hot-swap slot (TORCH_COMPILE).
SLOT = "sd35_slot"
TRANSFORMER_PREFIX = "transformer."


class AdapterError(LoadRefusedError):
    """An adapter cannot be served; the message names it and says why."""

    def __init__(self, adapter: AdapterSpec, reason: str) -> None:
        super().__init__(f"LORA_ADAPTERS: adapter {adapter.name!r} ({adapter.location}) cannot be used: {reason}")


def resolve(settings: Settings, model: str | None, lora_scale: float | None) -> tuple[str | None, float]:
    """The (adapter, scale) a request's ``model`` and ``lora_scale`` select: an adapter's name selects it;
    anything else (the base id, ``dall-e-3``, nothing) is the base model, whose scale is irrelevant."""
    adapter = settings.adapter(model)
    if adapter is None:
        return None, 0.0
    return adapter.name, adapter.scale if lora_scale is None else lora_scale


@dataclass
class _Snapshot:
    """An adapter as it sits in the hot-swap slot: its padded weights and per-layer scalings."""

    weights: dict[str, Any]
    scalings: dict[str, float]


@dataclass
class AdapterBank:
    """The adapters loaded into one pipeline, and which one is active."""

    pipeline: Any
    hotswap: bool
    names: list[str] = field(default_factory=list)
    _snapshots: dict[str, _Snapshot] = field(default_factory=dict)
    _in_slot: str | None = None
    _active: tuple[str | None, float] | None = None
    # The slot's layers and parameters, found once: walking the transformer per switch would cost milliseconds.
    _layers: dict[str, Any] = field(default_factory=dict)
    _parameters: dict[str, Any] = field(default_factory=dict)

    def activate(self, name: str | None, scale: float) -> None:
        """Make the next pipeline call run ``name`` at ``scale`` (None: the base model)."""
        wanted = (name, scale if name is not None else 0.0)
        if wanted == self._active:
            return
        if name is not None and name not in self.names:
            # Never the base model under an adapter's name.
            raise KeyError(f"LoRA adapter {name!r} is not loaded")
        if self.hotswap:
            self._activate_slot(name, scale)
        elif name is None:
            self.pipeline.disable_lora()
        else:
            self.pipeline.enable_lora()
            self.pipeline.set_adapters([name], adapter_weights=[scale])
        self._active = wanted

    def _activate_slot(self, name: str | None, scale: float) -> None:
        import torch

        if not self._layers:
            self._layers = _slot_layers(self.pipeline.transformer)
            self._parameters = dict(self.pipeline.transformer.named_parameters())
        with torch.no_grad():
            if name is not None and name != self._in_slot:
                for key, weight in self._snapshots[name].weights.items():
                    self._parameters[key].copy_(weight)
                self._in_slot = name
            scalings = self._snapshots[name].scalings if name is not None else {}
            for module_name, layer in self._layers.items():
                layer.scaling[SLOT].fill_(scalings.get(module_name, 0.0) * scale)

    def snapshot(self, name: str) -> None:
        """Keep what the slot holds now as adapter ``name`` (just hot-swapped in)."""
        transformer = self.pipeline.transformer
        weights = {
            key: value.detach().clone()
            for key, value in transformer.named_parameters()
            if ".lora_" in key and key.endswith(f".{SLOT}.weight")
        }
        scalings = {module_name: float(layer.scaling[SLOT]) for module_name, layer in _slot_layers(transformer).items()}
        self._snapshots[name] = _Snapshot(weights, scalings)
        self._in_slot = name
        self._active = None


def _slot_layers(transformer: Any) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {
        name: module
        for name, module in transformer.named_modules()
        if isinstance(module, LoraLayer) and SLOT in module.lora_A
    }


def lora_layers(transformer: Any, adapter_name: str) -> int:
    """How many transformer layers carry the adapter: zero means it would change nothing."""
    from peft.tuners.lora import LoraLayer

    return sum(1 for module in transformer.modules() if isinstance(module, LoraLayer) and adapter_name in module.lora_A)


def _read(pipe: Any, adapter: AdapterSpec, settings: Settings) -> dict[str, Any]:
    """The adapter's state dict in diffusers' key layout, downloaded like the model (token, cache)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )
    from safetensors import SafetensorError

    try:
        state_dict = pipe.lora_state_dict(adapter.source, weight_name=adapter.weight_name, token=settings.hf_token)
    except GatedRepoError:
        raise AdapterError(adapter, "it is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except (RepositoryNotFoundError, HFValidationError):
        raise AdapterError(adapter, "not found on the Hugging Face Hub (a private repo also needs HF_TOKEN)") from None
    except EntryNotFoundError:
        raise AdapterError(adapter, f"the repo has no file {adapter.weight_name!r}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError):
        raise AdapterError(adapter, _UNREACHABLE) from None
    except SafetensorError as exc:
        raise AdapterError(adapter, f"not a readable .safetensors file ({exc})") from None
    except OSError as exc:
        if "Unable to load weights" in str(exc):  # diffusers' wording for a file it cannot parse
            raise AdapterError(adapter, "not a readable .safetensors file") from None
        if "no file named" in str(exc):
            raise AdapterError(
                adapter, "no LoRA weights file found: expected pytorch_lora_weights.safetensors, or name the file"
            ) from None
        raise AdapterError(adapter, f"could not be read: {exc}") from None
    except ValueError as exc:
        if "Invalid LoRA checkpoint" in str(exc):
            raise AdapterError(adapter, "not a LoRA: none of its tensor names contains 'lora'") from None
        raise AdapterError(adapter, f"not a LoRA diffusers can read: {exc}") from None
    except Exception as exc:
        # httpx's connection errors are no ConnectionError.
        if "Connect" in type(exc).__name__ or "Timeout" in type(exc).__name__:
            raise AdapterError(adapter, _UNREACHABLE) from None
        raise
    if not any("lora" in key for key in state_dict):
        raise AdapterError(adapter, "not a LoRA: none of its tensor names contains 'lora'")
    if not any(key.startswith(TRANSFORMER_PREFIX) for key in state_dict):
        raise AdapterError(adapter, _NO_LAYERS)
    return state_dict


_UNREACHABLE = (
    "not in the local cache (HF_HOME) and the Hugging Face Hub is unreachable (no network, a proxy, or "
    "HF_HUB_OFFLINE=1)"
)
_NO_LAYERS = (
    "it gives the transformer no LoRA layers (its keys match no layer of this model; Kohya/civitai-style "
    "SD3.5 files can load as nothing without an error: convert it to the diffusers format)"
)


def _targets(state_dict: dict[str, Any]) -> set[str]:
    """The transformer layers an adapter changes."""
    suffix = ".lora_A.weight"
    return {
        key[len(TRANSFORMER_PREFIX) : -len(suffix)]
        for key in state_dict
        if key.startswith(TRANSFORMER_PREFIX) and key.endswith(suffix)
    }


def _rank(state_dict: dict[str, Any]) -> int:
    return max(value.shape[0] for key, value in state_dict.items() if key.endswith("lora_A.weight"))


def _load(pipe: Any, adapter: AdapterSpec, settings: Settings, adapter_name: str, hotswap: bool) -> None:
    """Load one adapter under ``adapter_name``; what diffusers or peft refuse becomes an :class:`AdapterError`.

    From its source again, not from the state dict already read: only the file
    carries the LoRA config (alpha) diffusers saves in its metadata.
    """
    from peft.tuners.tuners_utils import NoMatchingPeftModuleError

    try:
        pipe.load_lora_weights(
            adapter.source,
            weight_name=adapter.weight_name,
            token=settings.hf_token,
            adapter_name=adapter_name,
            hotswap=hotswap,
        )
    except NoMatchingPeftModuleError:
        raise AdapterError(adapter, _NO_LAYERS) from None
    except (RuntimeError, ValueError) as exc:
        if not hotswap:
            raise AdapterError(adapter, f"diffusers could not load it: {exc}") from None
        raise AdapterError(
            adapter,
            f"it cannot be hot-swapped, as TORCH_COMPILE needs ({' '.join(str(exc).split())[:300]}); "
            "serve it with TORCH_COMPILE=off",
        ) from None
    if lora_layers(pipe.transformer, adapter_name) == 0:
        raise AdapterError(adapter, _NO_LAYERS)


def load_adapters(pipe: Any, settings: Settings) -> None:
    """Load ``LORA_ADAPTERS`` into ``pipe`` (before it is compiled); sets ``pipe.sd35_adapters``."""
    if not settings.lora_adapters:
        return
    hotswap = settings.torch_compile != "off"
    bank = AdapterBank(pipe, hotswap)
    state_dicts = {adapter.name: _read(pipe, adapter, settings) for adapter in settings.lora_adapters}
    if hotswap:
        _load_hotswap(pipe, settings, state_dicts, bank)
    else:
        for adapter in settings.lora_adapters:
            _load(pipe, adapter, settings, adapter.name, hotswap=False)
            bank.names.append(adapter.name)
    for adapter in settings.lora_adapters:
        state_dict = state_dicts[adapter.name]
        layers = len(_targets(state_dict))
        text = any(not key.startswith(TRANSFORMER_PREFIX) for key in state_dict)
        logger.info(
            "LoRA adapter %s from %s: %d transformer layers%s, rank %d, default scale %g",
            adapter.name,
            adapter.location,
            layers,
            " and the text encoders" if text else "",
            _rank(state_dict),
            adapter.scale,
        )
    bank.activate(None, 0.0)
    pipe.sd35_adapters = bank


def _load_hotswap(pipe: Any, settings: Settings, state_dicts: dict[str, dict[str, Any]], bank: AdapterBank) -> None:
    adapters = settings.lora_adapters
    for adapter in adapters:
        if any(not key.startswith(TRANSFORMER_PREFIX) for key in state_dicts[adapter.name]):
            raise AdapterError(
                adapter,
                "it has text-encoder LoRA layers, which cannot be hot-swapped under TORCH_COMPILE; "
                "serve it with TORCH_COMPILE=off",
            )
    # The slot takes the layers of the adapter that targets the most; the
    # others must fit in them, at a rank no higher than the largest.
    ordered = sorted(adapters, key=lambda a: -len(_targets(state_dicts[a.name])))
    slot_layers = _targets(state_dicts[ordered[0].name])
    for adapter in ordered[1:]:
        extra = sorted(_targets(state_dicts[adapter.name]) - slot_layers)
        if extra:
            raise AdapterError(
                adapter,
                f"under TORCH_COMPILE every adapter must target a subset of the layers of the largest one "
                f"({ordered[0].name!r}), and this one also targets {len(extra)} others ({', '.join(extra[:3])}"
                f"{', ...' if len(extra) > 3 else ''}); serve it with TORCH_COMPILE=off",
            )
    pipe.enable_lora_hotswap(target_rank=max(_rank(sd) for sd in state_dicts.values()))
    for index, adapter in enumerate(ordered):
        _load(pipe, adapter, settings, SLOT, hotswap=index > 0)
        bank.snapshot(adapter.name)
        bank.names.append(adapter.name)


def activate(pipe: Any, name: str | None, scale: float) -> None:
    """Make the next call of ``pipe`` (or a pipeline sharing its modules) run adapter ``name`` at ``scale``."""
    bank: AdapterBank | None = getattr(pipe, "sd35_adapters", None)
    if bank is not None:
        bank.activate(name, scale)
    elif name is not None:
        raise KeyError(f"LoRA adapter {name!r} is not loaded")
