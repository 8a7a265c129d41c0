"""docker-compose.yml, the Dockerfile and deploy/nginx.conf hang together (no Docker here).

Every service's command exists in the project, every file it names exists, healthchecks
and dependency conditions are in place, URLs point at services and ports that exist,
and Debian's nginx accepts the load balancer's configuration.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
OUR_IMAGE = "flashsale:latest"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = compose["services"]
    return found


def _help(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "flashsale", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _ours(services: dict[str, Any]) -> dict[str, Any]:
    return {n: s for n, s in services.items() if s.get("image") == OUR_IMAGE}


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    return {k: str(v) for k, v in env.items()}


def _port(command: list[str]) -> int:
    return int(command[command.index("--port") + 1])


def test_the_stack_has_every_part_the_issue_names(services: dict[str, Any]) -> None:
    assert {"redis", "postgres", "migrate", "api", "persister", "nginx", "locust"} <= set(services)
    assert services["api"]["deploy"]["replicas"] >= 2


def test_every_flashsale_service_runs_a_subcommand_and_options_the_cli_has(
    services: dict[str, Any],
) -> None:
    """The image's entrypoint is `flashsale`: each command is one of its subcommands."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["flashsale"]' in dockerfile
    subcommands = set(re.findall(r"^    (\S+)\s", _help(), re.M))
    for name, svc in _ours(services).items():
        if "entrypoint" in svc:
            continue  # locust, below
        command = svc["command"]
        assert command[0] in subcommands, (name, command[0], subcommands)
        options = set(re.findall(r"(--[a-z-]+)", _help(command[0])))
        used = {a for a in command[1:] if a.startswith("--")}
        assert used <= options, (name, used - options)


def test_the_locust_service_runs_the_project_locustfile_against_nginx(
    services: dict[str, Any],
) -> None:
    locust = services["locust"]
    assert locust["entrypoint"] == ["locust"]
    command = locust["command"]
    assert (ROOT / command[command.index("-f") + 1]).is_file()
    host = urlsplit(command[command.index("--host") + 1])
    assert host.hostname == "nginx" and host.port == 80
    assert "FLASHSALE_AUTH_SECRET" in _env(locust)
    classes = set(
        re.findall(r"^class (\w+)\(", (ROOT / "loadtest/locustfile.py").read_text(), re.M)
    )
    assert {a for a in command if a.endswith("User")} <= classes
    assert locust.get("profiles") == ["loadtest"], "a load test must not start with the stack"


def test_the_dockerfile_is_slim_non_root_and_copies_what_exists() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        paths = source.split()
        if not any(c in source for c in "*?["):
            for path in paths:
                assert (ROOT / path).exists(), path
        else:
            assert any(list(ROOT.glob(p)) for p in paths), source
    # Every top-level package pyproject.toml installs is copied in (else `pip install .`
    # fails in the image: no Docker here to find out).
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied = {
        p.split("/")[0] for s in re.findall(r"^COPY (.+) \S+$", text, re.M) for p in s.split()
    }
    assert {p.split(".")[0] for p in packages["packages"]} <= copied
    for ignored in ("  .venv", ".git"):
        assert ignored.strip() in (ROOT / ".dockerignore").read_text()


def test_redis_keeps_an_append_only_file_and_never_evicts(services: dict[str, Any]) -> None:
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])


def test_long_running_services_have_healthchecks(services: dict[str, Any]) -> None:
    for name in ("redis", "postgres", "api", "persister", "nginx"):
        check = services[name].get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), name
    api_check = " ".join(services["api"]["healthcheck"]["test"])
    port = _port(services["api"]["command"])
    assert f"127.0.0.1:{port}/readyz" in api_check


