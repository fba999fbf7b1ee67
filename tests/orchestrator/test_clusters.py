"""The cluster recipes of `clusters/`: every file parses, carries the keys its tool requires, and the scripts
do what their READMEs say. The SLURM script and the RayJob entrypoint run here against stand-ins of srun,
scontrol, ray and opsd that record how they were called; the launcher file is checked with Ray's own schema."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
SBATCH = CLUSTERS / "slurm" / "sweep.sbatch"
RUN_SH = CLUSTERS / "local" / "run.sh"
RAYJOB = CLUSTERS / "kuberay" / "rayjob.yaml"
STORAGE = CLUSTERS / "kuberay" / "storage.yaml"
DOCKERFILE = CLUSTERS / "kuberay" / "Dockerfile"
LAUNCHER = CLUSTERS / "launcher" / "b200.yaml"
SWEEP_COMMANDS = {"run", "resume", "status", "collect", "plan"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def scripts() -> list[Path]:
    return sorted(p for p in CLUSTERS.rglob("*") if p.suffix in (".sh", ".sbatch"))


# ----------------------------------------------------------------------------------------- every file


def test_the_four_recipes_and_their_readmes_exist():
    for rel in ("README.md", "local/README.md", "local/run.sh", "slurm/README.md", "slurm/sweep.sbatch",
                "kuberay/README.md", "kuberay/rayjob.yaml", "launcher/README.md", "launcher/b200.yaml"):
        assert (CLUSTERS / rel).is_file(), rel


def test_every_yaml_file_parses():
    files = sorted(CLUSTERS.rglob("*.yaml")) + sorted(CLUSTERS.rglob("*.yml"))
    assert len(files) >= 3
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), path


def test_every_script_passes_bash_n_and_is_executable():
    found = scripts()
    assert {p.name for p in found} >= {"run.sh", "sweep.sbatch"}
    for path in found:
        res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert res.returncode == 0, f"{path}: {res.stderr}"
        assert path.read_text().startswith("#!"), path
        assert path.stat().st_mode & stat.S_IXUSR, f"{path} is not executable"


def test_readmes_name_only_real_sweep_commands_and_all_of_them():
    readmes = sorted(CLUSTERS.rglob("README.md"))
    assert len(readmes) == 5
    for path in readmes:
        used = set(re.findall(r"opsd sweep ([a-z_-]+)", path.read_text()))
        assert used <= SWEEP_COMMANDS, f"{path}: unknown sub-commands {used - SWEEP_COMMANDS}"
        assert used == SWEEP_COMMANDS, f"{path}: never mentions {SWEEP_COMMANDS - used}"


def test_no_secret_is_written_into_a_file():
    literal = re.compile(r"(WANDB_API_KEY|HF_TOKEN|RAY_AUTH_TOKEN)\s*[=:]\s*['\"]?[A-Za-z0-9_]{16,}")
    for path in CLUSTERS.rglob("*"):
        if path.is_file():
            assert not literal.search(path.read_text()), path


# ----------------------------------------------------------------------------------------- SLURM


def sbatch_directives() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in SBATCH.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([a-z-]+)(?:=(\S+))?", line)
        if m:
            found[m.group(1)] = m.group(2) or ""
    return found


def test_sbatch_directives():
    d = sbatch_directives()
    assert int(d["nodes"]) >= 2
    assert d["gres"] == "gpu:8"
    assert d["ntasks-per-node"] == "1"
    assert {"exclusive", "requeue"} <= d.keys()
    assert re.fullmatch(r"B:USR1@\d+", d["signal"]), d["signal"]  # to the batch shell only, not the Ray steps
    assert d["open-mode"] == "append"                             # a requeued run appends to the same log


def test_sbatch_directives_come_before_any_command():
    # sbatch stops reading #SBATCH lines at the first line that is not a comment.
    lines = SBATCH.read_text().splitlines()
    last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert all(not line.strip() or line.lstrip().startswith("#") for line in lines[: last + 1])


def test_sbatch_text_has_the_pieces_the_readme_promises():
    text = SBATCH.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert re.search(r"ray start --head\b.*--block", code)
    assert re.search(r"ray start --address=.*--block", code)
    assert "srun --overlap" in code
    assert "opsd sweep run" in code and "opsd sweep resume" in code
    assert "SLURM_RESTART_COUNT" in code
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in code
    assert 'nodes_array=("$nodes")' not in code
    assert "RAY_AUTH_MODE=token" in code and "RAY_AUTH_TOKEN_PATH" in code


FAKE_SRUN = r"""#!/bin/bash
# Records srun's options, then runs the command here (srun would run it on the node of -w).
opts=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -w) opts+=("-w=$2"); shift 2 ;;
        -*) opts+=("$1"); shift ;;
        *) break ;;
    esac
