"""The IAM policy docs/containers.md documents, enforced: `register` against an S3 server that
checks every request against the caller's IAM policies.

moto's server does that once told to (`POST /moto-api/reset-auth` with 0: no unauthenticated
request from then on; the same switch as its `INITIAL_NO_AUTH_ACTION_COUNT` variable, which
cannot be used alone here because the first IAM user must be made without one). The switch
is process-wide in moto (`moto.settings` and a class-level request counter), as are its
backends, so the server runs in a subprocess of its own: the session's S3 server in this
process is untouched. Its setup (buckets, an admin user for the reference MIMS) happens
before the switch; every user a test makes afterwards is made by that admin.

The job runs as an IAM user holding exactly the documented policy (read from the doc's
```json block, bucket and prefix substituted; see `for_moto` for the one name moto spells
differently), then with each S3 permission taken out in turn: each one is used, and what goes
wrong without it says which request was denied.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError
from pydantic import SecretStr

from async_registrar._local import REGION
from async_registrar.reference_mims import ReferenceMimsSettings, ThreadedMimsServer

from .conftest import HELD, ROOT, MiB, make_job
from .test_cli import run, run_releasing

DOC = ROOT / "docs" / "containers.md"
#: The names the documented policy uses for the temporary bucket and prefix.
DOC_BUCKET, DOC_PREFIX = "my-registration-tmp", "registrar-tmp/"
BUCKET = "registrar-iam-tmp"
REGISTRY_BUCKET = "mims-registry"
S3_ACTIONS = {
    "s3:ListBucket",
    "s3:ListBucketMultipartUploads",
    "s3:PutObject",
    "s3:GetObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
}

#: moto's S3 server on an ephemeral port, in a process of its own; prints the port, stops when
#: its stdin closes.
SERVER = """
import signal
import sys
import time
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""


@dataclass(frozen=True)
class Keys:
    access_key: str
    secret_key: str


@dataclass(frozen=True)
class IamS3:
    """The IAM-enforcing S3 server: its endpoint, and an admin allowed everything."""

    endpoint: str
    admin: Keys

    def client(self, service: str, keys: Keys | None = None) -> Any:
        keys = keys or self.admin
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=keys.access_key,
            aws_secret_access_key=keys.secret_key,
        )

    def user(self, policy: dict[str, Any]) -> Keys:
        """A new IAM user holding `policy` (inline, and nothing else), and its access key."""
        name = f"registrar-{secrets.token_hex(4)}"
        with contextlib.closing(self.client("iam")) as iam:
            iam.create_user(UserName=name)
            iam.put_user_policy(UserName=name, PolicyName="registrar", PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=name)["AccessKey"]
        return Keys(key["AccessKeyId"], key["SecretAccessKey"])

    def remove(self, prefix: str) -> None:
        """Remove what a test left under `prefix` on purpose (objects and open uploads), as the admin."""
        with contextlib.closing(self.client("s3")) as s3:
            for upload in s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", []):
                s3.abort_multipart_upload(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])
            for obj in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []):
                s3.delete_object(Bucket=BUCKET, Key=obj["Key"])
        assert self.leftovers(prefix) == []

    def leftovers(self, prefix: str) -> list[str]:
        """Objects and open multipart uploads under `prefix`, as the admin sees them."""
        with contextlib.closing(self.client("s3")) as s3:
            objects = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
            uploads = s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])
        return [o["Key"] for o in objects] + [f"upload:{u['Key']}" for u in uploads]


