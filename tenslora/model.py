"""``TensLoRAModel``: inject tensor-factorized adapters into a Hugging Face model."""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from tenslora.adapter import TensorAdapter, begin_passes
from tenslora.config import TensLoRAConfig, warn_ranks_above_sizes
from tenslora.errors import DamagedFileError
from tenslora.constructions import get_construction
from tenslora.io import write_dir_atomic
from tenslora.fused import AdaptedFused
from tenslora.layer import AdaptedLinear
from tenslora.layout import column_index, tensor_layout
from tenslora.mlp import MlpTargets, build_mlp, find_mlp_targets
from tenslora.params import summary_line
from tenslora.targets import (FUSED_NAMES, Target, describe_targets, find_head_modules, fingerprint, model_shape,
                               select_targets)
from tenslora.tensor.factorized import FACTORIZATIONS

CONFIG_FILE = "tenslora_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TRAINER_WEIGHTS_FILE = "model.safetensors"  # what transformers.Trainer writes from ``state_dict()``
RECORD_KEY = "tenslora_config.json"  # in ``state_dict()``: the config record, UTF-8 JSON as uint8


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing or unreadable file is an error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; the adapter directory is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise DamagedFileError(path, f"{path} is not a readable safetensors file ({err}); save the adapter again") \
            from None


def adapter_generator(seed: int, name: str) -> torch.Generator:
    """A generator of its own for each adapter, from the seed and the adapter's name."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def encode_record(record: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(record).encode()), dtype=torch.uint8)


def decode_record(tensor: torch.Tensor) -> dict:
    return json.loads(bytes(tensor.tolist()).decode())


def _tensor_name(stack: str, name: str) -> str:
    """Adapter tensor name: the construction's name, prefixed by the stack's when there are several."""
    return f"{stack}__{name}" if stack else name


def _layer_key(t: Target) -> tuple:
    """Key of ``TensLoRAModel.layers``: ``(layer, proj)``, or ``((stack, layer), proj)`` with several stacks."""
    return ((t.stack, t.layer) if t.stack else t.layer, t.proj)


class _BoundForward:
    """``adapted.forward``: calls ``adapted._forward`` and shows the base model's signature, which is
    what ``transformers.Trainer`` inspects to keep dataset columns (``input_ids``, ``labels``...)."""

    def __init__(self, owner: "AdaptedModel"):
        self.owner = owner

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.owner.base_model.forward)

    def __call__(self, *args, **kwargs):
        return self.owner._forward(*args, **kwargs)


def _class_forward(self, *args, labels=None, **kwargs):
    """``AdaptedModel.forward`` read on the class (``transformers`` finds label names there)."""
    if labels is not None:
        kwargs["labels"] = labels
    return self._forward(*args, **kwargs)


class _Forward:
    """On an instance: a :class:`_BoundForward`; on the class: :func:`_class_forward`."""

    def __get__(self, owner, owner_type=None):
        return _class_forward if owner is None else _BoundForward(owner)


class AdaptedModel(nn.Module):
    """What TensLoRA and the PEFT LoRA baseline share: attribute delegation, task heads, saving.

    Subclasses set ``base_model``, ``adapter_config``, ``shape`` and ``head_modules`` and implement
    ``_forward``. ``state_dict()`` holds what the adapter owns (the adapter file's tensors) plus the
    config record, so ``transformers.Trainer``'s checkpoints are small, never hold tied base
    weights, resume through ``load_state_dict`` and load with ``load_adapted_model``.
    """

    forward = _Forward()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def head_state(self) -> dict[str, torch.Tensor]:
        model = self.base_model
        return {f"head.{path}.{k}": v for path in self.head_modules
                for k, v in model.get_submodule(path).state_dict().items()}

    def adapter_parameters(self) -> int:
        """Trainable adapter parameters (task head excluded)."""
        raise NotImplementedError

    def _train_heads(self, model: nn.Module, head_modules: list[str]) -> None:
        """Record the task-head module paths (from :func:`find_head_modules`) and make them trainable."""
        self.head_modules = head_modules
        for path in self.head_modules:
            model.get_submodule(path).requires_grad_(True)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Adapter tensors to save, keyed ``adapters.<tensor>.<param>`` (head excluded)."""
        raise NotImplementedError

    def save_adapter(self, path: str | Path) -> Path:
        """Write ``tenslora_config.json`` and ``adapter_model.safetensors`` (adapter + head only)."""
        from safetensors.torch import save_file
        tensors = {k: v.contiguous() for k, v in self.state_dict().items() if k != RECORD_KEY}

        def fill(tmp: Path) -> None:
            save_file(tensors, str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(self._config_record(), indent=2))
        return write_dir_atomic(path, fill)

    def save_pretrained(self, path: str | Path, **_ignored) -> Path:
        """The adapter directory (as :meth:`save_adapter`), for code that calls ``save_pretrained``."""
        return self.save_adapter(path)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The adapter's own tensors (keys of the adapter file; detached, sharing the parameters' storage)
        and ``RECORD_KEY``; no base weights. ``keep_vars`` is ignored."""
        tensors = {**self.adapter_state(), **self.head_state()}
        tensors[RECORD_KEY] = encode_record(self._config_record())
        out = destination if destination is not None else {}
        out.update({prefix + k: v for k, v in tensors.items()})
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load what :meth:`state_dict` returned (the record is ignored); ``strict`` as in torch."""
        from torch.nn.modules.module import _IncompatibleKeys
        tensors = {k: v for k, v in state_dict.items() if k != RECORD_KEY}
        own = {k: v for k, v in self.state_dict().items() if k != RECORD_KEY}
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if strict and (missing or unexpected):
            raise ValueError(f"adapter state does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for key in set(own) & set(tensors):
            if own[key].shape != tensors[key].shape:
                raise ValueError(f"adapter weight {key!r} has shape {tuple(tensors[key].shape)} in the state, "
                                 f"{tuple(own[key].shape)} in the model")
        with torch.no_grad():
            for key in set(own) & set(tensors):
                own[key].copy_(tensors[key])
        return _IncompatibleKeys(missing, unexpected)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | Path, config: TensLoRAConfig,
                        tensors: dict[str, torch.Tensor]) -> "AdaptedModel":
        """Rebuild on ``model`` (already checked to fit) from the saved ``tensors`` of ``path``."""
        adapted = cls(model, config)
        adapted.load_state_dict(tensors)
        return adapted

    def print_trainable_parameters(self) -> None:
        print(summary_line(self, self.adapter_parameters()))

    @classmethod
    def model_fingerprint(cls, model: nn.Module, config: TensLoRAConfig) -> dict:
        """What a saved adapter of this class must match on ``model`` (architecture, adapted shapes)."""
        return fingerprint(model, model_shape(model, select_targets(model, config.targets, config.target_modules)))

    def shape_fingerprint(self) -> dict:
        return fingerprint(self.base_model, self.shape)

    def _config_record(self) -> dict:
        return {"method": self.adapter_config.method, "config": self.adapter_config.to_dict(),
                "model": self.shape_fingerprint(), "head_modules": list(self.head_modules)}