done
echo "srun ${opts[*]} :: $*" >>"$FAKE_LOG"
exec "$@"
"""

FAKE_SCONTROL = r"""#!/bin/bash
if [[ $1 == show && $2 == hostnames ]]; then printf '%s\n' $FAKE_NODES; exit 0; fi
echo "scontrol $*" >>"$FAKE_LOG"
"""

FAKE_RAY = r"""#!/bin/bash
if [[ $1 == status ]]; then
    echo "======== Autoscaler status ========"
    echo "Active:"
    for n in $FAKE_NODES; do echo " 1 node_$n"; done
    echo "Pending:"
    echo " (no pending nodes)"
    exit 0
fi
echo "ray $* | mode=${RAY_AUTH_MODE:-} path=${RAY_AUTH_TOKEN_PATH:-}" >>"$FAKE_LOG"
"""

FAKE_OPSD = r"""#!/bin/bash
tok=${RAY_AUTH_TOKEN_PATH:-}
echo "opsd $* | address=${RAY_ADDRESS:-} mode=${RAY_AUTH_MODE:-} path=$tok" \
     "file=$(stat -c %a "$tok" 2>/dev/null) dir=$(stat -c %a "$(dirname "$tok")" 2>/dev/null)" \
     "chars=$(wc -c <"$tok" 2>/dev/null) stray=${RAY_AUTH_TOKEN:-none}" >>"$FAKE_LOG"
if [[ -n ${FAKE_OPSD_WAIT_USR1:-} ]]; then
    trap 'echo "opsd got USR1" >>"$FAKE_LOG"; exit 0' USR1
    touch "$FAKE_LOG.ready"
    while :; do sleep 0.1; done
fi
exit "${FAKE_OPSD_RC:-0}"
"""

FAKE_HOSTNAME = """#!/bin/bash
# As on Debian, whose /etc/hosts maps the host name to 127.0.1.1: resolving the name gives that address, the
# interfaces give the one the other nodes reach.
case $1 in
    --ip-address|-i) echo "127.0.1.1" ;;
    --all-ip-addresses|-I) echo "127.0.1.1 fe80::1 10.1.2.3 " ;;
    *) echo "b200-01" ;;
esac
"""


@pytest.fixture
def slurm(tmp_path):
    """A submit directory with a sweep file, stand-ins on PATH, and the environment of a 3-node job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("ray", FAKE_RAY),
                       ("opsd", FAKE_OPSD), ("hostname", FAKE_HOSTNAME)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    submit = tmp_path / "repo"
    (submit / "sweeps").mkdir(parents=True)
    (submit / "sweeps" / "fig1.yaml").write_text("name: fig1\nstorage: shared/sweeps\nseeds: [0]\n")
    log = tmp_path / "calls.log"
    env = {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(tmp_path), "LANG": "C.UTF-8",
        "OPSD_VENV": str(tmp_path / "no-venv"),
        "FAKE_LOG": str(log), "FAKE_NODES": "b200-01 b200-02 b200-03",
        "SLURM_SUBMIT_DIR": str(submit), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "b200-[01-03]",
        "SLURM_JOB_NUM_NODES": "3", "SLURM_CPUS_ON_NODE": "224",
        "RAY_AUTH_TOKEN": "a-stray-token-that-must-not-win",
    }

    class Job:
        def __init__(self):
            self.env, self.submit, self.log = env, submit, log
            self.storage = submit / "shared" / "sweeps"

        def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess:
            return subprocess.run(["bash", str(SBATCH), *args], cwd=submit, env={**env, **extra},
                                  capture_output=True, text=True, timeout=120)

        def calls(self) -> list[str]:
            return log.read_text().splitlines() if log.exists() else []

    return Job()


