"""train.config: YAML + override loading, error messages, round trip, DeepSpeed configs, recipes."""
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from train import config as C
from train import engines as E
from train.config import ConfigError, Config, load_config

REPO = Path(__file__).resolve().parents[2]
BASE = ["model.student=demo-student", "model.teacher=demo-teacher", "data.train=data/train.jsonl"]


def load(*overrides):
    return load_config(None, BASE + list(overrides))


def write(tmp_path, tree, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(tree if isinstance(tree, str) else yaml.safe_dump(tree))
    return str(path)


def error(*overrides, path=None):
    with pytest.raises(ConfigError) as e:
        load_config(path, ([] if path else BASE) + list(overrides))
    return str(e.value)


# ---------------------------------------------------------------------------------------------
# loading and overrides

def test_defaults_and_required_fields():
    c = load()
    assert c.model.student == "demo-student" and c.data.train == "data/train.jsonl"
    assert c.train == C.TrainConfig() and c.parallel == C.ParallelConfig()
    assert (c.run_name, c.resume, c.loss.method, c.train.betas) == ("run", "none", "grkd", (0.9, 0.95))
    assert c.run_dir == Path("runs") / "run"


def test_yaml_then_overrides_win(tmp_path):
    path = write(tmp_path, {"run_name": "a", "model": {"student": "s", "teacher": "t"},
                            "train": {"steps": 5, "lr": 0.1}, "data": {"train": "x.jsonl"},
                            "loss": {"params": {"k": 4, "tau": 2.0}}})
    c = load_config(path, ["train.steps=8", "run_name=b", "loss.params.k=16"])
    assert (c.train.steps, c.train.lr, c.run_name) == (8, 0.1, "b")
    assert c.loss.params == {"k": 16, "tau": 2.0}        # params merge key by key
    assert c.run_dir == Path("runs") / "b"


@pytest.mark.parametrize("override, get, want", [
    ("train.steps=8", lambda c: c.train.steps, 8),                      # int
    ("train.lr=0.001", lambda c: c.train.lr, 0.001),                   # float
    ("train.lr=1e-5", lambda c: c.train.lr, 1e-5),                     # YAML 1.1 reads this as a string
    ("train.lr=2", lambda c: c.train.lr, 2.0),                         # float accepts an int
    ("data.pack=true", lambda c: c.data.pack, True),                   # bool
    ("model.activation_checkpointing=false", lambda c: c.model.activation_checkpointing, False),
    ("train.betas=[0.9,0.99]", lambda c: c.train.betas, (0.9, 0.99)),  # list -> tuple
    ("data.eval=null", lambda c: c.data.eval, None),                   # optional
    ("data.eval=none", lambda c: c.data.eval, None),
    ("data.eval=e.jsonl", lambda c: c.data.eval, "e.jsonl"),
    ("parallel.nproc=4", lambda c: c.parallel.nproc, 4),
    ("model.vocab_size=128256", lambda c: c.model.vocab_size, 128256),
    ("run_name=2024", lambda c: c.run_name, "2024"),                   # str fields take the text as written
    ("resume=auto", lambda c: c.resume, "auto"),
    ("resume=AUTO", lambda c: c.resume, "auto"),
    ("resume=runs/x/ckpt/step_10", lambda c: c.resume, "runs/x/ckpt/step_10"),
    ("model.dtype=bfloat16", lambda c: c.model.dtype, "bf16"),
    ("model.dtype=FP32", lambda c: c.model.dtype, "fp32"),
    ("parallel.zero_stage=2", lambda c: c.parallel.zero_stage, 2),
    ("loss.method=jsd", lambda c: c.loss.method, "jsd"),
    ("loss.params.k=16", lambda c: c.loss.params, {"k": 16}),
    ("loss.params={k: 8, tau: 0.5}", lambda c: c.loss.params, {"k": 8, "tau": 0.5}),
    ("train={steps: 3, seed: 7}", lambda c: (c.train.steps, c.train.seed), (3, 7)),
])
def test_override_types(override, get, want):
    assert get(load(override)) == want


def test_override_without_equals_is_an_error():
    assert "dotted.key=value" in error("train.steps")


# ---------------------------------------------------------------------------------------------
# error messages

@pytest.mark.parametrize("override, suggestion", [
    ("train.lrr=1", "train.lr"),
    ("train.stpes=8", "train.steps"),
    ("steps=8", "train.steps"),            # a leaf written at the top level
    ("lr=0.1", "train.lr"),
    ("model.seed=1", "train.seed"),        # a leaf under the wrong section
    ("trian.steps=8", "train.steps"),
    ("paralel=1", "parallel"),
])
def test_unknown_override_suggests_key(override, suggestion):
    msg = error(override)
    assert f"Unknown configuration key '{override.split('=')[0]}'" in msg
    assert f"command-line override '{override}'" in msg
    assert f"Did you mean '{suggestion}'?" in msg


def test_unknown_yaml_keys_name_file_and_suggest(tmp_path):
    path = write(tmp_path, {"steps": 8, "model": {"student": "s"}, "data": {"train": "x"}})
    msg = error(path=path)
    assert path in msg and "key 'steps'" in msg and "Did you mean 'train.steps'?" in msg
    path = write(tmp_path, {"model": {"student": "s", "techer": "t"}, "data": {"train": "x"}})
    msg = error(path=path)
    assert "'model.techer'" in msg and "Did you mean 'model.teacher'?" in msg


def test_loss_setting_outside_params_points_to_params():
    msg = error("loss.k=32")
    assert "loss.params.k" in msg


@pytest.mark.parametrize("override, value", [
    ("train.steps=abc", "'abc'"), ("train.steps=1.5", "1.5"), ("train.steps=true", "True"),
    ("train.steps='8'", "'8'"),                           # quoted: a string, not an int
    ("train.lr=fast", "'fast'"), ("train.lr=nan", "'nan'"), ("data.pack=1", "1"),
    ("data.pack=maybe", "'maybe'"), ("train.betas=[0.9]", "[0.9]"), ("train.betas=0.9", "0.9"),
    ("loss.params=3", "3"), ("model.student=null", "None"),
])
def test_bad_type_names_key_value_and_source(override, value):
    key = override.split("=")[0]
    msg = error(override)
    assert f"command-line override '{override}'" in msg
    assert f"{key} expects" in msg and f"got {value}" in msg


def test_bad_type_in_yaml_names_file_and_expected(tmp_path):
    path = write(tmp_path, {"model": {"student": "s", "teacher": "t"}, "data": {"train": "x"},
                            "train": {"micro_batch": "eight"}})
    msg = error(path=path)
    assert f"recipe '{path}', key 'train.micro_batch'" in msg
    assert "expects an integer > 0, got 'eight'" in msg
    # a YAML number where a string is expected: an error that says to quote it
    path = write(tmp_path, {"run_name": 2024, "model": {"student": "s", "teacher": "t"},
                            "data": {"train": "x"}})
    msg = error(path=path)
    assert "key 'run_name'" in msg and "got 2024 (int)" in msg and "Quote" in msg


@pytest.mark.parametrize("override", [
    "train.steps=0", "train.micro_batch=0", "train.grad_accum=-1", "train.lr=0", "loss.temperature=0",
    "loss.chunk_size=0", "parallel.sequence=0", "data.max_len=4", "train.min_lr_ratio=1.5",
    "train.betas=[0.9,1.0]", "parallel.nproc=0", "model.vocab_size=0",
])
def test_range_checks(override):
    assert f"{override.split('=')[0]} expects" in error(override)


@pytest.mark.parametrize("override, near", [
    ("model.dtype=bf61", "bf16"), ("model.attn_implementation=sdap", "sdpa"),
    ("loss.method=grdk", "grkd"), ("parallel.zero_stage=4", None),
])
def test_enum_checks(override, near):
    msg = error(override)
    assert "expects one of" in msg
    assert (f"Did you mean '{near}'?" in msg) if near else "Did you mean" not in msg


def test_loss_methods_come_from_kd():
    import kd
    for m in kd.METHODS:
        assert load(f"loss.method={m}").loss.method == m


def test_loss_params_checked_by_kd():
    msg = error("loss.params.kk=3")
    assert "loss.params.kk=3" in msg and "'k'" in msg
    assert "loss.temperature" in error("loss.params.temperature=2")
    assert load("loss.params.standardize=true").loss.params == {"standardize": True}


def test_missing_required_fields(tmp_path):
    path = write(tmp_path, {"data": {"train": "x"}, "model": {"teacher": "t"}})
    msg = error(path=path)
    assert "Missing required setting model.student" in msg and path in msg
    msg = error(path=write(tmp_path, {"model": {"student": "s", "teacher": "t"}}))
    assert "Missing required setting data.train" in msg and "data.train=" in msg


def test_teacher_required_unless_sft():
    with pytest.raises(ConfigError, match="model.teacher.*loss.method=sft"):
        load_config(None, ["model.student=s", "data.train=x"])
    c = load_config(None, ["model.student=s", "data.train=x", "loss.method=sft"])
    assert c.model.teacher is None and c.loss.method == "sft"


def test_cross_field_checks():
    assert "multiple of parallel.sequence" in error("parallel.nproc=3", "parallel.sequence=2")
    assert load("parallel.nproc=4", "parallel.sequence=2").parallel.sequence == 2
    msg = error("parallel.sequence=2", "model.attn_implementation=eager")
    assert "model.attn_implementation=eager" in msg and "parallel.sequence=2" in msg
    assert load("parallel.sequence=2", "model.attn_implementation=sdpa").model.attn_implementation == "sdpa"
    assert "zero_stage" in error("parallel.offload_optimizer=true", "parallel.zero_stage=0")


@pytest.mark.parametrize("text, fragment", [
    ("model: [1, 2\n", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
    ("model: demo-student\n", "'model' is a section"),
])
def test_bad_yaml_files(tmp_path, text, fragment):
    assert fragment in error(path=write(tmp_path, text))


def test_missing_recipe_file(tmp_path):
    assert "not found" in error(path=str(tmp_path / "nope.yaml"))


def test_empty_sections_and_file_use_defaults(tmp_path):
    path = write(tmp_path, "train:\nloss:\n")
    c = load_config(path, BASE)
    assert c.train == C.TrainConfig() and c.loss == C.LossConfig()


# ---------------------------------------------------------------------------------------------
# round trip

def test_dump_and_load_round_trip(tmp_path):
    c = load("run_name=rt", "output_dir=out", "resume=auto", "train.lr=1e-5", "train.betas=[0.8,0.9]",
             "loss.params={k: 16, transition: 0.25}", "data.pack=true", "data.eval=null",
             "model.vocab_size=100", "parallel.nproc=4", "parallel.sequence=2", "model.dtype=bf16")
    path = C.dump_yaml(c, tmp_path / "runs" / "rt" / "config.yaml")
    again = load_config(str(path), [])
    assert again == c
    assert yaml.safe_load(path.read_text())["train"]["betas"] == [0.8, 0.9]
    assert C.config_from_dict(c.to_dict()) == c


@settings(max_examples=40, deadline=None)
@given(steps=st.integers(1, 10**9), lr=st.floats(1e-9, 10.0), pack=st.booleans(),
       beta=st.floats(0.0, 0.999), name=st.text("abc-_019", min_size=1, max_size=12),
       eval_path=st.one_of(st.none(), st.just("e.jsonl")), k=st.integers(1, 256),
       method=st.sampled_from(["grkd", "forward_kl", "jsd"]))
def test_round_trip_property(steps, lr, pack, beta, name, eval_path, k, method):
    params = {"k": k} if method == "grkd" else {}
    c = C.config_from_dict({"run_name": name, "model": {"student": "s", "teacher": "t"},
                            "train": {"steps": steps, "lr": lr, "betas": [beta, beta]},
                            "loss": {"method": method, "params": params},
                            "data": {"train": "x", "eval": eval_path, "pack": pack}})
    assert C.config_from_dict(yaml.safe_load(yaml.safe_dump(c.to_dict()))) == c


def test_validate_programmatic_config():
    c = Config(model=C.ModelConfig(student="s", teacher="t"), data=C.DataConfig(train="x"))
    assert c.validate() == c
    c.train.steps = 0
    with pytest.raises(ConfigError, match="Config object.*train.steps"):
        c.validate()


# ---------------------------------------------------------------------------------------------
# DeepSpeed configs

def test_ds_config_files_are_plain_json():
    names = sorted(p.name for p in E.DS_CONFIG_DIR.glob("*.json"))
    assert names == ["zero3_student.json", "zero3_student_offload.json", "zero3_teacher.json",
                     "zero3_teacher_offload.json"]
    for name in names:
        text = (E.DS_CONFIG_DIR / name).read_text()
        d = json.loads(text)
        assert '"auto"' not in text and "optimizer" not in d and "scheduler" not in d
        assert d["zero_optimization"]["stage"] == 3


def test_ds_config_student():
    c = load("train.micro_batch=2", "train.grad_accum=3", "train.grad_clip=0.5", "parallel.zero_stage=2")
    d = E.ds_config(c, "student", world_size=4, device="cpu")
    assert d["train_micro_batch_size_per_gpu"] == 2 and d["gradient_accumulation_steps"] == 3
    assert d["train_batch_size"] == 2 * 3 * 4
    assert d["gradient_clipping"] == 0.5 and d["zero_optimization"]["stage"] == 2
    assert d["zero_allow_untested_optimizer"] is True
    assert "optimizer" not in d and "scheduler" not in d and "sequence_parallel_size" not in d
    assert "offload_optimizer" not in d["zero_optimization"]
    assert d["bf16"]["enabled"] is False and d["fp16"]["enabled"] is False    # auto on CPU = fp32
    assert d["steps_per_print"] >= 10**6 and d["wall_clock_breakdown"] is False
    # the trainer weights micro-batches itself and steps once per optimizer step
    assert d["managed_gradient_accumulation"] is False and d["zero_optimization"]["overlap_comm"] is True
    assert "checkpoint" not in d
    assert E.ds_config(c, "student", 4, device="cpu", load_universal=True)["checkpoint"]["load_universal"] is True
    stage1 = E.ds_config(load("parallel.zero_stage=1"), "student", 4, device="cpu")
    assert stage1["zero_optimization"]["overlap_comm"] is False      # DeepSpeed refuses it there


def test_chat_template_and_overwrite_keys(tmp_path):
    assert load().data.chat_template == "auto" and load().overwrite is False
    for text, want in (("data.chat_template=true", "true"), ("data.chat_template=False", "false"),
                       ("data.chat_template=auto", "auto")):
        assert load(text).data.chat_template == want
    with pytest.raises(ConfigError, match="data.chat_template expects one of 'auto', 'true', 'false'"):
        load("data.chat_template=yes")
    c = load("overwrite=true", "run_name=o", "resume=runs/o/checkpoints/step_00000008")
    assert c.overwrite is True
    # actions of the start, never repeated by rerunning config.yaml: it continues the run
    path = C.dump_yaml(c, tmp_path / "config.yaml")
    again = load_config(str(path), [])
    assert again.overwrite is False and again.resume == "auto"
    assert again.train == c.train and again.model == c.model and again.data == c.data
    assert path.read_text().splitlines()[1] == f"# Continue this run: kd-train {path}"


def test_ds_config_teacher():
    c = load("train.micro_batch=2", "parallel.zero_stage=1", "model.dtype=bf16")
    d = E.ds_config(c, "teacher", world_size=2, device="cpu")
    assert d["zero_optimization"]["stage"] == 3                  # the teacher always shards
    assert "gradient_clipping" not in d and "optimizer" not in d
    assert "offload_param" not in d["zero_optimization"]
    assert d["train_batch_size"] == 4 and d["bf16"]["enabled"] is True


def test_ds_config_classmate_is_trained_like_the_student():
    c = load("parallel.zero_stage=2", "parallel.offload_optimizer=true", "train.grad_clip=0.5")
    assert E.ds_config(c, "classmate", 2, device="cpu") == E.ds_config(c, "student", 2, device="cpu")
    with pytest.raises(ValueError, match="role must be one of"):
        E.ds_config(c, "critic", 2, device="cpu")


def test_onpolicy_and_classmate_settings_that_cannot_work_are_refused_before_launch():
    with pytest.raises(ConfigError, match="data.pack=false"):
        load("onpolicy.mode=gkd", "data.pack=true")
    with pytest.raises(ConfigError, match="onpolicy.max_new_tokens=64 .*data.max_len=64"):
        load("onpolicy.mode=gkd", "data.max_len=64", "onpolicy.max_new_tokens=64")
    with pytest.raises(ConfigError, match="phi never moves"):
        load("onpolicy.mode=distillm", "data.eval=null", "train.eval_every=10")
    with pytest.raises(ConfigError, match="train.eval_every=0"):
        load("onpolicy.mode=distillm", "data.eval=e.jsonl")
    with pytest.raises(ConfigError, match="needs a teacher to score"):
        load("onpolicy.mode=gkd", "loss.method=sft")
    with pytest.raises(ConfigError, match="onpolicy.val_metric"):
        load("onpolicy.mode=distillm", "data.eval=e.jsonl", "train.eval_every=5", "onpolicy.val_metric=eval_typo")
    with pytest.raises(ConfigError, match="misfeedback applies to student-generated samples"):
        load("model.classmate=demo-student")
    with pytest.raises(ConfigError, match="no micro-batch holds them"):
        load("model.classmate=demo-student", "onpolicy.mode=always")
    with pytest.raises(ConfigError, match="never train"):
        load("model.classmate=demo-student", "onpolicy.mode=gkd", "onpolicy.fraction=1")
    with pytest.raises(ConfigError, match="onpolicy.mode"):
        load("onpolicy.mode=sometimes")
    c = load("model.classmate=demo-student", "onpolicy.mode=gkd", "classmate.update_every=3")
    assert c.classmate.update_every == 3 and c.onpolicy.fraction == 0.5


def test_ds_config_offload_and_sequence_parallel():
    c = load("parallel.offload_teacher=true", "parallel.offload_optimizer=true", "parallel.sequence=2",
             "train.micro_batch=1", "train.grad_accum=2")
    s = E.ds_config(c, "student", world_size=8, device="cuda")
    t = E.ds_config(c, "teacher", world_size=8, device="cuda")
    assert s["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert s["zero_force_ds_cpu_optimizer"] is False
    assert t["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "offload_optimizer" not in t["zero_optimization"]
    assert s["train_batch_size"] == t["train_batch_size"] == 1 * 2 * 4      # 8 ranks / sequence 2
    assert s["sequence_parallel_size"] == 2
    assert s["bf16"]["enabled"] is True                                    # auto on GPU = bf16
    with pytest.raises(ConfigError, match="multiple of parallel.sequence"):
        E.ds_config(c, "student", world_size=3, device="cuda")


def test_ds_config_fp16_student_gets_loss_scaling():
    d = E.ds_config(load("model.dtype=fp16"), "student", world_size=1, device="cuda")
    assert d["fp16"]["enabled"] is True and d["fp16"]["loss_scale"] == 0 and d["bf16"]["enabled"] is False


def test_ds_config_user_file_keeps_settings_but_not_owned_keys(tmp_path):
    user = tmp_path / "mine.json"
    user.write_text(json.dumps({"train_batch_size": 999, "gradient_clipping": 9.0,
                                "zero_optimization": {"stage": 1, "reduce_bucket_size": 1234},
                                "communication_data_type": "fp32"}))
    d = E.ds_config(load(f"parallel.ds_config_student={user}"), "student", world_size=2, device="cpu")
    assert d["zero_optimization"]["reduce_bucket_size"] == 1234 and d["communication_data_type"] == "fp32"
    assert d["zero_optimization"]["stage"] == 3 and d["gradient_clipping"] == 1.0
    assert d["train_batch_size"] == 8 * 2
    user.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="optimizer"):
        E.ds_config(load(f"parallel.ds_config_student={user}"), "student", world_size=1, device="cpu")
    # the teacher is frozen: whatever the file says, it gets no optimizer, schedule or clipping
    user.write_text(json.dumps({"optimizer": {"type": "Adam"}, "scheduler": {"type": "WarmupLR"},
                                "gradient_clipping": 1.0, "zero_optimization": {"offload_optimizer": {}}}))
    t = E.ds_config(load(f"parallel.ds_config_teacher={user}"), "teacher", world_size=1, device="cpu")
    assert not {"optimizer", "scheduler", "gradient_clipping"} & set(t)
    assert "offload_optimizer" not in t["zero_optimization"] and t["zero_optimization"]["stage"] == 3
    with pytest.raises(ConfigError, match="parallel.ds_config_teacher"):
        E.ds_config(load(f"parallel.ds_config_teacher={tmp_path / 'no.json'}"), "teacher", 1, device="cpu")


@pytest.mark.parametrize("overrides", [
    [], ["model.dtype=bf16"], ["model.dtype=fp16", "parallel.offload_optimizer=true"],
    ["parallel.offload_teacher=true", "parallel.sequence=2"], ["parallel.zero_stage=1"],
])
@pytest.mark.parametrize("role", ["student", "teacher"])
def test_deepspeed_accepts_ds_configs(monkeypatch, overrides, role):
    from deepspeed.runtime import config as dsc
    world = 4
    # DeepSpeedConfig reads the world size from torch.distributed; pretend 4 ranks are up.
    monkeypatch.setattr(dsc.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(dsc.dist, "get_world_size", lambda *a, **k: world)
    c = load("train.micro_batch=2", "train.grad_accum=2", *overrides)
    d = E.ds_config(c, role, world_size=world, device="cuda")
    parsed = dsc.DeepSpeedConfig(json.loads(json.dumps(d)))
    assert parsed.train_batch_size == d["train_batch_size"] == 2 * 2 * world // c.parallel.sequence
    assert parsed.zero_optimization_stage == (1 if "parallel.zero_stage=1" in overrides and role == "student"
                                              else 3)
    assert parsed.bfloat16_config.enabled == (d["bf16"]["enabled"])


def test_resolve_dtype():
    assert C.resolve_dtype("auto", "cpu") == "fp32" and C.resolve_dtype("auto", "cuda") == "bf16"
    assert C.resolve_dtype("fp16", "cpu") == "fp16"


# ---------------------------------------------------------------------------------------------
# recipes

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_expected_recipes_exist():
    assert {"llama3_8b_to_1b.yaml", "gemma2_9b_to_2b.yaml", "demo.yaml"} <= {p.name for p in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses(recipe):
    c = load_config(str(recipe), [])
    assert c.model.student and c.data.train
    assert c.model.teacher or c.loss.method == "sft"
    E.ds_config(c, "student", world_size=c.parallel.nproc or 2, device="cuda")


def test_llama_recipe_values():
    c = load_config(str(REPO / "recipes" / "llama3_8b_to_1b.yaml"), [])
    assert c.loss.method == "grkd" and c.loss.params == {"k": 32, "lambda_end": 0.5, "transition": 0.5}
    assert (c.model.dtype, c.data.max_len, c.parallel.nproc) == ("bf16", 2048, 8)
    assert c.train.lr == pytest.approx(1e-5)