@pytest.fixture(scope="module")
def iam_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IamS3]:
    log = tmp_path_factory.mktemp("moto-iam") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "INITIAL_NO_AUTH_ACTION_COUNT"}
    with log.open("w") as sink:
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=sink,
            env=env,
            text=True,
        )
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        assert port.isdigit(), f"moto's server did not start: {log.read_text()[-2000:]}"
        endpoint = f"http://127.0.0.1:{port}"
        setup = IamS3(endpoint, Keys("AKIASETUPBEFOREIAM00", "unchecked-until-iam-is-on"))
        with contextlib.closing(setup.client("s3")) as s3:
            for bucket in (BUCKET, REGISTRY_BUCKET):
                s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
        admin = setup.user(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        )
        answer = httpx.post(f"{endpoint}/moto-api/reset-auth", content=b"0")
        assert answer.status_code == 200, answer.text
        enforced = IamS3(endpoint, admin)
        with contextlib.closing(setup.client("s3")) as s3, pytest.raises(ClientError, match="InvalidAccessKeyId"):
            s3.list_objects_v2(Bucket=BUCKET)  # IAM is on: a key no user holds is refused
        yield enforced
    finally:
        for pipe in (server.stdin, server.stdout):
            if pipe is not None:
                pipe.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def documented_policy(prefix: str) -> dict[str, Any]:
    """The one ```json block of docs/containers.md, for `BUCKET` and `prefix`."""
    blocks = re.findall(r"^```json\n(.*?)^```", DOC.read_text(), flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, f"docs/containers.md should hold one ```json block (the policy), not {len(blocks)}"
    text: str = blocks[0]
    for placeholder in (f'arn:aws:s3:::{DOC_BUCKET}"', f'arn:aws:s3:::{DOC_BUCKET}/{DOC_PREFIX}*"'):
        assert placeholder in text, f"the documented policy no longer names {placeholder}"
    text = text.replace(f"arn:aws:s3:::{DOC_BUCKET}/{DOC_PREFIX}*", f"arn:aws:s3:::{BUCKET}/{prefix}*")
    text = text.replace(f"arn:aws:s3:::{DOC_BUCKET}", f"arn:aws:s3:::{BUCKET}")
    policy: dict[str, Any] = json.loads(text)
    return policy


def actions(statement: dict[str, Any]) -> list[str]:
    value = statement["Action"]
    return [value] if isinstance(value, str) else list(value)


def for_moto(policy: dict[str, Any]) -> dict[str, Any]:
    """`policy` as moto must be told it.

    AWS authorises HeadBucket as s3:ListBucket (what the documentation grants); moto asks for
    an action it calls s3:HeadBucket (ACTION_MAP in moto/s3/responses.py). It is granted
    exactly where s3:ListBucket is, so taking s3:ListBucket out takes out both. Nothing else
    changes."""
    statements = []
    for statement in policy["Statement"]:
        granted = actions(statement)
        if "s3:ListBucket" in granted:
            statement = {**statement, "Action": [*granted, "s3:HeadBucket"]}
        statements.append(statement)
    return {**policy, "Statement": statements}


def without(policy: dict[str, Any], action: str) -> dict[str, Any]:
    """`policy` with `action` taken out of every statement (it must be in one)."""
    assert any(action in actions(s) for s in policy["Statement"]), f"the documented policy does not grant {action}"
    statements = [{**s, "Action": [a for a in actions(s) if a != action]} for s in policy["Statement"]]
    return {**policy, "Statement": [s for s in statements if s["Action"]]}


def job_environment(
    iam_s3: IamS3, keys: Keys, registry: ThreadedMimsServer, job: dict[str, Path], prefix: str
) -> dict[str, str]:
    """What a registration job would be given: the user's keys, nothing else of AWS."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "AWS_ACCESS_KEY_ID": keys.access_key,
        "AWS_SECRET_ACCESS_KEY": keys.secret_key,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL_S3": iam_s3.endpoint,
        "REGISTRAR_S3_BUCKET": BUCKET,
        "REGISTRAR_S3_PREFIX": prefix,
        "REGISTRAR_MIMS_ENDPOINT": registry.endpoint,
        "REGISTRAR_MODEL_PATH": str(job["model"]),
        "REGISTRAR_PAYLOAD_PATH": str(job["payload"]),
        "REGISTRAR_CONFIG_PATH": str(job["config"]),
        "REGISTRAR_PART_SIZE": "5MiB",
        "REGISTRAR_POLL_INITIAL": "0.05",
        "REGISTRAR_POLL_MAX": "0.2",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def reference_mims(iam_s3: IamS3, keys: Keys, **overrides: Any) -> ThreadedMimsServer:
    """The reference MIMS on the IAM-enforcing S3, reading with the admin's keys (MIMS has a role of
    its own), verifying the job's signatures."""
    settings = ReferenceMimsSettings(
        registry_bucket=REGISTRY_BUCKET,
        s3_endpoint_url=iam_s3.endpoint,
        aws_region=REGION,
        aws_access_key_id=SecretStr(iam_s3.admin.access_key),
        aws_secret_access_key=SecretStr(iam_s3.admin.secret_key),
        signing_secrets={keys.access_key: SecretStr(keys.secret_key)},
        pending_delay=0.05,
        **overrides,
    )
    return ThreadedMimsServer(settings)


