"""The container without Docker: what the Dockerfile says, and its CMD run with a read-only root.

The read-only run uses bubblewrap (`make test` installs it where it can): a root filesystem of the
host's folders bound read-only, WORKDIR holding only the files the Dockerfile copies there, a
fresh /dev (with /dev/shm) and /proc, a tmpfs on /tmp (and once a read-only /tmp, to show that
gunicorn needs none), a writable folder at the Dockerfile's VOLUME, the Dockerfile's USER, ENV
and HOME, and its exact CMD. What stands in for the image: this venv instead of /opt/venv, this
machine's Python and Debian instead of the base image's. Without user namespaces it skips.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import select
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from tests.conftest import Billing
from tests.fake_stripe import FakeStripe
from tests.harness import (
    PROJECT,
    clock_env,
    dockerfile_cmd,
    free_port,
    healthy,
    post,
    report,
    sign,
    wait_until,
)
from tests.test_operations import NEW_SUBJECT, swap_configmap

REQUIREMENTS = ("requirements.txt", "requirements-dev.txt")
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")
# A package manager installing anything, or a compiler and headers.
BUILD_TOOLS = re.compile(
    r"\b(apt-get|apt|apk|dnf|yum|pip3?|uv)\b[^&;|]*\binstall\b"
    r"|\b(gcc|g\+\+|clang|build-essential|python3?-dev)\b"
)


@dataclass
class Stage:
    """One FROM ... of the Dockerfile: its base image, its name, its instructions in order."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        """The arguments of each instruction with this keyword."""
        return [rest for key, rest in self.instructions if key == keyword]

    def env(self) -> dict[str, str]:
        """Every ENV the stage sets (values as written: $VARIABLES are not expanded)."""
        values: dict[str, str] = {}
        for rest in self.args("ENV"):
            for word in shlex.split(rest):
                name, _, value = word.partition("=")
                values[name] = value
        return values


def dockerfile_stages() -> list[Stage]:
    """The Dockerfile's stages, with continuation lines joined and comments dropped."""
    instructions: list[str] = []
    pending = ""
    for raw in (PROJECT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        instructions.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for instruction in instructions:
        keyword, _, rest = instruction.partition(" ")
        if keyword.upper() == "FROM":
            words = rest.split()
            named = len(words) == 3 and words[1].upper() == "AS"
            stages.append(Stage(words[0], words[2] if named else None))
        else:
            stages[-1].instructions.append((keyword.upper(), rest.strip()))
    return stages


def logical_lines(path: Path) -> list[str]:
    """A requirements file's lines, continuations joined, comments and blanks dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


# --- what the files say ----------------------------------------------------------------------


def test_every_dependency_is_pinned_by_hash() -> None:
    for name in REQUIREMENTS:
        for line in logical_lines(PROJECT / name):
            if line.startswith("-r "):
                assert line.split()[1] in REQUIREMENTS, line
                continue
            requirement = line.split()[0]
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[^=\s]+", requirement), f"{name}: {line[:60]}"
            assert HASH.search(line), f"{name}: {requirement} has no sha256 (run `make hashes`)"
            assert not re.search(r"--hash=(?!sha256:[0-9a-f]{64}\b)", line), requirement
    assert "-r requirements.txt" in logical_lines(PROJECT / "requirements-dev.txt")


def test_every_install_checks_hashes() -> None:
    makefile = (PROJECT / "Makefile").read_text().splitlines()
    installs = [line for line in makefile if "pip install" in line]
    assert len(installs) >= 2
    for line in installs:
        assert "--require-hashes" in line and " -r requirements" in line, line
    runs = [run for stage in dockerfile_stages() for run in stage.args("RUN")]
    docker_installs = [run for run in runs if "pip install" in run]
    assert docker_installs, "the Dockerfile installs the requirements somewhere"
    for run in docker_installs:
        assert "--require-hashes" in run and "-r /build/requirements.txt" in run, run
        # Wheels only: an sdist's build dependencies would escape the hash check.
        assert "--only-binary=:all:" in run, run


def test_the_image_keeps_no_build_tools() -> None:
    *builders, final = dockerfile_stages()
    assert builders, "a build stage installs the dependencies; the image only copies them"
    for run in final.args("RUN"):
        assert not BUILD_TOOLS.search(run), f"the final stage installs or builds: {run}"
    assert any("pip uninstall --yes pip setuptools wheel" in run for run in final.args("RUN"))
    # The venv is the only thing taken from the build stage, and it leaves without pip.
    copies = [rest for rest in final.args("COPY") if rest.startswith("--from=")]
    assert copies == [f"--from={builders[-1].name} /opt/venv /opt/venv"]
    build_runs = builders[-1].args("RUN")
    assert any("/opt/venv/bin/pip uninstall --yes pip setuptools" in run for run in build_runs)
    assert final.env()["PATH"].startswith("/opt/venv/bin:")
    # The venv's python links to the base image's: both stages must use the same one.
    assert {stage.base for stage in builders} == {final.base}
    assert "@" in final.base or re.search(r":\d+\.\d+\.\d+-", final.base), "an exact Python"


def test_the_image_holds_every_module_of_the_service() -> None:
    # What gunicorn imports from the project: app.py, gunicorn.conf.py and the bridge package,
    # every module of it (a package copied in part would fail at the first import of the rest).
    copied = {
        source.rstrip("/")
        for rest in dockerfile_stages()[-1].args("COPY")
        if not rest.startswith("--from=")
        for source in rest.split()[:-1]
    }
    imported = {
        name.split(".")[0]
        for path in ["app.py", *map(str, (PROJECT / "bridge").glob("*.py"))]
        for name in re.findall(r"^(?:from|import) (\w+)", (PROJECT / path).read_text(), re.M)
        if (PROJECT / name).is_dir() or (PROJECT / f"{name}.py").is_file()
    }
    assert imported == {"bridge"}
    assert {"app.py", "gunicorn.conf.py", "bridge"} <= copied


def test_the_image_holds_no_config_and_reads_it_from_a_mounted_folder() -> None:
    # The example config.yaml maps example IDs: an image holding it would look ready and answer
    # every real report 422. The config comes from a folder mounted at CONFIG_PATH's folder.
    final = dockerfile_stages()[-1]
    copied = [source for rest in final.args("COPY") for source in rest.split()[:-1]]
    assert not [source for source in copied if source.endswith((".yaml", ".yml"))], copied
    config = PurePosixPath(final.env()["CONFIG_PATH"])
    workdir = PurePosixPath(final.args("WORKDIR")[-1])
    assert config.name == "config.yaml" and config.parent != workdir
    assert not config.parent.is_relative_to(workdir) and str(config.parent) != "/"


def test_the_base_image_is_pinned_by_digest_and_tag() -> None:
    for stage in dockerfile_stages():
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+@sha256:[0-9a-f]{64}", stage.base)
    text = (PROJECT / "Dockerfile").read_text()
    assert "docker buildx imagetools inspect" in text  # how to update it


def test_the_build_context_is_only_what_the_image_copies() -> None:
    # .dockerignore's rules, read as Docker reads them (last match wins; ! re-includes).
    rules = [
        line.strip()
        for line in (PROJECT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*"

    def sent(path: str) -> bool:
        included = True
        for rule in rules:
            pattern = rule.removeprefix("!")
            matches = fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern + "*")
            if pattern.startswith("bridge/**/"):
                matches = fnmatch.fnmatch(path, "bridge/" + pattern.removeprefix("bridge/**/"))
            if matches:
                included = rule.startswith("!")
        return included

    copied = {
        source.rstrip("/")
        for stage in dockerfile_stages()
        for rest in stage.args("COPY")
        if not rest.startswith("--from=")
        for source in rest.split()[:-1]
    }
    for source in copied:
        assert sent(source) or sent(source + "/"), source
    assert sent("bridge/service.py")
    for kept_out in [
        "state/bridge.sqlite3", "tests/harness.py", "bench/run.py", "config.yaml", ".git",
        ".venv/bin/python", "docs/nginx.conf", "tools/send.py", ".env", "bridge/__pycache__/x.pyc",
    ]:  # fmt: skip
        assert not sent(kept_out), kept_out


def test_the_image_runs_as_non_root_with_its_state_on_a_volume() -> None:
    final = dockerfile_stages()[-1]
    users = final.args("USER")
    assert users and users[-1] == "10001:10001"
    keywords = [key for key, _ in final.instructions]
    assert max(i for i, key in enumerate(keywords) if key == "USER") < keywords.index("CMD")
    assert json.loads(final.args("CMD")[0]) == dockerfile_cmd()
    volumes = [path for rest in final.args("VOLUME") for path in json.loads(rest)]
    assert volumes == ["/var/lib/bridge"]
    state_path = PurePosixPath(final.env()["STATE_PATH"])
    assert str(state_path.parent) == volumes[0]
    # A named volume starts as a copy of the image's folder: owned by the service's user.
    created = [run for run in final.args("RUN") if volumes[0] in run]
    assert len(created) == 1
    assert re.search(rf"install --directory --owner=10001 --group=10001 .*{volumes[0]}", created[0])
    assert final.env()["PYTHONDONTWRITEBYTECODE"] == "1"


# --- the CMD with a read-only root -----------------------------------------------------------


def sandbox_problem() -> str | None:
    """Why bubblewrap cannot run the service here, or None."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap is not installed (make test installs it where it may: root, apt-get)"
    probe = subprocess.run(
        [bwrap, "--unshare-user", "--uid", "10001", "--ro-bind", "/", "/", "true"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        return f"bubblewrap cannot make a user namespace here: {probe.stderr.decode().strip()}"
    return None


def sandbox(
    final: Stage,
    volume_on_host: Path,
    config: Path | None,
    extra_ro: list[Path],
    info_fd: int,
    writable_tmp: bool,
) -> list[str]:
    """bwrap's arguments: the container's filesystem as the Dockerfile and `docker run --read-only
    --tmpfs /tmp -v bridge-state:/var/lib/bridge -v CONFIG:/config:ro` would make it (without
    --tmpfs /tmp unless writable_tmp), then the CMD. config: a host folder bound read-only at
    CONFIG_PATH's folder (as documented), or a single file bound at CONFIG_PATH (as the docs
    warn against), or None (no config mounted)."""
    uid, _, gid = final.args("USER")[-1].partition(":")
    workdir = PurePosixPath(final.args("WORKDIR")[-1])
    (volume,) = [PurePosixPath(path) for rest in final.args("VOLUME") for path in json.loads(rest)]
    bwrap = shutil.which("bwrap")
    assert bwrap
    args = [bwrap, "--unshare-user", "--uid", uid, "--gid", gid or uid, "--die-with-parent"]
    args += ["--info-fd", str(info_fd)]
    # The root: a tmpfs holding the host's top-level folders read-only, made read-only at the end.
    for entry in sorted(Path("/").iterdir()):
        if entry.name in {"proc", "dev", "tmp", workdir.parts[1]}:
            continue
        if entry.is_symlink():
            args += ["--symlink", os.readlink(entry), str(entry)]
        elif entry.is_dir():
            args += ["--ro-bind", str(entry), str(entry)]
    args += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    # The volume: a writable folder; what is beside it (a tmpfs here) stays read-only.
    args += ["--tmpfs", str(volume.parent), "--bind", str(volume_on_host), str(volume)]
    args += ["--remount-ro", str(volume.parent)]
    # WORKDIR holds exactly what the final stage copies into it.
    args += ["--dir", str(workdir)]
    for rest in final.args("COPY"):
        *sources, destination = rest.split()
        if sources[0].startswith("--from="):
            continue
        # Files go into WORKDIR; a folder (COPY bridge/ ./bridge/) into a folder of its name.
        folder = destination.removeprefix(f"{workdir}/").removeprefix("./").rstrip("/")
        assert folder == "" or sources == [f"{folder}/"], rest
        for source in sources:
            args += ["--ro-bind", str(PROJECT / source), str(workdir / source.rstrip("/"))]
    config_path = PurePosixPath(final.env()["CONFIG_PATH"])
    if config is not None:
        args += [
            "--ro-bind",
            str(config),
            str(config_path if config.is_file() else config_path.parent),
        ]
    for path in extra_ro:  # this venv if it lives under /tmp
        args += ["--ro-bind", str(path), str(path)]
    if not writable_tmp:
        args += ["--remount-ro", "/tmp"]
    args += ["--remount-ro", "/", "--chdir", str(workdir), "--", *dockerfile_cmd()]
    return args


def user_home(final: Stage) -> str:
    """HOME as Docker sets it: the home folder of USER's entry in the image's /etc/passwd (the
    stripe library keeps a telemetry id under it, and fails without one)."""
    uid = final.args("USER")[-1].partition(":")[0]
    for run in final.args("RUN"):
        for command in run.split("&&"):
            words = shlex.split(command)
            if words[:1] == ["useradd"] and words[words.index("--uid") + 1] == uid:
                return words[words.index("--home-dir") + 1] if "--home-dir" in words else "/"
    return "/"


def read_info(fd: int, timeout: float = 20.0) -> dict[str, Any]:
    """bwrap's --info-fd JSON (the sandboxed process's pid, as this machine sees it)."""
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 4096)
            data += chunk
            try:
                info: dict[str, Any] = json.loads(data)
                return info
            except ValueError:
                if not chunk:
                    break
    raise AssertionError(f"no info from bwrap: {data!r}")


def get(url: str) -> tuple[int, bytes]:
    """A GET over a real socket."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read()


@dataclass
class Container:
    """The Dockerfile's CMD running in the sandbox."""

    base: str
    process: subprocess.Popen[bytes]
    master: int
    log_path: Path

    def lines(self) -> list[dict[str, Any]]:
        """Its JSON log lines so far."""
        text = self.log_path.read_text()
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@contextmanager
def container(
    environment: dict[str, str],
    config: Path | None,
    tmp_path: Path,
    writable_tmp: bool = True,
    started: bool = True,
) -> Iterator[Container]:
    """Runs the image's CMD in the sandbox with config mounted (see sandbox); waits until it
    serves (or, if not started, until it exits); stops it afterwards."""
    problem = sandbox_problem()
    if problem:
        pytest.skip(problem)
    final = dockerfile_stages()[-1]
    volume_on_host = tmp_path / "bridge-state"
    volume_on_host.mkdir(exist_ok=True)
    venv = Path(sys.prefix)
    extra = [venv] if venv.is_relative_to("/tmp") else []
    port = free_port()
    image_env = {k: v for k, v in final.env().items() if k not in {"PATH", "PORT"}}
    env = (
        {k: v for k, v in environment.items() if k != "CONFIG_PATH"}  # the image's own
        | image_env
        | {
            "PORT": str(port),
            "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "WEB_CONCURRENCY": "2",
            "HOME": user_home(final),
        }
        | clock_env()
    )
    assert env["STATE_PATH"] == "/var/lib/bridge/bridge.sqlite3"
    log_path = tmp_path / f"container-{port}.log"
    info_read, info_write = os.pipe()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            sandbox(final, volume_on_host, config, extra, info_write, writable_tmp),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(info_write,),
        )
    os.close(info_write)
    base = f"http://127.0.0.1:{port}"
    try:
        master = int(read_info(info_read)["child-pid"])
        if started:
            wait_until(lambda: healthy(base) or process.poll() is not None, timeout=30)
            assert process.poll() is None, log_path.read_text()
        else:
            process.wait(timeout=30)
        yield Container(base, process, master, log_path)
    finally:
        os.close(info_read)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@pytest.mark.parametrize("writable_tmp", [True, False], ids=["tmpfs-tmp", "read-only-tmp"])
def test_serves_with_a_read_only_root_and_its_state_on_the_volume(
    writable_tmp: bool,
    environment: dict[str, str],
    stripe_fake: FakeStripe,
    billing: Billing,
    config_path: Path,
    tmp_path: Path,
) -> None:
    with container(environment, config_path.parent, tmp_path, writable_tmp) as running:
        base = running.base
        status, answer = get(f"{base}/readyz")
        assert status == 200 and json.loads(answer)["status"] == "ready"
        assert json.loads(answer)["config"]["path"] == "/config/config.yaml"

        body = json.dumps(report([10, 20, 30]))
        status, result = post(f"{base}/webhook", body, sign(body, "msg_readonly"))
        assert status == 200, result
        assert stripe_fake.usage_total(billing.api) == 60
        # The redelivery is answered from the ledger on the volume, without calling Stripe.
        status, result = post(f"{base}/webhook", body, sign(body, "msg_readonly"))
        assert status == 200 and result["outcome"] == "already_written"
        assert len(stripe_fake.writes()) == 3
        # The workers' shared metrics files (under /dev/shm) work.
        status, metrics = get(f"{base}/metrics")
        assert status == 200
        for outcome in ("written", "already_written"):
            sample = f'bridge_webhooks_total{{outcome="{outcome}",status="200"}} 1.0'
            assert sample in metrics.decode(), metrics

        os.kill(running.master, signal.SIGTERM)
        assert running.process.wait(timeout=30) == 0, running.log_path.read_text()
        lines = running.lines()

    assert [line for line in lines if line["level"] not in {"info", "debug"}] == []
    volume_on_host = tmp_path / "bridge-state"
    assert (volume_on_host / "bridge.sqlite3").is_file()
    with sqlite3.connect(volume_on_host / "bridge.sqlite3") as ledger:
        messages = ledger.execute("SELECT id, done FROM messages").fetchall()
        writes = ledger.execute("SELECT COUNT(*) FROM writes").fetchone()[0]
    assert messages == [("msg_readonly", 1)] and writes == 3


def test_without_a_mounted_config_it_refuses_to_start_naming_config_path(
    environment: dict[str, str], billing: Billing, tmp_path: Path
) -> None:
    with container(environment, None, tmp_path, started=False) as running:
        assert running.process.returncode != 0
        text = running.log_path.read_text()
    assert "CONFIG_PATH: /config/config.yaml: cannot read" in text, text
    assert "mount the folder that holds it" in text
    assert "Booting worker" not in text


def new_subject_answers(base: str) -> int:
    """The status a report for the subject `newcomer` gets (422 until the config maps it)."""
    body = json.dumps(report([1], subject="newcomer"))
    return post(f"{base}/webhook", body, sign(body, "msg_newcomer"))[0]


def test_a_mounted_folder_sees_an_editors_rename(
    environment: dict[str, str], billing: Billing, config_path: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "bridge-config"
    folder.mkdir()
    (folder / "config.yaml").write_text(config_path.read_text())
    with container(environment, folder, tmp_path) as running:
        assert new_subject_answers(running.base) == 422
        fresh = folder / ".config.yaml.swp"  # an editor's save: a new file renamed over the old
        fresh.write_text(NEW_SUBJECT)
        fresh.replace(folder / "config.yaml")
        wait_until(lambda: new_subject_answers(running.base) == 200, timeout=10)


def test_a_mounted_configmap_folder_sees_the_kubelets_symlink_swap(
    environment: dict[str, str], billing: Billing, config_path: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "configmap"
    folder.mkdir()
    swap_configmap(folder, config_path.read_text(), 1)
    (folder / "config.yaml").symlink_to("..data/config.yaml")
    with container(environment, folder, tmp_path) as running:
        assert new_subject_answers(running.base) == 422
        swap_configmap(folder, NEW_SUBJECT, 2)
        wait_until(lambda: new_subject_answers(running.base) == 200, timeout=10)


def test_a_single_file_mount_never_sees_a_rename(
    environment: dict[str, str], billing: Billing, config_path: Path, tmp_path: Path
) -> None:
    # Why the docs say "a folder, never the file": a bind mount of one file holds that file (its
    # inode); a rename on the host puts a new file in the host's folder, which the container never
    # sees. (Kubernetes' subPath mounts are the same.)
    with container(environment, config_path, tmp_path) as running:
        assert new_subject_answers(running.base) == 422
        fresh = config_path.with_suffix(".new")
        fresh.write_text(NEW_SUBJECT)
        fresh.replace(config_path)
        checked_until = time.monotonic() + 4  # well past a reload (within 5 s, about 2 s)
        while time.monotonic() < checked_until:
            assert new_subject_answers(running.base) == 422
            time.sleep(0.5)
        assert not [line for line in running.lines() if line["message"] == "config reloaded"]