def test_sbatch_first_run_starts_head_workers_and_the_driver(slurm):
    res = slurm.run("sweeps/fig1.yaml")
    assert res.returncode == 0, res.stderr
    calls = slurm.calls()
    token = slurm.storage / ".ray-auth" / "ray-4242.token"

    head = [c for c in calls if c.startswith("srun") and "ray start --head" in c]
    assert len(head) == 1
    assert "-w=b200-01" in head[0] and "--gres=gpu:8" in head[0] and "--cpus-per-task=224" in head[0]
    assert ("ray start --head --node-ip-address=10.1.2.3 --port=6379 --num-cpus=224 --num-gpus=8 --block"
            in head[0])
    workers = sorted(c for c in calls if c.startswith("srun") and "--address=10.1.2.3:6379" in c)
    assert [re.search(r"-w=(\S+)", c).group(1) for c in workers] == ["b200-02", "b200-03"]
    assert all(c.endswith("--block") and "--gres=gpu:8" in c for c in workers)
    starts = [c for c in calls if c.startswith("ray start")]
    assert len(starts) == 3
    assert all(f"mode=token path={token}" in c for c in starts)

    driver = [c for c in calls if c.startswith("srun") and "opsd sweep" in c]
    assert len(driver) == 1
    assert "--overlap" in driver[0] and "-w=b200-01" in driver[0]
    assert driver[0].endswith(f":: opsd sweep run sweeps/fig1.yaml --storage {slurm.storage}")
    opsd = [c for c in calls if c.startswith("opsd ")]
    assert len(opsd) == 1
    assert f"address=10.1.2.3:6379 mode=token path={token} file=600 dir=700 chars=64 stray=none" in opsd[0]
    assert not token.exists()                  # removed when the job ends
    assert not any(c.startswith("scontrol requeue") for c in calls)


def test_sbatch_exit_code_is_the_drivers(slurm):
    assert slurm.run("sweeps/fig1.yaml", FAKE_OPSD_RC="3").returncode == 3


def test_sbatch_requeued_job_resumes_the_sweep_folder(slurm):
    (slurm.storage / "fig1").mkdir(parents=True)
    res = slurm.run("sweeps/fig1.yaml", SLURM_RESTART_COUNT="1")
    assert res.returncode == 0, res.stderr
    opsd = [c for c in slurm.calls() if c.startswith("opsd ")]
    assert len(opsd) == 1 and opsd[0].startswith(f"opsd sweep resume {slurm.storage / 'fig1'} |")


def test_sbatch_requeued_before_the_sweep_folder_existed_runs_it(slurm):
    res = slurm.run("sweeps/fig1.yaml", SLURM_RESTART_COUNT="2")
    assert res.returncode == 0, res.stderr
    assert any(c.startswith("opsd sweep run sweeps/fig1.yaml") for c in slurm.calls())


def test_sbatch_opsd_storage_overrides_the_sweep_files(slurm, tmp_path):
    res = slurm.run("sweeps/fig1.yaml", OPSD_STORAGE=str(tmp_path / "lustre"))
    assert res.returncode == 0, res.stderr
    assert any(c.startswith(f"opsd sweep run sweeps/fig1.yaml --storage {tmp_path / 'lustre'} ")
               for c in slurm.calls())


