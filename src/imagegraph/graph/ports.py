"""Port types and the rule that says which output may feed which input."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class PortType(StrEnum):
    TEXT = "text"
    NUMBER = "number"
    BOOLEAN = "boolean"
    IMAGE = "image"
    IMAGE_LIST = "image_list"
    MASK = "mask"
    JSON = "json"
    ANY = "any"


@dataclass(frozen=True)
class InputPort:
    """An input of a node type.

    `accepts` widens what may be connected (a template variable takes text or a number);
    `multiple` lets several edges feed the port, which is how fan-in is declared.
    """

    name: str
    type: PortType
    required: bool = True
    accepts: frozenset[PortType] = frozenset()
    multiple: bool = False
    description: str = ""

    def can_take(self, source: PortType) -> bool:
        if self.type is PortType.ANY or source is PortType.ANY:
            return True
        if source is self.type or source in self.accepts:
            return True
        # A single image may join a list (fan-in); a mask is an image with one channel.
        return (self.type is PortType.IMAGE_LIST and source is PortType.IMAGE) or (
            self.type is PortType.IMAGE and source is PortType.MASK
        )

    def type_label(self) -> str:
        names = sorted({self.type.value, *(t.value for t in self.accepts)})
        return " or ".join(names)


@dataclass(frozen=True)
class OutputPort:
    name: str
    type: PortType
    description: str = ""