def error_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("error:"))


def test_the_documented_policy_is_all_a_registration_needs(tmp_path: Path, iam_s3: IamS3) -> None:
    """With exactly the documented S3 statements: exit 0, the two lines, no warning, nothing left."""
    prefix = f"iam-{secrets.token_hex(4)}/"
    policy = documented_policy(prefix)
    granted = {a for s in policy["Statement"] for a in actions(s) if a.startswith("s3:")}
    assert granted == S3_ACTIONS
    keys = iam_s3.user(for_moto(policy))
    job = make_job(tmp_path, model_bytes=6 * MiB)  # two parts: a real multipart upload
    with reference_mims(iam_s3, keys) as registry:
        result = run(job_environment(iam_s3, keys, registry, job, prefix), "register")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith("Workflow execution arn for model registration process: arn:aws:states:")
    assert lines[1].startswith("Model id for model being registered: model-")
    assert other_warnings(result.stderr) == [], result.stderr
    assert " ERROR " not in result.stderr, result.stderr
    assert iam_s3.leftovers(prefix) == []


def other_warnings(stderr: str) -> list[str]:
    """The WARNING lines but the one that moto, which checks nothing it receives, earns (issue 17)."""
    return [line for line in stderr.splitlines() if " WARNING " in line and "checks no CRC" not in line]


def test_the_documented_policy_covers_keeping_and_resuming(tmp_path: Path, iam_s3: IamS3) -> None:
    """A run kept by its wait timeout, then resumed by a re-run (ListObjectsV2, GetObject of the run
    manifest, HeadObject of the kept artifacts): both work with the documented statements."""
    prefix = f"iam-{secrets.token_hex(4)}/"
    keys = iam_s3.user(for_moto(documented_policy(prefix)))
    job = make_job(tmp_path)
    # Held until the re-run follows it: unfinished at --wait-timeout, however slow the machine.
    with reference_mims(iam_s3, keys, read_artifacts="at_finish", processing_delay=HELD) as registry:
        env = {**job_environment(iam_s3, keys, registry, job, prefix), "MODS_WORKFLOW_EXECUTION_ID": "wf-iam"}
        kept = run(env, "register", "--wait-timeout", "0.5")
        assert kept.returncode == 6, kept.stderr
        assert sorted(k.rsplit("/", 1)[1] for k in iam_s3.leftovers(prefix)) == [
            "model.tar.gz",
            "payload.tar.gz",
            "registration.json",
        ]
        resumed = run_releasing(env, registry, "register")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming registration" in resumed.stderr, resumed.stderr
    assert "nothing to upload" in resumed.stderr, resumed.stderr
    assert len(resumed.stdout.splitlines()) == 2
    assert other_warnings(resumed.stderr) == [], resumed.stderr
    assert iam_s3.leftovers(prefix) == []


#: What a job whose role lacks one permission sees: the exit code, what stderr says, and whether
#: the run's prefix is left empty.
WITHOUT: dict[str, tuple[int, list[str], bool]] = {
    "s3:ListBucket": (4, ["(HeadBucket: 403 AccessDenied); the job's role needs s3:ListBucket"], True),
    # PutObject (payload, manifest) or CreateMultipartUpload (model): whichever is sent first.
    "s3:PutObject": (4, ["failed for s3://registrar-iam-tmp/", ": AccessDenied (Access Denied)"], True),
    "s3:GetObject": (
        4,
        ["it cannot be read back: HeadObject answered 403 AccessDenied (the job's role needs s3:GetObject on s3://"],
        True,
    ),
    # The run completed every multipart upload it opened: its ledger shows none can be open,
    # so the failed listing is no leftover (issue 17).
    "s3:ListBucketMultipartUploads": (
        0,
        ["multipart uploads could not be listed (AccessDenied); this run left none open"],
        True,
    ),
    "s3:DeleteObject": (0, ["WARNING", "S3 DeleteObject failed", "remove these by hand"], False),
}


