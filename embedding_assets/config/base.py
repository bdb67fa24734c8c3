"""What every part of sources.yaml shares: strict models, and how table names and text
templates are read."""

import string

from pydantic import BaseModel, ConfigDict


class Spec(BaseModel):
    # A typo in sources.yaml must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


def off_as_disabled(value):
    """`pgvector: false` / `qdrant: false` in sources.yaml: the destination is off."""
    return {"enabled": False} if value is False else value


def template_fields(template: str) -> list[str]:
    """The column names a `{column}` text template uses, in order of first use."""
    fields: list[str] = []
    for _, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if not field.strip() or field.isdigit() or spec or conversion:
            raise ValueError(
                f"text template field {{{field}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} is not a plain column name; write {{column}}, "
                "and for a column whose name is a number or holds ':' or '!' alias it in a "
                "`query:` "
                '(SELECT "odd:name" AS odd_name ...)'
            )
        if field not in fields:
            fields.append(field)
    if not fields:
        raise ValueError(f"text template {template!r} uses no column; write e.g. '{{title}}'")
    return fields


def split_qualified(name: str, default_schema: str = "public") -> tuple[str, str]:
    parts = name.split(".")
    if len(parts) == 1:
        return default_schema, parts[0]
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1]
    raise ValueError(f"{name!r} is not a table name; write table or schema.table")