def test_dependencies_wait_for_health_and_for_migrations(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, (name, dep)
            assert cond["condition"] in (
                "service_healthy",
                "service_completed_successfully",
            ), (name, dep)
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], (name, dep)
    for name in ("api", "persister"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["nginx"]["depends_on"]["api"]["condition"] == "service_healthy"


def test_environment_points_at_the_services_that_exist(services: dict[str, Any]) -> None:
    pg_env = _env(services["postgres"])
    for name, svc in _ours(services).items():
        if name == "locust":
            continue
        env = _env(svc)
        redis_url = urlsplit(env["FLASHSALE_REDIS_URL"])
        assert redis_url.hostname == "redis" and redis_url.port == 6379, name
        db = urlsplit(env["FLASHSALE_DATABASE_URL"])
        assert db.hostname == "postgres" and db.port == 5432, name
        assert db.username == pg_env["POSTGRES_USER"] and db.password == pg_env["POSTGRES_PASSWORD"]
        assert db.path == "/" + pg_env["POSTGRES_DB"]
        assert "FLASHSALE_AUTH_SECRET" in env, name
    # Every replica signs with the same keys: one shared volume.
    assert any(v.endswith(":/keys") for v in services["api"]["volumes"])


def test_nginx_proxies_to_the_api_port_and_is_published(services: dict[str, Any]) -> None:
    nginx = services["nginx"]
    mounts = [v.split(":") for v in nginx["volumes"]]
    conf_mount = next(m for m in mounts if m[1] == "/etc/nginx/nginx.conf")
    conf = (ROOT / conf_mount[0]).read_text()
    api_port = _port(services["api"]["command"])
    assert re.search(rf"server api:{api_port}\b", conf)
    listen = int(re.search(r"listen (\d+)", conf).group(1))  # type: ignore[union-attr]
    assert any(p.endswith(f":{listen}") for p in nginx["ports"])
    check = " ".join(nginx["healthcheck"]["test"])
    assert f"127.0.0.1:{listen}" in check


def test_nginx_accepts_the_load_balancer_config(tmp_path: Path) -> None:
    """`nginx -t` on deploy/nginx.conf, with the compose hostname made resolvable."""
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if Path(p).exists()), None
    )
    if nginx is None:
        pytest.skip("needs nginx: apt-get install nginx-light (.ci/run installs it)")
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    # `api` is a compose service name; outside compose it would not resolve.
    conf = conf.replace("server api:", "server 127.0.0.1:")
    conf = conf.replace("/tmp/", f"{tmp_path}/")
    path = tmp_path / "nginx.conf"
    path.write_text(conf)
    done = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-e", "stderr", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


def test_the_api_limits_per_address_and_trusts_only_the_load_balancer(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    """FLASHSALE_RATE_ADDRESS is on; FLASHSALE_TRUSTED_PROXIES is nginx's fixed address."""
    import ipaddress

    env = _env(services["api"])
    assert int(env["FLASHSALE_RATE_ADDRESS"]) > 0
    nginx_address = services["nginx"]["networks"]["default"]["ipv4_address"]
    assert env["FLASHSALE_TRUSTED_PROXIES"].split(",") == [nginx_address]
    subnet = compose["networks"]["default"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(nginx_address) in ipaddress.ip_network(subnet)
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in conf


def test_nginx_answers_its_own_errors_in_the_api_s_json_shape() -> None:
    """Each status nginx may answer itself has an error_page returning the JSON error body."""
    import json

    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    pages = dict(re.findall(r"error_page (\d+) (?:=\d+ )?(\S+);", conf))
    for status in ("400", "413", "414", "429", "494", "502", "503", "504"):
        assert status in pages, status
        answer = re.search(
            rf"location = {re.escape(pages[status])} \{{[^']*?return (\d+) '(.*)';", conf
        )
        assert answer, pages[status]
        assert answer.group(1) == ("431" if status == "494" else status)
        body = json.loads(answer.group(2).replace("\\n", ""))
        assert set(body["error"]) == {"code", "message", "details"}
    assert "default_type application/json;" in conf
    assert "proxy_intercept_errors on" not in conf  # the API's own errors pass through
