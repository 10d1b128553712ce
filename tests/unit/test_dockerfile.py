"""The Dockerfile: its pinned versions agree with pyproject.toml, and the structure the image relies on
(base-image args, non-root user, kd-train entrypoint, the source tree at /opt/kd-stack). Text only:
nothing is built here (scripts/image/image-test.sh builds and runs the CPU image)."""
import json
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"

# Dockerfile ARG -> the pyproject dependency it must equal (pinned with == there)
PINNED = {"TORCH_VERSION": "torch", "DEEPSPEED_VERSION": "deepspeed", "TRANSFORMERS_VERSION": "transformers"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, as dockerfile-parse reads them (comments dropped)."""
    from dockerfile_parse import DockerfileParser
    with open(path, "rb") as f:
        parsed = DockerfileParser(fileobj=f)
        return [(i["instruction"], i["value"]) for i in parsed.structure if i["instruction"] != "COMMENT"]


def expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)


def parse_arg(args: str) -> tuple[str, str | None]:
    name, eq, default = args.partition("=")
    return name.strip(), (default.strip().strip('"') if eq else None)


@pytest.fixture(scope="module")
def dockerfile():
    ins = instructions(DOCKERFILE)
    first_from = next(i for i, (k, _) in enumerate(ins) if k == "FROM")
    global_args: dict[str, str] = {}
    for keyword, args in ins[:first_from]:
        assert keyword == "ARG", f"only ARG may come before the first FROM, not {keyword}"
        name, default = parse_arg(args)
        global_args[name] = expand(default or "", global_args)
    stages, stage = [], None
    for keyword, args in ins[first_from:]:
        if keyword == "FROM":
            stage = {"from": args, "ins": []}
            stages.append(stage)
        else:
            stage["ins"].append((keyword, args))
    return {"args": global_args, "stages": stages}


@pytest.fixture(scope="module")
def project():
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirement(reqs: list[str], name: str) -> Requirement:
    found = [r for r in map(Requirement, reqs) if r.name.lower() == name]
    assert len(found) == 1, f"{name}: {len(found)} requirements in pyproject.toml"
    return found[0]


@pytest.mark.parametrize("arg, package", sorted(PINNED.items()))
def test_pinned_versions_equal_pyproject(dockerfile, project, arg, package):
    req = requirement(project["dependencies"], package)
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"pyproject.toml no longer pins {package} with ==: {req}"
    assert dockerfile["args"].get(arg) == specs[0].version, (
        f"Dockerfile ARG {arg}={dockerfile['args'].get(arg)} but pyproject.toml pins {req}: change both")


def test_flash_attn_satisfies_the_gpu_extra(dockerfile, project):
    req = requirement(project["optional-dependencies"]["gpu"], "flash-attn")
    version = dockerfile["args"]["FLASH_ATTN_VERSION"]
    assert req.specifier.contains(Version(version), prereleases=True), f"FLASH_ATTN_VERSION={version} vs {req}"


def test_cuda_toolkit_matches_the_torch_wheel_index(dockerfile):
    """Extensions must be compiled with torch's own CUDA major (the index's cuXYZ), and for sm_90."""
    args = dockerfile["args"]
    major, minor = args["CUDA_VERSION"].split(".")[:2]
    assert args["TORCH_INDEX_URL"].rstrip("/").endswith(f"/cu{major}{minor}"), (
        f"CUDA_VERSION={args['CUDA_VERSION']} but TORCH_INDEX_URL={args['TORCH_INDEX_URL']}")
    assert args["CUDA_VERSION"] in args["BASE_IMAGE"] and args["CUDA_VERSION"] in args["RUNTIME_IMAGE"]
    assert "devel" in args["BASE_IMAGE"]
    assert "9.0" in re.split(r"[;\s]+", args["TORCH_CUDA_ARCH_LIST"])
    assert "90" in args["FLASH_ATTN_CUDA_ARCHS"].split(";")
    assert args["VARIANT"] == "gpu"


def test_stages_build_on_the_base_image_args(dockerfile):
    froms = [s["from"].split()[0] for s in dockerfile["stages"]]
    assert froms[0] == "${BASE_IMAGE}", "the devel stage must build FROM ${BASE_IMAGE}"
    assert froms[-1] == "${RUNTIME_IMAGE}", "the runtime stage must be FROM ${RUNTIME_IMAGE}"
    devel = dockerfile["stages"][0]["from"].split()
    final = dockerfile["stages"][-1]
    copied = [a for k, a in final["ins"] if k == "COPY" and a.startswith("--from=")]
    assert len(devel) == 3 and devel[1].upper() == "AS" and any(a.startswith(f"--from={devel[2]} ") for a in copied), \
        "the runtime stage takes the wheels built in the devel stage"


def test_stages_redeclare_the_global_args_they_use(dockerfile):
    """A global ARG is empty inside a stage unless that stage declares it again: a classic silent bug."""
    for stage in dockerfile["stages"]:
        declared = {parse_arg(a)[0] for k, a in stage["ins"] if k == "ARG"}
        for keyword, args in stage["ins"]:
            if keyword in ("RUN", "ENV", "WORKDIR", "COPY", "USER"):
                used = {a or b for a, b in re.findall(r"\$\{(\w+)\}|\$(\w+)", args)}
                missing = (used & set(dockerfile["args"])) - declared
                assert not missing, f"stage {stage['from']!r} uses {sorted(missing)} without ARG: {args[:80]}"


def test_final_stage_runs_kd_train_as_a_non_root_user(dockerfile):
    final = dockerfile["stages"][-1]["ins"]
    users = [a for k, a in final if k == "USER"]
    assert users, "the final stage sets no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"the final USER is {users[-1]}"
    created = " ".join(a for k, a in final if k == "RUN" and "useradd" in a)
    assert (f"--uid {user}" in created) if user.isdigit() else re.search(rf"useradd\b.*\b{user}\b", created), \
        f"USER {user} is not created by a useradd in the final stage"
    entrypoints = [a for k, a in final if k == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["kd-train"], "ENTRYPOINT must be exec form [\"kd-train\"]"


def test_the_project_is_installed_editable_from_its_source_tree(dockerfile):
    """train/engines.py and train/demo.py find ds_configs/ and recipes/ beside the packages, and recipes
    name runs/... relative to the working directory: the source tree is the working directory."""
    final = dockerfile["stages"][-1]["ins"]
    workdirs = [a for k, a in final if k == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/opt/kd-stack"
    assert ("COPY", ". /opt/kd-stack") in final
    runs = " ".join(a for k, a in final if k == "RUN")
    assert "pip install --no-deps -e ." in runs and "set -- mpi" in runs, "editable, with the mpi extra's requirements"
    assert "install -d -o kd -g kd runs" in runs, "the user must own runs/"
    torch_first = next(i for i, (k, a) in enumerate(final) if k == "RUN" and "torch==${TORCH_VERSION}" in a)
    others = [i for i, (k, a) in enumerate(final) if k == "RUN" and "requirements.txt" in a]
    assert others and torch_first < min(others), "torch is installed first and alone"


def test_dockerignore_keeps_local_state_out():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "runs", "build"} <= ignored
    assert not {"recipes", "ds_configs", "kd", "train", "tools", "pyproject.toml"} & ignored


def test_makefile_installs_the_pinned_torch():
    """`make` installs torch first and alone (the CPU wheel on the dev machines): the same pin."""
    pins = set(re.findall(r"torch==([\w.+]+)", (REPO / "Makefile").read_text()))
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = next(Requirement(r) for r in pyproject if Requirement(r).name == "torch")
    assert pins == {str(next(iter(torch.specifier)).version)}
