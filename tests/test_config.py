"""Config files and overrides: typed values, unknown keys, run-config records."""
import json
import os

import pytest

from agcg_jax import config as config_lib
from agcg_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("spec", ["demo.py", "demo.py:tiny", "phantoms.py", "phantoms.py:bf16",
                                  "paper.py", "paper.py:patient"])
def test_every_shipped_config_loads(spec):
  cfg = config_lib.load_config(os.path.join(ROOT, "configs", spec))
  assert cfg.data.image_size in (32, 64, 256)
  assert cfg.gan.lr_d == 4e-4 and cfg.gan.lr_g == 1e-4 and cfg.classifier.lr == 3.2e-3


def test_overrides_are_typed_as_the_field(tiny_config):
  cfg = config_lib.apply_overrides(tiny_config, [
      "--config.gan.steps=12", "gan.lr_d=2e-4", "model.att_dilations=(1, 3)",
      "model.dis_sigmoid=true", "data.kind=nih", "gan.steps=1e2"])
  assert cfg.gan.steps == 100 and isinstance(cfg.gan.steps, int)
  assert cfg.gan.lr_d == 2e-4 and cfg.model.att_dilations == (1, 3)
  assert cfg.model.dis_sigmoid is True and cfg.data.kind == "nih"
  assert tiny_config.gan.steps == 6  # the original is left alone


@pytest.mark.parametrize("item, message", [
    ("gan.lr_x=1", "unknown config key 'gan.lr_x'"),
    ("nosuch=1", "unknown config key 'nosuch'"),
    ("gan.steps=1.5", "expected an integer"),
    ("gan.lr_d=fast", "expected a number"),
    ("model.dis_sigmoid=maybe", "expected true or false"),
    ("gan.steps", "expected --config.KEY=VALUE"),
])
def test_bad_overrides_name_the_key(tiny_config, item, message):
  with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config_lib.apply_overrides(tiny_config, [item])


def test_bad_config_files(tmp_path):
  (tmp_path / "nofn.py").write_text("x = 1\n")
  (tmp_path / "broken.py").write_text("def get_config(arg=None):\n  return 1 / 0\n")
  with pytest.raises(UserError, match="no get_config"):
    config_lib.load_config(str(tmp_path / "nofn.py"))
  with pytest.raises(UserError, match="ZeroDivisionError"):
    config_lib.load_config(str(tmp_path / "broken.py"))
  with pytest.raises(UserError, match="no such file"):
    config_lib.load_config(str(tmp_path / "absent.py"))


def test_run_config_record_accepts_the_same_and_refuses_another(tiny_config, tmp_path):
  path = str(tmp_path / "gan" / "config.json")
  config_lib.check_or_record(tiny_config, ["seed", "gan"], path)
  assert json.load(open(path))["gan"]["steps"] == 6
  config_lib.check_or_record(tiny_config, ["seed", "gan"], path)  # same: fine
  other = config_lib.apply_overrides(tiny_config, ["gan.lambda_cycle=5.0"])
  with pytest.raises(UserError, match="holds a run of another config.*gan.lambda_cycle"):
    config_lib.check_or_record(other, ["seed", "gan"], path)
