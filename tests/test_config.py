"""The registration configuration: both variable-list forms, every problem listed at once."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from async_registrar import ConfigurationError, RegistrationConfig, load_config
from async_registrar._config import Region
from async_registrar._regions import _WORDS, _warn_unknown, known_regions, region_pattern

from .conftest import registration_config


def test_example_configuration_is_valid() -> None:
    """The shipped example validates and keeps its values."""
    config = RegistrationConfig.from_mapping(registration_config())
    assert config.model_domain == "buyer_abuse"
    assert config.regions == ("us-west-2",)
    assert config.to_wire()["model_registration_region"] == "us-west-2"
    assert config.source_model_inference_output_variable_list == [("risk_score", "NUMERIC")]


def test_both_variable_list_forms_give_the_same_pairs() -> None:
    """A mapping and a list of pairs normalise to the same ordered pairs."""
    as_map = RegistrationConfig.from_mapping(
        registration_config(source_model_inference_input_variable_list={"a": "NUMERIC", "b": "TEXT"})
    )
    as_list = RegistrationConfig.from_mapping(
        registration_config(source_model_inference_input_variable_list=[["a", "NUMERIC"], ["b", "TEXT"]])
    )
    assert as_map.source_model_inference_input_variable_list == [("a", "NUMERIC"), ("b", "TEXT")]
    assert as_map == as_list
    assert as_map.to_wire()["source_model_inference_input_variable_list"] == [["a", "NUMERIC"], ["b", "TEXT"]]


def test_every_problem_is_listed_at_once() -> None:
    """Missing fields, wrong types, bad values and unknown keys all appear in one error."""
    data = registration_config(
        model_objective="",
        source_model_inference_content_types="text/csv",
        source_model_inference_input_variable_list={"amount": "FLOAT"},
        model_registration_region="us-west",
        model_domian="typo",
    )
    del data["model_owner"]
    with pytest.raises(ConfigurationError) as caught:
        RegistrationConfig.from_mapping(data, source="config.json")
    problems = caught.value.problems
    text = str(caught.value)
    assert text.startswith("config.json: invalid registration configuration (6 problems)")
    assert any(p.startswith("model_owner: required field is missing") for p in problems)
    assert any(p.startswith("model_objective:") for p in problems)
    assert any(p.startswith("source_model_inference_content_types: Input should be a valid list") for p in problems)
    assert any(p.startswith("source_model_inference_input_variable_list['amount']:") for p in problems)
    assert any("AWS region" in p for p in problems)
    assert "model_domian: unknown key (did you mean 'model_domain'?)" in problems


def test_several_regions() -> None:
    """A list of regions is kept in order; duplicates and bad names are problems."""
    config = RegistrationConfig.from_mapping(registration_config(model_registration_region=["us-west-2", "eu-west-1"]))
    assert config.regions == ("us-west-2", "eu-west-1")
    assert config.to_wire("eu-west-1")["model_registration_region"] == "eu-west-1"
    with pytest.raises(ValueError, match="needs the region"):
        config.to_wire()
    with pytest.raises(ConfigurationError, match="regions must be unique"):
        RegistrationConfig.from_mapping(registration_config(model_registration_region=["us-west-2", "us-west-2"]))
    with pytest.raises(ConfigurationError, match=r"model_registration_region\[1\]: must be an AWS region"):
        RegistrationConfig.from_mapping(registration_config(model_registration_region=["us-west-2", "mars"]))


def test_duplicate_variable_names_are_rejected() -> None:
    """A variable list naming a variable twice is a problem."""
    with pytest.raises(ConfigurationError, match="repeated: x"):
        RegistrationConfig.from_mapping(
            registration_config(source_model_inference_output_variable_list=[["x", "TEXT"], ["x", "NUMERIC"]])
        )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("   \n", "is empty"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('"text"', "must be a JSON object"),
        ("null", "got null"),
    ],
)
def test_unusable_files_are_configuration_errors(text: str, message: str) -> None:
    """Empty, non-JSON and non-object files name the problem."""
    with pytest.raises(ConfigurationError, match=message):
        RegistrationConfig.from_json(text, source="c.json")


def test_huge_values_are_rejected() -> None:
    """Oversized strings and lists are problems, not accepted silently."""
    with pytest.raises(ConfigurationError) as caught:
        RegistrationConfig.from_mapping(
            registration_config(model_owner="x" * 10_000, source_model_inference_content_types=["text/csv"] * 100)
        )
    assert len(caught.value.problems) == 2


async def test_load_config_names_a_missing_file(tmp_path: Path) -> None:
    """A missing file names the path and the option to fix it."""
    with pytest.raises(ConfigurationError, match="not found; pass --config"):
        await load_config(tmp_path / "nope.json")


async def test_load_config_reads_a_file(tmp_path: Path) -> None:
    """A file on disk loads into the model."""
    path = tmp_path / "config"
    path.write_text(json.dumps(registration_config()))
    assert (await load_config(path)).model_owner == "ml-platform-team"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
field_names = st.sampled_from([*RegistrationConfig.model_fields, "model_domian", "extra"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.dictionaries(field_names, json_values, max_size=14)))
def test_arbitrary_json_never_raises_anything_but_a_configuration_error(value: object) -> None:
    """Whatever JSON arrives, the outcome is a config or a ConfigurationError with problems."""
    text = json.dumps(value)
    problem = None
    try:
        RegistrationConfig.from_json(text)
    except ConfigurationError as exc:
        problem = str(exc)
    assert problem is None or problem.startswith("configuration: ")


@pytest.mark.parametrize(
    ("region", "suggestion"), [("us-wst-2", "us-west-2"), ("eu-westt-1", "eu-west-1"), ("xx-east-1", "us-east-1")]
)
def test_a_misspelt_region_is_refused_with_the_closest_known_name(region: str, suggestion: str) -> None:
    """`us-wst-2` fits the pattern but is no region: refused (exit 2), naming the likely one."""
    with pytest.raises(ConfigurationError) as caught:
        RegistrationConfig.from_json(json.dumps(registration_config(model_registration_region=region)))
    assert f"'{region}' is not an AWS region name; did you mean {suggestion}?" in caught.value.message


def test_a_well_formed_region_botocore_does_not_know_passes_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A region newer than the installed botocore is not refused: it is named in a warning
    (once per process: a service validates the same name on every request)."""
    _warn_unknown.cache_clear()
    config = RegistrationConfig.from_json(json.dumps(registration_config(model_registration_region="eu-west-9")))
    assert config.regions == ("eu-west-9",)
    assert "region eu-west-9 is not one this botocore knows" in caplog.text
    caplog.clear()
    RegistrationConfig.from_json(json.dumps(registration_config(model_registration_region="eu-west-9")))
    assert "eu-west-9" not in caplog.text
    for region in ("us-gov-west-1", "ap-southeast-7", "cn-north-1"):
        assert RegistrationConfig.from_json(json.dumps(registration_config(model_registration_region=region)))


