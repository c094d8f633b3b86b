"""The registration configuration: the JSON file the original script read.

`RegistrationConfig` validates the file's fields and normalises them (the two
forms of variable list in use become one).  Validation reports every problem at
once, each naming the field, and suggests the closest known name for an unknown
key, so a user fixes the file in one go.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from . import _strict_json as strict_json
from ._errors import ConfigurationError
from ._regions import check_region

__all__ = ["RegistrationConfig", "VariableType", "load_config"]

#: Largest configuration file read; a real one is a few KiB.
MAX_CONFIG_BYTES = 1024 * 1024

VariableType = Literal["NUMERIC", "TEXT"]

_NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256, pattern=_NO_CONTROL)]
#: The form of a region name, with no judgement of the name itself (a run manifest's, read back).
RegionName = Annotated[str, StringConstraints(pattern=r"^[a-z]{2,4}(-[a-z]+)+-[0-9]{1,2}$", max_length=32)]
Region = Annotated[RegionName, AfterValidator(check_region)]
ContentType = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][\w.+-]*/[\w.+*-]+$", max_length=128)]
VariableName = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=_NO_CONTROL)]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=256)]
EnvValue = Annotated[str, StringConstraints(max_length=32 * 1024)]


def _pairs_from_mapping(value: Any) -> Any:
    """Accept `{"name": "NUMERIC"}` as well as `[["name", "NUMERIC"], ...]`."""
    if isinstance(value, dict):
        return [[name, kind] for name, kind in value.items()]
    return value


def _unique_names(value: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: set[str] = set()
    duplicates = []
    for name, _ in value:
        if name in seen:
            duplicates.append(name)
        seen.add(name)
    if duplicates:
        raise ValueError(f"variable names must be unique; repeated: {', '.join(sorted(set(duplicates)))}")
    return value


def _listify(value: Any) -> Any:
    """Accept one region as well as a list of them."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):  # pydantic would say "a valid list", though one string is fine
        raise ValueError("must be a region name such as 'us-west-2', or a list of them")
    return value


