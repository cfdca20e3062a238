"""Config presets, overrides, validation messages, fingerprints and YAML round-trips."""

from __future__ import annotations

import pytest
import yaml

from selma_ray.config import (
    DEFAULT_PRESET,
    PAPER_SKILLS,
    ConfigError,
    SelmaConfig,
    config_sources,
    list_presets,
    load_config,
    validate,
)
from selma_ray.core.skills import get_skills

PAPER_PRESETS = ["sd14", "sd2", "sdxl", "weak_to_strong"]


def test_shipped_presets_include_tiny_default_and_all_paper_presets():
    presets = list_presets()
    assert DEFAULT_PRESET in presets
    assert set(PAPER_PRESETS) <= set(presets)


@pytest.mark.parametrize("preset", list_presets())
def test_every_shipped_preset_loads_and_validates(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, SelmaConfig)
    assert cfg.run.name == preset
    assert get_skills(cfg.prompts.skills)  # every configured skill is registered
    # The dumped tree validates again on its own (no hidden defaults needed).
    assert validate(cfg.model_dump(mode="json")) == cfg


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_presets_carry_appendix_h_settings(preset):
    cfg = load_config(preset)
    ex, im, pr = cfg.experts, cfg.images, cfg.prompts
    assert ex.rank == 128
    assert ex.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert ex.learning_rate == pytest.approx(3e-4)
    assert ex.lr_scheduler == "constant"
    assert ex.batch_size * ex.gradient_accumulation == 64  # micro-batch x accumulation
    assert ex.max_steps == 5000
    assert ex.mixed_precision == "fp16"
    assert im.steps == 50
    assert im.guidance_scale == pytest.approx(7.5)
    assert pr.per_skill == 1000
    assert pr.skills == PAPER_SKILLS
    assert "8B" in cfg.models.llm


@pytest.mark.parametrize("preset", ["sd14", "sd2", "sdxl"])
def test_single_model_paper_presets_generate_with_their_base(preset):
    cfg = load_config(preset)
    assert cfg.models.generator == cfg.models.base


def test_weak_to_strong_renders_with_sd2_and_trains_sdxl():
    cfg = load_config("weak_to_strong")
    assert cfg.models.generator != cfg.models.base
    assert "stable-diffusion-2" in cfg.models.generator
    assert "xl" in cfg.models.base.lower()


def test_tiny_preset_is_small_enough_for_a_laptop():
    cfg = load_config("tiny")
    assert cfg.experts.rank < 128
    assert cfg.experts.max_steps < 5000
    assert cfg.prompts.per_skill < 1000


# ---------------------------------------------------------------- overrides


def test_int_float_and_string_overrides_are_parsed_as_yaml():
    cfg = load_config(
        "tiny", ["experts.rank=16", "prompts.rouge_threshold=0.7", "models.llm=some/model"]
    )
    assert cfg.experts.rank == 16 and isinstance(cfg.experts.rank, int)
    assert cfg.prompts.rouge_threshold == pytest.approx(0.7)
    assert cfg.models.llm == "some/model"


def test_list_override_uses_yaml_flow_syntax():
    cfg = load_config("tiny", ["prompts.skills=[counting, dense_detail]"])
    assert cfg.prompts.skills == ["counting", "dense_detail"]


def test_nested_override_reaches_sub_sections():
    cfg = load_config(
        "sd14", ["resources.experts.cpus_per_worker=2.5", "resources.images.max_size=3"]
    )
    assert cfg.resources.experts.cpus_per_worker == pytest.approx(2.5)
    assert cfg.resources.images.max_size == 3
    # untouched siblings keep the preset's values
    assert cfg.resources.experts.use_gpu is True


def test_override_of_a_section_the_preset_omits_creates_it():
    cfg = load_config(
        "tiny",
        ["prompts.skills=[counting, dense_detail]", "merge.weights={counting: 2, dense_detail: 1}"],
    )
    assert cfg.merge.weights == {"counting": 2.0, "dense_detail": 1.0}


def test_merge_weights_must_name_exactly_the_run_skills():
    with pytest.raises(ConfigError, match="merge.weights must give one weight per skill"):
        load_config("tiny", ["merge.weights={counting: 1.5}"])


