"""One original tenant run on its calibration data one decoder layer at a time.

Calibration needs each tenant as its own family's model, but a whole source model may not fit in
memory next to the consolidation. Here the family's model is built with its parameters on the
meta device; the embeddings, final norms and head are read from the checkpoint, and each decoder
layer is read, run on every calibration chunk, and released before the next one is read.

Every forward is the family's own. Each decoder layer other than the one being run is a stub that
returns the latest output of its stack for the current chunk (what the layer before the one being
run gave), so the family's code computes everything between layers exactly as in a whole-model
forward: masks, rotary embeddings, Switch Transformers' position biases (which its layers hand on
to each other) and encoder output. A forward stops as soon as the layer being run has its output.
"""

from __future__ import annotations

import copy
import itertools
from typing import TYPE_CHECKING

import accelerate
import torch

from ..assembly import TenantSet, checked

if TYPE_CHECKING:
    from .calibration import CalibrationData


class LayerDone(Exception):
    """Ends a forward once the layer being run has given its output: the layers after it are stubs
    with nothing to return yet."""


class StackOutputs:
    """Per calibration chunk, the latest output of each stack of decoder layers (one stack in a
    causal LM; Switch's encoder and decoder), and the chunk being run: every pass over the data
    runs every chunk once, in order. Kept apart from the model it feeds, so that the model's hooks
    and stubs hold no reference cycle and the model is freed as soon as it is dropped."""

    def __init__(self, chunks: int):
        self.latest: list[dict[str, object]] = [{} for _ in range(chunks)]
        self.order = itertools.cycle(range(chunks))
        self.chunk = 0

    def next_chunk(self, module, args) -> None:
        self.chunk = next(self.order)

    def replay(self, stack: str):
        """A layer's stand-in: the stack's latest output for the current chunk, whatever its inputs."""
        return lambda *args, **kwargs: self.latest[self.chunk][stack]

    def keep(self, stack: str):
        """A forward hook for the layer being run: keep its output, end the forward."""

        def hook(module, args, output):
            self.latest[self.chunk][stack] = output
            raise LayerDone

        return hook


class LayerByLayerModel:
    """Tenant `name`'s own model (`model`, its family's class) holding the weights of at most one
    decoder layer at a time. `run_layer(i)`, called for every layer in order, runs layer `i` on every
    chunk of `data`, so that hooks on its modules see each call a whole-model forward makes; after
    the last layer, a forward of `model` on the chunks of `data`, in order, runs the family's head
    on their last hidden states."""

    def __init__(self, tenants: TenantSet, name: str, data: CalibrationData):
        self.tenants, self.name, self.data = tenants, name, data
        self.checkpoint = tenants.checkpoints[name]
        config, family = self.checkpoint.config, tenants.family
        # As `from_pretrained` would build it (on a copy of the config, which this sets the dtype of),
        # with real buffers: rotary frequencies are computed, not read.
        with accelerate.init_empty_weights():
            self.model = family.model_class._from_config(copy.deepcopy(config), dtype=tenants.dtype).eval()
        self.layers = [self.model.get_submodule(path) for path in tenants.layer_paths]
        self.stacks = [path.rpartition(".")[0] for path in tenants.layer_paths]
        self.experts_modules = family.experts_modules(config)
        self.model.load_state_dict(self.outer_state(), strict=False, assign=True)  # the layers come one by one
        self.outputs = StackOutputs(sum(1 for _ in data.batches()))
        self.model.register_forward_pre_hook(self.outputs.next_chunk)
        for layer, stack in zip(self.layers, self.stacks):
            layer.forward = self.outputs.replay(stack)

    def read(
        self, templates: dict[str, torch.Tensor], prefix: str, given: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The tensors named in `templates` (a module's state at `prefix` in the model): from `given`,
        else read by name from the checkpoint; checked, and cast to the dtype the family's model keeps
        each in (DeepSeek-V3's router bias stays float32). A tied embedding is read once for all its names."""
        state, read_once = {}, {}
        for key, template in templates.items():
            source = self.checkpoint.tied_aliases.get(prefix + key, prefix + key)
            if source not in read_once:
                stored = given[key] if key in given else self.checkpoint.tensor(source)
                read_once[source] = checked(
                    stored, tenant=self.name, name=source, shape=template.shape, dtype=template.dtype
                )
            state[key] = read_once[source]
        return state

    def outer_state(self) -> dict[str, torch.Tensor]:
        """Everything outside the decoder layers: embeddings, final norms, head."""
        inside = tuple(f"{path}." for path in self.tenants.layer_paths)
        templates = {key: tensor for key, tensor in self.model.state_dict().items() if not key.startswith(inside)}
        return self.read(templates, "", {})

    def layer_state(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """Decoder layer `layer_idx`'s tensors; its experts are read as the layer's stacked tensors."""
        path, experts = self.tenants.layer_paths[layer_idx], self.experts_modules[layer_idx]
        given = {}
        if experts is not None:
            state = self.tenants.family.experts_state(self.checkpoint.config, self.checkpoint.experts(layer_idx))
            given = {f"{experts.removeprefix(path + '.')}.{key}": tensor for key, tensor in state.items()}
        return self.read(self.layers[layer_idx].state_dict(), f"{path}.", given)

    def run_layer(self, layer_idx: int) -> None:
        """Read layer `layer_idx`, run it on every chunk, and put it back on the meta device."""
        layer, stack, path = self.layers[layer_idx], self.stacks[layer_idx], self.tenants.layer_paths[layer_idx]
        layer.load_state_dict(self.layer_state(layer_idx), assign=True)
        del layer.forward  # the family's own again
        handle = layer.register_forward_hook(self.outputs.keep(stack))
        for input_ids, attention_mask, labels in self.data.batches():
            try:
                self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            except LayerDone:
                continue
            raise RuntimeError(f"The {type(self.model).__name__} forward never reached {path}.")
        handle.remove()
        layer.to("meta")
        layer.forward = self.outputs.replay(stack)


__all__ = ["LayerByLayerModel"]
