"""A request's `response_format` and tool choice as the grammar its answer must match, rendered
by mistral-common's `GrammarFactory` and checked by llguidance before the request goes anywhere:
a schema the library cannot take is an `InvalidGrammarError` naming the part of the request.

- `json_object`: any JSON object or array; `json_schema` with `strict: true`: that schema; without
  `strict`, any JSON (mistral-common's rule: the schema is then the model's guide, not a constraint).
- Under tool_choice "required" or a named function, each call's arguments follow its tool's
  `parameters` schema (the tools are taken as strict); under "auto" only strict tools are held to
  their schema.
- JSON is written with `", "` and `": "` between items and no other whitespace outside strings
  (llguidance's `whitespace_flexible: false`), unless a schema sets its own `x-guidance` options:
  free whitespace lets an answer run on in blank runs (vLLM's `disable_any_whitespace` is for that).
- With reasoning on, the factory's `[THINK]` template: the answer may reason first, and the grammar
  holds from `[/THINK]`. With reasoning off, its base template: no `[THINK]` section.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pydantic
from mistral_common.guidance.grammar_factory import JINJA_DIR
from mistral_common.protocol.instruct.request import ResponseFormat, ResponseFormats, SchemaRenderingMode
from mistral_common.protocol.instruct.tool_calls import Tool, ToolChoiceEnum

from cluster.engine.grammar import Grammar, GrammarCompiler, grammar_factory
from cluster.errors import InvalidGrammarError
from cluster.model.tokenizer import Tokenizer

_BASE_TEMPLATE = (JINJA_DIR / "base_grammar.lark.jinja").read_text(encoding="utf-8")
_NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}  # mistral-common's default
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
TOOL_CHOICES = ("auto", "none", "required")


class ResponseGrammars:
    """Grammars for one tokenizer (its factory is made on the first request that needs one)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def for_completion(self, response_format: dict[str, Any] | None) -> Grammar | None:
        """The grammar of a completion's text under `response_format` (None for text)."""
        schema = self._schema(response_format)
        if schema is None:
            return None
        factory = grammar_factory(self.tokenizer)
        return self._checked(factory.get_lark_for_json_schema(_BASE_TEMPLATE, schema),
                             "response_format.json_schema.schema", ())

    def for_chat(self, response_format: dict[str, Any] | None, tools: Sequence[dict[str, Any]] | None,
                 tool_choice: str | None, function: str | None, parallel_tool_calls: bool, reasoning: bool,
                 prefix: Sequence[int] = ()) -> Grammar | None:
        """The grammar of a chat answer, or None where nothing constrains it. `tool_choice` is
        "auto", "none", "required" or None (auto); `function` names a forced function instead.
        `prefix`: the tokens the prompt ends with that begin the answer (a forced tool call)."""
        schema = self._schema(response_format)
        forced = tool_choice == "required" or function is not None
        if schema is None and not forced:
            return None
        if schema is not None and forced:
            raise InvalidGrammarError("response_format", f"a {response_format and response_format.get('type')} "
                                      "response cannot be combined with tool_choice 'required' or a named "
                                      "function (only with 'auto' or 'none')")
        factory = grammar_factory(self.tokenizer)
        template = factory.select_jinja_template() if reasoning else _BASE_TEMPLATE
        chosen = self._tools(tools or (), function, strict=forced) if tool_choice != "none" else []
        if not chosen and forced:
            raise InvalidGrammarError("tool_choice", "tools are needed for tool_choice 'required' or a function")
        try:
            lark = factory.get_lark_from_jinja(
                template=template, mode=ToolChoiceEnum.required if forced else ToolChoiceEnum.auto if chosen
                else ToolChoiceEnum.none, tools=chosen or None, json_schema=schema,
                parallel_tool_calls=parallel_tool_calls and function is None,
                json_only=schema is not None and not chosen, force_tool_names=function is not None)
        except ValueError as exc:
            raise InvalidGrammarError("tool_choice", str(exc)) from None
        return self._checked(lark, "response_format.json_schema.schema" if schema is not None else "tools",
                             prefix)

    def _schema(self, response_format: dict[str, Any] | None) -> dict[str, Any] | None:
        """The JSON schema a response format constrains to (None for text)."""
        if response_format is None:
            return None
        try:
            parsed = ResponseFormat.model_validate(response_format)
        except pydantic.ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in ("response_format", *err["loc"]))
            raise InvalidGrammarError(where.replace("custom_schema", "schema"), err["msg"]) from None
        if parsed.type == ResponseFormats.text:
            return None
        schema = parsed.get_schema(SchemaRenderingMode.grammar)
        if schema is None:
            return None
        schema = compact(schema)
        if parsed.type == ResponseFormats.json_schema:
            self._check_schema(schema, "response_format.json_schema.schema")
        return schema

    def _tools(self, tools: Sequence[dict[str, Any]], function: str | None, strict: bool) -> list[Tool]:
        """The tools a call may use (the named one alone), strict where the choice forces a call;
        each strict tool's parameters are checked on their own, so a refusal names the tool."""
        out = []
        for i, raw in enumerate(tools):
            try:
                tool = Tool.model_validate(raw)
            except pydantic.ValidationError as exc:
                raise InvalidGrammarError(f"tools[{i}]", exc.errors(include_url=False)[0]["msg"]) from None
            if function is not None and tool.function.name != function:
                continue
            if strict or tool.function.strict:
                params = tool.function.parameters or _NO_ARGUMENTS
                held = tool.function.model_copy(update={"strict": True, "parameters": compact(params)})
                tool = tool.model_copy(update={"function": held})
            if tool.function.strict and tool.function.parameters:
                self._check_schema(tool.function.parameters, f"tools[{i}].function.parameters")
            out.append(tool)
        if function is not None and not out:
            raise InvalidGrammarError("tool_choice", f"names {function!r}, which is not in tools")
        return out

    def _check_schema(self, schema: dict[str, Any], field: str) -> None:
        lark = grammar_factory(self.tokenizer).get_lark_for_json_schema(_BASE_TEMPLATE, schema)
        if error := self._compiler().check(lark):
            raise InvalidGrammarError(field, error)

    def _checked(self, lark: str, field: str, prefix: Sequence[int]) -> Grammar:
        """The grammar, once llguidance has compiled it and taken its prefix."""
        grammar = Grammar(lark, tuple(prefix))
        try:
            self._compiler().matchers(grammar, 1)
        except InvalidGrammarError as exc:
            raise InvalidGrammarError(field, str(exc).removeprefix("grammar: ")) from None
        return grammar

    def _compiler(self) -> GrammarCompiler:
        return GrammarCompiler.for_tokenizer(self.tokenizer)


def compact(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with llguidance's compact-JSON options, under any it sets itself."""
    own = schema.get("x-guidance")
    return {**schema, "x-guidance": {**_JSON_OPTIONS, **(own if isinstance(own, dict) else {})}}
