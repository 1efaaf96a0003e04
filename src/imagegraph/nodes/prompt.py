"""`prompt:template`: build a prompt from `${variables}`; its variables are its input ports."""

from __future__ import annotations

import string
from typing import Any

from pydantic import Field

from imagegraph.errors import Issue, NodeError
from imagegraph.graph.ports import InputPort, OutputPort, PortType
from imagegraph.nodes.base import Inputs, Node, NodeContext, NodeParams, Outputs

NEGATIVE_PORT = "negativePrompt"


class PromptTemplate(string.Template):
    """`${name}` substitution only; `$$` is a literal `$`, and a lone `$` (as in "$5") is text."""

    delimiter = "$"
    pattern = r"""
    \$(?:
      (?P<escaped>\$) |
      \{(?P<braced>[_a-zA-Z][_a-zA-Z0-9]*)\} |
      (?P<named>(?!)) |
      (?P<invalid>(?!))
    )
    """  # type: ignore[assignment]


def template_variables(template: str) -> list[str]:
    return PromptTemplate(template).get_identifiers()


class TemplateParams(NodeParams):
    template: str = Field(
        default="${subject}",
        min_length=1,
        max_length=20_000,
        description="Prompt text with ${variable} placeholders; each variable is an input.",
    )
    negative_prompt: str = Field(
        default="",
        max_length=20_000,
        description="This node's negative prompt; a shared one connected to the "
        "negativePrompt input is appended to it.",
    )
    variables: dict[str, str | float] = Field(
        default_factory=dict,
        description="Default values for variables that are not connected.",
    )


class PromptTemplateNode(Node[TemplateParams]):
    type = "prompt:template"
    title = "Prompt template"
    description = "Fills ${variables} from its inputs to make a prompt and a negative prompt."
    params_model = TemplateParams
    outputs = (
        OutputPort("text", PortType.TEXT),
        OutputPort(NEGATIVE_PORT, PortType.TEXT),
    )

    def input_ports(self, params: TemplateParams) -> tuple[InputPort, ...]:
        ports = [
            InputPort(
                name,
                PortType.TEXT,
                required=name not in params.variables,
                accepts=frozenset({PortType.NUMBER}),
            )
            for name in template_variables(params.template)
            if name != NEGATIVE_PORT
        ]
        ports.append(
            InputPort(
                NEGATIVE_PORT,
                PortType.TEXT,
                required=False,
                description="A shared negative prompt, appended.",
            )
        )
        return tuple(ports)

    def check(self, params: TemplateParams) -> list[Issue]:
        issues = []
        names = template_variables(params.template)
        if NEGATIVE_PORT in names:
            issues.append(
                Issue(
                    "invalid_param",
                    f"variable name {NEGATIVE_PORT!r} is reserved "
                    "for the shared negative prompt input",
                    field="params.template",
                )
            )
        unused = sorted(set(params.variables) - set(names))
        if unused:
            issues.append(
                Issue(
                    "invalid_param",
                    f"params.variables has values for {unused}, which the template does not use",
                    field="params.variables",
                )
            )
        return issues

    async def run(self, ctx: NodeContext, params: TemplateParams, inputs: Inputs) -> Outputs:
        values: dict[str, Any] = {**params.variables}
        values.update({k: v for k, v in inputs.items() if k != NEGATIVE_PORT})
        missing = [n for n in template_variables(params.template) if n not in values]
        if missing:
            raise NodeError(
                f"template variable(s) {', '.join(missing)} have no value",
                code="missing_variable",
                variables=missing,
            )
        text = PromptTemplate(params.template).substitute(
            {k: _format(v) for k, v in values.items()}
        )
        negatives = [params.negative_prompt.strip(), str(inputs.get(NEGATIVE_PORT, "")).strip()]
        return {"text": text, NEGATIVE_PORT: ", ".join(n for n in negatives if n)}


def _format(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
