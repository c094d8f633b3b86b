"""Settings and job inputs from the environment, with overrides first."""

from __future__ import annotations

from pathlib import Path

import pytest

from async_registrar import ConfigurationError, JobInputs, Settings

REQUIRED = {"REGISTRAR_S3_BUCKET": "models-tmp", "REGISTRAR_MIMS_ENDPOINT": "https://mims.example.com/"}


def test_environment_maps_onto_settings() -> None:
    """Each documented variable lands in its setting, with units and normalisation."""
    settings = Settings.from_env(
        {
            **REQUIRED,
            "REGISTRAR_S3_PREFIX": "/tmp-artifacts",
            "REGISTRAR_WAIT_TIMEOUT": "90",
            "REGISTRAR_PART_SIZE": "64MiB",
            "AWS_DEFAULT_REGION": "eu-west-1",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
            "REGISTRAR_S3_CHECKSUMS": "when_required",
            "REGISTRAR_S3_CHECKSUM_ALGORITHM": "crc64nvme",
            "SOURCE_DATE_EPOCH": "1700000000",
        }
    )
    assert settings.s3_bucket == "models-tmp"
    assert settings.mims_endpoint == "https://mims.example.com"
    assert settings.s3_prefix == "tmp-artifacts/"
    assert settings.wait_timeout == 90
    assert settings.part_size == 64 * 1024 * 1024
    assert settings.aws_region == "eu-west-1"
    assert settings.s3_endpoint_url == "http://127.0.0.1:9000"
    assert settings.s3_checksums == "when_required"
    assert settings.s3_checksum_algorithm == "CRC64NVME"
    assert settings.archive_mtime == 1_700_000_000


def test_overrides_win_over_the_environment() -> None:
    """A command-line value beats its environment variable; None means 'not given'."""
    settings = Settings.from_env({**REQUIRED, "REGISTRAR_S3_PREFIX": "env/"}, s3_prefix="cli/", wait_timeout=None)
    assert settings.s3_prefix == "cli/"
    assert settings.wait_timeout == 3600


def test_the_service_specific_endpoint_wins() -> None:
    """AWS_ENDPOINT_URL_S3 is preferred to AWS_ENDPOINT_URL, as botocore does."""
    settings = Settings.from_env(
        {**REQUIRED, "AWS_ENDPOINT_URL": "http://general:1", "AWS_ENDPOINT_URL_S3": "http://s3only:2"}
    )
    assert settings.s3_endpoint_url == "http://s3only:2"


def test_crc64nvme_without_the_crt_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """CRC64NVME is computed by the AWS CRT: without it, the setting is refused with the fix."""
    monkeypatch.setattr("async_registrar._settings.crc64nvme_available", lambda: False)
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({**REQUIRED, "REGISTRAR_S3_CHECKSUM_ALGORITHM": "CRC64NVME"})
    (problem,) = caught.value.problems
    assert problem.startswith("REGISTRAR_S3_CHECKSUM_ALGORITHM: ")
    assert "install async-registrar[crt], or use CRC32" in problem
    assert Settings.from_env({**REQUIRED, "REGISTRAR_S3_CHECKSUM_ALGORITHM": "crc32"}).s3_checksum_algorithm == "CRC32"


def test_errors_name_the_option_and_variable() -> None:
    """Missing and bad values are all reported, each by option and variable name."""
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"REGISTRAR_WAIT_TIMEOUT": "soon", "REGISTRAR_PART_SIZE": "1MiB"})
    problems = caught.value.problems
    assert any(p.startswith("--bucket / REGISTRAR_S3_BUCKET: required") for p in problems)
    assert any(p.startswith("--mims-endpoint / REGISTRAR_MIMS_ENDPOINT: required") for p in problems)
    assert any(p.startswith("--wait-timeout / REGISTRAR_WAIT_TIMEOUT:") for p in problems)
    assert any(p.startswith("REGISTRAR_PART_SIZE:") for p in problems)
    assert len(problems) == 4


def test_engine_defaults_follow_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """One core is left to reading and hashing; parts in flight follow the gzip threads."""
    for cpus, threads, concurrency in [(1, 1, 3), (2, 1, 3), (4, 3, 7), (64, 4, 9)]:
        monkeypatch.setattr("async_registrar._settings._cpus", lambda cpus=cpus: cpus)
        settings = Settings.from_env(REQUIRED)
        assert (settings.compression_threads, settings.upload_concurrency) == (threads, concurrency)
    settings = Settings.from_env({**REQUIRED, "REGISTRAR_COMPRESSION_THREADS": "2"})
    assert settings.upload_concurrency == 5
    settings = Settings.from_env({**REQUIRED, "REGISTRAR_UPLOAD_CONCURRENCY": "4"})
    assert settings.upload_concurrency == 4


def test_a_bad_value_another_default_depends_on_is_one_problem() -> None:
    """The concurrency default can't be computed from bad threads; only the threads are reported."""
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({**REQUIRED, "REGISTRAR_COMPRESSION_THREADS": "many"})
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("REGISTRAR_COMPRESSION_THREADS:")


def test_job_inputs_default_to_the_sagemaker_paths() -> None:
    """With nothing set, the inputs are the original's container paths."""
    inputs = JobInputs.from_env({})
    assert inputs.model_path == Path("/opt/ml/processing/input/model")
    assert inputs.payload_path == Path("/opt/ml/processing/mims_payload")
    assert inputs.config_path == Path("/opt/ml/processing/config/config")
    assert inputs.metadata_path == Path("/opt/ml/processing/input/metadata")
    assert inputs.performance_metadata_uri is None