def _unique_regions(value: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise ValueError("regions must be unique")
    return value


Regions = Annotated[
    list[Region], BeforeValidator(_listify), AfterValidator(_unique_regions), Field(min_length=1, max_length=20)
]

VariableList = Annotated[
    list[tuple[VariableName, VariableType]],
    BeforeValidator(_pairs_from_mapping),
    AfterValidator(_unique_names),
    # Unique by name, which JSON Schema cannot say (`uniqueItems` compares whole pairs): in words.
    Field(min_length=1, max_length=10_000, description="[name, type] pairs; each name at most once"),
]


class RegistrationConfig(BaseModel):
    """What the model is and how it is served: the fields of the original's config file.

    Variable lists are normalised to a list of `(name, type)` pairs, whichever of
    the two accepted forms the file used.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_domain: Text
    model_objective: Text
    source_model_inference_content_types: Annotated[list[ContentType], Field(min_length=1, max_length=32)]
    source_model_inference_response_types: Annotated[list[ContentType], Field(min_length=1, max_length=32)]
    source_model_inference_input_variable_list: VariableList
    source_model_inference_output_variable_list: VariableList
    #: One region, or several: the model is then registered in each (one archive, one
    #: upload and one registration per region).
    model_registration_region: Regions
    model_owner: Text
    source_model_inference_image_arn: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2048, pattern=_NO_CONTROL)
    ]
    source_model_region: Region | None = None
    source_model_environment_variable_map: Annotated[dict[EnvName, EnvValue] | None, Field(max_length=1000)] = None
    load_testing_info_map: Annotated[dict[str, Any] | None, Field(max_length=1000)] = None

    @classmethod
    def from_mapping(cls, data: object, *, source: str = "configuration") -> RegistrationConfig:
        """Validate an already-parsed JSON value; raise `ConfigurationError` listing every problem."""
        if not isinstance(data, dict):
            raise ConfigurationError(
                f"{source}: the configuration must be a JSON object with the registration fields, "
                f"got {_json_kind(data)}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = describe_validation_errors(exc, known=list(cls.model_fields), data=data)
            raise ConfigurationError(
                f"{source}: invalid registration configuration ({len(problems)} problem"
                f"{'s' if len(problems) != 1 else ''}); fix each and run again:",
                problems,
            ) from None

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "configuration") -> RegistrationConfig:
        """Parse and validate JSON text."""
        if not text.strip():
            raise ConfigurationError(
                f"{source}: the configuration file is empty; it must hold a JSON object with the registration fields"
            )
        try:
            data = strict_json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ConfigurationError(f"{source}: the configuration is not valid JSON ({exc})") from None
        return cls.from_mapping(data, source=source)

    @property
    def regions(self) -> tuple[str, ...]:
        """The regions to register in, in the order given."""
        return tuple(self.model_registration_region)

    def to_wire(self, region: str | None = None) -> dict[str, Any]:
        """The fields as they are sent to the registry of `region` (variable lists as pairs).

        `region` may be left out when there is only one.
        """
        if region is None:
            if len(self.regions) != 1:
                raise ValueError("to_wire needs the region of a multi-region configuration")
            region = self.regions[0]
        data = self.model_dump(mode="json")
        data["model_registration_region"] = region
        for field in ("source_model_inference_input_variable_list", "source_model_inference_output_variable_list"):
            data[field] = [list(pair) for pair in data[field]]
        return data


async def load_config(path: Path) -> RegistrationConfig:
    """Read and validate the configuration file at `path` (or the one JSON file in that directory)."""
    import aiofiles  # on first use: it costs 40 ms at start-up, which `upload` does not need

    from ._threads import FILES

    try:
        async with aiofiles.open(path, "rb", executor=FILES) as f:
            text = await f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigurationError(
            f"{path}: configuration file not found; pass --config or set REGISTRAR_CONFIG_PATH"
        ) from None
    except IsADirectoryError:
        # A SageMaker channel or a Kubernetes ConfigMap mounted as a directory: its one file.
        return await load_config(await _one_file_in(path))
    except OSError as exc:
        raise ConfigurationError(
            f"{path}: cannot read the configuration file ({exc.strerror}); make it readable by the user the "
            "job runs as (chmod a+r)"
        ) from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigurationError(
            f"{path}: the configuration file is larger than {MAX_CONFIG_BYTES // 1024} KiB; "
            "it should hold only the registration fields"
        )
    return RegistrationConfig.from_json(text, source=str(path))


async def _one_file_in(directory: Path) -> Path:
    """The configuration file in `directory`: its one file, or its one `.json` file.  Links to
    files count (a ConfigMap mounts each key as a link into `..data/`); hidden entries do not."""
    import aiofiles.os

    from ._threads import FILES

    try:
        entries = await aiofiles.os.scandir(directory, executor=FILES)
    except OSError as exc:
        raise ConfigurationError(f"{directory}: cannot list the configuration directory ({exc.strerror})") from None
    with entries:
        files = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_file())
    if len(files) > 1:
        files = [name for name in files if name.endswith(".json")] or files
    if len(files) != 1:
        found = ", ".join(files) if files else "no file"
        raise ConfigurationError(
            f"{directory}: is a directory holding {found}; it must hold one JSON file, "
            "or name the configuration file itself (--config or REGISTRAR_CONFIG_PATH)"
        )
    return directory / files[0]


#: What a value must look like, for fields whose pattern says little to a person.
_PATTERN_HINTS = {
    "model_registration_region": "an AWS region such as 'us-west-2'",
    "source_model_region": "an AWS region such as 'us-west-2'",
    "source_model_inference_content_types": "a MIME type such as 'text/csv'",
    "source_model_inference_response_types": "a MIME type such as 'application/json'",
    "source_model_environment_variable_map": "an environment variable name (letters, digits, '_')",
    "aws_region": "an AWS region such as 'us-west-2'",
}


def describe_validation_errors(exc: ValidationError, *, known: list[str], data: object = None) -> list[str]:
    """Turn pydantic's errors into one line per problem, naming the field."""
    problems = []
    for error in exc.errors(include_url=False):
        loc = _format_loc(_named_loc(error["loc"], data))
        kind = error["type"]
        if kind == "default_factory_not_called":
            continue  # a default that depends on a field in error: that error is listed
        if kind == "missing":
            problems.append(f"{loc}: required field is missing")
        elif kind == "extra_forbidden":
            key = str(error["loc"][-1])
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(known)}"
            problems.append(f"{loc}: unknown key{hint}")
        else:
            message = error["msg"].removeprefix("Value error, ")
            if kind == "string_pattern_mismatch":
                field = str(error["loc"][0])
                message = f"must be {_PATTERN_HINTS.get(field, 'free of control characters')}"
            elif kind in ("byte_size", "byte_size_unit"):  # pydantic's words for it are its parser's
                message = "must be a size such as 16MiB, 64MB or 8388608 (bytes)"
            problems.append(f"{loc}: {message} (got {_preview(error.get('input'))})")
    return problems


def _named_loc(loc: tuple[int | str, ...], data: object) -> tuple[int | str, ...]:
    """Name a variable by its key when the file used the mapping form of a variable list."""
    if len(loc) >= 2 and isinstance(data, dict) and isinstance(loc[1], int):
        original = data.get(loc[0])
        if isinstance(original, str) and loc[1] == 0:  # one region given as a string
            return (loc[0], *loc[2:])
        if isinstance(original, dict) and loc[1] < len(original):
            name = list(original)[loc[1]]
            return (loc[0], repr(name), *loc[3:])
    return loc


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = str(loc[0]) if loc else "(top level)"
    for part in loc[1:]:
        if part == "[key]":
            out += " (the key)"
        elif isinstance(part, int) or part.startswith("'"):
            out += f"[{part}]"
        else:
            out += f"[{part!r}]"
    return out


def _preview(value: object) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    text = re.sub(r"[\x00-\x1f\x7f]", "?", text)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_kind(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