def test_later_override_wins():
    cfg = load_config("tiny", ["experts.rank=8", "experts.rank=2"])
    assert cfg.experts.rank == 2


def test_override_value_may_contain_equals_sign():
    cfg = load_config("tiny", ["models.llm=a=b"])
    assert cfg.models.llm == "a=b"


def test_override_null_sets_optional_value_to_none():
    cfg = load_config("tiny", ["images.resolution=null"])
    assert cfg.images.resolution is None


def test_overrides_do_not_leak_between_loads():
    load_config("tiny", ["experts.rank=7"])
    assert load_config("tiny").experts.rank == 4


# ---------------------------------------------------------------- errors


def test_unknown_key_error_names_dotted_key_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["experts.rnak=8"])
    msg = str(err.value)
    assert "experts.rnak" in msg
    assert "unknown key" in msg
    for allowed in ("rank", "alpha", "target_modules", "learning_rate"):
        assert allowed in msg


def test_unknown_nested_key_lists_keys_of_that_sub_section():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["resources.experts.gpus=1"])
    msg = str(err.value)
    assert "resources.experts.gpus" in msg
    for allowed in ("workers_per_expert", "use_gpu", "cpus_per_worker", "max_concurrent"):
        assert allowed in msg


def test_unknown_section_lists_top_level_sections():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["modles.llm=x"])
    msg = str(err.value)
    assert "modles" in msg
    for section in ("run", "models", "prompts", "images", "experts", "merge", "serve"):
        assert section in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("experts.rank=-1", "experts.rank"),
        ("images.resolution=30", "images.resolution"),
        ("images.resolution=0", "images.resolution"),
        ("prompts.rouge_threshold=1.5", "prompts.rouge_threshold"),
        ("prompts.rouge_threshold=0", "prompts.rouge_threshold"),
        ("experts.lr_scheduler=step", "experts.lr_scheduler"),
        ("serve.port=70000", "serve.port"),
        ("prompts.skills=[counting, counting]", "prompts.skills"),
        ("resources.images.num_gpus=-1", "resources.images.num_gpus"),
    ],
)
def test_bad_value_error_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert key in str(err.value)


def test_bad_value_error_shows_the_offending_value():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["images.resolution=30"])
    assert "30" in str(err.value)
    assert "multiple of 8" in str(err.value)


@pytest.mark.parametrize("override", ["experts.rank", "=3", "experts..rank=3", ".rank=3"])
def test_malformed_override_raises_config_error(override):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert "section.key=value" in str(err.value)


def test_override_into_a_scalar_says_it_is_not_a_section():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["run.name.x=1"])
    assert "run.name" in str(err.value)
    assert "not a section" in str(err.value)


def test_override_with_invalid_yaml_value_raises_config_error():
    with pytest.raises(ConfigError):
        load_config("tiny", ["prompts.skills=[unclosed"])


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_unknown_preset_error_lists_the_presets():
    with pytest.raises(ConfigError) as err:
        load_config("sd15")
    msg = str(err.value)
    assert "sd15" in msg
    for name in list_presets():
        assert name in msg


