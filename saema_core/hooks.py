"""Residual-stream hook points, named TransformerLens-style, captured with forward hooks.

`blocks.{L}.hook_resid_pre`  — the input of transformer block L   (batch, seq, d_model)
`blocks.{L}.hook_resid_post` — the output of transformer block L  (batch, seq, d_model)

The hooks sit on the block modules themselves, so they see the residual stream exactly, never the
final-norm output that `hidden_states[-1]` holds for pre-norm models. One forward captures every
requested hook, and the forward is cut short after the deepest requested block.
`replaced_residual` uses the same hook points to splice a function of the residual stream (an SAE
reconstruction, zeros) into a full forward.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from saema_core.errors import SaemaError

HOOK_PATTERN = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")

# Attribute paths of the block list in the supported families (base model or with a head):
# BERT `encoder.layer`, GPT-2 `h`, GPT-NeoX and Llama `layers`.
_BLOCK_LIST_SUFFIXES = ("encoder.layer", "h", "layers")


class HookError(SaemaError):
    """A hook name the model does not have, or a model whose blocks cannot be found."""


@dataclass(frozen=True)
class HookPoint:
    """A parsed hook name: block index and whether it is the block's input or output."""

    name: str
    layer: int
    kind: str  # "pre" | "post"


def hook_names(n_layers: int) -> list[str]:
    """Every residual hook point of a model with `n_layers` blocks, in forward order."""
    return [f"blocks.{layer}.hook_resid_{kind}" for layer in range(n_layers) for kind in ("pre", "post")]


def parse_hook(name: str, n_layers: int) -> HookPoint:
    """Parse and validate one hook name; the error lists the valid names."""
    match = HOOK_PATTERN.match(name)
    if match is None or int(match.group(1)) >= n_layers:
        valid = hook_names(n_layers)
        raise HookError(
            f"hook {name!r} does not exist in this model ({n_layers} blocks); valid hooks: "
            + ", ".join(valid)
        )
    return HookPoint(name=name, layer=int(match.group(1)), kind=match.group(2))


def find_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of transformer blocks (shallowest matching ModuleList)."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in ("layer", "h", "layers"):
            if any(name == s or name.endswith("." + s) for s in _BLOCK_LIST_SUFFIXES):
                if n_layers is None or len(module) == n_layers:
                    return module
    raise HookError(
        f"cannot find the transformer blocks of {type(model).__name__}: expected a ModuleList named "
        f"one of {_BLOCK_LIST_SUFFIXES} with {n_layers} entries (BERT, GPT-2, GPT-NeoX, Llama style)"
    )


class _StopForward(Exception):
    """Raised inside the deepest requested hook to cut the forward short."""


def _hidden(value: object) -> torch.Tensor:
    # transformers 5 blocks return a tensor; older ones (and some families) a tuple.
    return value[0] if isinstance(value, tuple) else value  # type: ignore[return-value]


@contextmanager
def _registered_hooks(
    blocks: torch.nn.ModuleList, points: Sequence[HookPoint], store: dict[str, torch.Tensor]
) -> Iterator[None]:
    deepest = max(points, key=lambda p: (p.layer, p.kind == "post"))
    handles = []

    def capture(point: HookPoint, value: torch.Tensor) -> None:
        store[point.name] = value.detach()
        if point == deepest:
            raise _StopForward

    for point in points:
        block = blocks[point.layer]
        if point.kind == "pre":
            def pre_hook(module, args, kwargs, point=point):
                capture(point, args[0] if args else kwargs["hidden_states"])
            handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:
            def post_hook(module, args, output, point=point):
                capture(point, _hidden(output))
            handles.append(block.register_forward_hook(post_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def capture_residuals(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], hooks: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Run one forward of `model` on `inputs` and return {hook: (batch, seq, d_model)}.

    The forward stops after the deepest requested hook, so later blocks cost nothing.
    """
    if not hooks:
        raise HookError("no hooks requested")
    blocks = find_blocks(model)
    points = [parse_hook(h, len(blocks)) for h in dict.fromkeys(hooks)]
    captured: dict[str, torch.Tensor] = {}
    with _registered_hooks(blocks, points, captured):
        try:
            model(**inputs)
        except _StopForward:
            pass
    missing = [p.name for p in points if p.name not in captured]
    if missing:
        raise HookError(f"hooks {missing} did not fire during the forward of {type(model).__name__}")
    return captured


def _replaced_output(output: object, new_hidden: torch.Tensor) -> object:
    """A block's output with its hidden state swapped, keeping the tuple shape when there is one."""
    return (new_hidden, *output[1:]) if isinstance(output, tuple) else new_hidden


@contextmanager
def replaced_residual(
    model: torch.nn.Module, hook: str, replace: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Within the context, every forward of `model` sees `replace(x)` instead of the residual x at `hook`.

    x and `replace(x)` are (batch, seq, d_model); `hook_resid_pre` rewrites the block's input,
    `hook_resid_post` its output, so the rest of the forward (later blocks, final norm, LM head) runs on
    the replacement. The hook is removed on exit, also when the forward raises.
    """
    blocks = find_blocks(model)
    point = parse_hook(hook, len(blocks))

    def checked(x: torch.Tensor) -> torch.Tensor:
        new = replace(x)
        if new.shape != x.shape:
            raise HookError(f"replacement at {hook} has shape {tuple(new.shape)}, expected {tuple(x.shape)}")
        return new

    def pre_hook(module, args, kwargs):
        if args:
            return (checked(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": checked(kwargs["hidden_states"])}

    def post_hook(module, args, output):
        return _replaced_output(output, checked(_hidden(output)))

    block = blocks[point.layer]
    handle = (block.register_forward_pre_hook(pre_hook, with_kwargs=True) if point.kind == "pre"
              else block.register_forward_hook(post_hook))
    try:
        yield
    finally:
        handle.remove()
