"""Loading Python config files (`get_config(arg)`) and applying overrides.

    --config configs/demo.py            get_config(None)
    --config configs/demo.py:tiny       get_config("tiny")
    --config.gan.steps=500              override one field (typed as the field)

Every problem (missing file, no get_config, unknown key, a value of the wrong
type) is a UserError naming the file or the key.
"""
import ast
import importlib.util
import json
import os
from typing import Any, Callable, Iterable

import ml_collections

from agcg_jax.errors import UserError


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path[:arg]` and returns get_config(arg) as a ConfigDict."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"--config {spec}: no such file {path!r}")
  name = "agcg_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # A user's config file: report it in one line.
    raise UserError(f"--config {path}: failed to load: {type(e).__name__}: {e}") from e
  if not hasattr(module, "get_config"):
    raise UserError(f"--config {path}: the file has no get_config() function")
  try:
    cfg = module.get_config(arg or None)
  except Exception as e:
    raise UserError(f"--config {spec}: get_config({arg!r}) failed: {type(e).__name__}: {e}") from e
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise UserError(f"--config {path}: get_config() must return an ml_collections.ConfigDict")
  return cfg


def _known_keys(cfg, prefix="") -> list[str]:
  out = []
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict):
      out += _known_keys(v, f"{prefix}{k}.")
    else:
      out.append(prefix + k)
  return out


def _parse_value(key: str, text: str, current: Any) -> Any:
  """Parses `text` to the type of the field's current value."""
  def bad(what):
    return UserError(f"--config.{key}={text}: {what}")
  if isinstance(current, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise bad("expected true or false")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      try:
        f = float(text)
      except ValueError:
        raise bad("expected an integer") from None
      if f != int(f):
        raise bad("expected an integer") from None
      return int(f)
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise bad("expected a number") from None
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise bad("expected a tuple like (1, 2, 4)") from None
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return type(current)(value)
  return text


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
  """Applies 'a.b=value' (or '--config.a.b=value') items; unknown keys are errors."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  known = _known_keys(cfg)
  for item in overrides:
    text = item[len("--config."):] if item.startswith("--config.") else item
    key, eq, value = text.partition("=")
    if not eq:
      raise UserError(f"override {item!r}: expected --config.KEY=VALUE")
    if key not in known:
      section = key.rsplit(".", 1)[0] if "." in key else ""
      near = [k for k in known if section and k.startswith(section + ".")]
      hint = f"; keys under {section}: {', '.join(near)}" if near else ""
      raise UserError(f"unknown config key {key!r} (from {item!r}){hint}")
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = _parse_value(key, value, node[leaf])
  return cfg


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


def section_dict(cfg: ml_collections.ConfigDict, sections: Iterable[str]) -> dict:
  """The named top-level sections as plain, JSON-normal dicts (tuples become lists)."""
  return json.loads(json.dumps({s: cfg[s].to_dict() if isinstance(cfg[s], ml_collections.ConfigDict)
                                else cfg[s] for s in sections}, default=list))


def check_or_record(cfg, sections: Iterable[str], path: str,
                    may_change: Callable[[str, Any, Any], bool] | None = None) -> list[str]:
  """Records the given config sections at `path`, or checks they match a previous record.

  A workdir holding a run of another config is an error (resuming it with
  other settings would silently mix two experiments). Keys for which
  `may_change(key, recorded, current)` is true (e.g. a stage's `steps`, made
  larger to train longer) may differ: the record is then updated.

  Returns:
    The changes recorded, as "key: old -> new" (empty for a new or same record).
  """
  sections = list(sections)
  current = section_dict(cfg, sections)
  changed = []
  if os.path.exists(path):
    try:
      with open(path) as f:
        previous = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise UserError(f"{path}: unreadable run config ({e}); remove it or use another --workdir") from e
    diffs = _diff(previous, current)
    allowed = [k for k in diffs if may_change is not None
               and may_change(k, _get(previous, k), _get(current, k))]
    refused = [k for k in diffs if k not in allowed]
    if refused:
      shown = ", ".join(refused[:6]) + (" ..." if len(refused) > 6 else "")
      raise UserError(f"workdir {os.path.dirname(path) or '.'} holds a run of another config "
                      f"(differs in {shown}); use a new --workdir or the same config")
    if not allowed:
      return []
    changed = [f"{k}: {_get(previous, k)!r} -> {_get(current, k)!r}" for k in allowed]
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(current, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return changed


def _get(tree, dotted: str):
  for part in dotted.split("."):
    tree = tree.get(part) if isinstance(tree, dict) else None
  return tree


def _diff(a, b, prefix="") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [prefix.rstrip(".")]