def test_missing_preset_path_is_reported(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(str(missing))
    assert "does not exist" in str(err.value)


def test_preset_by_path_loads(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("run: {name: mine, dir: runs/mine}\nexperts: {rank: 2}\n")
    cfg = load_config(str(path))
    assert cfg.run.name == "mine" and cfg.experts.rank == 2


def test_preset_file_that_is_not_a_mapping_is_rejected(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert "mapping" in str(err.value)


def test_preset_file_with_invalid_yaml_is_rejected(tmp_path):
    path = tmp_path / "broken.yml"
    path.write_text("run: {name: [\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert "not valid YAML" in str(err.value)


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_is_stable_across_loads():
    a = load_config("sd14")
    b = load_config("sd14")
    assert a is not b
    assert a.fingerprint("prompts") == b.fingerprint("prompts")
    assert a.fingerprint("experts", "images", extra={"x": 1}) == b.fingerprint(
        "experts", "images", extra={"x": 1}
    )


def test_fingerprint_changes_when_a_value_of_its_section_changes():
    base = load_config("tiny")
    changed = load_config("tiny", ["prompts.rouge_threshold=0.7"])
    assert base.fingerprint("prompts") != changed.fingerprint("prompts")
    assert base.fingerprint("experts") != load_config("tiny", ["experts.rank=8"]).fingerprint(
        "experts"
    )


def test_fingerprint_ignores_changes_to_other_sections():
    base = load_config("tiny")
    changed = load_config("tiny", ["serve.port=9000", "experts.rank=8", "run.dir=elsewhere"])
    assert base.fingerprint("prompts") == changed.fingerprint("prompts")


def test_fingerprint_depends_on_extra():
    cfg = load_config("tiny")
    assert cfg.fingerprint("prompts", extra={"seed": 0}) != cfg.fingerprint(
        "prompts", extra={"seed": 1}
    )


def test_fingerprint_depends_on_which_sections_are_named():
    cfg = load_config("tiny")
    assert cfg.fingerprint("prompts") != cfg.fingerprint("prompts", "images")


# ---------------------------------------------------------------- YAML round-trip


@pytest.mark.parametrize("preset", list_presets())
def test_to_yaml_round_trips_to_an_equal_config(preset):
    cfg = load_config(preset, ["prompts.skills=[counting]", "merge.weights={counting: 1.5}"])
    again = validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.fingerprint("prompts", "experts", "merge") == cfg.fingerprint(
        "prompts", "experts", "merge"
    )


def test_to_yaml_is_loadable_as_a_preset_file(tmp_path):
    cfg = load_config("weak_to_strong", ["experts.rank=64"])
    path = tmp_path / "dumped.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(str(path)) == cfg


def test_a_custom_skill_named_like_a_builtin_is_an_error_unless_it_says_it_replaces_it():
    spec = "{name: counting, description: my counting, seeds: [a, b, c]}"
    with pytest.raises(ConfigError, match=r"\['counting'\] have the names of built-in skills"):
        load_config("tiny", [f"prompts.custom_skills=[{spec}]"])
    spec = spec.replace("}", ", replaces_builtin: true}")
    cfg = load_config("tiny", [f"prompts.custom_skills=[{spec}]"])
    skill = get_skills(["counting"], cfg.prompts.all_custom_skills())[0]
    assert (skill.description, skill.source) == ("my counting", "custom")


def test_a_config_file_is_layered_on_its_base_and_names_its_own_run(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("prompts: {per_skill: 2}\nresources: {experts: {max_concurrent: 3}}\n")
    cfg, tiny = load_config(str(mine)), load_config("tiny")
    assert cfg.prompts.per_skill == 2 and cfg.resources.experts.max_concurrent == 3
    # everything else is the tiny preset's, not the schema's paper-sized defaults
    assert (cfg.images.steps, cfg.experts.rank, cfg.experts.max_steps) == (
        tiny.images.steps,
        tiny.experts.rank,
        tiny.experts.max_steps,
    )
    assert cfg.resources.experts.use_gpu == tiny.resources.experts.use_gpu
    assert (cfg.run.name, cfg.run.dir) == ("mine", "runs/mine")
    assert config_sources(str(mine), ["experts.rank=2"]) == f"tiny < {mine} + 1 override(s)"
    paper = tmp_path / "paper.yaml"
    paper.write_text(
        "base: sd14\nrun: {name: p}\nmerge: {weights: {counting: 2.0}}\n"
        "prompts: {skills: [counting]}\n"
    )
    cfg = load_config(str(paper))
    assert cfg.experts.rank == 128 and cfg.merge.weights == {"counting": 2.0}
    assert (cfg.run.name, cfg.run.dir) == ("p", "runs/p")
    on = tmp_path / "on.yaml"  # a file on a file, relative to it
    on.write_text("base: paper.yaml\nexperts: {rank: 8}\n")
    assert load_config(str(on)).experts.rank == 8
    assert config_sources(str(on)) == f"sd14 < {paper} < {on}"
    bare = tmp_path / "bare.yaml"
    bare.write_text("base: null\n")
    assert load_config(str(bare)).experts.rank == SelmaConfig().experts.rank
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="more than 8 deep"):
        load_config(str(tmp_path / "loop.yaml"))
