"""Vertical prompt templates: YAML files that turn structured fields into a prompt.

A template names its variables with a type, whether they are required, a default, allowed choices
and a length limit; ``render`` checks every value before filling ``{name}`` placeholders, so a typo
in a field name or a missing field is a clear error instead of a silently odd prompt. Built-in
templates live in ``aigc/configs/templates``; any YAML file with the same shape works too.

    name: product-description
    variables:
      name: {type: str, required: true, max_length: 80}
      features: {type: list, required: true}
      tone: {type: str, choices: [friendly, premium, playful], default: friendly}
    template: "Product: {name}\\nFeatures: {features}\\nTone: {tone}\\nDescription:"
    sampling: {max_new_tokens: 120, temperature: 0.8, stop: ["\\n\\n"]}
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from aigc.errors import UserError

BUILTIN = Path(__file__).resolve().parent.parent / "configs" / "templates"
TYPES = {"str": str, "int": int, "float": float, "list": list}


@dataclass
class Variable:
    name: str
    type: str = "str"
    required: bool = True
    default: object = None
    choices: list | None = None
    max_length: int = 0
    description: str = ""


@dataclass
class Template:
    name: str
    template: str
    variables: dict[str, Variable]
    sampling: dict = field(default_factory=dict)
    description: str = ""

    def render(self, values: dict[str, object]) -> str:
        unknown = sorted(set(values) - set(self.variables))
        if unknown:
            raise UserError(f"template {self.name}: unknown variable {unknown[0]!r} (variables: {', '.join(self.variables)})")
        filled = {}
        for name, var in self.variables.items():
            if name not in values or values[name] in (None, ""):
                if var.required and var.default is None:
                    raise UserError(f"template {self.name}: missing required variable {name!r}" + (f" ({var.description})" if var.description else ""))
                filled[name] = var.default if var.default is not None else ""
                continue
            filled[name] = _check(self.name, var, values[name])
        return self.template.format_map({k: ", ".join(map(str, v)) if isinstance(v, list) else v for k, v in filled.items()})


def _check(template: str, var: Variable, value: object) -> object:
    where = f"template {template}: variable {var.name!r}"
    if var.type == "list":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not value:
            raise UserError(f"{where} must be a non-empty list (comma-separated on the command line)")
    elif var.type in ("int", "float"):
        try:
            value = TYPES[var.type](value)
        except (TypeError, ValueError):
            raise UserError(f"{where} must be {var.type}, got {value!r}") from None
    else:
        value = str(value)
    if var.choices is not None and value not in var.choices:
        raise UserError(f"{where} must be one of {', '.join(map(str, var.choices))}, got {value!r}")
    if var.max_length and len(str(value)) > var.max_length:
        raise UserError(f"{where} is {len(str(value))} characters, more than its limit of {var.max_length}")
    return value


def available() -> list[str]:
    return sorted(p.stem for p in BUILTIN.glob("*.yaml"))


def load(name_or_path: str) -> Template:
    """A built-in template by name, or a template YAML file by path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = BUILTIN / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UserError(f"unknown template {name_or_path!r} (built-in: {', '.join(available())}; or give a YAML file path)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("template"), str):
        raise UserError(f"{path}: a template needs a 'template' string")
    raw_vars = data.get("variables") or {}
    variables = {}
    for name, spec in raw_vars.items():
        spec = spec or {}
        if not isinstance(spec, dict):
            raise UserError(f"{path}: variable {name!r} must be a mapping")
        extra = set(spec) - {"type", "required", "default", "choices", "max_length", "description"}
        if extra:
            raise UserError(f"{path}: variable {name!r} has unknown key {sorted(extra)[0]!r}")
        if spec.get("type", "str") not in TYPES:
            raise UserError(f"{path}: variable {name!r} has type {spec.get('type')!r}; allowed: {', '.join(TYPES)}")
        variables[name] = Variable(name=name, **spec)
    used = {f for _, f, _, _ in string.Formatter().parse(data["template"]) if f}
    undeclared = sorted(used - set(variables))
    if undeclared:
        raise UserError(f"{path}: placeholder {{{undeclared[0]}}} has no declared variable")
    return Template(name=data.get("name", path.stem), template=data["template"], variables=variables,
                    sampling=data.get("sampling") or {}, description=data.get("description", ""))