def _mlp_targets(model: nn.Module, config: TensLoRAConfig, targets: list[Target]) -> MlpTargets | None:
    return find_mlp_targets(model, targets) if config.targets == "all-linear" else None


def _with_mlp(record: dict, mlp: MlpTargets | None) -> dict:
    return record if mlp is None else {**record, "mlp": mlp.record()}


class TensLoRAModel(AdaptedModel):
    """A model whose Q/K/V projections (and O, with ``targets="qkvo"``) carry TensLoRA updates.

    ``adapters[name]`` is a :class:`TensorAdapter` (tensor names: ``all``, ``layer_3``, ``query``,
    ``query_layer_3`` depending on the construction). Calling the model opens one adapter pass, so
    each tensor's slices are computed once per forward.
    """

    def __init__(self, model: nn.Module, config: TensLoRAConfig):
        super().__init__()
        if config.method != "tenslora":
            raise ValueError(f"TensLoRAModel takes a tensor construction, not {config.construction!r}")
        self.base_model = model
        self.adapter_config = config
        construction = get_construction(config.construction)
        targets = select_targets(model, config.targets, config.target_modules)
        self.shape = model_shape(model, targets)
        self.mlp = _mlp_targets(model, config, targets)
        self.report = describe_targets(targets) + (f"\n{self.mlp.describe()}" if self.mlp else "")
        if self.shape.stacks:
            warnings.warn(f"{type(model).__name__}: {len(self.shape.stacks)} attention stacks, each with its own "
                          f"tensors:\n{self.report}", stacklevel=3)
        head_modules = find_head_modules(model, config.modules_to_save)
        ranks = config.mode_ranks()
        device = next(iter(model.parameters())).device
        # build everything first; the model is modified only once nothing can fail
        self.adapters = nn.ModuleDict()
        layout, columns = {}, {}  # over all stacks: tensor name -> mode sizes, -> its projections' columns
        for stack, shape in self.shape.by_stack().items():
            stack_columns = [column_index(construction, shape, p) for p in range(len(shape.projections))]
            for name, sizes in tensor_layout(construction, shape).items():
                layout[_tensor_name(stack, name)] = sizes
                columns[_tensor_name(stack, name)] = stack_columns
        kind = FACTORIZATIONS[config.factorization]
        for name, sizes in layout.items():
            warn_ranks_above_sizes(ranks, kind.rank_caps(sizes), f"tensor {name!r}: ",
                                   "its size" if kind.rank_unit == "mode" else "what its bond can use,")
            tensor = kind.from_mode_ranks(sizes, ranks, config.init, adapter_generator(config.seed, name))
            self.adapters[name] = TensorAdapter(tensor, construction,
                                                columns[name] if construction.qkv else None).to(device)
        self.layers: dict[tuple, AdaptedLinear | AdaptedFused] = {}
        placements, fused = [], {}
        for t in targets:
            adapter = self.adapters[_tensor_name(t.stack, construction.group_key(t.proj, t.layer))]
            index = construction.batch_index(t.proj_index, t.layer_index)
            if t.columns is not None:
                fused.setdefault(t.name, []).append((t, adapter, index))
                continue
            parent_name, _, leaf = t.name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = AdaptedLinear(getattr(parent, leaf), adapter, index, config.scaling, config.dropout, t.transposed)
            placements.append((parent, leaf, layer))
            self.layers[_layer_key(t)] = layer
        for name, parts in fused.items():
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = AdaptedFused(getattr(parent, leaf), [a for _, a, _ in parts], [i for _, _, i in parts],
                                 [t.columns for t, _, _ in parts], config.scaling, config.dropout)
            placements.append((parent, leaf, layer))
            for t, _, _ in parts:
                self.layers[_layer_key(t)] = layer
        if self.mlp is not None:  # the MLP's own tensors (targets all-linear; tenslora/mlp.py)
            mlp_adapters, mlp_layers = build_mlp(model, config, self.mlp, device, adapter_generator)
            self.adapters.update(mlp_adapters)
            for t, parent, leaf, layer in mlp_layers:
                placements.append((parent, leaf, layer))
                self.layers[_layer_key(t)] = layer
        for p in model.parameters():
            p.requires_grad_(False)
        for parent, leaf, layer in placements:
            setattr(parent, leaf, layer)
        self._train_heads(model, head_modules)

    @contextlib.contextmanager
    def adapter_pass(self):
        """Compute every tensor's per-projection slices once for the enclosed forward."""
        try:
            if not any(layer.merged for layer in self.layers.values()):
                begin_passes(list(self.adapters.values()))
            yield
        finally:
            for adapter in self.adapters.values():
                adapter.end_pass()

    def _forward(self, *args, **kwargs):
        with self.adapter_pass():
            return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """``base_model.generate`` with the slices computed once for the whole generation."""
        with torch.no_grad(), self.adapter_pass():
            return self.base_model.generate(*args, **kwargs)

    # analysis -----------------------------------------------------------------------------
    def adapter_parameters(self) -> int:
        return sum(p.numel() for p in self.adapters.parameters())

    @classmethod
    def model_fingerprint(cls, model: nn.Module, config: TensLoRAConfig) -> dict:
        """As :meth:`AdaptedModel.model_fingerprint`, plus ``mlp`` (the MLP members) with targets all-linear."""
        targets = select_targets(model, config.targets, config.target_modules)
        return _with_mlp(fingerprint(model, model_shape(model, targets)), _mlp_targets(model, config, targets))

    def shape_fingerprint(self) -> dict:
        return _with_mlp(fingerprint(self.base_model, self.shape), self.mlp)

    def layer(self, layer, proj: str) -> AdaptedLinear | AdaptedFused:
        """The module adapting ``proj`` of ``layer`` (with several stacks, ``layer`` is ``(stack, layer)``)."""
        try:
            return self.layers[(layer, proj)]
        except KeyError:
            raise ValueError(f"no adapted projection {proj!r} in layer {layer}; adapted: "
                             f"{sorted(self.layers)}") from None

    def delta_weight(self, layer, proj: str) -> torch.Tensor:
        """Dense update of one projection, ``(d_out, d_in)``, scaling included (its own column order)."""
        module = self.layer(layer, proj)
        if isinstance(module, AdaptedFused):
            return module.delta_weight(FUSED_NAMES.index(proj))
        return module.delta_weight()

    def folded_tensor(self, name: str = "all") -> torch.Tensor:
        """The full reconstructed tensor ``name`` (modes as in ``adapters[name].tensor.mode_names``)."""
        if name not in self.adapters:
            raise ValueError(f"no adapter tensor {name!r}; tensors: {', '.join(self.adapters)}")
        return self.adapters[name].tensor.full()

    # merging --------------------------------------------------------------------------------
    def merge(self) -> None:
        for layer in dict.fromkeys(self.layers.values()):
            layer.merge()

    def unmerge(self) -> None:
        for layer in dict.fromkeys(self.layers.values()):
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge every update into its base weight and return the plain base model."""
        self.merge()
        for name, module in list(self.base_model.named_modules()):
            if isinstance(module, (AdaptedLinear, AdaptedFused)):
                parent_name, _, leaf = name.rpartition(".")
                setattr(self.base_model.get_submodule(parent_name), leaf, module.base_layer)
        return self.base_model

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {f"adapters.{k}": v for k, v in self.adapters.state_dict().items()}
