"""Run a checkpoint one decoder layer at a time, so memory holds one layer and the activations, whatever the depth.

transformers builds the model on the meta device (no memory), which gives us each layer's module and
the model's own forward. That forward is run once per batch with the layers replaced by stand-ins that
record what each layer is called with (the embeddings, the causal mask of its attention type, the
rotary position embeddings): exactly the arguments the whole model would pass. Then, for each layer,
its tensors are read with the lazy loader into the meta module (`load_state_dict(assign=True)`), every
batch goes through it, and the module goes back to meta. Activations stay in memory when they fit the
budget and are spilled to a temporary file when not. No final norm or `lm_head` is needed.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from moemerge.architectures import find_architecture
from moemerge.errors import MoemergeError, TensorError
from moemerge.io.loader import LazyModel

log = logging.getLogger(__name__)

# (layer, module, probe) → undo (called once the layer is done) or None; `probe()` runs every batch through the
# loaded layer without keeping its outputs, so hooks can see the layer's inputs before its outputs are kept.
LayerHook = Callable[[int, torch.nn.Module, Callable[[], None]], Callable[[], None] | None]


class _StopForward(Exception):
    """Raised by the last stand-in layer: nothing after the decoder layers is needed."""


class _LayerCall(torch.nn.Module):
    """Stand-in for one decoder layer: records the arguments it is called with and passes the states on."""

    def __init__(self, calls: list, index: int, last: bool):
        super().__init__()
        self.calls, self.index, self.last = calls, index, last

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.index == 0:
            self.calls.append(hidden_states)
        self.calls.append((args, kwargs))
        if self.last:
            raise _StopForward
        return hidden_states


@dataclass
class Batch:
    """One batch of token ids and, once embedded, the arguments every layer is called with."""

    input_ids: torch.Tensor  # [batch, tokens]
    attention_mask: torch.Tensor | None  # [batch, tokens] 1 for real tokens; None: no padding
    layer_args: list[tuple[tuple, dict]] | None = None

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel() if self.attention_mask is None else self.attention_mask.sum())


class ActivationStore:
    """The hidden states of every batch between two layers: in memory, or in a temporary file when spilled.

    Each batch keeps its offset for the whole pass (a layer's output has its input's shape), so a layer's
    output overwrites its input in place.
    """

    def __init__(self, spill_dir: Path | None):
        self.spill_dir = spill_dir
        self.tensors: dict[int, torch.Tensor] = {}
        self.places: dict[int, tuple[int, torch.Size, torch.dtype]] = {}
        self.fd: int | None = None
        self.end = 0
        if spill_dir is not None:
            handle, name = tempfile.mkstemp(prefix="moemerge-activations-", dir=spill_dir)
            os.unlink(name)  # the file disappears with its descriptor, even after a crash
            self.fd = handle

    @property
    def spilled(self) -> bool:
        return self.fd is not None

    def put(self, index: int, states: torch.Tensor) -> None:
        if self.fd is None:
            self.tensors[index] = states
            return
        states = states.detach().cpu().contiguous()
        if index not in self.places:
            self.places[index] = (self.end, states.shape, states.dtype)
            self.end += states.numel() * states.element_size()
        offset = self.places[index][0]
        data = memoryview(states.view(torch.uint8).numpy()).cast("B")
        written = 0
        while written < len(data):
            written += os.pwrite(self.fd, data[written:], offset + written)

    def get(self, index: int) -> torch.Tensor:
        if self.fd is None:
            return self.tensors[index]
        offset, shape, dtype = self.places[index]
        states = torch.empty(shape, dtype=dtype)
        data = memoryview(states.view(torch.uint8).numpy()).cast("B")
        read = 0
        while read < len(data):
            chunk = os.preadv(self.fd, [data[read:]], offset + read)
            if chunk <= 0:
                raise OSError(f"activation file ended early at byte {offset + read}")
            read += chunk
        return states

    def close(self) -> None:
        self.tensors.clear()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so RSS follows the layer in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _module_path(root: torch.nn.Module, target: torch.nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise AssertionError("module not found in its model")


def _decoder_layers(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """The inner transformer (the module whose forward embeds and loops over layers) and its layer list."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise MoemergeError(f"{type(model).__name__}: cannot find its decoder layers to run them one at a time")
    return inner, layers