def test_job_inputs_read_lineage_and_metadata_uri() -> None:
    """MODS_WORKFLOW_EXECUTION_ID and PERFORMANCE_METADATA_PATH are read; a bad URI is named."""
    inputs = JobInputs.from_env(
        {"MODS_WORKFLOW_EXECUTION_ID": "exec-1", "PERFORMANCE_METADATA_PATH": "s3://b-1/m.json"}, model_path="/m"
    )
    assert inputs.workflow_execution_id == "exec-1"
    assert inputs.performance_metadata_uri == "s3://b-1/m.json"
    assert inputs.model_path == Path("/m")
    with pytest.raises(ConfigurationError, match="PERFORMANCE_METADATA_PATH"):
        JobInputs.from_env({"PERFORMANCE_METADATA_PATH": "/local/file.json"})


def test_a_variable_of_ours_that_names_nothing_is_a_problem_with_the_closest_name() -> None:
    """A typo would otherwise leave its setting at the default without a word; the variables the
    command line reads itself and the job inputs' are known, and other programs' are not ours."""
    env = {
        "REGISTRAR_S3_BUCKET": "my-bucket",
        "REGISTRAR_MIMS_ENDPOINT": "http://localhost:1",
        "REGISTRAR_WAIT_TIMOUT": "5",
        "REGISTRAR_LOG_LEVEL": "DEBUG",
        "REGISTRAR_MODEL_PATH": "/opt/ml/processing/input/model",
        "REGISTRAR_OUTPUT_DIR": "/tmp",
        "OTHER_WAIT_TIMOUT": "5",
    }
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env(env)
    assert caught.value.problems == (
        "REGISTRAR_WAIT_TIMOUT: not a variable of async-registrar (did you mean REGISTRAR_WAIT_TIMEOUT?); "
        "rename or unset it",
    )
    del env["REGISTRAR_WAIT_TIMOUT"]
    assert Settings.from_env(env).s3_bucket == "my-bucket"


def test_a_prefix_with_an_empty_or_dot_segment_is_refused_before_anything_is_sent() -> None:
    """The registry refuses such keys: found at the start (exit 2), not after the whole upload."""
    for prefix in ("a//b/", "./x/", "a/../b"):
        with pytest.raises(ConfigurationError, match=r"REGISTRAR_S3_PREFIX.*empty, '\.' or '\.\.' segment"):
            Settings.from_env({"REGISTRAR_S3_BUCKET": "my-bucket", "REGISTRAR_S3_PREFIX": prefix}, registry=False)
    assert Settings(s3_bucket="my-bucket", s3_prefix="/runs/x").s3_prefix == "runs/x/"


def test_a_prefix_that_normalises_to_nothing_is_refused() -> None:
    """The bucket root is no prefix of the runs' own (sweep and the lifecycle rule refuse it): exit 2,
    naming the option and the variable, whether it came from either or from the library."""
    env = {"REGISTRAR_S3_BUCKET": "my-bucket"}
    for given in ({"s3_prefix": ""}, {"s3_prefix": "/"}, {"s3_prefix": "//"}):
        with pytest.raises(ConfigurationError, match=r"--prefix / REGISTRAR_S3_PREFIX: is empty .*registrar-tmp/"):
            Settings.from_env(env, registry=False, **given)
    with pytest.raises(ConfigurationError, match=r"--prefix / REGISTRAR_S3_PREFIX: is empty"):
        Settings.from_env({**env, "REGISTRAR_S3_PREFIX": "/"}, registry=False)
    with pytest.raises(ConfigurationError, match=r"s3_prefix: is empty"):
        Settings(s3_bucket="my-bucket", s3_prefix="")


def test_an_empty_variable_is_unset_for_the_prefix_as_for_every_variable() -> None:
    """REGISTRAR_S3_PREFIX="" is not set (the default applies), as every empty variable is;
    an explicit `--prefix ""` is a value, and is refused."""
    settings = Settings.from_env({**REQUIRED, "REGISTRAR_S3_PREFIX": "", "REGISTRAR_WAIT_TIMEOUT": ""})
    assert settings.s3_prefix == "registrar-tmp/"
    assert settings.wait_timeout == 3600


def test_a_region_that_is_not_one_is_said_so() -> None:
    """AWS_REGION=us_west_2 was said to need to be "free of control characters"."""
    with pytest.raises(ConfigurationError, match=r"AWS_REGION / AWS_DEFAULT_REGION: must be an AWS region such as"):
        Settings.from_env(
            {"AWS_REGION": "us_west_2", "REGISTRAR_S3_BUCKET": "bucket", "REGISTRAR_MIMS_ENDPOINT": "http://mims.test"}
        )


@pytest.mark.parametrize("uri", ["s3://source-bucket/", "s3://source-bucket", "s3:/source-bucket/model.tar.gz"])
def test_an_s3_uri_without_a_key_is_not_taken_for_a_local_path(uri: str) -> None:
    """`--model s3://bucket/` was taken for the local path `s3:/bucket` ("does not exist")."""
    with pytest.raises(ConfigurationError, match=r"REGISTRAR_MODEL_PATH: must be s3://bucket/key of a prebuilt"):
        JobInputs.from_env({"REGISTRAR_MODEL_PATH": uri})
    with pytest.raises(ConfigurationError, match=r"REGISTRAR_PAYLOAD_PATH: must be s3://bucket/key of a prebuilt"):
        JobInputs.from_env({"REGISTRAR_PAYLOAD_PATH": uri})


def test_a_size_that_is_not_one_says_what_a_size_looks_like() -> None:
    """REGISTRAR_PART_SIZE=abc said "could not parse value and unit from byte string"."""
    with pytest.raises(ConfigurationError, match=r"REGISTRAR_PART_SIZE: must be a size such as 16MiB"):
        Settings.from_env({"REGISTRAR_PART_SIZE": "abc", "REGISTRAR_S3_BUCKET": "bucket"}, registry=False)
