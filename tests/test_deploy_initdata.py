"""The Kubernetes example binds the runner's VM to its initdata, and the policies pin that digest.

``deploy/kubernetes/initdata.toml`` is what Kata hands the VM; the pod annotation in
``runner-job.yaml`` must decode to it byte for byte (the launch value is its SHA-384), and the
policy in ``docs/deploy-kubernetes.md`` must name that digest and be a valid policy.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import re
import tomllib
from pathlib import Path

from shieldml.policy import Policy, initdata_digest, initdata_field

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "kubernetes"
ANNOTATION = "io.katacontainers.config.hypervisor.cc_init_data"


def _annotation() -> bytes:
    text = (DEPLOY / "runner-job.yaml").read_text()
    [value] = re.findall(rf'^\s+{re.escape(ANNOTATION)}: "([A-Za-z0-9+/=]+)"$', text, re.M)
    return gzip.decompress(base64.b64decode(value))


def test_pod_annotation_is_the_initdata_document():
    doc = (DEPLOY / "initdata.toml").read_bytes()
    assert _annotation() == doc
    parsed = tomllib.loads(doc.decode())
    assert parsed["algorithm"] == "sha384" and parsed["version"] == "0.1.0"
    rego = parsed["data"]["policy.rego"]
    for denied in ("ExecProcessRequest", "CopyFileRequest", "SetPolicyRequest"):
        assert f"default {denied} := false" in rego


def test_docs_policy_pins_the_example_initdata_and_is_valid():
    doc = (DEPLOY / "initdata.toml").read_bytes()
    digest = initdata_digest(doc)
    assert digest == "sha384:" + hashlib.sha384(doc).hexdigest()
    page = (REPO / "docs" / "deploy-kubernetes.md").read_text()
    [block] = re.findall(r"```toml\n(.*?)```", page, re.S)
    assert block.count(f'initdata_digest = "{digest}"') == 2
    concrete = re.sub(r'"<sha256:[^"]*>"', '"sha256:' + "ab" * 32 + '"', block)
    concrete = re.sub(r'"<[^"]*>"', '"' + "00" * 48 + '"', concrete)
    policy = Policy.from_toml(concrete)
    tdx, snp = policy.profiles
    assert tdx.refs["initdata_digest"] == (hashlib.sha384(doc).digest(),)
    assert snp.refs["initdata_digest"] == (initdata_field(digest, 32),)
    assert snp.refs["initdata_digest"] == (hashlib.sha384(doc).digest()[:32],)
