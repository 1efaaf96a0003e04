"""What a node type is, what it may see while it runs, and the registry that names them all.

A node type is a small object: a `type` name (`category:name`), a `version`, typed input and
output ports, a pydantic params model with defaults and bounds, and `run`. Node code sees a
narrow `NodeContext` (load and store images, fetch a URL safely, report progress, run CPU
work off the event loop), never the database or the HTTP layer.

    class Invert(ImageOperation[NoParams]):
        type = "image:invert"
        params_model = NoParams
        inputs = (InputPort("image", PortType.IMAGE),)
        outputs = (OutputPort("image", PortType.IMAGE),)

        def compute(self, ctx, params, inputs):
            image = ImageOps.invert(ctx.load_image(inputs["image"]).convert("RGB"))
            return {"image": ctx.store_image(image, parents=[inputs["image"]])}
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar

from PIL import Image
from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from imagegraph.errors import Issue
from imagegraph.graph.ports import InputPort, OutputPort, PortType
from imagegraph.nodes.values import ImageValue
from imagegraph.providers.base import Route

if TYPE_CHECKING:
    from imagegraph.graph.plan import Plan, PlanNode
    from imagegraph.providers.hub import ProviderHub

T = TypeVar("T")
# The message a node run's task is cancelled with when its execution is cancelled (as
# opposed to the server stopping): a node waiting on a provider job then cancels the job.
EXECUTION_CANCELLED = "execution cancelled"


class NodeParams(BaseModel):
    """Base of every params model: camelCase in JSON, unknown fields refused."""

    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True
    )


class NoParams(NodeParams):
    pass


P = TypeVar("P", bound=NodeParams)
Inputs = Mapping[str, Any]
Outputs = dict[str, Any]
AssetKind = Literal["intermediate", "output", "upload"]


@dataclass(frozen=True)
class RegenerationTarget:
    """The generation a node may send back to be made again (a quality gate's; see
    `Node.regeneration_target`), as its latest run went: that run was generation
    `regenerations + 1`, with `params` (JSON, camelCase, earlier adjustments applied)."""

    node_id: str
    node_type: str
    regenerations: int
    params: Mapping[str, Any]
    params_model: builtins.type[NodeParams]


class Regenerate(Exception):
    """Raised by `Node.run` to send `ctx.regeneration_target` back to be made again with
    `adjust` merged over its params; every node run from there to this one runs again.

    `outputs` are what the node passes on instead if the engine cannot send the generation
    back (another gate did so meanwhile, or it was already made again); `detail` (JSON) goes
    into the `node.regenerating` event.

        raise Regenerate({"seed": 43}, outputs=on_review, detail={"failures": [...]})
    """

    def __init__(
        self, adjust: Mapping[str, Any], *, outputs: Outputs, detail: Mapping[str, Any]
    ) -> None:
        super().__init__(f"regenerate with {dict(adjust)}")
        self.adjust = adjust
        self.outputs = outputs
        self.detail = detail


class NodeContext(Protocol):
    """Everything a running node may use. Implemented by the engine."""

    @property
    def execution_id(self) -> str: ...

    @property
    def node_id(self) -> str: ...

    @property
    def attempt(self) -> int: ...

    @property
    def max_pixels(self) -> int:
        """The largest image, in pixels, this server decodes or produces."""
        ...

    def load_image(self, value: ImageValue) -> Image.Image:
        """Decode a stored image (sync; call it from CPU work)."""
        ...

    def read_bytes(self, value: ImageValue) -> bytes:
        """The stored bytes of an image (sync)."""
        ...

    def store_image(
        self,
        image: Image.Image | bytes | ImageValue,
        *,
        parents: Sequence[ImageValue] = (),
        generation: Mapping[str, Any] | None = None,
        kind: AssetKind = "intermediate",
        format: str | None = None,
        quality: int | None = None,
    ) -> ImageValue:
        """Encode (if needed) and store an image; it becomes an asset when the node succeeds.

        `bytes` must already be an encoded image and are stored as they are. An `ImageValue`
        is an image stored already: the new asset shares its bytes, and nothing is read,
        encoded or written (`format` and `quality` do not apply). `generation` defaults to
        that of the first parent.
        """
        ...

    async def run_cpu(
        self, fn: Callable[..., T], *args: Any, pixels: int | None = None, urgent: bool = True
    ) -> T:
        """Run CPU-bound work in the image thread pool so the event loop never blocks.

        `pixels` says how much image the work touches: work on small images runs right away,
        since handing it to a thread would cost more than doing it. `urgent=False` is for
        work that has time to spare (done while waiting for something else): it runs in its
        own lane and never delays work that executions are waiting for.
        """
        ...

    async def run_process(self, fn: Callable[..., T], *args: Any, urgent: bool = True) -> T:
        """Run CPU work that holds the interpreter lock (many small steps in Python, such as
        drawing) in a process of its own, so it never takes the event loop's turn. `fn` and
        `args` cross by pickling: a module-level function and plain values. Where this
        server runs no such processes, it runs in a thread (see `run_cpu` for `urgent`).
        """
        ...

    async def fetch(self, url: str) -> bytes:
        """Download a URL with the server's outbound safety rules (no private addresses)."""
        ...

    async def find_asset(self, asset_id: str) -> ImageValue:
        """An existing asset as an image value; raises `NodeError` if there is none."""
        ...

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report progress between 0 and 1; shows up in live events."""
        ...

    @property
    def watched(self) -> bool:
        """Whether anyone follows this execution's live events now (progress reported
        while nobody does is dropped)."""
        ...

    @property
    def providers(self) -> ProviderHub:
        """The hosted-model providers of this server (adapters, limits, breakers)."""
        ...

    @property
    def provider_job(self) -> Mapping[str, Any] | None:
        """What an earlier attempt of this node run recorded with `save_provider_job` before
        it was cut off (a crash, a restart), so the run can pick the job up; else None."""
        ...

    async def save_provider_job(self, job: Mapping[str, Any]) -> None:
        """Record, durably and at once, the provider job this run waits for (JSON)."""
        ...

    @property
    def regeneration_target(self) -> RegenerationTarget | None:
        """For a node that may send a generation back (`Node.regeneration_target`): that
        generation's latest run; None for other nodes."""
        ...