@pytest.mark.parametrize("action", list(WITHOUT))
def test_without_one_permission_register_says_which(tmp_path: Path, iam_s3: IamS3, action: str) -> None:
    """Each documented S3 permission but s3:AbortMultipartUpload (further down) is used by every
    registration: without it, the run fails naming the denied request and leaves nothing, or,
    for the cleanup's permissions, registers and warns about what it could not remove."""
    prefix = f"iam-{secrets.token_hex(4)}/"
    keys = iam_s3.user(for_moto(without(documented_policy(prefix), action)))
    job = make_job(tmp_path)
    with reference_mims(iam_s3, keys) as registry:
        result = run(job_environment(iam_s3, keys, registry, job, prefix), "register")
    code, needles, emptied = WITHOUT[action]
    assert result.returncode == code, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
    if code == 0:
        assert len(result.stdout.splitlines()) == 2, result.stdout
    else:
        assert result.stdout == ""
        assert any(needle in error_line(result.stderr) for needle in needles), result.stderr
    left = iam_s3.leftovers(prefix)
    if emptied:
        assert left == [], left
    else:
        names = sorted(k.rsplit("/", 1)[1] for k in left)  # with the capability probe's, which it can't remove either
        assert [n for n in names if not n.startswith(".capabilities-")] == [
            "model.tar.gz",
            "payload.tar.gz",
            "registration.json",
        ]
        iam_s3.remove(prefix)


def test_a_denied_read_back_does_not_ask_for_a_rerun(tmp_path: Path, iam_s3: IamS3) -> None:
    """Without s3:GetObject, running again cannot help until the permission is added: the message
    says so, and does not call the object damaged."""
    prefix = f"iam-{secrets.token_hex(4)}/"
    keys = iam_s3.user(for_moto(without(documented_policy(prefix), "s3:GetObject")))
    job = make_job(tmp_path)
    with reference_mims(iam_s3, keys) as registry:
        result = run(job_environment(iam_s3, keys, registry, job, prefix), "register")
    assert result.returncode == 4, result.stderr
    line = error_line(result.stderr)
    assert "s3:GetObject" in line
    assert "could not be checked" in line
    assert "is not what was uploaded" not in line
    assert "deleted, run again" not in line
    assert "add that permission and run again" in line


def interrupted_upload(iam_s3: IamS3, env: dict[str, str], prefix: str) -> subprocess.CompletedProcess[str]:
    """`register`, sent SIGTERM once its model's multipart upload is open (seen by the admin)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "async_registrar", "register"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not any(key.startswith("upload:") for key in iam_s3.leftovers(prefix)):
            assert process.poll() is None, "register ended before its multipart upload was seen"
            assert time.monotonic() < deadline, "no multipart upload was opened"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize("abort", [True, False], ids=["documented", "without-s3:AbortMultipartUpload"])
def test_an_interrupted_upload_is_aborted_only_with_s3_abortmultipartupload(
    tmp_path: Path, iam_s3: IamS3, abort: bool
) -> None:
    """s3:AbortMultipartUpload is what a run stopped in the middle of an upload needs: SIGTERM
    then leaves nothing with the documented policy, and an open multipart upload, named in the
    message, without that permission."""
    prefix = f"iam-{secrets.token_hex(4)}/"
    policy = documented_policy(prefix)
    keys = iam_s3.user(for_moto(policy if abort else without(policy, "s3:AbortMultipartUpload")))
    job = make_job(tmp_path, model_bytes=64 * MiB)
    with reference_mims(iam_s3, keys) as registry:
        env = {**job_environment(iam_s3, keys, registry, job, prefix), "REGISTRAR_UPLOAD_CONCURRENCY": "1"}
        result = interrupted_upload(iam_s3, env, prefix)
    assert result.returncode == 143, result.stderr
    left = iam_s3.leftovers(prefix)
    if abort:
        assert left == [], left
        assert "error: terminated by SIGTERM; no temporary object was left behind" in result.stderr
        return
    assert [key.rsplit("/", 1)[1] for key in left] == ["model.tar.gz"], left
    assert left[0].startswith("upload:"), left
    error = error_line(result.stderr)
    assert "could not remove everything" in error, result.stderr
    assert f"s3://{BUCKET}/{left[0].removeprefix('upload:')} (open multipart upload, upload id " in error
    assert "AbortMultipartUpload failed" in result.stderr
    assert "AccessDenied" in result.stderr
    iam_s3.remove(prefix)