def _layer_step(
    layer: int,
    module: torch.nn.Module,
    batches: Sequence[Batch],
    store: ActivationStore,
    on_input: Callable[[int, int, torch.Tensor], None] | None,
    index: int,
) -> torch.Tensor:
    """Batch `index`'s stored input through the loaded layer, with the arguments the whole model would pass."""
    states = store.get(index)
    if on_input is not None:
        on_input(layer, index, states)
    args, kwargs = batches[index].layer_args[layer]
    output = module(states, *args, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def _probe(step: Callable[[int], torch.Tensor], count: int) -> None:
    for index in range(count):
        step(index)


class LayerwiseModel:
    """A checkpoint whose decoder layers are materialised one at a time from the lazy loader."""

    def __init__(self, model: LazyModel, *, device: str = "cpu", trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model, self.device = model, device
        try:
            config = AutoConfig.from_pretrained(model.folder, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            raise MoemergeError(f"model {model.label!r}: transformers cannot read its config ({error})") from None
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        self.config = self.skeleton.config
        self.inner, self.layers = _decoder_layers(self.skeleton)
        self.layers_path = _module_path(self.skeleton, self.layers)
        self.inner_path = _module_path(self.skeleton, self.inner)
        self.dtype = next(self.skeleton.parameters()).dtype
        self.arch = find_architecture(model.config.get("model_type"))
        self._moe_source = None
        rotary = getattr(self.inner, "rotary_emb", None)
        if rotary is not None:  # its inverse frequencies are computed at construction, not loaded
            with torch.device(device):
                self.inner.rotary_emb = type(rotary)(config=rotary.config if hasattr(rotary, "config") else config)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # -- reading tensors into the meta modules -------------------------------------------------------------------

    def _source(self):
        """Expert lookup (either on-disk layout) for MoE checkpoints; None for dense ones."""
        if self._moe_source is None and self.arch is not None and self.arch.moe is not None:
            from moemerge.split.experts import MoeSource

            self._moe_source = MoeSource(self.model)
        return self._moe_source

    def _read(self, name: str) -> torch.Tensor:
        return self.model.read(name).to(self.dtype)

    def _layer_tensor(self, layer: int, key: str) -> torch.Tensor:
        """Layer `layer`'s tensor for module key `key` (transformers' in-memory name) from the checkpoint."""
        name = f"{self.layers_path}.{layer}.{key}"
        if self.model.has(name):
            return self._read(name)
        source = self._source()
        if source is not None:
            if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
                return self._fused_experts(source, layer, "gate_up" if key.endswith("gate_up_proj") else "down")
            if key.endswith(".gate.weight") and source._router_name(layer) is not None:
                return self._read(source.router_name(layer))
        renamed = f"{self.layers_path}.{layer}.{key.replace('mlp.', 'block_sparse_moe.', 1)}"
        if self.model.has(renamed):
            return self._read(renamed)
        raise TensorError(f"model {self.model.label!r}: no tensor for {name} (layer {layer}'s {key})")

    def _fused_experts(self, source, layer: int, kind: str) -> torch.Tensor:
        """transformers v5's fused [experts, 2I, H] gate_up (gate rows first) or [experts, H, I] down, filled one
        expert part at a time (no second copy of the layer's experts)."""
        parts = ("gate", "up") if kind == "gate_up" else ("down",)
        first = [source.expert_part(layer, 0, part) for part in parts]
        rows = sum(part.shape[0] for part in first)
        fused = torch.empty((source.num_experts, rows, first[0].shape[1]), dtype=self.dtype)
        for expert in range(source.num_experts):
            start = 0
            for index, part in enumerate(parts):
                tensor = first[index] if expert == 0 else source.expert_part(layer, expert, part)
                fused[expert, start : start + tensor.shape[0]] = tensor
                start += tensor.shape[0]
        return fused

    def layer_bytes(self, layer: int) -> int:
        """Bytes layer `layer` takes once materialised."""
        return sum(p.numel() * p.element_size() for p in self.layers[layer].state_dict().values())

    def load_layer(self, layer: int) -> torch.nn.Module:
        module = self.layers[layer]
        state = {key: self._layer_tensor(layer, key).to(self.device) for key in module.state_dict()}
        module.load_state_dict(state, strict=True, assign=True)
        return module.eval()

    def free_layer(self, layer: int) -> None:
        self.layers[layer].to_empty(device="meta")
        _release_freed_memory()

    def _load_inner_parts(self) -> list[torch.nn.Module]:
        """Materialise every module of the inner model outside the layers that has weights (embeddings, norm)."""
        loaded = []
        for name, module in self.inner.named_children():
            if module is self.layers or name == "rotary_emb" or not any(True for _ in module.parameters()):
                continue
            prefix = f"{self.inner_path}.{name}." if self.inner_path else f"{name}."
            names = list(module.state_dict())
            if not all(self.model.has(prefix + key) for key in names):
                continue  # e.g. a final norm the checkpoint lacks: never called before the layers end
            module.load_state_dict({k: self._read(prefix + k).to(self.device) for k in names}, assign=True)
            loaded.append(module)
        return loaded

    # -- running ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, batches: Sequence[Batch], store: ActivationStore) -> None:
        """Each batch's layer-0 input into the store, and the arguments each layer will be called with."""
        loaded = self._load_inner_parts()
        original = self.inner.layers
        calls: list = []
        self.inner.layers = torch.nn.ModuleList(
            [_LayerCall(calls, index, index == self.num_layers - 1) for index in range(self.num_layers)]
        )
        try:
            for index, batch in enumerate(batches):
                calls.clear()
                mask = None if batch.attention_mask is None else batch.attention_mask.to(self.device)
                try:
                    self.inner(input_ids=batch.input_ids.to(self.device), attention_mask=mask, use_cache=False)
                except _StopForward:
                    pass
                store.put(index, calls[0])
                batch.layer_args = list(calls[1:])
        finally:
            self.inner.layers = original
            for module in loaded:
                module.to_empty(device="meta")

    @torch.no_grad()
    def run(
        self,
        batches: Sequence[Batch],
        *,
        max_memory: int | None = None,
        spill_dir: Path | None = None,
        on_layer: LayerHook | None = None,
        on_input: Callable[[int, int, torch.Tensor], None] | None = None,
        on_output: Callable[[int, torch.Tensor], None] | None = None,
        progress: bool = True,
        description: str = "layers",
    ) -> None:
        """Every batch through every layer. `on_input(layer, batch, states)` sees each layer's input,
        `on_output(batch, states)` the last layer's output; `on_layer(layer, module, probe)` runs once the layer
        is loaded (to add hooks, or to change the layer after probing it) and returns an undo."""
        hidden = int(self.config.get_text_config().hidden_size)
        activation_bytes = sum(b.input_ids.numel() for b in batches) * hidden * self.dtype.itemsize
        largest_layer = max(self.layer_bytes(layer) for layer in range(self.num_layers))
        spill = max_memory is not None and largest_layer + 2 * activation_bytes > max_memory
        store = ActivationStore(Path(spill_dir or tempfile.gettempdir()) if spill else None)
        log.info(
            "layer by layer: %d layers of up to %.1f MB, activations %.1f MB %s",
            self.num_layers,
            largest_layer / 1e6,
            activation_bytes / 1e6,
            "spilled to a temporary file" if spill else "in memory",
        )
        tokens = sum(b.tokens for b in batches)
        started = time.perf_counter()
        try:
            self.embed(batches, store)
            with tqdm(total=self.num_layers, desc=description, unit="layer", disable=not progress) as bar:
                for layer in range(self.num_layers):
                    module = self.load_layer(layer)
                    step = functools.partial(_layer_step, layer, module, batches, store, on_input)
                    probe = functools.partial(_probe, step, len(batches))
                    undo = on_layer(layer, module, probe) if on_layer is not None else None
                    try:
                        for index in range(len(batches)):
                            output = step(index)
                            if on_output is not None and layer == self.num_layers - 1:
                                on_output(index, output)
                            store.put(index, output)
                            del output
                    finally:
                        if undo is not None:
                            undo()
                        self.free_layer(layer)
                    elapsed = time.perf_counter() - started
                    bar.set_postfix_str(f"{tokens * (layer + 1) / max(elapsed, 1e-9):,.0f} tok/s")
                    bar.update()
        finally:
            store.close()
        elapsed = time.perf_counter() - started
        log.info("layer by layer: %d tokens × %d layers in %.1f s", tokens, self.num_layers, elapsed)


@torch.no_grad()
def token_losses(runner: LayerwiseModel, batches: Sequence[Batch], **run_options) -> list[torch.Tensor]:
    """Per batch [batch, tokens - 1]: −log p(next token) under the model, run layer by layer (final norm and
    lm_head, or the tied embeddings, applied to the last layer's output)."""
    skeleton = runner.skeleton
    norm = getattr(runner.inner, "norm", None)
    head = skeleton.get_output_embeddings()
    head_name = _module_path(skeleton, head) + ".weight"
    if not runner.model.has(head_name):  # tied: the embedding matrix
        head_name = f"{runner.inner_path}.embed_tokens.weight" if runner.inner_path else "embed_tokens.weight"
    head_weight = runner._read(head_name).to(runner.device)
    norm_prefix = _module_path(skeleton, norm) if norm is not None else ""
    losses: list[torch.Tensor] = [torch.empty(0)] * len(batches)

    def score(index: int, states: torch.Tensor) -> None:
        if norm is not None and any(p.is_meta for p in norm.parameters()):  # loaded here: run() frees the inner parts
            state = {key: runner._read(f"{norm_prefix}.{key}").to(runner.device) for key in norm.state_dict()}
            norm.load_state_dict(state, assign=True)
        normed = norm(states) if norm is not None else states
        logits = torch.nn.functional.linear(normed, head_weight).float()
        targets = batches[index].input_ids.to(logits.device)[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
        losses[index] = nll.cpu()

    try:
        runner.run(batches, on_output=score, **run_options)
    finally:
        if norm is not None:
            norm.to_empty(device="meta")
    return losses


def moe_block(layer: torch.nn.Module) -> torch.nn.Module | None:
    """The layer's sparse MoE block (transformers v5: a module with a `gate` router, GPT-OSS's `router`, and fused
    `experts`)."""
    for name in ("mlp", "block_sparse_moe"):
        block = getattr(layer, name, None)
        if block is not None and (hasattr(block, "gate") or hasattr(block, "router")) and hasattr(block, "experts"):
            return block
    return None


def mlp_module(layer: torch.nn.Module) -> torch.nn.Module:
    """A decoder layer's MLP or sparse MoE block: its input is the post-attention-norm state a router multiplies."""
    for name in ("mlp", "block_sparse_moe", "feed_forward"):
        module = getattr(layer, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise MoemergeError(f"{type(layer).__name__}: cannot find its MLP (mlp, block_sparse_moe or feed_forward)")


def equal_batches(chunks: list[list[int]], batch_size: int) -> Iterator[Batch]:
    """Equal-length chunks batched together; a shorter last chunk goes alone (no padding to mask)."""
    full = [chunk for chunk in chunks if len(chunk) == len(chunks[0])]
    for start in range(0, len(full), batch_size):
        yield Batch(torch.tensor(full[start : start + batch_size]), None)
    for chunk in chunks[len(full) :]:
        yield Batch(torch.tensor([chunk]), None)
