"""OpenAPI description tweaks on top of quart-schema."""

from __future__ import annotations

import re
from typing import Any

from quart_schema import OpenAPIProvider
from werkzeug.routing import Rule

# quart-schema's own pattern lets a converter's name run across an earlier variable, turning
# "/v1/buckets/<bucket>/objects/<object:name>" into "/v1/buckets/{name}".
_PATH_VARIABLE = re.compile(r"<(?:[^:<>]*:)?([^<>]+)>")


class LoopgateOpenAPIProvider(OpenAPIProvider):
    """Names every path variable of a rule, whatever converters it uses."""

    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        paths, components = super().build_paths(rule)
        correct = _PATH_VARIABLE.sub(r"{\1}", rule.rule)
        (operations,) = paths.values()  # one path per rule
        return {correct: operations}, components