def test_sbatch_usr1_stops_the_driver_and_requeues(slurm):
    proc = subprocess.Popen(["bash", str(SBATCH), "sweeps/fig1.yaml"], cwd=slurm.submit,
                            env={**slurm.env, "FAKE_OPSD_WAIT_USR1": "1"}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = Path(str(slurm.log) + ".ready")
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert ready.exists(), "the driver never started"
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:          # the script or the stand-in driver hangs: end the whole group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err
    calls = slurm.calls()
    assert "opsd got USR1" in calls
    assert "scontrol requeue 4242" in calls
    assert calls.index("opsd got USR1") < calls.index("scontrol requeue 4242")


def test_sbatch_refuses_a_node_list_that_does_not_match(slurm):
    res = slurm.run("sweeps/fig1.yaml", FAKE_NODES="b200-01 b200-02")
    assert res.returncode == 2
    assert "2 nodes" in res.stderr
    assert not any("ray start" in c for c in slurm.calls())


def test_sbatch_needs_storage_on_a_shared_folder(slurm):
    (slurm.submit / "sweeps" / "nostore.yaml").write_text("name: x\n")
    res = slurm.run("sweeps/nostore.yaml")
    assert res.returncode == 2 and "storage" in res.stderr
    res = slurm.run("sweeps/fig1.yaml", OPSD_STORAGE="s3://bucket/sweeps")
    assert res.returncode == 2 and "storage" in res.stderr
    assert not slurm.calls()


# ----------------------------------------------------------------------------------------- local


def test_local_two_node_recipe_keeps_to_its_own_token_and_processes():
    """The README's test cluster writes its token to a file of its own (not ~/.ray, whose token the local Ray
    of `opsd sweep run` uses) and stops its own nodes, not every Ray process of the user (`ray stop`)."""
    readme = (CLUSTERS / "local" / "README.md").read_text()
    section = readme[readme.index("## A two-node test cluster"):]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert "export RAY_AUTH_TOKEN_PATH=$PWD/runs/test-cluster.token" in commands
    assert not any(c.startswith("ray get-auth-token") or c == "ray stop" for c in commands)
    starts = [c for c in commands if c.startswith("ray start")]
    assert len(starts) == 2 and all("--block" in c and c.endswith("& head=$!") or c.endswith("& worker=$!")
                                    for c in starts)
    assert "kill $worker $head" in commands and "rm -f /tmp/ray/ray_current_cluster" in commands
    res = subprocess.run(["bash", "-n", "-c", block], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_run_sh_runs_opsd_sweep_run_with_the_arguments(tmp_path):
    fake = tmp_path / "opsd"
    fake.write_text('#!/bin/bash\necho "$* | vllm=${VLLM_CPU_KVCACHE_SPACE:-}" >"$FAKE_LOG"\n')
    fake.chmod(0o755)
    log = tmp_path / "log"
    path = "/usr/bin:/bin"
    env = {"PATH": path, "HOME": str(tmp_path), "OPSD": str(fake), "FAKE_LOG": str(log),
           "RAY_ADDRESS": "127.0.0.1:6379"}
    res = subprocess.run(["bash", str(RUN_SH), "sweeps/demo.yaml", "--storage", "/data/x"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    args, vllm = log.read_text().strip().split(" | ")
    assert args == "sweep run sweeps/demo.yaml --storage /data/x"
    if not any(Path(d, "nvidia-smi").exists() for d in path.split(":")):
        assert vllm == "vllm=1"
    assert "127.0.0.1:6379" in res.stderr


def test_run_sh_without_a_sweep_file_prints_usage():
    res = subprocess.run(["bash", str(RUN_SH)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "run.sh sweeps/demo.yaml" in res.stdout


# ----------------------------------------------------------------------------------------- KubeRay

# Fields of KubeRay's ray.io/v1 API types (ray-operator/apis/ray/v1/rayjob_types.go, raycluster_types.go).
RAYJOB_SPEC_KEYS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "deletionPolicy", "entrypoint",
    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYCLUSTER_SPEC_KEYS = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "historyServerOptions", "networkPolicy",
    "tlsOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs"}
HEAD_GROUP_KEYS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_KEYS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                     "rayStartParams", "template", "scaleStrategy", "numOfHosts"}


def rayjob() -> dict:
    return load(RAYJOB)


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_rayjob_required_keys_and_values():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    spec = job["spec"]
    assert "opsd sweep run" in spec["entrypoint"] and "opsd sweep resume" in spec["entrypoint"]
    assert spec["submissionMode"] in {"K8sJobMode", "HTTPMode", "InteractiveMode"}
    assert spec["shutdownAfterJobFinishes"] is True
    for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"):
        assert isinstance(spec[key], int) and spec[key] >= 0, key
    assert spec["activeDeadlineSeconds"] > 0
    assert set(spec["submitterConfig"]) <= {"backoffLimit"}
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.60")
    assert set(cluster.get("authOptions", {})) <= {"mode", "secretName", "enableK8sTokenAuth"}
    assert cluster.get("authOptions", {}).get("mode", "token") in {"token", "disabled"}


def test_rayjob_uses_only_keys_of_the_crd():
    spec = rayjob()["spec"]
    assert set(spec) <= RAYJOB_SPEC_KEYS, set(spec) - RAYJOB_SPEC_KEYS
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC_KEYS, set(cluster) - RAYCLUSTER_SPEC_KEYS
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP_KEYS
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_KEYS, set(group) - WORKER_GROUP_KEYS


def test_rayjob_head_and_gpu_worker_groups():
    cluster = rayjob()["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # map[string]string
    assert containers(head) and all(c["name"] and c["image"] for c in containers(head))
    assert "nvidia.com/gpu" not in containers(head)[0]["resources"].get("limits", {})
    workers = cluster["workerGroupSpecs"]
    assert len(workers) == 1
    group = workers[0]
    assert group["groupName"]
    assert all(isinstance(group[k], int) for k in ("replicas", "minReplicas", "maxReplicas"))
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    worker = containers(group)[0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 8
    # 8 trials of the b200-1 preset (16 CPUs each) must fit in one pod.
    assert int(worker["resources"]["limits"]["cpu"]) >= 8 * 16
    assert worker["image"] == containers(head)[0]["image"]


def test_rayjob_storage_secrets_and_sweep_paths_agree():
    job = rayjob()
    cluster = job["spec"]["rayClusterSpec"]
    pvc = load(STORAGE)
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    env_vars = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert all(isinstance(v, str) for v in env_vars.values())
    storage = env_vars["OPSD_STORAGE"]
    assert env_vars["OPSD_SWEEP_DIR"].startswith(storage + "/")
    workdir = re.search(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert env_vars["OPSD_SWEEP_FILE"].startswith(workdir + "/sweeps/")
    assert re.search(r"^FROM rayproject/ray:2\.60\.\d+-py3\d+-cu12[89]", DOCKERFILE.read_text(), re.M)
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        spec = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in spec["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in containers(group)[0]["volumeMounts"]}
        assert claims.get(mounts.get(storage)) == pvc["metadata"]["name"]  # the PVC, at the same path everywhere
        env = {e["name"]: e for e in containers(group)[0]["env"]}
        assert "value" not in env["WANDB_API_KEY"]
        assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["name"]


def test_rayjob_sweep_dir_is_where_the_sweep_file_writes():
    """OPSD_SWEEP_DIR is <storage>/<the sweep file's name:>, or the resume branch never runs; the README's
    commands name the same folder."""
    env_vars = yaml.safe_load(rayjob()["spec"]["runtimeEnvYAML"])["env_vars"]
    workdir = re.search(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    sweep_file = ROOT / Path(env_vars["OPSD_SWEEP_FILE"]).relative_to(workdir)
    name = load(sweep_file)["name"]
    assert env_vars["OPSD_SWEEP_DIR"] == f"{env_vars['OPSD_STORAGE']}/{name}"
    readme = (CLUSTERS / "kuberay" / "README.md").read_text()
    used = set(re.findall(r"/mnt/opsd/([A-Za-z0-9._-]+)", readme))
    assert used == {name}, used


FAKE_RAY_JOB = r"""#!PYTHON
# Stands in for `ray job ...` in KubeRay's submitter pod: `status` finds no job; `submit` joins the
# entrypoint as Ray's CLI does (shlex.join) and runs it through /bin/sh with the runtime env's env_vars,
# as Ray's job supervisor does.
import json, os, shlex, subprocess, sys
args = sys.argv[1:]
if args[:2] == ["job", "status"]:
    sys.exit(1)
assert args[:2] == ["job", "submit"], args
runtime_env = json.loads(args[args.index("--runtime-env-json") + 1])
entrypoint = shlex.join(args[args.index("--") + 1:])
env = {**os.environ, **runtime_env.get("env_vars", {})}
sys.exit(subprocess.run(["/bin/sh", "-c", entrypoint], env=env).returncode)
"""


def submit_like_kuberay(tmp_path: Path, env_vars: dict[str, str]) -> str:
    """Runs the RayJob's entrypoint the way KubeRay's K8sJobMode submitter does (GetK8sJobCommand: one
    `bash -c` string with the entrypoint pasted in) and returns what opsd was called with."""
    job = rayjob()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "ray").write_text(FAKE_RAY_JOB.replace("PYTHON", sys.executable))
    (bin_dir / "opsd").write_text('#!/bin/bash\necho "$*" >"$FAKE_LOG"\n')
    for name in ("ray", "opsd"):
        (bin_dir / name).chmod(0o755)
    raw_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    raw_env["env_vars"].update(env_vars)
    address, job_id = "http://opsd-head-svc:8265", "opsd-paper-fig1-abcde"
    command = ["if", "ray", "job", "status", "--address", address, job_id, ">/dev/null", "2>&1", ";",
               "then", "ray", "job", "logs", "--address", address, "--follow", job_id, ";",
               "else", "ray", "job", "submit", "--address", address,
               "--runtime-env-json", json.dumps(json.dumps(raw_env, separators=(",", ":"))),
               "--submission-id", job_id, "--", job["spec"]["entrypoint"].strip(), ";", "fi"]
    log = tmp_path / "opsd.log"
    res = subprocess.run(["/bin/bash", "-c", " ".join(command)], capture_output=True, text=True, timeout=60,
                         env={"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(log), "HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    return log.read_text().strip()


def test_rayjob_entrypoint_runs_the_sweep_then_resumes_it_on_retry(tmp_path):
    sweep_dir = tmp_path / "pvc" / "paper_fig1"
    env_vars = {"OPSD_STORAGE": str(tmp_path / "pvc"), "OPSD_SWEEP_DIR": str(sweep_dir)}
    sweep_file = yaml.safe_load(rayjob()["spec"]["runtimeEnvYAML"])["env_vars"]["OPSD_SWEEP_FILE"]
    assert submit_like_kuberay(tmp_path, env_vars) == f"sweep run {sweep_file} --storage {tmp_path / 'pvc'}"
    sweep_dir.mkdir(parents=True)
    assert submit_like_kuberay(tmp_path, env_vars) == f"sweep resume {sweep_dir}"


def test_rayjob_entrypoint_is_one_shell_word_for_the_submitter():
    # The submitter's bash parses the entrypoint first: it must reach `ray job submit` as `bash -c SCRIPT`.
    words = shlex.split(rayjob()["spec"]["entrypoint"])
    assert words[:2] == ["bash", "-c"] and len(words) == 3
    res = subprocess.run(["bash", "-n", "-c", words[2]], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ----------------------------------------------------------------------------------------- launcher


def test_launcher_required_keys():
    cfg = load(LAUNCHER)
    assert cfg["cluster_name"]
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for name, node in types.items():
        assert isinstance(node["node_config"], dict) and node["node_config"]["InstanceType"], name
        assert isinstance(node["resources"], dict), name
        if name != cfg["head_node_type"]:
            assert 0 <= node["min_workers"] <= node["max_workers"] <= cfg["max_workers"], name
    b200 = [n for n in types.values() if n["node_config"]["InstanceType"] == "p6-b200.48xlarge"]
    assert len(b200) == 1 and b200[0]["resources"]["GPU"] == 8
    assert all("ray start" in " ".join(cfg[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))
    assert "--head" in " ".join(cfg["head_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(cfg["worker_start_ray_commands"])
    assert any("opsd-sweep[gpu]" in c for c in cfg["setup_commands"])
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_launcher_file_passes_rays_own_validation():
    util = pytest.importorskip("ray.autoscaler._private.util")
    pytest.importorskip("jsonschema")
    import copy

    cfg = load(LAUNCHER)
    util.validate_config(util.prepare_config(copy.deepcopy(cfg)))
    cfg["available_node_types"]["ray.worker.b200"]["resource"] = {"GPU": 8}   # a misspelt key is refused
    with pytest.raises(Exception):
        util.validate_config(util.prepare_config(cfg))
