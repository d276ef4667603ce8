"""Run a network again with one conv swapped, recomputing only what the swap changes.

``--target-size`` measures a dozen stored forms of every conv, each alone in the network. The activations
before a conv (and beside it: a residual branch that does not pass through it) are the same for every form, so
:class:`LayerReplay` runs the FX graph once per batch, keeps every node's value, and per swap re-executes only
the nodes downstream of the conv's call sites. Exact: the outputs equal a full forward of the swapped network.
:class:`GraphStepper` runs the same graph one node at a time over several batches together, dropping each value
after its last user (output reconstruction's single pass).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from vconvert.convert.discover import _ConvSiteTracer

Values = dict[fx.Node, Any]


class LayerReplay:
    """A traced copy of a network's graph (sharing its modules) that replays the part after one conv."""

    def __init__(self, model: nn.Module) -> None:
        """Trace ``model`` (convs kept as leaves); raises whatever FX raises for a graph it cannot trace."""
        self.model = model
        self.graph = _ConvSiteTracer().trace(model)
        self.nodes = list(self.graph.nodes)
        self._downstream: dict[str, list[fx.Node]] = {}

    def record(self, images: Tensor) -> Values:
        """Every node's value for ``images`` (the first input; later inputs take their defaults) through the
        unchanged network."""
        values: Values = {}
        for node in self.nodes:
            values[node] = self._execute(node, values, None, None, images)
        return values

    @staticmethod
    def output(values: Values) -> Tensor:
        """The network's output among ``values``."""
        return next(value for node, value in values.items() if node.op == "output")

    def run_with(self, values: Values, name: str, replacement: nn.Module) -> Tensor:
        """The network's output with submodule ``name`` replaced by ``replacement``, from recorded ``values``."""
        changed: Values = {}
        lookup = collections.ChainMap(changed, values)
        for node in self.downstream(name):
            changed[node] = self._execute(node, lookup, name, replacement)
        return changed[self.nodes[-1]]

    def downstream(self, name: str) -> list[fx.Node]:
        """The call sites of ``name`` and every node that depends on one, in execution order."""
        if name not in self._downstream:
            reached = {node for node in self.nodes if node.op == "call_module" and node.target == name}
            if not reached:
                raise KeyError(f"{name} is not called in the traced graph")
            for node in self.nodes:
                if node not in reached and any(arg in reached for arg in node.all_input_nodes):
                    reached.add(node)
            self._downstream[name] = [node for node in self.nodes if node in reached]
        return self._downstream[name]

    def _execute(
        self,
        node: fx.Node,
        values: Mapping[fx.Node, Any],
        name: str | None,
        replacement: nn.Module | None,
        images: Tensor | None = None,
    ) -> Any:
        if node.op == "placeholder":  # the first input is the images, later ones take their defaults
            return images if node is self.nodes[0] else (node.args[0] if node.args else None)
        if node.op == "get_attr":
            return _attribute(self.model, str(node.target))
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
        if node.op == "call_module":
            module = replacement if node.target == name else self.model.get_submodule(str(node.target))
            return module(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        return args[0]  # output


class GraphStepper:
    """Runs a :class:`LayerReplay`'s graph node by node, each node for every batch of ``inputs`` before the next,
    and drops each node's values once its last user has run, so that only the live activations are held."""

    def __init__(self, replay: LayerReplay, inputs: Sequence[Tensor]) -> None:
        self.replay = replay
        self.inputs = list(inputs)
        self.values: list[Values] = [{} for _ in self.inputs]
        self._released = released_after(replay.nodes)

    def arguments(self, node: fx.Node) -> list[Any]:
        """The value of ``node``'s first argument for each batch (e.g. a conv's input); the node has not run."""
        source = node.args[0]
        return [values[source] if isinstance(source, fx.Node) else source for values in self.values]

    @torch.no_grad()
    def step(self, node: fx.Node) -> None:
        """Run ``node`` for every batch, then drop the values that no later node reads."""
        for values, images in zip(self.values, self.inputs, strict=True):
            values[node] = self.replay._execute(node, values, None, None, images)
            for finished in self._released[node]:
                del values[finished]


def released_after(nodes: Sequence[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """For each node, the nodes whose values are no longer needed once it has run: those it is the last user
    of, and itself when nothing reads it (the output node's value is kept)."""
    last_user = {node: node for node in nodes if node.op != "output"}
    for node in nodes:
        for source in node.all_input_nodes:
            last_user[source] = node
    released: dict[fx.Node, list[fx.Node]] = {node: [] for node in nodes}
    for source, user in last_user.items():
        released[user].append(source)
    return released


def _attribute(module: nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def values_bytes(values: Values) -> int:
    """Bytes held by the tensors among recorded ``values``."""
    return sum(v.numel() * v.element_size() for v in values.values() if isinstance(v, torch.Tensor))
