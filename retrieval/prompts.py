"""Label prompts for zero-shot classification: the template a user chooses, checked, and the texts it makes.

Shared by the zero-shot model (which embeds the ImageNet class names) and classification (which embeds the
user's labels); plain strings, no numpy.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

from retrieval.errors import InvalidArgument

DEFAULT_TEMPLATE = "a photo of a {label}"  # the prompt a class label becomes in zero-shot classification


class TemplateError(InvalidArgument):
    """A prompt template str.format cannot fill with the label alone."""


def check_template(template: str) -> None:
    """The template must hold {label} and no other field: '{label}{0}', '{nope}' or a lone '{' would make
    str.format raise IndexError, KeyError or ValueError from deep inside a run."""
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError:  # an unmatched brace
        fields = []
    if not fields or any(field != ("label", "", None) for field in fields):
        raise TemplateError(
            f"the template must contain {{label}} and nothing else in braces "
            f"(write {{{{ or }}}} for a literal brace), got {template!r}"
        )


def prompts(labels: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """Hyphens and underscores in labels read as spaces ("food-drink" -> "a photo of a food drink")."""
    check_template(template)
    return [template.format(label=label.replace("-", " ").replace("_", " ")) for label in labels]