class Recorder(Protocol):
    """What a node settled without running (`Node.settle`) may do: record a new asset of an
    image that is stored already, reading and writing nothing."""

    def keep_image(
        self,
        image: ImageValue,
        *,
        parents: Sequence[ImageValue] = (),
        generation: Mapping[str, Any] | None = None,
        kind: AssetKind = "intermediate",
    ) -> ImageValue | None:
        """A new asset of `image`'s bytes; None when that would take reading the store."""
        ...


SANDBOX_TYPE = "generate:sandbox"


class Node(ABC, Generic[P]):
    """A node type. Instances are registered; they hold no per-run state."""

    type: str
    version: str = "1.0.0"
    title: str = ""
    description: str = ""
    params_model: builtins.type[P]
    inputs: tuple[InputPort, ...] = ()
    outputs: tuple[OutputPort, ...] = ()
    # Whether the output cache may answer for this node (see is_cacheable).
    cacheable: bool = False
    # Output nodes are where results leave a workflow; every workflow needs one.
    is_output: bool = False
    # For input nodes: the param an execution's `inputs` sets (`{"inputs": {"prompt": "…"}}`).
    input_param: str | None = None
    # Hosted models: the provider routes that can serve the node, in order of preference.
    routes: tuple[Route, ...] = ()
    # Whether `settle` may answer for this node type (asked before its inputs are gathered).
    settles: bool = False

    @property
    def category(self) -> str:
        return self.type.split(":", 1)[0]

    def parse_params(self, raw: Mapping[str, Any]) -> P:
        return self.params_model.model_validate(raw)

    def input_ports(self, params: P) -> tuple[InputPort, ...]:
        """The inputs for these params (a template's variables are its inputs)."""
        return self.inputs

    def output_ports(
        self, params: P, input_types: Mapping[str, PortType]
    ) -> tuple[OutputPort, ...]:
        """The outputs, given the types connected to the inputs (a branch passes its type on)."""
        return self.outputs

    def check(self, params: P) -> list[Issue]:
        """Problems with params that their schema cannot express; located by the caller."""
        return []

    def check_plan(self, node: PlanNode, plan: Plan) -> list[Issue]:
        """Problems that depend on the rest of the workflow (what is upstream, what is
        connected); checked once the workflow is otherwise valid. Located by the caller."""
        return []

    def regeneration_target(self, node: PlanNode, plan: Plan) -> str | None:
        """The node whose run this one may send back to be made again by raising
        `Regenerate` (a quality gate's generation), or None. The engine tells each run of
        this node how that run went (`NodeContext.regeneration_target`)."""
        return None

    def asset_refs(self, params: P) -> dict[str, str]:
        """Asset ids the params point at, by param path (`params.image`); each is checked to
        exist before an execution is queued."""
        return {}

    def url_refs(self, params: P) -> dict[str, str]:
        """URLs the node will fetch, by param path; checked against the outbound rules before
        an execution is queued."""
        return {}

    def is_cacheable(self, params: P, inputs: Inputs) -> bool:
        """Whether to consult the output cache before running. Worth it when running costs
        more than a lookup: paid or slow generations, heavy image work."""
        return self.cacheable

    def price(self, params: P) -> float:
        """Credits one run of this node costs."""
        return 0.0

    def model(self, params: P) -> str | None:
        """The model a generation runs on (usage is reported by model); None otherwise."""
        return None

    def settled_outputs(self, params: P) -> Outputs | None:
        """The outputs, when they follow from the params alone (no inputs, no I/O, nothing
        to pay): the run is then recorded as succeeded in the transaction that creates the
        execution, and its successors start at once. None: the node runs as usual."""
        return None

    def settle(self, params: P, inputs: Inputs, recorder: Recorder) -> Outputs | None:
        """The outputs, when they follow at once from the params and inputs with no I/O and
        nothing to compute or pay (an image that is stored already, recorded as an output):
        the run is then recorded as succeeded in the transaction that makes it ready, with
        no run of its own. None: the node runs as usual. Asked only if `settles` is set."""
        return None

    def unavailable(self) -> str | None:
        """Why this node type cannot run on this server (a missing optional dependency),
        checked before an execution is queued; None when it can."""
        return None

    def test_stand_in(self, params: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """What runs instead of this node for test keys, as (node type, params); None runs
        the node itself. Generators of paid models stand in with the sandbox, keeping the
        size and seed."""
        if self.category != "generate" or self.type == SANDBOX_TYPE:
            return None
        kept: dict[str, Any] = {}
        for name in ("width", "height"):
            value = params.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                kept[name] = min(max(value, 64), 2048)
        if isinstance(params.get("seed"), int):
            kept["seed"] = params["seed"]
        return SANDBOX_TYPE, kept

    @abstractmethod
    async def run(self, ctx: NodeContext, params: P, inputs: Inputs) -> Outputs:
        """Produce outputs by port name. Raise `NodeError` for a failure the user should see."""

    def describe(self) -> dict[str, Any]:
        """The node type as `GET /nodes` shows it."""
        defaults = self.params_model() if _has_defaults(self.params_model) else None
        ports_in = self.input_ports(defaults) if defaults is not None else self.inputs
        return {
            "type": self.type,
            "category": self.category,
            "version": self.version,
            "title": self.title,
            "description": self.description,
            "inputs": [
                {
                    "name": p.name,
                    "type": p.type.value,
                    "required": p.required,
                    "accepts": sorted({p.type.value, *(t.value for t in p.accepts)}),
                    "multiple": p.multiple,
                }
                for p in ports_in
            ],
            "outputs": [{"name": p.name, "type": p.type.value} for p in self.outputs],
            "params": self.params_model.model_json_schema(by_alias=True),
            "dynamicInputs": type(self).input_ports is not Node.input_ports,
            "executionInput": self.input_param,
        }


def _has_defaults(model: type[BaseModel]) -> bool:
    return all(not f.is_required() for f in model.model_fields.values())


# Below this many input pixels an image operation is cheaper to redo than to look up.
CACHE_MIN_PIXELS = 1_000_000


class ImageOperation(Node[P]):
    """A node whose work is CPU-bound: `compute` runs in the image thread pool."""

    cacheable = True

    def is_cacheable(self, params: P, inputs: Inputs) -> bool:
        return input_pixels(inputs) >= CACHE_MIN_PIXELS

    @abstractmethod
    def compute(self, ctx: NodeContext, params: P, inputs: Inputs) -> Outputs:
        """Synchronous work; runs off the event loop (unless the images are tiny)."""

    async def run(self, ctx: NodeContext, params: P, inputs: Inputs) -> Outputs:
        return await ctx.run_cpu(self.compute, ctx, params, inputs, pixels=input_pixels(inputs))


def input_pixels(inputs: Inputs) -> int:
    """Pixels of every image among `inputs`."""
    pixels = 0
    for value in inputs.values():
        for image in value if isinstance(value, list) else [value]:
            if isinstance(image, ImageValue):
                pixels += image.width * image.height
    return pixels


class NodeRegistry:
    """Every node type this process knows, by type name.

    >>> registry = NodeRegistry()
    >>> "input:text" in registry
    False
    """

    def __init__(self, nodes: Iterable[Node[Any]] = ()) -> None:
        self._nodes: dict[str, Node[Any]] = {}
        for node in nodes:
            self.register(node)

    def register(self, node: Node[Any]) -> None:
        if node.type in self._nodes:
            raise ValueError(f"node type {node.type!r} is registered twice")
        if ":" not in node.type:
            raise ValueError(f"node type {node.type!r} must look like 'category:name'")
        self._nodes[node.type] = node

    def get(self, node_type: str) -> Node[Any] | None:
        return self._nodes.get(node_type)

    def __getitem__(self, node_type: str) -> Node[Any]:
        return self._nodes[node_type]

    def __contains__(self, node_type: object) -> bool:
        return node_type in self._nodes

    def __iter__(self) -> Iterator[Node[Any]]:
        return iter(sorted(self._nodes.values(), key=lambda n: n.type))

    def __len__(self) -> int:
        return len(self._nodes)