_GEOGRAPHIES = ["us", "eu", "ap", "cn", "il", "mx", "xx", "eusc", "u"]
_NAME_WORDS = [*sorted(_WORDS), "wst", "middle", "isoc", "de2"]


@settings(max_examples=2000, deadline=None)
@given(
    geography=st.sampled_from(_GEOGRAPHIES) | st.from_regex(r"[a-z]{1,3}", fullmatch=True),
    words=st.lists(st.sampled_from(_NAME_WORDS) | st.from_regex(r"[a-z]{1,4}", fullmatch=True), max_size=3),
    number=st.sampled_from(["1", "9", "10", "99", "100", "0", "01", "", "x", "\u0661"]),
)
def test_the_region_pattern_takes_exactly_the_names_the_type_takes(
    geography: str, words: list[str], number: str
) -> None:
    """The OpenAPI document's region pattern (`region_pattern`) says, in a schema, what
    `Region` checks in code: a fuzzer reading the schema must not find a difference."""
    name = "-".join([geography, *words, number])
    try:
        TypeAdapter(Region).validate_python(name)
        taken = True
    except ValidationError:
        taken = False
    assert (re.fullmatch(region_pattern(), name) is not None) == taken, name


def test_every_known_region_fits_the_region_pattern() -> None:
    """eusc-de-east-1 (a geography of four letters) included: `Region` used to refuse it."""
    names, _ = known_regions()
    fitting = {n for n in names if re.fullmatch(region_pattern(), n)}
    assert names == fitting


def test_a_region_that_is_neither_a_name_nor_a_list_says_what_it_may_be() -> None:
    """A number for the region said "Input should be a valid list", though one name is fine."""
    with pytest.raises(ConfigurationError, match=r"model_registration_region: must be a region name such as"):
        RegistrationConfig.from_mapping({**registration_config(), "model_registration_region": 5})
